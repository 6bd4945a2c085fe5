"""The Anthropic Messages API as the gateway speaks it: the checks a request body must
pass before it becomes a job, Anthropic's error shape, and what a failed job answers.

Pure functions: no I/O, table-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.results import JobResult

#: Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

#: What a job that ended in a dead letter answers, by the letter's reason (the worker's
#: classification of the provider's error): (status, Anthropic error type). A reason not
#: listed is a 500 ``api_error``. The provider's credentials are ridethrough's, not the
#: caller's: a provider ``auth`` failure is ridethrough's fault (500), never a 401.
FAILURES: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "invalid": (400, "invalid_request_error"),
    "refused": (400, "invalid_request_error"),
    "unmappable": (400, "invalid_request_error"),
    "not_found": (404, "not_found_error"),
    "too_large": (413, "request_too_large"),
    "response_too_large": (500, "api_error"),
    "quota": (402, "billing_error"),
    "auth": (500, "api_error"),
    "config": (500, "api_error"),
    "provider_outage": (529, "overloaded_error"),
    "retries_exhausted": (500, "api_error"),
    "expired": (504, "timeout_error"),
}


class BadRequest(Exception):
    """A request body the gateway refuses (a 400 ``invalid_request_error``)."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A checked request body: its model, the rest of it (the job's ``request``: the body
    without ``model`` and what only concerns the call, like ``stream``), and how the
    answer is sent (``stream``; OpenAI's ``stream_options.include_usage``)."""

    model: str
    request: dict[str, Any]
    stream: bool = False
    include_usage: bool = False


def decode_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; ``BadRequest`` when it is not one."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def parse_messages_request(body: bytes) -> ParsedRequest:
    """Check the parts of a Messages body the gateway relies on; ``BadRequest`` says what is
    wrong. The provider checks the rest (a job it refuses ends as a 400 all the same)."""
    data = decode_object(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a non-empty string is required")
    max_tokens = data.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens: a positive integer is required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be a boolean")
    request = {k: v for k, v in data.items() if k not in ("model", "stream")}
    return ParsedRequest(model=model, request=request, stream=stream)


def error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    """Anthropic's error shape: ``{"type":"error","error":{"type":...,"message":...}}``."""
    kind = error_type or ERROR_TYPES.get(status, "api_error")
    return msgspec.json.encode({"type": "error", "error": {"type": kind, "message": message}})


def failure(result: JobResult) -> tuple[int, bytes]:
    """The status and error body of a job that did not succeed."""
    reason, message = failure_reason(result)
    status, kind = FAILURES.get(reason, (500, "api_error"))
    return status, error_body(status, message, kind)


def failure_reason(result: JobResult) -> tuple[str, str]:
    """Why a job did not succeed (its dead letter's reason, or ``expired``), and the
    message its error answer carries (naming the job)."""
    reason = result.error.type if result.error is not None else result.status
    if result.status == "expired":
        reason = "expired"
    detail = result.error.message if result.error is not None else result.status
    return reason, f"job {result.job_id} {result.status} ({reason}): {detail}"
