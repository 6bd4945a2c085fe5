"""What the fake received of large requests: a digest of each body's content, so a test can
check that a large job reached the provider whole (``content_digest`` of what it sent).

Requests over ``LARGE_BYTES`` are logged (the last ``KEPT``), each as its path, its size
and the SHA-256 of its JSON content without ``model`` (a job's ``request`` carries no model),
keys sorted: the SDK's own spacing and key order do not matter, a changed byte of content
does. Smaller requests are not looked at (the hot path of the benchmarks stays as it was).
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any, Final

import msgspec

#: Bodies at least this large are logged.
LARGE_BYTES: Final = 256 * 1024
#: How many are kept.
KEPT: Final = 16

_sorted = msgspec.json.Encoder(order="sorted")


def content_digest(request: dict[str, Any]) -> str:
    """The SHA-256 of a request's content: its JSON with sorted keys, without ``model``."""
    body = {k: v for k, v in request.items() if k != "model"}
    return hashlib.sha256(_sorted.encode(body)).hexdigest()


class LargeRequests:
    """The log of large request bodies; touched only on the server's loop."""

    def __init__(self) -> None:
        self._seen: deque[dict[str, Any]] = deque(maxlen=KEPT)

    def record(self, path: str, body: bytes) -> None:
        """Log ``body`` if it is large (and a JSON object)."""
        if len(body) < LARGE_BYTES:
            return
        try:
            request = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return
        if isinstance(request, dict):
            digest = content_digest(request)
            self._seen.append({"path": path, "size": len(body), "digest": digest})

    def snapshot(self) -> list[dict[str, Any]]:
        """The logged requests, oldest first."""
        return list(self._seen)
