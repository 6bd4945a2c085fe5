"""What the notifier says: one ``Notice`` per notification, whichever sink carries it.

Types (the CloudEvents ``type``; Slack shows the text, PagerDuty takes the outage ones):

    dev.ridethrough.outage.opened   a scope's breaker opened (an incident began)
    dev.ridethrough.outage.closed   it closed for good: the incident's summary
    dev.ridethrough.ops             an operator action from the audit log

A notice's ``id`` is stable (the incident id and the event, or the audit event's stream
sequence), so a receiver dedupes the copies at-least-once delivery may send.

The closed summary's numbers
----------------------------
``duration_s``        first open to last close of the incident.
``time_to_detect_s``  from the first transient failure still in the tripping worker's
                      breaker window (``breaker.window_s``) to the open (the open event's
                      ``failing_since``); ``null`` when the event does not carry it (a
                      provider opened because its models were, or workers of an older
                      release). ``detected_on``: the trip's reason, ``failures`` of ``calls``.
``parked``            jobs parked during the incident (the replayer's count at each close:
                      those it replayed plus those still parked).
``replayed``          parked jobs the replayer put back on the queue.
``dead``              dead letters of the scope stored between open and close (by reason:
                      ``provider_outage`` are the jobs that asked to fail in an outage).
``failed_over``       at least this many jobs of the scope were sent to a fallback provider
                      while it was open: the workers' tallies of the incident's outages
                      (``ai.events.tally.<provider>``, ``services/breaker/tally.py``).
``expired``           at least this many jobs of the incident expired: parked jobs whose
                      deadline passed before the replayer got to them (counted against the
                      outage they were parked in, even when that was after the close and
                      before the summary), and jobs a worker found past their deadline while
                      the scope was open or half-open.
                      Both are lower bounds: a process counts in memory and publishes about
                      once a second, so one killed in between loses its last second's
                      counts; expiries after the summary is sent are not in it. ``null``
                      when the tallies could not be read.
``provider_calls_saved``  at least ``parked``: each parked job is a call (and its retries)
                      the provider did not get while it was down; probes went instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.events import OpsEvent
from services.notifier.incidents import Incident
from services.secrets import scrub

OPENED = "dev.ridethrough.outage.opened"
CLOSED = "dev.ridethrough.outage.closed"
OPS = "dev.ridethrough.ops"


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification: ``id`` stable across retries and notifiers, ``subject`` the scope
    (or provider) it is about, ``title`` one line, ``text`` a few, ``data`` the numbers."""

    id: str
    type: str
    subject: str
    time: datetime
    title: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    #: The incident id (PagerDuty's dedup key); empty for operator actions.
    incident: str = ""

    @property
    def kind(self) -> str:
        """The last word of the type: ``opened``, ``closed``, ``ops`` (a metric label)."""
        return self.type.rsplit(".", 1)[-1]


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _after(detect: float | None) -> str:
    return "" if detect is None else f" {detect:g}s after the first failure"


def opened(inc: Incident) -> Notice:
    """The notification that an incident began."""
    e = inc.opened_by
    assert e is not None
    why = e.reason or "breaker tripped"
    lines = [f"Breaker of {inc.scope} opened: {why}."]
    if e.calls or e.failures:
        lines.append(
            f"Detected{_after(inc.time_to_detect_s)} on {e.failures} failures of {e.calls} calls."
        )
    if e.last_error:
        lines.append(f"Last error: {scrub(e.last_error)[:300]}")
    lines.append("Jobs are parked (or failed over) until it recovers; the provider gets probes.")
    data = inc.numbers() | {"last_error": scrub(e.last_error)[:500], "by": e.by}
    return Notice(
        id=f"{inc.id}:opened",
        type=OPENED,
        subject=inc.scope,
        time=e.at,
        title=f"Outage: {inc.scope} is down",
        text="\n".join(lines),
        data=data,
        incident=inc.id,
    )


def _at_least(n: int | None, what: str) -> str:
    return f"{what} not read" if n is None else f"at least {n} {what}"


def closed(
    inc: Incident,
    dead_by_reason: dict[str, int] | None,
    tallied: dict[str, int] | None = None,
) -> Notice:
    """The summary of an incident that ended (``dead_by_reason``: None if not read;
    ``tallied``: ``failed_over`` and ``expired`` summed from the outages' tallies, None if
    not read)."""
    n = inc.numbers()
    dead = None if dead_by_reason is None else sum(dead_by_reason.values())
    failed_over = None if tallied is None else tallied.get("failed_over", 0)
    expired = None if tallied is None else tallied.get("expired", 0)
    n |= {
        "dead": dead,
        "dead_by_reason": dict(dead_by_reason or {}),
        "expired": expired,
        "failed_over": failed_over,
        "provider_calls_saved": inc.parked,
    }
    d = n["detected_on"]
    lines = [
        f"Breaker of {inc.scope} closed after {_dur(inc.duration_s)}"
        + (f" ({inc.flaps} flaps coalesced)" if inc.flaps else "")
        + ".",
        f"Detected{_after(inc.time_to_detect_s)} on {d['failures']} failures of {d['calls']} "
        f"calls ({d['reason'] or 'trip'})."
        if d["calls"]
        else f"Opened because {d['reason'] or 'it tripped'}.",
        f"Jobs: {inc.parked} parked, {inc.replayed} replayed, "
        + f"{_at_least(failed_over, 'failed over')}, {_at_least(expired, 'expired')}, "
        + ("dead letters not read" if dead is None else f"{dead} dead")
        + ".",
        f"Provider calls saved: at least {inc.parked} (parked instead of called).",
    ]
    when = inc.closed_at or inc.opened_at
    assert when is not None
    return Notice(
        id=f"{inc.id}:closed",
        type=CLOSED,
        subject=inc.scope,
        time=when,
        title=f"Resolved: {inc.scope} is back after {_dur(inc.duration_s)}",
        text="\n".join(lines),
        data=n,
        incident=inc.id,
    )


def ops(seq: int, e: OpsEvent) -> Notice:
    """The notification of an operator action (without its job ids: counts only)."""
    what = e.action + (f" {e.provider}" if e.provider else "")
    filters = ", ".join(f"{k}={v}" for k, v in sorted(e.filters.items()))
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(e.counts.items()))
    text = (
        f"{e.who} ran {what}"
        + (f" ({filters})" if filters else "")
        + (f": {counts}" if counts else "")
    )
    return Notice(
        id=f"ops:{seq}",
        type=OPS,
        subject=e.provider or "ridethrough",
        time=e.at,
        title=f"Operator: {what}",
        text=scrub(text),
        data={
            "action": e.action,
            "who": e.who,
            "provider": e.provider,
            "filters": dict(e.filters),
            "counts": dict(e.counts),
            "jobs": len(e.job_ids),
        },
    )
