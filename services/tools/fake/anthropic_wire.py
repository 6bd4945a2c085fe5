"""The Anthropic Messages API as the fake provider speaks it: request, reply, stream, errors.

Values in, bytes (or JSON-ready dicts) out; the server does the I/O.

``POST /v1/messages`` answers JSON or SSE (``"stream": true``): ``message_start``,
``ping``, ``content_block_start``, one ``content_block_delta`` per word,
``content_block_stop``, ``message_delta`` (stop reason, output tokens), ``message_stop``.
A reply cut at ``max_tokens`` stops with ``stop_reason="max_tokens"``, otherwise
``"end_turn"``. The trigger field is ``metadata.user_id``.

Error types by status: 400 ``invalid_request_error``, 401 ``authentication_error``,
402 ``billing_error``, 403 ``permission_error``, 404 ``not_found_error``,
408 ``timeout_error``, 409 ``conflict_error``, 413 ``request_too_large``,
429 ``rate_limit_error``, 500/502/503 ``api_error``, 504 ``timeout_error``,
529 ``overloaded_error``.

``GET /v1/models`` (with an ``anthropic-version`` header) pages the model list with
``after_id``, ``before_id`` and ``limit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from services.tools.fake.echo import Block, count_words, pieces

_encode = msgspec.json.Encoder().encode


class Message(msgspec.Struct):
    """One message of a request."""

    role: str
    content: str | list[Block]


class Metadata(msgspec.Struct):
    """The request's ``metadata``; ``user_id`` may hold a fault trigger."""

    user_id: str | None = None


class Request(msgspec.Struct):
    """What the fake reads of a Messages request (other keys are ignored)."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None
    stream: bool = False
    metadata: Metadata | None = None
    system: str | list[Block] | None = None


decode_request: Final = msgspec.json.Decoder(Request).decode


class CloudRequest(msgspec.Struct):
    """A Messages request on a cloud door (Bedrock, Vertex): the model is in the path."""

    messages: list[Message]
    max_tokens: int | None = None
    metadata: Metadata | None = None
    system: str | list[Block] | None = None


decode_cloud_request: Final = msgspec.json.Decoder(CloudRequest).decode


def input_tokens(req: Request) -> int:
    """The words of every message and the system prompt (at least 1)."""
    return count_words([m.content for m in req.messages] + [req.system])


# --------------------------------------------------------------------------- errors


_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Payment required."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    408: ("timeout_error", "Request timed out."),
    409: ("conflict_error", "Conflict."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


def error_body(status: int, message: str | None = None) -> bytes:
    """The error body of ``status`` (its default message unless ``message``)."""
    kind, default = _ERRORS.get(
        status,
        ("api_error", "Internal server error")
        if status >= 500
        else ("invalid_request_error", "Request failed."),
    )
    return _encode({"type": "error", "error": {"type": kind, "message": message or default}})


def spend_limit(with_429: bool) -> tuple[int, bytes]:
    """Status and body of ``fault:spend_limit`` (400 ``billing_error``) or, ``with_429``,
    of ``fault:spend_limit_429`` (429 with ``enforced_spend_limit_reached``)."""
    if not with_429:
        error: dict[str, Any] = {
            "type": "billing_error",
            "message": "Your credit balance is too low to access the Anthropic API.",
        }
        status = 400
    else:
        error = {
            "type": "rate_limit_error",
            "message": "You have reached your organization's spend limit.",
            "details": {"error_code": "enforced_spend_limit_reached"},
        }
        status = 429
    return status, _encode({"type": "error", "error": error})


def error_with_success(kind: str) -> bytes:
    """An error object of type ``kind`` to send with status 200 (``fault:error_200``)."""
    error = {"type": kind, "message": "an error with a success status"}
    return _encode({"type": "error", "error": error})


MIDSTREAM_ERROR: Final = (
    b"event: error\ndata: "
    + _encode({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    + b"\n\n"
)
"""The event that breaks off a stream (``fault:midstream``)."""


# --------------------------------------------------------------------------- replies


PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'
_BLOCK_START: Final = (
    b"event: content_block_start\ndata: "
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)
_BLOCK_STOP: Final = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(data) + b"\n\n"


def stop_reason(cut: bool) -> str:
    """``max_tokens`` for a reply cut at the limit, else ``end_turn``."""
    return "max_tokens" if cut else "end_turn"


def message(
    req: Request, message_id: str, text: str, reason: str, in_tokens: int, out_tokens: int
) -> bytes:
    """The JSON reply: one text block."""
    return _encode(
        {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": reason,
            "stop_sequence": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens},
        }
    )


def message_events(
    req: Request, message_id: str, text: str, reason: str, in_tokens: int, out_tokens: int
) -> list[bytes]:
    """The streamed reply, one SSE event per item (a text delta per word)."""
    start = {
        "type": "message_start",
        "message": {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": 1},
        },
    }
    events = [_sse("message_start", start), PING, _BLOCK_START]
    events.extend(
        _sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece},
            },
        )
        for piece in pieces(text)
    )
    events.append(_BLOCK_STOP)
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": None},
                "usage": {"output_tokens": out_tokens},
            },
        )
    )
    events.append(_MESSAGE_STOP)
    return events


# --------------------------------------------------------------------------- models


def model_entry(model_id: str) -> dict[str, Any]:
    """One model of ``GET /v1/models``."""
    return {
        "type": "model",
        "id": model_id,
        "display_name": f"Fake {model_id}",
        "created_at": "2025-01-01T00:00:00Z",
        "lifecycle": "active",
    }


def models_page(models: list[str], query: Mapping[str, str]) -> dict[str, Any]:
    """The page of ``models`` that ``after_id``, ``before_id`` and ``limit`` ask for."""
    after, before = query.get("after_id"), query.get("before_id")
    try:
        limit = max(1, min(int(query.get("limit", "20")), 1000))
    except ValueError:
        limit = 20
    if after in models:
        window = models[models.index(after) + 1 :]
        page, more = window[:limit], len(window) > limit
    elif before in models:
        window = models[: models.index(before)]
        page, more = window[-limit:], len(window) > limit
    else:
        page, more = models[:limit], len(models) > limit
    return {
        "data": [model_entry(m) for m in page],
        "has_more": more,
        "first_id": page[0] if page else None,
        "last_id": page[-1] if page else None,
    }
