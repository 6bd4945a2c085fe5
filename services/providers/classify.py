"""The machinery behind the adapters' classification tables.

Each adapter (``anthropic.py``, ``openai.py``) owns one table: a tuple of rows
``(when, outcome, reason)``, read top to bottom, first match wins. ``when`` is
an exception class (or a tuple of them) or a predicate on the exception;
``outcome`` is the ``ProviderError`` subclass to raise; ``reason`` is its stable
snake_case reason. No row matching means ``TransientError("unknown")``: an
error we do not understand is retried, never dropped.

This module holds what both tables share: the rows for transport-level
failures that reach us unwrapped (the SDKs wrap errors while sending, but not
always while reading a streamed body), the row for requests refused before
sending, ``retry-after`` parsing, and the building of the ``ProviderError``
itself (status, retry-after, and a message that never carries a credential).
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import TypeAlias

import aiohttp
import httpx2

from services.errors import PermanentError, ProviderError, RateLimited, TransientError
from services.secrets import scrub

Predicate: TypeAlias = Callable[[BaseException], bool]
When: TypeAlias = type[BaseException] | tuple[type[BaseException], ...] | Predicate
Row: TypeAlias = tuple[When, type[ProviderError], str]
Table: TypeAlias = tuple[Row, ...]

_MAX_MESSAGE = 500


class MalformedResponse(Exception):
    """The provider answered with success, but no complete message could be read from it.

    Adapters raise it for a streamed body that ends early or out of order, or a
    body of the wrong shape; it never leaves an adapter unclassified.
    """


class ErrorObject(Exception):
    """The provider answered with a success status, but its body is an error object.

    Adapters raise it with the object's ``type`` and ``code``, and classify it by them,
    as they classify an error event in the middle of a stream.
    """

    def __init__(self, error: object) -> None:
        fields = error if isinstance(error, dict) else {}
        self.type = _str_or_none(fields.get("type"))
        self.code = _str_or_none(fields.get("code"))
        message = _str_or_none(fields.get("message")) or "no message"
        super().__init__(f"error object in a success reply ({self.type}): {message}")


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def redirect_loop(exc: BaseException) -> bool:
    """The client gave up following redirects: a wrong ``base_url``, not an outage."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, httpx2.TooManyRedirects | aiohttp.TooManyRedirects):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# Rows both tables end with, after their SDK's own rows. Order matters:
# TimeoutError is an OSError, JSONDecodeError is a ValueError.
def by_status(status: Callable[..., Predicate]) -> Table:
    """The rows both SDKs share for an HTTP status; ``status(*codes)`` builds the SDK's
    own status predicate. Order matters: 529 before the 5xx range."""
    return (
        (status(429),                   RateLimited,    "rate_limited"),
        (status(408),                   TransientError, "timeout"),
        (status(409),                   TransientError, "conflict"),
        (status(499),                   TransientError, "connection"),
        (status(529),                   TransientError, "overloaded"),
        (status(*range(500, 600)),      TransientError, "server_error"),
        (status(400, 422),              PermanentError, "invalid_request"),
        (status(401, 403),              PermanentError, "auth"),
        (status(404),                   PermanentError, "not_found"),
        (status(413, 431),              PermanentError, "too_large"),
    )  # fmt: skip


COMMON: Table = (
    # A request nested too deeply to serialise: the same request fails the same way.
    (RecursionError,                 PermanentError, "refused"),
    (httpx2.TimeoutException,        TransientError, "timeout"),
    (httpx2.TransportError,          TransientError, "connection"),
    (httpx2.DecodingError,           TransientError, "bad_response"),
    (TimeoutError,                   TransientError, "timeout"),
    (aiohttp.ClientError,            TransientError, "connection"),
    (OSError,                        TransientError, "connection"),
    (MalformedResponse,              TransientError, "bad_response"),
    (json.JSONDecodeError,           TransientError, "bad_response"),
    # Raised by the SDK while binding arguments or building the request:
    # nothing was sent, and the same request would be refused again.
    ((TypeError, ValueError),        PermanentError, "refused"),
)  # fmt: skip


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify_with(table: Table, exc: BaseException) -> ProviderError:
    """Translate ``exc`` into the ``ProviderError`` named by the first matching row of ``table``."""
    kind: type[ProviderError] = TransientError
    reason = "unknown"
    for when, outcome, why in table:
        if _matches(when, exc):
            kind, reason = outcome, why
            break
    return kind(
        message_of(exc), reason=reason, status=status_of(exc), retry_after=retry_after_of(exc)
    )


def _matches(when: When, exc: BaseException) -> bool:
    if isinstance(when, type | tuple):
        return isinstance(exc, when)
    return when(exc)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind ``exc``, if the SDK attached one."""
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def retry_after_of(exc: BaseException) -> float | None:
    """The delay the provider asked for in the response behind ``exc``, if any."""
    response = getattr(exc, "response", None)
    if not isinstance(response, httpx2.Response):
        return None
    return parse_retry_after(response.headers)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (milliseconds) or else ``retry-after``.

    ``retry-after`` may be seconds or an HTTP date; a date in the past means 0.
    Values that are not finite, negative or unparseable are ignored.
    """
    millis = _finite(headers.get("retry-after-ms"))
    if millis is not None and millis >= 0:
        return millis / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return seconds if seconds >= 0 else None
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    try:
        at = email.utils.mktime_tz(parsed)
    except (OverflowError, ValueError):
        return None
    return max(0.0, at - (time.time() if now is None else now))


def _finite(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def message_of(exc: BaseException) -> str:
    """A one-line, bounded, credential-free description of ``exc`` (and of its cause, which
    often says more: "Connection error." hides "Exceeded maximum allowed redirects.")."""
    text = _describe(exc)
    cause = exc.__cause__
    if cause is not None:
        text = f"{text} ({_describe(cause)})"
    text = scrub(text)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
