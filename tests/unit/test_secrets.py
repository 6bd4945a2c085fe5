"""Secrets hidden by value: keys of any shape, in text, reprs, JSON, errors and log records."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from services import secrets
from services.config import NatsSettings, ProviderSettings, Settings
from services.errors import ProviderError
from services.providers import anthropic as anthropic_adapter
from services.secrets import MASK, ScrubFilter, Secrets

ODD_KEYS = [
    "Zq9-Xx_4444-abcd.efgh",  # no sk- prefix, dots and dashes
    "dGhpcyBpcyBhIGtleQ+/AbC==",  # base64 with + / =
    "a+b(c)*d[e]$f^g|h?i{2}\\j",  # every regex metacharacter, a backslash
    "quote'and\"double-quote",  # escaped differently by repr and JSON
    "ключ-секрет-ünïcode",  # escaped by JSON (\uXXXX) and by URL quoting
]


def _known(*values: str) -> Secrets:
    known = Secrets()
    known.register(*values)
    return known


@pytest.mark.parametrize("key", ODD_KEYS)
def test_a_registered_key_of_any_shape_is_hidden_in_text_repr_and_json(key: str) -> None:
    """A key that looks like nothing in particular is replaced wherever it is written."""
    known = _known(key)
    texts = {
        "text": f"invalid credential {key} for this endpoint",
        "repr": repr({"headers": [("x-api-key", key)], "status": 401}),
        "json": json.dumps({"error": {"message": f"key {key} rejected"}}),
        "json ascii": json.dumps({"k": key}, ensure_ascii=False),
        "bytes repr": repr([(b"x-api-key", key.encode())]) if key.isascii() else "",
        "twice": f"{key}{key} and {key}",
    }
    for where, text in texts.items():
        clean = known.scrub(text)
        assert key not in clean, where
        assert repr(key)[1:-1] not in clean, where
        assert json.dumps(key)[1:-1] not in clean, where
    assert known.scrub(texts["text"]) == "invalid credential *** for this endpoint"


def test_text_without_secrets_is_left_alone() -> None:
    """Ordinary text, and text naming a header without a value, comes back unchanged."""
    known = _known("Zq9-Xx_4444-abcd.efgh")
    for text in ("invalid x-api-key", "Zq9-Xx_4444", "job 42 dead-lettered (auth): 401", ""):
        assert known.scrub(text) == text


def test_the_key_shapes_are_still_caught_without_registration() -> None:
    """A key nobody registered is still hidden when it looks like one (sk-..., Bearer ...)."""
    known = Secrets()
    assert known.scrub("bad key sk-abcdef123456") == "bad key sk-***"
    assert known.scrub("Authorization: Bearer whatever-token") == "Authorization: Bearer ***"


def test_short_values_are_not_registered() -> None:
    """Values under MIN_LENGTH (and None, "") would mangle text: they are skipped."""
    known = _known("unused", "admin", "", "1234567")
    known.register(None)
    assert len(known) == 0
    assert known.scrub("admin unused 1234567") == "admin unused 1234567"


def test_a_longer_secret_containing_another_is_hidden_whole() -> None:
    """Two secrets, one inside the other: no tail of the longer one survives."""
    known = _known("abcdefgh", "abcdefgh-and-more")
    assert known.scrub("x abcdefgh-and-more y abcdefgh") == "x *** y ***"


def test_registering_the_same_values_again_keeps_the_pattern() -> None:
    """The pattern is compiled when the set grows, not on every registration."""
    known = _known("Zq9-Xx_4444-abcd.efgh")
    pattern = known._pattern
    known.register("Zq9-Xx_4444-abcd.efgh", "short")
    assert known._pattern is pattern
    known.register("another-secret-value")
    assert known._pattern is not pattern
    assert known.scrub("another-secret-value Zq9-Xx_4444-abcd.efgh") == "*** ***"


def test_settings_register_every_secret_they_hold(tmp_path: Path) -> None:
    """Provider keys (inline, from a file, from the SDK variables), the NATS password,
    the seed of a creds file and a password in a server URL are all registered."""
    key_file = tmp_path / "key"
    key_file.write_text("file-key-Zq9.efgh\n")
    seed = "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4"
    creds = tmp_path / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.sig\n------END NATS USER JWT------\n"
        f"\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    settings = Settings(
        providers={
            "a": ProviderSettings(kind="anthropic", api_key_file=key_file),
            "b": ProviderSettings(kind="openai", api_key=SecretStr("inline-key-1234")),
            "c": ProviderSettings(kind="openai", api_key_file=tmp_path / "missing"),
        },
        openai_api_key=SecretStr("env-openai-key-5678"),
        nats=NatsSettings(creds_file=creds),
        nats_url="nats://ops:url-password-99@127.0.0.1:4222",
    )
    known = Secrets()
    secrets.register_settings(settings, into=known)
    for value in (
        "file-key-Zq9.efgh",
        "inline-key-1234",
        "env-openai-key-5678",
        seed,
        "url-password-99",
    ):
        assert value in known, value
    assert "eyJ0eXAiOiJKV1QifQ.e30.sig" not in known  # the JWT is not secret on its own

    token = Settings(nats=NatsSettings(token=SecretStr("nats-token-abcdef")))
    secrets.register_settings(token, into=known)
    assert known.scrub("token nats-token-abcdef") == "token ***"


def test_provider_error_messages_hide_registered_keys() -> None:
    """classify builds its messages with the process's secrets hidden (the global set)."""
    key = "Qw7.rT-unregistered-shape-0001"
    secrets.register(key)
    exc = ValueError(f"invalid credential '{key}' for this endpoint")
    error = anthropic_adapter.classify(exc)
    assert isinstance(error, ProviderError)
    assert key not in error.message and key not in str(error)
    assert "'***'" in error.message


