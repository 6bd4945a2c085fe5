"""Events on ``AI_EVENTS``: breaker transitions, the operator audit log, status page changes,
and the tallies of jobs an outage failed over or expired."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from schemas.health import Evidence, State
from schemas.jobs import Timestamp


def _now() -> datetime:
    return datetime.now(UTC)


class HealthEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One breaker transition of a provider, on ``ai.events.health.<provider>``, or of one
    of its models (``model`` set), on ``ai.events.health.<provider>.<model_token>``.

    ``opened`` and ``closed`` transitions mark the start and end of an outage;
    ``parked`` and ``replayed`` count the jobs of that outage so far. A trip's
    ``failing_since`` is when the first failure still in the tripping worker's window
    happened: from it to ``at`` is the time to detect.
    """

    provider: str
    state: State
    previous: State
    outage_id: str
    reason: str = ""
    last_error: str = ""
    calls: int = 0
    failures: int = 0
    parked: int = 0
    replayed: int = 0
    by: str = ""
    at: Timestamp = msgspec.field(default_factory=_now)
    model: str = ""
    failing_since: Timestamp | None = None


_decoder = msgspec.json.Decoder(HealthEvent)


def decode_health_event(data: bytes) -> HealthEvent:
    """Decode a health event."""
    return _decoder.decode(data)


class OpsEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One operator action, on ``ai.events.ops``: the audit log.

    ``job_ids`` lists the jobs the action moved (so ``jobs show`` can tell a job's
    history); a large action writes several events, each with its share of ids.
    """

    action: str
    who: str
    provider: str = ""
    filters: dict[str, str] = msgspec.field(default_factory=dict)
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    job_ids: list[str] = msgspec.field(default_factory=list)
    dry_run: bool = False
    at: Timestamp = msgspec.field(default_factory=_now)


_ops_decoder = msgspec.json.Decoder(OpsEvent)


def decode_ops_event(data: bytes) -> OpsEvent:
    """Decode an operator event."""
    return _ops_decoder.decode(data)


class EvidenceEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A change in what a provider's status page says, on ``ai.events.evidence.<provider>``:
    the new ``evidence`` in full and its one-line ``summary``. Evidence is never proof:
    these events move no breaker."""

    provider: str
    evidence: Evidence
    summary: str = ""
    by: str = ""
    at: Timestamp = msgspec.field(default_factory=_now)


_evidence_decoder = msgspec.json.Decoder(EvidenceEvent)


def decode_evidence_event(data: bytes) -> EvidenceEvent:
    """Decode a status page event."""
    return _evidence_decoder.decode(data)


class TallyEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Jobs of one outage a process failed over or expired since its last tally, on
    ``ai.events.tally.<provider>`` (``provider``: the one whose outage it is).

    Workers and the replayer count in memory and publish at most one tally per outage
    about once a second, never one per job; the notifier adds up the tallies of an
    incident's outages for its summary. A process killed before its flush loses its last
    tally: the sums are lower bounds.
    """

    provider: str
    outage_id: str
    failed_over: int = 0
    expired: int = 0
    by: str = ""
    at: Timestamp = msgspec.field(default_factory=_now)


_tally_decoder = msgspec.json.Decoder(TallyEvent)


def decode_tally_event(data: bytes) -> TallyEvent:
    """Decode a tally event."""
    return _tally_decoder.decode(data)
