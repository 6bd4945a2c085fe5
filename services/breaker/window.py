"""The sliding window of one scope's calls in one process: when to trip its breaker."""

from __future__ import annotations

import time
from collections import deque

from services.config import BreakerSettings


class SlidingWindow:
    """Transient failures of one provider as seen by one process.

    Trips on ``consecutive_failures`` in a row, or on a failure rate at or above
    ``failure_rate`` over at least ``min_calls`` calls in the last ``window_s``.
    Rate-limit answers are not recorded at all: they slow us down, they are no outage.
    While the status page says the scope is degraded, the caller passes ``degraded=True``
    and the lower ``*_degraded`` thresholds apply.
    """

    __slots__ = ("_buckets", "consecutive", "settings")

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        # [second, calls, failures, monotonic time of the second's first failure (0: none)]
        self._buckets: deque[list[float]] = deque()
        self.consecutive = 0

    def _bucket(self, now: float) -> list[float]:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0, 0.0])
            horizon = second - self.settings.window_s
            while self._buckets and self._buckets[0][0] <= horizon:
                self._buckets.popleft()
        return self._buckets[-1]

    def success(self, now: float | None = None) -> None:
        """Record a call the provider answered (including permanent errors: it is up)."""
        self._bucket(time.monotonic() if now is None else now)[1] += 1
        self.consecutive = 0

    def neutral(self, now: float | None = None) -> None:
        """Record a call that failed for a reason this window does not judge (a model's
        own failure, in its provider's window): it counts in the rate's denominator."""
        self._bucket(time.monotonic() if now is None else now)[1] += 1

    def failure(self, now: float | None = None, *, degraded: bool = False) -> bool:
        """Record a transient failure; return whether the breaker should trip.

        ``degraded``: the provider's status page says this scope is degraded, so the
        lower thresholds of ``BreakerSettings.trip_thresholds`` apply (evidence, never
        proof: it only makes real failures trip sooner).
        """
        at = time.monotonic() if now is None else now
        b = self._bucket(at)
        b[1] += 1
        b[2] += 1
        if not b[3]:
            b[3] = at
        self.consecutive += 1
        consecutive, rate = self.settings.trip_thresholds(degraded=degraded)
        if self.consecutive >= consecutive:
            return True
        calls, failures = self.counts()
        return calls >= self.settings.min_calls and failures >= rate * calls

    def idle(self, now: float | None = None) -> bool:
        """Whether no call fell within the window: nothing here can trip it any more."""
        second = int(time.monotonic() if now is None else now)
        return not self._buckets or self._buckets[-1][0] <= second - self.settings.window_s

    def counts(self) -> tuple[int, int]:
        """(calls, failures) in the window."""
        return int(sum(b[1] for b in self._buckets)), int(sum(b[2] for b in self._buckets))

    def first_failure(self) -> float | None:
        """Monotonic time of the first transient failure still in the window (None: none):
        where a trip's time to detect starts."""
        return next((b[3] for b in self._buckets if b[2]), None)

    def reset(self) -> None:
        """Forget everything (after a state change)."""
        self._buckets.clear()
        self.consecutive = 0
