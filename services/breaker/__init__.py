"""The fleet-wide breaker: local failure windows, the shared board, CAS transitions, leases.

    window.py   SlidingWindow: one per provider in each worker; decides *when* to trip
    board.py    HealthBoard: every process's view of KV ai_health + ai_control, re-read
                every ``board_poll_s`` (a worker stops calling an open provider within it);
                ``transition()``, the only way a breaker changes state: compare-and-set on
                the KV revision (two workers tripping at once make one transition), then
                one event on ``ai.events.health.<provider>``; ``HealthBoard.move()`` is
                that plus this process's view, for the worker, prober and replayer alike
    lease.py    Lease, LeaseKeeper: one active prober / replayer per provider among
                replicas
    recovery.py LeasedPerProvider, the base of the prober and the replayer: one task per
                provider, acting only while its replica holds the lease
    evidence.py EvidenceView: what the status pages say (``evidence.<provider>`` in
                ai_control, written by the prober); a degraded scope trips at lower
                thresholds. Evidence, never proof: it moves no breaker
    tally.py    Tally: jobs each outage failed over or expired, counted in memory by the
                workers and the replayer, published about once a second on
                ``ai.events.tally.<provider>`` for the outage's summary (lower bounds)

States: ``closed`` → ``open`` (trip) → ``half_open`` (prober: M probe successes) →
``closed`` (replayer: slow start reached its cap or the backlog is empty); any
trip in ``half_open`` re-opens. An operator pause (``paused.<provider>`` in
ai_control) behaves like ``open`` and no probe can end it.

An entry nobody can decode (any role that may write the board can write garbage) is
unknown, never fatal: the board keeps its last known view of it (closed if it has
none), ``transition()`` reads it as ``closed`` (so a trip overwrites it by CAS and
nothing else does), and a lease is free. Each is logged as one warning line.
"""

from services.breaker.board import (
    PAUSED,
    HealthBoard,
    new_outage_id,
    paused_key,
    transition,
)
from services.breaker.lease import Lease, LeaseKeeper, decode_lease, try_decode_lease
from services.breaker.window import SlidingWindow

__all__ = [
    "PAUSED",
    "HealthBoard",
    "Lease",
    "LeaseKeeper",
    "SlidingWindow",
    "decode_lease",
    "new_outage_id",
    "paused_key",
    "transition",
    "try_decode_lease",
]
