"""The secret values this process knows, and ``scrub``, which hides them in any text.

Text that leaves a process can carry what an upstream wrote: a proxy's error page
that quotes the request's key, an SDK's debug line that prints response headers.
That text reaches ``ProviderError`` messages, and through them dead letters,
``failed`` results, ``dead show`` and logs. Keys come in many shapes, so matching
their look (``sk-...``) is not enough: every process registers the secrets its
settings hold (``register_settings``, called where providers are built and where
NATS connection options are made, the two places every process goes through), and
``scrub`` replaces each of them by value. A pattern for key-shaped strings and
auth-header values still runs after, for credentials this process was never told.

Values shorter than ``MIN_LENGTH`` characters are not registered: replacing every
``unused`` or ``admin`` in every message would mangle ordinary text, and a secret
that short is not kept secret by scrubbing anyway.

``ScrubFilter`` applies ``scrub`` to log records (message, exception and stack
text); ``scrub_logs`` installs it on the root logger's handlers, which the
services' logging setup (``services/runner.py``) does.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from services.errors import ConfigError

if TYPE_CHECKING:
    from services.config import Settings

#: Shortest value registered as a secret (see the module docstring).
MIN_LENGTH = 8

#: What a secret is replaced with.
MASK = "***"

# Strings that look like a key or an auth header's value, whoever's they are.
_SHAPES = re.compile(
    r"(?i)(?P<key>\bsk-[A-Za-z0-9_-]{6,})"
    r"|(?P<label>\bbearer\s+"
    r"|\b(?:x-api-key|api[_-]key|authorization)['\"]?\s*[:=]\s*['\"]?(?:bearer\s+)?)"
    r"[^\s'\",}]+"
)

# An nkey seed (user, account, operator...): "S", its kind, then base32.
_SEED = re.compile(r"\bS[A-Z][A-Z2-7]{40,}\b")


def _hide_shape(m: re.Match[str]) -> str:
    return "sk-" + MASK if m.group("key") else m.group("label") + MASK


def _forms(value: str) -> Iterator[str]:
    """``value`` as it may appear in text: as is, escaped in a repr or JSON, URL-quoted."""
    yield value
    yield repr(value)[1:-1]
    yield json.dumps(value)[1:-1]
    yield quote(value, safe="")


class Secrets:
    """A set of secret values, and one compiled pattern that matches any of them.

    Each value is kept in the forms it may be written in (as is, escaped by ``repr``
    or JSON, URL-quoted). The pattern is rebuilt when a new value arrives (rare: at
    start-up), never on ``scrub``, which runs on error paths and log records.
    """

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def register(self, *values: str | None) -> None:
        """Add ``values`` (``None`` and values shorter than ``MIN_LENGTH`` are skipped)."""
        new = {form for v in values if v and len(v) >= MIN_LENGTH for form in _forms(v)}
        with self._lock:
            if new <= self._values:
                return
            grown = self._values | new
            # Longest first: a secret that contains another is replaced whole.
            ordered = sorted(grown, key=lambda v: (-len(v), v))
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
            self._values = grown

    def scrub(self, text: str) -> str:
        """``text`` with every registered secret, and anything shaped like a key, hidden."""
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return _SHAPES.sub(_hide_shape, text)


#: The secrets of this process.
KNOWN = Secrets()


def register(*values: str | None) -> None:
    """Add ``values`` to the secrets of this process."""
    KNOWN.register(*values)


def scrub(text: str) -> str:
    """``text`` with every secret this process knows, and anything shaped like a key, hidden."""
    return KNOWN.scrub(text)


def register_settings(settings: Settings, into: Secrets = KNOWN) -> None:
    """Register every secret ``settings`` hold: each provider's API key (from the
    settings, the environment or its ``api_key_file``), the NATS password or token,
    the seed in the NATS creds or nkey seed file, and a password in a server URL.

    Unreadable files are skipped: what was not read cannot leak, and the code that
    needs the file reports it.
    """
    into.register(*_settings_secrets(settings))


def _settings_secrets(settings: Settings) -> Iterator[str | None]:
    for name, p in settings.providers.items():
        yield _provider_key(settings, name)
        # A cloud door's own credentials (Bedrock's secret key and session token, a Vertex
        # access token), from the settings or their files.
        for secret in (p.aws_secret_access_key, p.aws_session_token, p.gcp_access_token):
            yield secret.get_secret_value() if secret is not None else None
        for path in (p.aws_secret_access_key_file, p.gcp_access_token_file):
            text = _read(path)
            yield text.strip() if text is not None else None
    for secret in (settings.anthropic_api_key, settings.openai_api_key):
        yield secret.get_secret_value() if secret is not None else None
    n = settings.nats
    for secret in (n.password, n.token):
        yield secret.get_secret_value() if secret is not None else None
    # A creds file holds a JWT (sent to the server, not secret on its own) and the seed.
    yield from _seeds(_read(n.creds_file))
    seed_file = _read(n.nkey_seed_file)
    yield seed_file.strip() if seed_file is not None else None
    yield from _seeds(seed_file)
    yield from _url_secrets(settings.nats_servers)
    yield from _notify_secrets(settings)


def _notify_secrets(settings: Settings) -> Iterator[str | None]:
    """The notifier's sink URLs and keys (from the settings or their files)."""
    n = settings.notify
    for value, path in (
        (n.webhook_url, n.webhook_url_file),
        (n.webhook_secret, n.webhook_secret_file),
        (n.slack_webhook_url, n.slack_webhook_url_file),
        (n.pagerduty_routing_key, n.pagerduty_routing_key_file),
    ):
        if value is not None:
            yield value.get_secret_value()
        else:
            text = _read(path)
            yield text.strip() if text is not None else None


def _provider_key(settings: Settings, name: str) -> str | None:
    try:
        return settings.provider_key(name)
    except ConfigError:
        return None


def _read(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _seeds(text: str | None) -> list[str]:
    return _SEED.findall(text) if text else []


def _url_secrets(urls: Iterable[str]) -> Iterator[str]:
    """The password (``user:password@``) or token (``token@``) in each server URL."""
    for url in urls:
        try:
            parts = urlsplit(url)
            secret = parts.password if parts.password is not None else parts.username
        except ValueError:
            continue
        if secret:
            yield secret
            yield unquote(secret)


class ScrubFilter(logging.Filter):
    """Rewrites each record so that its message, exception and stack text are scrubbed.

    On a handler, it sees every record the handler emits, whichever logger made it
    (the SDKs' own loggers included). The record is rewritten in place, so handlers
    after it get the clean text too.
    """

    def __init__(self, secrets: Secrets = KNOWN) -> None:
        super().__init__()
        self._secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub ``record``; never drops it."""
        if getattr(record, "_ridethrough_scrubbed", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler would print msg and args
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = self._secrets.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._secrets.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self._secrets.scrub(record.stack_info)
        record.__dict__["_ridethrough_scrubbed"] = True
        return True


def scrub_logs(logger: logging.Logger | None = None) -> None:
    """Install a ``ScrubFilter`` on every handler of ``logger`` (the root logger by
    default) that has none yet."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