@pytest.fixture
def scrubbed_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose handler carries a ScrubFilter, and the stream it writes to."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("test_secrets.sdk")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    secrets.scrub_logs(logger)
    secrets.scrub_logs(logger)  # idempotent: one filter per handler
    assert sum(isinstance(f, ScrubFilter) for f in handler.filters) == 1
    yield logger, stream
    logger.removeHandler(handler)


def test_log_records_are_scrubbed_in_message_args_and_traceback(
    scrubbed_log: tuple[logging.Logger, io.StringIO],
) -> None:
    """An SDK-style debug line printing headers, and a traceback quoting the key, come out
    of the handler with the key hidden."""
    logger, stream = scrubbed_log
    key = "log-key.Zq9-Xx_4444+/="
    secrets.register(key)
    logger.debug('HTTP Response: %s "%i" %s', "POST /v1", 401, {"x-echo": key})
    try:
        raise RuntimeError(f"upstream said: bad key {key}")
    except RuntimeError:
        logger.exception("call failed for %r", key)
    logger.info("stack of %s", key, stack_info=True)
    text = stream.getvalue()
    assert "HTTP Response" in text and "RuntimeError: upstream said: bad key ***" in text
    assert key not in text


def test_a_record_with_bad_arguments_is_still_scrubbed_and_emitted(
    scrubbed_log: tuple[logging.Logger, io.StringIO],
) -> None:
    """A format string that does not match its arguments is written raw, key hidden,
    instead of raising in the filter."""
    logger, stream = scrubbed_log
    key = "bad-args-key-Zq9.efgh"
    secrets.register(key)
    logger.warning("two %s %s", key)
    text = stream.getvalue()
    assert "two" in text and key not in text


def test_the_services_logging_setup_installs_the_filter() -> None:
    """The logging setup every service runs (worker, prober, replayer, dev) puts a
    ScrubFilter on the root handlers."""
    from services.runner import configure_logging

    root = logging.getLogger()
    before = list(root.handlers)
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    levels = {n: logging.getLogger(n).level for n in ("nats", "faststream", "httpx", "httpx2")}
    levels["aiohttp.access"] = logging.getLogger("aiohttp.access").level
    try:
        configure_logging(verbose=False)
        assert all(any(isinstance(f, ScrubFilter) for f in h.filters) for h in root.handlers)
    finally:
        for h in root.handlers:
            for f in [f for f in h.filters if isinstance(f, ScrubFilter)]:
                h.removeFilter(f)
        root.handlers[:] = before
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_the_mask_is_short_and_fixed() -> None:
    """The replacement names nothing about the secret (not its length, not its start)."""
    assert MASK == "***"
    known = _known("a-very-long-secret-value-" + "x" * 100)
    assert known.scrub("a-very-long-secret-value-" + "x" * 100) == MASK
