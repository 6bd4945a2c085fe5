"""The OpenAI Chat Completions API as the fake provider speaks it: request, reply, stream,
errors.

Values in, bytes (or JSON-ready dicts) out; the server does the I/O.

``POST /v1/chat/completions`` answers JSON or SSE: ``chat.completion.chunk`` events (the
role, one content delta per word, the finish reason), a final usage chunk when
``stream_options.include_usage`` is true, then ``data: [DONE]``. The limit is
``max_completion_tokens``, else ``max_tokens``; a reply cut there finishes with
``finish_reason="length"``, otherwise ``"stop"``. The trigger field is ``user``.

Errors are ``{"error": {"message", "type", "param", "code"}}``: 401 ``invalid_api_key``,
404 ``model_not_found``, 429 ``rate_limit_exceeded``, 5xx ``server_error`` (529
``overloaded``), and so on. ``GET /v1/models`` lists every model at once.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from services.tools.fake.echo import Block, count_words, pieces

_encode = msgspec.json.Encoder().encode


class Message(msgspec.Struct):
    """One message of a request."""

    role: str
    content: str | list[Block] | None = None


class StreamOptions(msgspec.Struct):
    """The request's ``stream_options``."""

    include_usage: bool = False


class Request(msgspec.Struct):
    """What the fake reads of a Chat Completions request (other keys are ignored)."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


decode_request: Final = msgspec.json.Decoder(Request).decode


def token_limit(req: Request) -> int | None:
    """``max_completion_tokens``, else ``max_tokens``."""
    limit = req.max_completion_tokens
    if limit is None:
        limit = req.max_tokens
    return limit


def input_tokens(req: Request) -> int:
    """The words of every message (at least 1)."""
    return count_words([m.content for m in req.messages])


# --------------------------------------------------------------------------- errors


_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to use this resource."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    413: ("invalid_request_error", "request_too_large", "Request too large."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
    504: ("timeout", None, "Request timed out."),
    529: ("server_error", "overloaded", "The server is overloaded."),
}


def error_body(status: int, message: str | None = None) -> bytes:
    """The error body of ``status`` (its default message unless ``message``)."""
    kind, code, default = _ERRORS.get(
        status,
        ("server_error", None, "Server error.")
        if status >= 500
        else ("invalid_request_error", None, "Request failed."),
    )
    return _encode(
        {"error": {"message": message or default, "type": kind, "param": None, "code": code}}
    )


def spend_limit() -> tuple[int, bytes]:
    """Status and body of ``fault:spend_limit`` and ``fault:spend_limit_429`` alike: 429
    ``insufficient_quota``."""
    body = _encode(
        {
            "error": {
                "message": "You exceeded your current quota, please check your plan "
                "and billing details.",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
    )
    return 429, body


def error_with_success(kind: str) -> bytes:
    """An error object of type ``kind`` to send with status 200 (``fault:error_200``)."""
    error = {"type": kind, "message": "an error with a success status"}
    return _encode({"error": error})


MIDSTREAM_ERROR: Final = (
    b"data: "
    + _encode(
        {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    )
    + b"\n\n"
)
"""The chunk that breaks off a stream (``fault:midstream``)."""


# --------------------------------------------------------------------------- replies


KEEPALIVE: Final = b": keepalive\n\n"
"""An SSE comment: what a stalled stream sends (``fault:stall``)."""
_SSE_DONE: Final = b"data: [DONE]\n\n"


def finish_reason(cut: bool) -> str:
    """``length`` for a reply cut at the limit, else ``stop``."""
    return "length" if cut else "stop"


def token_usage(in_tokens: int, out_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": in_tokens,
        "completion_tokens": out_tokens,
        "total_tokens": in_tokens + out_tokens,
    }


def completion(
    req: Request,
    completion_id: str,
    created: int,
    text: str,
    reason: str,
    usage: dict[str, int],
) -> bytes:
    """The JSON reply: one choice."""
    return _encode(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            ],
            "usage": usage,
        }
    )


def completion_events(
    req: Request,
    completion_id: str,
    created: int,
    text: str,
    reason: str,
    usage: dict[str, int],
) -> list[bytes]:
    """The streamed reply, one SSE ``data:`` line per item (a content delta per word)."""

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        return (
            b"data: "
            + _encode(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "logprobs": None,
                            "finish_reason": finish,
                        }
                    ],
                }
            )
            + b"\n\n"
        )

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events.extend(chunk({"content": piece}, None) for piece in pieces(text))
    events.append(chunk({}, reason))
    if req.stream_options is not None and req.stream_options.include_usage:
        usage_chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": [],
            "usage": usage,
        }
        events.append(b"data: " + _encode(usage_chunk) + b"\n\n")
    events.append(_SSE_DONE)
    return events


# --------------------------------------------------------------------------- models


def model_entry(model_id: str) -> dict[str, Any]:
    """One model of ``GET /v1/models``."""
    return {"id": model_id, "object": "model", "created": 1735689600, "owned_by": "fake"}


def models_list(models: list[str]) -> dict[str, Any]:
    """``GET /v1/models``: every model."""
    return {"object": "list", "data": [model_entry(m) for m in models]}
