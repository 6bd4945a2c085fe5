"""Probe providers that are open (or paused); after M successes in a row, half-open them.

Only providers that are not closed are probed, each with exponential backoff and
jitter between failures, so an outage costs the provider a trickle of probes
instead of a retry storm. A probe is a real call (by default the cheapest
request the provider accepts: one token) sent with the header
``x-ridethrough-probe: 1``. A paused provider is probed too (status shows
whether it is up) but never moved: only the operator's resume ends a pause.

One prober per provider is active among replicas (a lease in ai_control,
``probe.<provider>``); when it dies, another replica takes over within the lease.
The holder also reads the provider's status page, if one is configured
(``evidence.py``): evidence that is shown and lowers trip thresholds, never proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Self

from nats.js import JetStreamContext

from services.breaker import LeaseKeeper
from services.breaker.recovery import LeasedPerProvider
from services.config import Settings
from services.errors import ProviderError
from services.prober.evidence import StatusPageWatch
from services.providers.base import Provider
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.prober")

_DEFAULT_MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4o-mini"}


def default_probe(settings: Settings, provider: str) -> tuple[str, dict[str, Any]]:
    """(model, request) of ``provider``'s probe: configured, else a one-token call."""
    p = settings.providers[provider]
    model = p.probe_model or _DEFAULT_MODELS[p.kind]
    request = p.probe_request or {
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "ping"}],
    }
    return model, request


class Prober(LeasedPerProvider):
    """Probes every provider it has an adapter for, one task each."""

    lease = "probe"
    log = log

    def __init__(
        self,
        js: JetStreamContext,
        providers: dict[str, Provider],
        settings: Settings,
        *,
        owner: str,
    ) -> None:
        super().__init__(js, settings, providers, owner=owner)
        self.providers = providers
        self.probes: dict[str, int] = dict.fromkeys(providers, 0)
        self.status_pages: dict[str, StatusPageWatch] = {}

    async def start(self) -> Self:
        """Start the probes, and one status page reader per provider under its lease."""
        await super().start()
        for name, lease in zip(self._names, self._leases, strict=True):
            watch = StatusPageWatch(self.js, self.settings, name, lease, by=self.owner)
            self.status_pages[name] = watch
            self._tasks.append(watch.start())
        return self

    async def _stopped(self) -> None:
        """Close the provider clients."""
        for provider in self.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()

    async def _run(self, name: str, lease: LeaseKeeper) -> None:
        b = self.settings.breaker
        model, request = default_probe(self.settings, name)
        interval = b.probe_interval_s
        successes = 0
        while True:
            raise_if_cancelling()
            state = self.board.state(name)
            if not lease.held or state in ("closed", "half_open"):
                successes, interval = 0, b.probe_interval_s
                await asyncio.sleep(b.board_poll_s)
                continue
            ok = await self._probe(name, model, request)
            if ok:
                successes += 1
                interval = b.probe_interval_s
                if successes >= b.probe_successes and self.board.state(name) == "open":
                    await self._half_open(name, successes)
                    successes = 0
                    continue
            else:
                successes = 0
                interval = min(b.probe_max_interval_s, interval * 2)
            # Full jitter on the upper half: replicas and providers do not probe in step.
            await asyncio.sleep(random.uniform(interval / 2, interval))

    async def _probe(self, name: str, model: str, request: dict[str, Any]) -> bool:
        """One probe; it succeeds when the provider answers within the model's latency
        budget (slow is down too: a slow answer must not half-open a slow provider)."""
        self.probes[name] += 1
        started = time.monotonic()
        try:
            await self.providers[name].call(model, request, probe=True)
        except ProviderError as exc:
            log.info("probe of %s failed: %s (%s)", name, exc.reason, exc.message[:120])
            return False
        took = time.monotonic() - started
        budget = self.settings.providers[name].latency_budget(model)
        if budget is not None and took > budget:
            log.info("probe of %s answered in %.2fs, over its %gs budget", name, took, budget)
            return False
        return True

    async def _half_open(self, name: str, successes: int) -> None:
        await self.board.move(
            name,
            to="half_open",
            allowed_from=("open",),
            by=self.owner,
            reason=f"{successes} probes in a row succeeded",
        )
