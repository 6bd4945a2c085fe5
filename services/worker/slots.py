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
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence


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

    def release(self) -> None:
        """Give a slot back; the next waiter (by priority and share) gets it."""
        self._free += 1
        while self._free > 0 and self._waiters:
            waiting = [p for p in self._order if self._queues[p]]
            priority, self._credit = next_priority(waiting, self._credit, self._weights)
            fut = self._queues[priority].popleft()
            self._waiters -= 1
            if fut.done():  # its waiter was cancelled and has not run yet
                continue
            self._free -= 1
            fut.set_result(None)
