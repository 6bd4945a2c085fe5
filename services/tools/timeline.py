"""A drill's per-model numbers, worked out from three records of what happened.

Pure functions over plain data, so each definition below is tested as a table
(``tests/unit/test_timeline.py``); ``ridethrough demo`` gathers the records.

The records
-----------
``Window``
    A fault window of the fake provider (``GET /admin/calls``: ``windows``), in Unix time,
    with the models it hits (none listed: every model).
``Transition``
    A breaker transition read from AI_EVENTS: when (the event's ``at``), which scope (the
    provider's, ``model == ""``, or one model's), and the state it moved to.
parks
    ``(job_id, parked_at)`` of every park of one model's jobs, as seen on ``ai.parked.>``.
calls, probes
    Arrival times of one model's calls and probes at the fake (its call log).

Definitions, for a model M of provider P
----------------------------------------
covering scopes
    P and (P, M): M's jobs are held when either is open.
blocked
    Some covering scope is ``open``.
unhealthy
    Some covering scope is not ``closed`` (``open`` or ``half_open``).
faulted
    Inside a fault window that hits M.
sick
    Faulted, or inside an unhealthy period that overlaps a fault window of M (stretched by
    ``tail_s``, the longest a call started inside the window can take to fail): the outage
    as the fleet lives it, from the first failure until the breaker closes again.
``trip_s``
    From the start of M's first fault window to the first moment at or after it when M is
    blocked (the open event of a covering scope); ``None`` if M was never blocked after it.
``calls_during_outage`` / ``probes_during_outage``
    M's calls / probes that arrived while M was faulted.
``calls_while_open``
    Of those calls, the ones that arrived while M was blocked: what the breaker did not
    stop, the board's lag included (workers read the board every ``board_poll_s``).
``calls_during_outage_beyond_trip``
    Of those, the ones that arrived more than ``grace_s`` after that blocked period began:
    calls a worker made although it had had time to read that the breaker was open. The
    calls before the trip, and those within the grace, are the trip itself. ``demo`` passes
    two board polls: a worker's view is at most one poll old, plus the poll's own read and
    the call's dispatch, which under load can take a good part of another.
``parked``
    Distinct jobs of M that went through AI_PARKED.
``parked_while_healthy``
    Distinct jobs of M with a park outside every sick period of M: for a model that had no
    fault at all, every park.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Interval = tuple[float, float]
"""``[start, end)`` in Unix seconds; ``end`` may be ``math.inf``."""


@dataclass(frozen=True, slots=True)
class Window:
    """A fault window of the fake provider; ``models`` empty means every model."""

    start: float
    end: float
    models: frozenset[str] = frozenset()

    def hits(self, model: str) -> bool:
        """Whether requests for ``model`` got this window's fault."""
        return not self.models or model in self.models


@dataclass(frozen=True, slots=True)
class Transition:
    """A breaker moving to ``state`` at ``at``, in the provider's scope (``model == ""``) or
    in one model's."""

    at: float
    model: str
    state: str


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """``intervals`` sorted, with overlapping or touching ones joined."""
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def inside(t: float, intervals: Sequence[Interval]) -> Interval | None:
    """The interval of the merged, sorted ``intervals`` holding ``t``, if any."""
    i = bisect.bisect_right(intervals, (t, math.inf)) - 1
    if i >= 0 and intervals[i][0] <= t < intervals[i][1]:
        return intervals[i]
    return None


def periods(
    transitions: Iterable[Transition], scopes: set[str], states: set[str]
) -> list[Interval]:
    """Merged periods when some scope of ``scopes`` was in one of ``states``.

    Each scope starts ``closed``; a period runs from a transition into ``states`` to the
    next transition of that scope out of them (``math.inf`` if none came).
    """
    found: list[Interval] = []
    began: dict[str, float] = {}
    for tr in sorted(transitions, key=lambda tr: tr.at):
        if tr.model not in scopes:
            continue
        if tr.state in states:
            began.setdefault(tr.model, tr.at)
        elif tr.model in began:
            found.append((began.pop(tr.model), tr.at))
    found.extend((start, math.inf) for start in began.values())
    return merge(found)


def model_numbers(
    model: str,
    *,
    windows: Sequence[Window],
    transitions: Sequence[Transition],
    parks: Sequence[tuple[str, float]],
    calls: Sequence[float],
    probes: Sequence[float] = (),
    grace_s: float = 0.0,
    tail_s: float = 0.0,
) -> dict[str, Any]:
    """The per-model numbers of the module docstring for ``model``."""
    scopes = {"", model}
    faulted = merge((w.start, w.end) for w in windows if w.hits(model))
    blocked = periods(transitions, scopes, {"open"})
    unhealthy = periods(transitions, scopes, {"open", "half_open"})
    sick = merge(
        faulted
        + [p for p in unhealthy if any(p[0] < end + tail_s and p[1] > s for s, end in faulted)]
    )

    trip_s: float | None = None
    if faulted:
        first = faulted[0][0]
        at_start = inside(first, blocked)
        opened = first if at_start else next((s for s, _ in blocked if s >= first), None)
        trip_s = None if opened is None else round(opened - first, 3)

    during = [t for t in calls if inside(t, faulted)]
    held = [(t, period) for t in during if (period := inside(t, blocked)) is not None]
    beyond = sum(1 for t, period in held if t >= period[0] + grace_s)
    return {
        "parked": len({job for job, _ in parks}),
        "parked_while_healthy": len({job for job, at in parks if inside(at, sick) is None}),
        "calls_during_outage": len(during),
        "calls_while_open": len(held),
        "calls_during_outage_beyond_trip": beyond,
        "probes_during_outage": sum(1 for t in probes if inside(t, faulted)),
        "trip_s": trip_s,
    }
