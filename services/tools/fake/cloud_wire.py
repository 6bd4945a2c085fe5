"""The Messages API as Amazon Bedrock and Google Vertex AI serve it, for the fake provider.

The doors differ from the first party only in their envelope; the message, its stream
events and its usage are the same:

Bedrock
    ``POST /model/{modelId}/invoke`` answers the message JSON;
    ``POST /model/{modelId}/invoke-with-response-stream`` answers an AWS event stream
    (``application/vnd.amazon.eventstream``): one binary frame per Messages event, each
    a prelude (total length, headers length, CRC32 of those 8 bytes), headers
    (``:event-type`` ``chunk``, ``:content-type``, ``:message-type`` ``event``), the
    payload ``{"bytes": base64(event JSON)}`` and a CRC32 of all that came before. An
    error after the stream began is an ``exception`` frame. The body carries
    ``anthropic_version`` (and ``anthropic_beta``) and neither ``model`` nor ``stream``.
    Errors: the status, ``x-amzn-errortype: <Name>Exception:...`` and ``{"message"}``.
Vertex AI
    ``POST /v1/projects/{p}/locations/{r}/publishers/anthropic/models/{m}:rawPredict``
    (JSON) and ``...:streamRawPredict`` (SSE, as the first party). The body carries
    ``anthropic_version`` and no ``model``. Errors: Google's ``{"error": {"code",
    "message", "status"}}``, except a 529, which Vertex passes on in Anthropic's shape.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Final

import msgspec

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.decode

EVENTSTREAM: Final = "application/vnd.amazon.eventstream"
_AMZN_SUFFIX: Final = ":http://internal.amazon.com/coral/com.amazon.bedrock/"

#: Bedrock's exception per status (a 529, which Bedrock never sends, is its 503).
_BEDROCK: Final[dict[int, tuple[int, str]]] = {
    400: (400, "ValidationException"),
    401: (403, "UnrecognizedClientException"),
    402: (400, "ServiceQuotaExceededException"),
    403: (403, "AccessDeniedException"),
    404: (404, "ResourceNotFoundException"),
    408: (408, "ModelTimeoutException"),
    413: (400, "ValidationException"),
    424: (424, "ModelErrorException"),
    429: (429, "ThrottlingException"),
    500: (500, "InternalServerException"),
    503: (503, "ServiceUnavailableException"),
    529: (503, "ServiceUnavailableException"),
}
#: Google's status name per HTTP status.
_GOOGLE: Final[dict[int, str]] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (
        struct.pack("!B", len(raw_name))
        + raw_name
        + b"\x07"  # type 7: a string
        + struct.pack("!H", len(raw_value))
        + raw_value
    )


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event stream message: prelude, its CRC32, headers, payload, message CRC32."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    body = prelude + head + payload
    return body + struct.pack("!I", binascii.crc32(body) & 0xFFFFFFFF)


def chunk(event_json: bytes) -> bytes:
    """A Bedrock ``chunk`` frame carrying one Messages stream event."""
    payload = _encode({"bytes": base64.b64encode(event_json).decode()})
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return frame(headers, payload)


def exception(name: str, message: str) -> bytes:
    """A Bedrock ``exception`` frame (``name`` like ``throttlingException``)."""
    headers = {
        ":exception-type": name,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return frame(headers, _encode({"message": message}))


def sse_data(event: bytes) -> bytes | None:
    """The JSON of an SSE event (``event: x\\ndata: {...}\\n\\n``), or None for none."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


def bedrock_frames(events: list[bytes]) -> list[bytes]:
    """The first party's SSE events as Bedrock frames (an ``error`` event becomes an
    ``exception`` frame, as Bedrock reports an error after the stream began)."""
    out: list[bytes] = []
    for event in events:
        data = sse_data(event)
        if data is None:
            continue
        decoded = _decode(data)
        if isinstance(decoded, dict) and decoded.get("type") == "error":
            error = decoded.get("error") or {}
            out.append(exception("internalServerException", str(error.get("message", ""))))
        elif isinstance(decoded, dict) and decoded.get("type") == "ping":
            continue  # Bedrock sends no pings
        else:
            out.append(chunk(data))
    return out


def bedrock_error(status: int, message: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a Bedrock error for the first party's ``status``."""
    sent, name = _BEDROCK.get(
        status,
        (status, "InternalServerException" if status >= 500 else "ValidationException"),
    )
    headers = {"x-amzn-errortype": name + _AMZN_SUFFIX}
    return sent, headers, _encode({"message": message})


def vertex_error(status: int, message: str, anthropic_body: bytes) -> bytes:
    """A Vertex error body for ``status`` (a 529 keeps the Anthropic body)."""
    if status == 529:
        return anthropic_body
    name = _GOOGLE.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    return _encode({"error": {"code": status, "message": message, "status": name}})


def error_message(anthropic_body: bytes) -> str:
    """The message of a first-party error body ("" when it has none)."""
    try:
        decoded = _decode(anthropic_body)
    except msgspec.DecodeError:
        return ""
    error = decoded.get("error") if isinstance(decoded, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else ""
