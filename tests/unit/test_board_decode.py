"""The board's tolerant decoders: any bytes give a value or ``None``, never an exception."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import encode
from schemas.health import BreakerState, Pause, try_decode_pause, try_decode_state
from services.breaker import Lease, try_decode_lease

_json: Any = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from(
    ["state", "since", "outage_id", "reason", "calls", "by", "owner", "until", "info"]
)
# Bytes of every kind: random, any JSON, and objects with the real field names.
_values = (
    st.binary(max_size=200)
    | _json.map(msgspec.json.encode)
    | st.dictionaries(_fields, _json, max_size=5).map(msgspec.json.encode)
)


@given(_values)
def test_tolerant_decoders_never_raise(data: bytes) -> None:
    """try_decode_state/pause/lease return their struct or None for any bytes."""
    assert isinstance(try_decode_state(data), BreakerState | None)
    assert isinstance(try_decode_pause(data), Pause | None)
    assert isinstance(try_decode_lease(data), Lease | None)


def test_tolerant_decoders_read_what_the_writers_write() -> None:
    """A stored state, pause and lease decode to what was stored; garbage to None."""
    state = BreakerState(state="open", outage_id="o-1", reason="5 in a row")
    pause = Pause(reason="maintenance", by="ops")
    lease = Lease(owner="prober-1", until=12.5, info={"rate": 3})
    assert try_decode_state(encode(state)) == state
    assert try_decode_pause(encode(pause)) == pause
    assert try_decode_lease(encode(lease)) == lease
    for garbage in (b"\xff\x00not json", b'{"state": 5}', b"[]"):
        assert try_decode_state(garbage) is None
        assert try_decode_lease(garbage) is None
