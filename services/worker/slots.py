"""Call slots of one worker process, handed out by priority with a share for each.

A worker keeps at most ``concurrency`` provider calls in flight. Each priority has its own
consumer (``workers-<provider>-<priority>``), so a high job is never stuck behind low ones
in the stream; once fetched, jobs wait here for a free slot, and who gets a freed slot is
the one decision priority makes inside the process:

- a slot is free and nobody waits: take it (the hot path: no future, no bookkeeping);
- jobs of several priorities wait: ``next_priority`` picks by smooth weighted round robin
  over the priorities that wait. With the default weights (high 16, normal 4, low 1) every
  21 freed slots go 16 / 4 / 1 while all three wait, spread evenly rather than in runs;
  a priority with nothing waiting gives its share to the others. Low is slowed by a
  backlog of high, never starved: it gets at least 1 slot in 21.

Before its process slot, a call takes one of its provider's (``AdaptiveLimit``): as many as
the provider has shown it accepts, learnt from its 429s and overloads.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence


def next_priority(
    waiting: Sequence[str], credit: Mapping[str, int], weights: Mapping[str, int]
) -> tuple[str, dict[str, int]]:
    """The priority that gets the next slot, and the credits after the pick.

    Smooth weighted round robin (nginx's upstream balancing): each waiting priority earns
    its weight, the richest is picked (the first of ``waiting`` on a tie) and pays the
    total earned. Priorities that do not wait neither earn nor pay. ``waiting`` must not
    be empty.
    """
    after = dict(credit)
    total = 0
    best = waiting[0]
    for p in waiting:
        after[p] = after.get(p, 0) + weights[p]
        total += weights[p]
        if after[p] > after[best]:
            best = p
    after[best] -= total
    return best, after


class PrioritySlots:
    """A semaphore of ``capacity`` whose waiters are served by priority (``next_priority``)."""

    def __init__(self, capacity: int, weights: Mapping[str, int]) -> None:
        self._capacity = capacity
        self._free = capacity
        self._weights = dict(weights)
        self._order = tuple(weights)  # tie-break: the order the weights are given in
        self._queues: dict[str, deque[asyncio.Future[None]]] = {p: deque() for p in weights}
        self._credit: dict[str, int] = dict.fromkeys(weights, 0)
        self._waiters = 0

    @property
    def waiting(self) -> dict[str, int]:
        """How many wait for a slot, by priority."""
        return {p: len(q) for p, q in self._queues.items()}

    async def acquire(self, priority: str) -> None:
        """Wait for a slot for a job of ``priority``."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[priority].append(fut)
        self._waiters += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, but the waiter is gone: hand the slot on
            elif fut in self._queues[priority]:
                self._queues[priority].remove(fut)
                self._waiters -= 1
            raise

    @property
    def capacity(self) -> int:
        """How many slots there are (``resize`` changes it)."""
        return self._capacity

    def resize(self, capacity: int) -> None:
        """Have ``capacity`` slots from now on. Shrinking takes none back from their holders:
        the slots in use above the new capacity are not handed on when released."""
        self._free += capacity - self._capacity
        self._capacity = capacity
        self._grant()

    def release(self) -> None:
        """Give a slot back; the next waiter (by priority and share) gets it."""
        self._free += 1
        self._grant()

    def _grant(self) -> None:
        while self._free > 0 and self._waiters:
            waiting = [p for p in self._order if self._queues[p]]
            priority, self._credit = next_priority(waiting, self._credit, self._weights)
            fut = self._queues[priority].popleft()
            self._waiters -= 1
            if fut.done():  # its waiter was cancelled and has not run yet
                continue
            self._free -= 1
            fut.set_result(None)


class AdaptiveLimit:
    """How many calls one provider may have in flight from this process, learnt from its
    answers (AIMD, as TCP learns a path's capacity).

    The provider may accept fewer calls than the process's ``concurrency``: a recovered
    provider under a backlog's replay, a tenant's rate limit. Calls beyond what it accepts
    come back at once as 429s, each a wasted round trip and a job put back for a second.
    So each provider's calls pass through ``slots`` (by priority, like the process's), and
    their number follows the answers:

    - a 429 or an overload (``pushed_back``) halves it, once per round: the calls sent
      before the last cut were sent at the old number, and their 429s say nothing new;
    - each success adds 1 below the threshold (slow start: doubling per round trip) and
      ``1 / limit`` above it (one more per round trip); the threshold is where the last
      cut left the limit, and goes back to the ceiling after ``recover_s`` without a cut,
      so a provider recovered from an outage is back at full pace within a few round trips;
    - it stays between 1 and ``ceiling`` (the process's ``concurrency``).
    """

    def __init__(
        self,
        ceiling: int,
        weights: Mapping[str, int],
        *,
        recover_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.threshold = float(ceiling)
        self.recover_s = recover_s
        self.slots = PrioritySlots(ceiling, weights)
        self._clock = clock
        self._cut_at = -math.inf
        #: Cuts so far (what ``status`` and the tests read).
        self.cuts = 0

    def release(self, _task: object = None) -> None:
        """A call of this provider ended (a task's done callback, hence the argument)."""
        self.slots.release()

    def success(self) -> None:
        """A call was answered."""
        if self.limit >= self.ceiling:
            return
        if self.threshold < self.ceiling and self._clock() - self._cut_at >= self.recover_s:
            self.threshold = float(self.ceiling)
        step = 1.0 if self.limit < self.threshold else 1.0 / self.limit
        self.limit = min(float(self.ceiling), self.limit + step)
        self._apply()

    def pushed_back(self, sent_at: float) -> None:
        """A call sent at ``sent_at`` (this limit's clock) met a 429 or an overload."""
        if sent_at < self._cut_at:
            return
        self._cut_at = self._clock()
        self.limit = max(1.0, self.limit / 2)
        self.threshold = self.limit
        self.cuts += 1
        self._apply()

    def _apply(self) -> None:
        n = int(self.limit)
        if n != self.slots.capacity:
            self.slots.resize(n)
