"""Breaker state of one provider, as stored in KV ``ai_health`` under the provider's name."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Literal

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


# Status pages: evidence, never proof. What a provider's status page says lowers the trip
# thresholds of the scopes it names and is shown to operators; it never moves a breaker.

#: Component statuses that count as degraded (Atlassian Statuspage's own words).
DEGRADED_STATUSES: Final = ("degraded_performance", "partial_outage", "major_outage")
#: The whole provider, in ``ProviderSettings.status_components`` and ``PageComponent.model``.
WHOLE_PROVIDER: Final = "*"


class PageComponent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A component of a status page that is not operational, and the scope it covers:
    ``model`` is a model name, ``*`` the whole provider, ``""`` nothing we call."""

    name: str
    status: str
    model: str = ""


class PageIncident(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An unresolved incident on a status page."""

    name: str
    status: str = ""
    impact: str = ""
    shortlink: str = ""


class Evidence(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What ``provider``'s status page says, in KV ``ai_control`` under
    ``evidence.<provider>``: written by the prober holding ``probe.<provider>``, and only
    when it changes (``read_at`` is the read that saw the change).

    ``degraded`` lists the mapped components in a degraded status: each lowers the trip
    thresholds of its scope (a model, or ``*``: every scope of the provider). ``other``
    lists components that are not operational but lower nothing (not mapped, or under
    maintenance). A page that cannot be read changes nothing: the last evidence stays.
    """

    provider: str
    page: str = ""
    indicator: str = ""
    degraded: list[PageComponent] = msgspec.field(default_factory=list)
    other: list[PageComponent] = msgspec.field(default_factory=list)
    incidents: list[PageIncident] = msgspec.field(default_factory=list)
    read_at: Timestamp = msgspec.field(default_factory=_now)

    def degrades(self, model: str | None = None) -> bool:
        """Whether the page says the scope is degraded: the provider (``model`` None) by a
        ``*`` component only; a model by its own component or a ``*`` one."""
        return any(c.model == WHOLE_PROVIDER or c.model == model for c in self.degraded if c.model)

    def says(self) -> tuple[object, ...]:
        """What the page says, without when it was read: two reads that say the same
        thing are one piece of evidence."""
        return (self.page, self.indicator, self.degraded, self.other, self.incidents)

    def summary(self) -> str:
        """One line for operators: the degraded components and the incidents, or
        ``operational``."""
        parts = [f"{c.name}: {c.status.replace('_', ' ')}" for c in self.degraded]
        parts += [
            f"incident: {i.name}" + (f" ({i.status})" if i.status else "") for i in self.incidents
        ]
        if not parts and self.other:
            parts = [f"{c.name}: {c.status.replace('_', ' ')} (not counted)" for c in self.other]
        return "; ".join(parts) or "operational"


_evidence_decoder = msgspec.json.Decoder(Evidence)


def try_decode_evidence(data: bytes) -> Evidence | None:
    """Decode stored evidence, or ``None`` when ``data`` is none (readers: no evidence)."""
    try:
        return _evidence_decoder.decode(data)
    except msgspec.DecodeError:
        return None
