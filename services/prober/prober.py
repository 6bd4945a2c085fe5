"""Probe breakers that are open (or paused); after M successes in a row, half-open them.

A scope is a provider or one of its models. An open provider is probed with its probe
model; while it is closed, each open model is probed with a one-token call of that
model. Only scopes that are not closed are probed, each with exponential backoff and
jitter between failures, so an outage costs the provider a trickle of probes
instead of a retry storm. A probe is a real call (by default the cheapest
request the provider accepts: one token) sent with the header
``x-ridethrough-probe: 1``. A paused provider is probed too (status shows
whether it is up) but never moved: only the operator's resume ends a pause.

One prober per provider (for all its scopes) is active among replicas (a lease in
ai_control, ``probe.<provider>``); when it dies, another replica takes over within the lease.
The holder also reads the provider's status page, if one is configured
(``evidence.py``): evidence that is shown and lowers trip thresholds, never proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Self

from nats.js import JetStreamContext

from schemas.subjects import scope_label
from services import metrics
from services.breaker import PAUSED, LeaseKeeper
from services.breaker.recovery import LeasedPerProvider
from services.config import Settings
from services.errors import ProviderError, TransientError
from services.lifecycle.decide import probe_says_up
from services.prober.evidence import StatusPageWatch
from services.providers.base import Provider
from services.providers.mapping import shape_of
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.prober")

_DEFAULT_MODELS = {"anthropic": "claude-haiku-4-5", "openai": "gpt-4o-mini"}


def default_probe(settings: Settings, provider: str) -> tuple[str, dict[str, Any]]:
    """(model, request) of ``provider``'s probe: configured, else a one-token call."""
    p = settings.providers[provider]
    # A Bedrock or Vertex door probes the same model (its model_map names the door's id).
    model = p.probe_model or _DEFAULT_MODELS[shape_of(p.kind)]
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
        schedule: dict[str | None, _Schedule] = {}  # per scope (None: the provider)
        while True:
            raise_if_cancelling()
            due = self._scopes(name) if lease.held else []
            for scope in set(schedule) - set(due):
                del schedule[scope]  # closed, half-open, or not ours: start afresh next time
            for model in due:
                now = time.monotonic()
                plan = schedule.setdefault(model, _Schedule(b.probe_interval_s, now))
                if now < plan.next_at:
                    continue
                ok = await self._probe(name, model)
                if (m := metrics.active) is not None:
                    m.probes.labels(name, m.model(model), "success" if ok else "failure").inc()
                if ok:
                    plan.successes += 1
                    plan.interval = b.probe_interval_s
                    if (
                        plan.successes >= b.probe_successes
                        and self.board.own_state(name, model) == "open"
                    ):
                        await self._half_open(name, model, plan.successes)
                        del schedule[model]
                        continue
                else:
                    plan.successes = 0
                    plan.interval = min(b.probe_max_interval_s, plan.interval * 2)
                # Full jitter on the upper half: replicas and scopes do not probe in step.
                plan.next_at = time.monotonic() + random.uniform(plan.interval / 2, plan.interval)
            soonest = min((p.next_at for p in schedule.values()), default=math.inf)
            await asyncio.sleep(max(0.0, min(b.board_poll_s, soonest - time.monotonic())))

    def _scopes(self, name: str) -> list[str | None]:
        """The scopes of provider ``name`` to probe: the provider itself while it is open or
        paused (its models cannot be told apart through it), else each model that is."""
        if self.board.own_state(name) in ("open", PAUSED):
            return [None]
        return [m for m in self.board.models(name) if self.board.own_state(name, m) in _PROBED]

    async def _probe(self, name: str, model: str | None) -> bool:
        """One probe of the provider (``model`` None: with its probe model) or of one model,
        within ``probe_timeout_s``; whether it says the scope is up (``probe_says_up``:
        slow is down too, a permanent error is an answer)."""
        probe_model, request = default_probe(self.settings, name)
        probe_model = model or probe_model
        self.probes[name] += 1
        key = scope_label(name, model)
        started = time.monotonic()
        failure: ProviderError | None = None
        try:
            async with asyncio.timeout(self.settings.breaker.probe_timeout_s):
                await self.providers[name].call(probe_model, request, probe=True)
        except ProviderError as exc:
            failure = exc
        except TimeoutError:
            failure = TransientError("no answer within probe_timeout_s", reason="timeout")
        took = time.monotonic() - started
        budget = self.settings.providers[name].latency_budget(probe_model)
        slow = budget is not None and took > budget
        up = probe_says_up(
            failure,
            self.settings.worker,
            slow=slow,
            provider_scope=model is None,
            model_known_sick=self.board.own_state(name, probe_model) in _PROBED,
        )
        if failure is not None:
            log.info(
                "probe of %s: %s (%s): %s",
                key,
                failure.reason,
                failure.message[:120],
                "answered" if up else "failed",
            )
        elif slow:
            log.info("probe of %s answered in %.2fs, over its %gs budget", key, took, budget)
        return up

    async def _half_open(self, name: str, model: str | None, successes: int) -> None:
        await self.board.move(
            name,
            model,
            to="half_open",
            allowed_from=("open",),
            by=self.owner,
            reason=f"{successes} probes in a row succeeded",
        )


_PROBED = ("open", PAUSED)


@dataclass(slots=True)
class _Schedule:
    """When a scope is probed next, and its run of successes."""

    interval: float
    next_at: float
    successes: int = 0
