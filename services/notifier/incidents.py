"""Which health events become notifications, and an incident's numbers: pure functions over
one scope's history of breaker events (``tests/unit/test_notify_incidents.py`` tables them).

An incident is one outage, or several outages of one scope in a row when each re-opened
within ``flap_s`` seconds of the previous one's close (flapping): it gets one "opened"
notification (its first outage's open) and one "closed" summary (its last outage's close,
sent once ``flap_s`` has passed without a re-open). Its id is its first outage's id: the
PagerDuty dedup key, and the stem of the notifications' CloudEvents ids.

The decision for an event depends only on the stored history (and, for a close, on
whether ``flap_s`` has passed), so a notifier that takes over after a crash decides the
same way and sends the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas.events import HealthEvent
from schemas.subjects import scope_label


@dataclass(frozen=True, slots=True)
class Seen:
    """A health event of the scope and its AI_EVENTS sequence."""

    seq: int
    event: HealthEvent


@dataclass(slots=True)
class Incident:
    """One incident of a scope: its outages and what they add up to."""

    id: str
    provider: str
    model: str
    outage_ids: list[str] = field(default_factory=list)
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    reopened: int = 0
    parked: int = 0
    replayed: int = 0
    opened_by: HealthEvent | None = None

    @property
    def scope(self) -> str:
        """How people read the scope: ``anthropic`` or ``anthropic/claude-x``."""
        return scope_label(self.provider, self.model or None)

    @property
    def flaps(self) -> int:
        """How many times the scope re-opened within the flap window after closing."""
        return max(0, len(self.outage_ids) - 1)

    @property
    def duration_s(self) -> float | None:
        """From the first open to the last close, in seconds (None while either is unknown)."""
        if self.opened_at is None or self.closed_at is None:
            return None
        return round((self.closed_at - self.opened_at).total_seconds(), 3)

    @property
    def time_to_detect_s(self) -> float | None:
        """From the first failure in the tripping worker's window to the open (None when
        the open event does not say: the last release's workers, or a provider opened
        because its models were)."""
        first = self.opened_by
        if first is None or first.failing_since is None:
            return None
        return round(max(0.0, (first.at - first.failing_since).total_seconds()), 3)

    def numbers(self) -> dict[str, Any]:
        """The incident as JSON-ready numbers (without what is read from other streams)."""
        first = self.opened_by
        return {
            "incident_id": self.id,
            "outage_ids": list(self.outage_ids),
            "provider": self.provider,
            "model": self.model,
            "scope": self.scope,
            "opened_at": self.opened_at.isoformat() if self.opened_at else None,
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
            "duration_s": self.duration_s,
            "time_to_detect_s": self.time_to_detect_s,
            "flaps": self.flaps,
            "reopened": self.reopened,
            "parked": self.parked,
            "replayed": self.replayed,
            "detected_on": {
                "reason": first.reason if first else "",
                "failures": first.failures if first else 0,
                "calls": first.calls if first else 0,
            },
        }


@dataclass(frozen=True, slots=True)
class Wait:
    """Decide again at ``until`` (a close waits out the flap window)."""

    until: datetime


@dataclass(frozen=True, slots=True)
class Quiet:
    """No notification for this event, and why."""

    why: str


@dataclass(frozen=True, slots=True)
class Opened:
    """Send the incident's "opened" notification."""

    incident: Incident


@dataclass(frozen=True, slots=True)
class Closed:
    """Send the incident's "closed" summary."""

    incident: Incident


Decision = Wait | Quiet | Opened | Closed


def _starts(e: HealthEvent) -> bool:
    return e.state == "open" and e.previous == "closed"


@dataclass(slots=True)
class _Outage:
    id: str
    open: HealthEvent | None = None
    close: HealthEvent | None = None
    reopened: int = 0


def _outages(history: Sequence[Seen], upto: int) -> list[_Outage]:
    """The outages of ``history[: upto + 1]``, in order of their first event."""
    out: dict[str, _Outage] = {}
    for seen in history[: upto + 1]:
        e = seen.event
        if not e.outage_id:
            continue
        o = out.setdefault(e.outage_id, _Outage(e.outage_id))
        if _starts(e):
            o.open = o.open or e
        elif e.state == "open":
            o.reopened += 1
        elif e.state == "closed":
            o.close = e
    return list(out.values())


def _flapped(before: _Outage, after: _Outage, flap_s: float) -> bool:
    """Whether ``after`` opened within ``flap_s`` of ``before`` closing."""
    if before.close is None or after.open is None:
        return False
    gap = (after.open.at - before.close.at).total_seconds()
    return 0 <= gap <= flap_s


def incident_of(history: Sequence[Seen], index: int, flap_s: float) -> Incident:
    """The incident the event at ``history[index]`` belongs to, as far as it goes there."""
    outages = _outages(history, index)
    current = history[index].event.outage_id
    at = next((i for i, o in enumerate(outages) if o.id == current), len(outages) - 1)
    first = at
    while first > 0 and _flapped(outages[first - 1], outages[first], flap_s):
        first -= 1
    chain = outages[first : at + 1]
    e = history[index].event
    inc = Incident(id=chain[0].id, provider=e.provider, model=e.model)
    inc.outage_ids = [o.id for o in chain]
    inc.opened_by = chain[0].open
    inc.opened_at = chain[0].open.at if chain[0].open else None
    inc.closed_at = chain[-1].close.at if chain[-1].close else None
    inc.reopened = sum(o.reopened for o in chain)
    inc.parked = sum(o.close.parked for o in chain if o.close)
    inc.replayed = sum(o.close.replayed for o in chain if o.close)
    return inc


def decide(history: Sequence[Seen], seq: int, *, flap_s: float, now: datetime) -> Decision:
    """What to send for the event at AI_EVENTS sequence ``seq``, given every health event
    of its scope (``history``, oldest first, that event included)."""
    index = next((i for i, s in enumerate(history) if s.seq == seq), None)
    if index is None:
        return Quiet("the event is not in its scope's history (aged out?)")
    e = history[index].event
    if not e.outage_id:
        return Quiet("a transition without an outage id")
    if _starts(e):
        inc = incident_of(history, index, flap_s)
        if inc.id != e.outage_id:
            return Quiet(f"re-opened within {flap_s:g}s of closing: incident {inc.id} goes on")
        return Opened(inc)
    if e.state != "closed":
        return Quiet(f"{e.previous} -> {e.state} within the outage")
    until = e.at + timedelta(seconds=flap_s)
    if flap_s > 0 and now < until:
        return Wait(until)
    later = next((s.event for s in history[index + 1 :] if _starts(s.event)), None)
    if later is not None and 0 <= (later.at - e.at).total_seconds() <= flap_s:
        return Quiet(f"re-opened within {flap_s:g}s: the incident goes on")
    return Closed(incident_of(history, index, flap_s))
