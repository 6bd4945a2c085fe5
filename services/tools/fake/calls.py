"""The call log: when each model was called, probes apart, for drills that check the fleet.

The counters say how many requests came; the call log says when, per model, so a reader
can line the calls up with the breaker's history (``ridethrough demo`` counts the calls a
sick model got after its breaker had opened). Each inference request is logged once, when
it arrives, at ``time.time()``: under ``probes`` when it carries ``x-ridethrough-probe: 1``,
else under ``calls``. Times are kept in ``array('d')`` (8 bytes a call); a model's list
stops at ``MAX_PER_MODEL`` entries, dropping its oldest half and counting them in
``dropped``, so a long benchmark cannot eat the memory.
"""

from __future__ import annotations

import time
from array import array
from typing import Any, Final

MAX_PER_MODEL: Final = 1_000_000


class _ModelCalls:
    __slots__ = ("calls", "dropped", "probes")

    def __init__(self) -> None:
        self.calls = array("d")
        self.probes = array("d")
        self.dropped = 0


class CallLog:
    """Arrival times of inference requests per model; touched only on the server's loop."""

    def __init__(self, max_per_model: int = MAX_PER_MODEL) -> None:
        """An empty log keeping at most ``max_per_model`` times per model and kind."""
        if max_per_model < 2:
            raise ValueError("max_per_model must be >= 2")
        self._max = max_per_model
        self._models: dict[str, _ModelCalls] = {}
        self.since = time.time()

    def record(self, model: str, probe: bool) -> None:
        """Log one request for ``model`` arriving now."""
        entry = self._models.get(model)
        if entry is None:
            entry = self._models[model] = _ModelCalls()
        times = entry.probes if probe else entry.calls
        if len(times) >= self._max:
            half = len(times) // 2
            del times[:half]
            entry.dropped += half
        times.append(time.time())

    def snapshot(
        self, model: str | None = None, since: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per model (only ``model``, if given): ``calls`` and ``probes`` (Unix times, oldest
        first, only those at or after ``since`` if given) and ``dropped`` (times no longer
        kept)."""
        out: dict[str, dict[str, Any]] = {}
        for name, entry in sorted(self._models.items()):
            if model is not None and name != model:
                continue
            out[name] = {
                "calls": _after(entry.calls, since),
                "probes": _after(entry.probes, since),
                "dropped": entry.dropped,
            }
        return out


def _after(times: array[float], since: float | None) -> list[float]:
    if since is None:
        return times.tolist()
    return [t for t in times if t >= since]
