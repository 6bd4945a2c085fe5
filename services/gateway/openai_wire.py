"""The OpenAI Chat Completions API as the gateway speaks it: the checks a request body must
pass before it becomes a job, OpenAI's error shape, and what a failed job answers.

Pure functions: no I/O, table-tested.
"""

from __future__ import annotations

import msgspec

from schemas.results import JobResult
from services.gateway.anthropic_wire import (
    BadRequest,
    ParsedRequest,
    decode_object,
    failure_reason,
)

#: OpenAI's error ``type`` by HTTP status (its API answers these; the SDK raises its
#: exception class from the status, and retries 408, 409, 429 and 5xx).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout",
}

#: What a job that ended in a dead letter answers, by the letter's reason:
#: (status, OpenAI error type, code). A reason not listed is a 500 ``server_error``.
FAILURES: dict[str, tuple[int, str, str | None]] = {
    "invalid_request": (400, "invalid_request_error", None),
    "invalid": (400, "invalid_request_error", None),
    "refused": (400, "invalid_request_error", None),
    "unmappable": (400, "invalid_request_error", None),
    "not_found": (404, "invalid_request_error", "model_not_found"),
    "too_large": (413, "invalid_request_error", "request_too_large"),
    "response_too_large": (500, "server_error", None),
    "quota": (429, "insufficient_quota", "insufficient_quota"),
    "auth": (500, "server_error", None),
    "config": (500, "server_error", None),
    "provider_outage": (503, "server_error", "overloaded"),
    "retries_exhausted": (500, "server_error", None),
    "expired": (504, "timeout", "job_expired"),
}

#: Fields of a request that belong to the call, not the job: the worker makes the call
#: whole (``stream``), and the API refuses ``stream_options`` without ``stream``.
_CALL_ONLY = ("model", "stream", "stream_options")


def parse_chat_request(body: bytes) -> ParsedRequest:
    """Check the parts of a Chat Completions body the gateway relies on; ``BadRequest``
    says what is wrong. The provider checks the rest."""
    data = decode_object(body)
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a non-empty string is required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("stream: must be a boolean")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options: must be an object")
    if options is not None and not stream:
        raise BadRequest("stream_options: only allowed when stream is true")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise BadRequest("stream_options.include_usage: must be a boolean")
    request = {k: v for k, v in data.items() if k not in _CALL_ONLY}
    return ParsedRequest(model=model, request=request, stream=stream, include_usage=include_usage)


def error_body(
    status: int, message: str, error_type: str | None = None, code: str | None = None
) -> bytes:
    """OpenAI's error shape: ``{"error":{"message":...,"type":...,"param":null,"code":...}}``."""
    kind = error_type or ERROR_TYPES.get(status, "server_error")
    if code is None and status == 401:
        code = "invalid_api_key"
    return msgspec.json.encode(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    )


def door_error_body(status: int, message: str, error_type: str | None = None) -> bytes:
    """``error_body`` for the gateway's shared paths, which name Anthropic's error types:
    its ``overloaded_error`` (a wait that ran out) is OpenAI's ``server_error``, code
    ``overloaded``; other types are left to the status."""
    if error_type == "overloaded_error":
        return error_body(status, message, "server_error", "overloaded")
    return error_body(status, message)


def failure(result: JobResult) -> tuple[int, bytes]:
    """The status and error body of a job that did not succeed."""
    reason, message = failure_reason(result)
    status, kind, code = FAILURES.get(reason, (500, "server_error", None))
    return status, error_body(status, message, kind, code)
