"""Tally: the jobs each outage failed over or expired, counted in memory and published
coalesced, for the outage's summary (``services/notifier``).

A worker counts a fail-over (and an expiry) that happens while the job's scope is open or
half-open against that scope's outage; the replayer counts a parked job it expires
against the outage it was parked in (``park.outage_id``). Counting is a dict increment;
about once a second (``flush_s``) the counts go out as one ``TallyEvent`` per outage on
``ai.events.tally.<provider>``, and a process that stops flushes what it has. Nothing is
published per job, nor while there is nothing to say.

A tally is lost when its process is killed between two flushes (at most ``flush_s`` of
counts) or NATS refuses it for longer than the process lives: the sums are lower bounds.
A publish that fails keeps its counts for the next flush; a retried publish carries the
same msg id (``tally:<process>:<n>``), so the dedup window never counts it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from nats.js import JetStreamContext

from schemas.codec import encode
from schemas.events import TallyEvent
from schemas.subjects import tally_msg_id, tally_subject
from services.jetstream.streams import publish

log = logging.getLogger("ridethrough.tally")

#: Seconds between two flushes (the notifier waits twice this after a close before it
#: reads an outage's tallies).
FLUSH_S = 1.0

#: The counts of one outage: (provider, outage id) -> [failed over, expired].
Counts = dict[tuple[str, str], list[int]]


class Tally:
    """Per-outage counts of one process, flushed every ``flush_s`` while started."""

    def __init__(self, js: JetStreamContext, *, by: str, flush_s: float = FLUSH_S) -> None:
        self.js = js
        self.by = by
        self.flush_s = flush_s
        # One stem per run: a restarted process (same host and pid, as in a container)
        # must not reuse msg ids the dedup window still remembers.
        self._stem = f"{by}-{secrets.token_hex(4)}"
        self._counts: Counts = {}
        self._sent = 0  # msg ids used
        self._pending: list[tuple[str, TallyEvent]] = []  # made, not yet stored (msg id kept)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def failed_over(self, provider: str, outage_id: str, n: int = 1) -> None:
        """Count ``n`` jobs of ``provider``'s outage ``outage_id`` sent to a fallback."""
        if outage_id:
            self._counts.setdefault((provider, outage_id), [0, 0])[0] += n

    def expired(self, provider: str, outage_id: str, n: int = 1) -> None:
        """Count ``n`` jobs of ``provider``'s outage ``outage_id`` that expired."""
        if outage_id:
            self._counts.setdefault((provider, outage_id), [0, 0])[1] += n

    def start(self) -> Tally:
        """Flush every ``flush_s`` until ``stop``."""
        self._task = asyncio.create_task(self._flushing())
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop flushing in the background, and flush what is left (within ``timeout``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except Exception as exc:  # NATS away at shutdown: those counts are lost (a bound)
            log.warning("last tally not published: %r", exc)

    async def _flushing(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception as exc:  # kept for the next flush
                log.info("tally not published yet (%r); retried in %gs", exc, self.flush_s)

    async def flush(self) -> int:
        """Publish the counts gathered since the last flush, one event per outage; how
        many events were stored. A failure keeps the unpublished ones (with their msg ids)
        for the next flush."""
        async with self._lock:
            for (provider, outage), (failed_over, expired) in self._counts.items():
                self._sent += 1
                event = TallyEvent(
                    provider=provider,
                    outage_id=outage,
                    failed_over=failed_over,
                    expired=expired,
                    by=self.by,
                )
                self._pending.append((tally_msg_id(self._stem, self._sent), event))
            self._counts = {}
            stored = 0
            while self._pending:
                msg_id, event = self._pending[0]
                await publish(
                    self.js,
                    tally_subject(event.provider),
                    encode(event),
                    msg_id=msg_id,
                    timeout=5.0,
                )
                self._pending.pop(0)
                stored += 1
            return stored
