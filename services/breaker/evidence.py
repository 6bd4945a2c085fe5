"""What the status pages say, as this process sees it: a read-only view of the
``evidence.<provider>`` keys of ai_control, refreshed by polling.

The prober writes the evidence (``services/prober/evidence.py``); a worker asks
``degraded(provider, model)`` before it records a failure, and a degraded scope trips at
the lower thresholds (``SlidingWindow.failure(degraded=...)``). Evidence is never proof:
nothing here moves a breaker, and a view that cannot be refreshed keeps what it knew.

An entry that cannot be decoded leaves the view of its provider as it was (no evidence,
if there was none); ``unreadable`` counts such entries, one per key and revision, each
logged once as a warning, as on the breaker board.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Self

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas.health import Evidence, try_decode_evidence
from schemas.subjects import CONTROL_BUCKET, evidence_key
from services.breaker.board import log, warn_unreadable
from services.config import BreakerSettings
from services.jetstream.kv import read_entry
from services.tasks import raise_if_cancelling


class EvidenceView:
    """Every provider's status page evidence, re-read every ``evidence_poll_s``."""

    def __init__(
        self, js: JetStreamContext, providers: Iterable[str], settings: BreakerSettings
    ) -> None:
        self.js = js
        self.providers = sorted(set(providers))
        self.settings = settings
        self.evidence: dict[str, Evidence | None] = dict.fromkeys(self.providers)
        self.unreadable = 0
        self._seen: dict[str, int] = {}  # key -> revision warned about
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Self:
        """Bind ai_control, read once, and keep polling in the background."""
        self._kv = await self.js.key_value(CONTROL_BUCKET)
        await self.refresh()
        self._task = asyncio.create_task(self._poll())
        return self

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(self.settings.evidence_poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # NATS away for a moment: keep the last view
                log.debug("evidence refresh failed: %s", exc)

    async def refresh(self) -> None:
        """Re-read every provider's evidence."""
        if self._kv is None:
            self._kv = await self.js.key_value(CONTROL_BUCKET)
        for p in self.providers:
            key = evidence_key(p)
            raw, revision = await read_entry(self._kv, key)
            if raw is None:
                self.evidence[p] = None
                continue
            evidence = try_decode_evidence(raw)
            if evidence is None or evidence.provider != p:
                if self._seen.get(key) != revision:
                    self._seen[key] = revision
                    self.unreadable += 1
                    warn_unreadable(CONTROL_BUCKET, key, revision, raw, "the last evidence known")
                continue
            self.evidence[p] = evidence

    def degraded(self, provider: str, model: str | None = None) -> bool:
        """Whether the status page says the scope is degraded: the provider (``model``
        None) by a component mapped to ``*``; a model by its own component or a ``*`` one."""
        evidence = self.evidence.get(provider)
        return evidence is not None and evidence.degrades(model)
