"""Breaker state of one provider, as stored in KV ``ai_health`` under the provider's name."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec

from schemas.jobs import Timestamp

State = Literal["closed", "open", "half_open"]


def _now() -> datetime:
    return datetime.now(UTC)


class BreakerState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The fleet-wide breaker of a provider.

    ``outage_id`` names the outage from the moment the breaker opens until it closes
    again (re-opening from ``half_open`` keeps it: a flapping provider is one outage).
    """

    state: State = "closed"
    since: Timestamp = msgspec.field(default_factory=_now)
    outage_id: str = ""
    reason: str = ""
    last_error: str = ""
    calls: int = 0
    failures: int = 0
    updated_by: str = ""


class Pause(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An operator's pause of a provider, in KV ``ai_control`` under ``paused.<provider>``."""

    reason: str = ""
    by: str = ""
    since: Timestamp = msgspec.field(default_factory=_now)


_state_decoder = msgspec.json.Decoder(BreakerState)
_pause_decoder = msgspec.json.Decoder(Pause)


def decode_state(data: bytes) -> BreakerState:
    """Decode a stored breaker state."""
    return _state_decoder.decode(data)


def decode_pause(data: bytes) -> Pause:
    """Decode a stored pause."""
    return _pause_decoder.decode(data)


# Any role that may write the board can write garbage to it (a typo in `nats kv put`, a
# buggy client). Readers use these and treat ``None`` as "unknown": never a crash.


def try_decode_state(data: bytes) -> BreakerState | None:
    """``decode_state``, or ``None`` when ``data`` is not a breaker state."""
    try:
        return _state_decoder.decode(data)
    except msgspec.DecodeError:  # ValidationError (wrong shape or types) is one too
        return None


def try_decode_pause(data: bytes) -> Pause | None:
    """``decode_pause``, or ``None`` when ``data`` is not a pause."""
    try:
        return _pause_decoder.decode(data)
    except msgspec.DecodeError:
        return None


class WorkerBeat(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A worker's heartbeat in KV ``ai_workers`` under its id (expires with the bucket TTL).

    ``windows`` holds, per provider, (calls, transient failures) in the breaker window.
    """

    worker_id: str
    providers: list[str]
    in_flight: int = 0
    concurrency: int = 0
    stats: dict[str, int] = msgspec.field(default_factory=dict)
    windows: dict[str, tuple[int, int]] = msgspec.field(default_factory=dict)
    started_at: Timestamp = msgspec.field(default_factory=_now)
    at: Timestamp = msgspec.field(default_factory=_now)


_beat_decoder = msgspec.json.Decoder(WorkerBeat)


def decode_beat(data: bytes) -> WorkerBeat:
    """Decode a worker heartbeat."""
    return _beat_decoder.decode(data)


def try_decode_beat(data: bytes) -> WorkerBeat | None:
    """``decode_beat``, or ``None`` when ``data`` is not a heartbeat."""
    try:
        return _beat_decoder.decode(data)
    except msgspec.DecodeError:
        return None
