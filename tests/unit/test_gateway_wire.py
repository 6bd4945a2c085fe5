"""The gateway's pure parts: Messages body checks, failure mapping, keys."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from schemas.results import ErrorInfo, JobResult
from services.config import GatewaySettings
from services.errors import ConfigError
from services.gateway.anthropic_wire import BadRequest, failure, parse_messages_request
from services.gateway.keys import KeyRing, key_digest, read_keys_file

GOOD = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def test_a_good_body_becomes_model_and_request_without_model_and_stream() -> None:
    """model travels apart; stream: false is dropped with it; everything else is kept."""
    body = msgspec.json.encode({**GOOD, "stream": False, "temperature": 0.5})
    parsed = parse_messages_request(body)
    assert parsed.model == "m"
    assert parsed.request == {
        "max_tokens": 5,
        "messages": GOOD["messages"],
        "temperature": 0.5,
    }
    assert parsed.stream is False
    assert parse_messages_request(msgspec.json.encode({**GOOD, "stream": True})).stream


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (msgspec.json.encode({**GOOD, "model": ""}), "model"),
        (msgspec.json.encode({**GOOD, "model": 3}), "model"),
        (msgspec.json.encode({**GOOD, "max_tokens": True}), "max_tokens"),
        (msgspec.json.encode({**GOOD, "max_tokens": 0}), "max_tokens"),
        (msgspec.json.encode({**GOOD, "messages": []}), "messages"),
        (msgspec.json.encode({**GOOD, "stream": "yes"}), "stream"),
    ],
)
def test_a_bad_body_is_a_bad_request_naming_the_field(body: bytes, says: str) -> None:
    """Each refusal names what is wrong."""
    with pytest.raises(BadRequest, match=says):
        parse_messages_request(body)


@pytest.mark.parametrize(
    ("status", "reason", "code", "kind"),
    [
        ("failed", "invalid_request", 400, "invalid_request_error"),
        ("failed", "not_found", 404, "not_found_error"),
        ("failed", "too_large", 413, "request_too_large"),
        ("failed", "quota", 402, "billing_error"),
        ("failed", "auth", 500, "api_error"),
        ("failed", "retries_exhausted", 500, "api_error"),
        ("failed", "provider_outage", 529, "overloaded_error"),
        ("failed", "something_new", 500, "api_error"),
        ("expired", "expired", 504, "timeout_error"),
    ],
)
def test_a_failed_job_answers_its_reasons_status_and_type(
    status: str, reason: str, code: int, kind: str
) -> None:
    """A dead letter's reason maps to Anthropic's status and error type; the message names
    the job."""
    result = JobResult(
        job_id="j1",
        status=status,  # type: ignore[arg-type]
        provider="anthropic",
        model="m",
        error=ErrorInfo(type=reason, message="why"),
    )
    got, body = failure(result)
    decoded = msgspec.json.decode(body)
    assert got == code
    assert decoded["type"] == "error"
    assert decoded["error"]["type"] == kind
    assert "j1" in decoded["error"]["message"]


def test_keys_are_looked_up_by_digest_from_settings_and_file(tmp_path: Path) -> None:
    """A key's tenant comes from its SHA-256 digest; the file's lines add keys; an unknown
    or missing key has no tenant."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# gateway keys\n{key_digest('k2')} globex  # ops\n\n")
    ring = KeyRing.from_settings(
        GatewaySettings(keys={key_digest("k1"): "acme"}, keys_file=keys_file)
    )
    assert (ring.tenant("k1"), ring.tenant("k2")) == ("acme", "globex")
    assert ring.tenant("k3") is None
    assert ring.tenant(None) is None
    assert ring.tenant("") is None


@pytest.mark.parametrize("line", ["k1 acme", f"{key_digest('k')} a.b", key_digest("k")])
def test_a_keys_file_line_that_is_no_digest_and_tenant_is_refused(
    tmp_path: Path, line: str
) -> None:
    """A clear key, a tenant that is no subject token, a missing tenant: ConfigError."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(line + "\n")
    with pytest.raises(ConfigError, match=":1:"):
        read_keys_file(keys_file)


def test_settings_refuse_a_clear_key() -> None:
    """gateway.keys takes digests only."""
    with pytest.raises(ValueError, match="SHA-256"):
        GatewaySettings(keys={"sk-clear-key": "acme"})
