"""The one JSON encoder of the wire records (jobs, results, dead letters, park records,
events, KV values): msgspec, reused, so every record is encoded the same way."""

from __future__ import annotations

import msgspec

_encoder = msgspec.json.Encoder()


def encode(obj: msgspec.Struct) -> bytes:
    """Encode any wire Struct to JSON bytes."""
    return _encoder.encode(obj)
