"""The worker as a FastStream app: one batch pull subscriber per provider and priority.

Each provider has one durable consumer per priority, ``workers-<provider>-<priority>``,
shared by every worker process: a consumer delivers oldest first, so only separate
consumers let a high job overtake the low ones stored before it. Messages arrive in
batches (FastStream's batch pull: about six times the per-message subscriber's
throughput) as raw nats-py messages, which ``JobRunner`` settles explicitly
(``AckPolicy.MANUAL``: FastStream's default would terminate, that is delete, a
work-queue message on any exception).

In-flight calls per process are capped by ``WorkerSettings.concurrency``; a
batch is not fetched until there is room for it. Fetched jobs wait for a call slot in
``PrioritySlots``: while several priorities wait, freed slots go by
``priority_weights`` (high 16, normal 4, low 1 of every 21), so low is slowed by a
backlog of high, never starved. Long calls, and jobs waiting for a slot, are kept alive
with ``in_progress()`` heartbeats. On SIGTERM the worker stops fetching, lets
in-flight jobs finish for ``shutdown_grace_s``, then releases the rest (nak),
so nothing waits for ``ack_wait`` and nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.aio.msg import Msg

from schemas.codec import encode
from schemas.health import WorkerBeat
from schemas.subjects import JOBS_STREAM, PRIORITIES, WORKERS_BUCKET, jobs_priority_filters
from services.breaker import HealthBoard
from services.breaker.evidence import EvidenceView
from services.breaker.tally import Tally
from services.config import Settings
from services.jetstream.connection import broker_options
from services.jetstream.pull import guard_fetch_from_start
from services.jetstream.topology import ensure_topology, legacy_jobs_seq, worker_consumer_config
from services.providers.base import Provider
from services.tasks import raise_if_cancelling
from services.worker.runtime import JobRunner
from services.worker.slots import AdaptiveLimit, PrioritySlots

log = logging.getLogger("ridethrough.worker")


async def _raw_decoder(msg: NatsMessage) -> Any:
    # Hand the handler the raw nats-py messages: the runner decodes with msgspec,
    # and a body that is not JSON must reach it (to become a dead letter) rather
    # than fail inside FastStream.
    return msg.raw_message


class Worker:
    """In-flight bookkeeping, heartbeats and graceful shutdown around a ``JobRunner``."""

    def __init__(self, settings: Settings, providers: dict[str, Provider]) -> None:
        self.settings = settings
        self.providers = providers
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        self.broker = NatsBroker(**_broker_options(settings), logger=None)
        self.runner: JobRunner | None = None
        self.board: HealthBoard | None = None
        self.evidence: EvidenceView | None = None
        #: Jobs failed over or expired per outage, published coalesced (the summaries').
        self.tally: Tally | None = None
        self._slots = PrioritySlots(settings.worker.concurrency, settings.worker.priority_weights)
        #: Per provider, the calls in flight it has shown it accepts (empty: not adaptive).
        self.limits: dict[str, AdaptiveLimit] = (
            {
                name: AdaptiveLimit(settings.worker.concurrency, settings.worker.priority_weights)
                for name in providers
            }
            if settings.worker.adaptive_limit
            else {}
        )
        self._inflight: dict[asyncio.Task[None], tuple[Msg, float]] = {}
        #: Fetched jobs waiting for a slot, with when they were last kept alive.
        self._held: list[_Held] = []
        self._subscribers: list[Any] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._workers_kv: Any = None
        self.started_at = datetime.now(UTC)
        self._stopping = False
        self._ready = asyncio.Event()
        batch = min(settings.worker.batch_size, settings.worker.concurrency)
        for name in sorted(providers):
            for priority in PRIORITIES:
                sub = self.broker.subscriber(
                    jobs_priority_filters(name, priority)[0],
                    stream=JStream(JOBS_STREAM, declare=False),
                    durable=worker_consumer_config(settings, name, priority).durable_name,
                    # Used only if the consumer is missing (--no-topology): both job forms.
                    config=worker_consumer_config(settings, name, priority),
                    pull_sub=PullSub(
                        batch_size=batch, timeout=settings.worker.fetch_timeout_s, batch=True
                    ),
                    ack_policy=AckPolicy.MANUAL,
                    decoder=_raw_decoder,
                    # FastStream's pull inbox ignores the connection's prefix unless told.
                    inbox_prefix=f"{settings.nats.inbox_prefix}.".encode(),
                )
                sub(self._handler(name, priority))
                guard_fetch_from_start(sub)
                self._subscribers.append(sub)

    @property
    def in_flight(self) -> int:
        """Jobs this process holds right now."""
        return len(self._inflight)

    async def readiness(self) -> str:
        """Why this worker cannot take jobs now ("" when it can): connected to NATS, its
        consumers present, its subscribers fetching. A provider's health is no part of it."""
        from services.jetstream.errors import NOT_FOUND
        from services.liveness import nats_connected

        if not nats_connected(self.broker):
            return "not connected to NATS"
        if self.runner is None or self._stopping:
            return "starting" if self.runner is None else "stopping"
        for sub in self._subscribers:
            tasks = getattr(sub, "tasks", [])
            if not getattr(sub, "running", False) or not tasks or any(t.done() for t in tasks):
                return "not fetching"
        js = self.broker.config.connection_state.stream
        for name in sorted(self.providers):
            for priority in PRIORITIES:
                durable = worker_consumer_config(self.settings, name, priority).durable_name
                try:
                    await js.consumer_info(JOBS_STREAM, durable)
                except NOT_FOUND:
                    return f"consumer {durable} is missing"
        return ""

    def _handler(self, provider: str, priority: str) -> Callable[[list[Any]], Awaitable[None]]:
        async def handle_batch(msgs: list[Any]) -> None:
            await self.handle_batch(msgs, priority, provider)

        return handle_batch

    async def handle_batch(
        self, msgs: list[Any], priority: str = "normal", provider: str | None = None
    ) -> None:
        """Start one task per message, waiting for a free slot (by priority) before each:
        first one of its provider's (its ``AdaptiveLimit``), then one of the process's."""
        if self.runner is None:  # FastStream starts fetching before after_startup has run
            await self._ready.wait()
        assert self.runner is not None
        runner = self.runner
        limit = self.limits.get(provider) if provider is not None else None
        held = _Held(deque(msgs), time.monotonic())
        self._held.append(held)
        pending = held.msgs
        try:
            while pending:
                if limit is not None:
                    await limit.slots.acquire(priority)
                try:
                    await self._slots.acquire(priority)
                except BaseException:
                    if limit is not None:
                        limit.slots.release()
                    raise
                msg = pending.popleft()
                task = asyncio.create_task(runner.process(msg))
                self._inflight[task] = (msg, time.monotonic())
                task.add_done_callback(self._done)
                if limit is not None:
                    task.add_done_callback(limit.release)
        except asyncio.CancelledError:
            for msg in pending:  # fetched but never started: hand back at once
                with contextlib.suppress(Exception):
                    await msg.nak()
            pending.clear()
            raise
        finally:
            self._held.remove(held)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        self._slots.release()

    async def _heartbeats(self) -> None:
        every = max(self.settings.worker.ack_wait_s / 3, 0.2)
        while True:
            raise_if_cancelling()
            await asyncio.sleep(every / 2)
            now = time.monotonic()
            for task, (msg, last) in list(self._inflight.items()):
                if now - last >= every and not task.done():
                    self._inflight[task] = (msg, now)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
            # Jobs waiting for a slot: low ones may wait long behind a backlog of high.
            for held in list(self._held):
                if now - held.beaten >= every:
                    held.beaten = now
                    for msg in list(held.msgs):
                        with contextlib.suppress(Exception):
                            await msg.in_progress()

    async def _beats(self, js: Any) -> None:
        """Announce this worker in ``ai_workers`` (status shows who is online)."""
        kv = self._workers_kv = await js.key_value(WORKERS_BUCKET)
        every = max(self.settings.nats.worker_ttl_s / 3, 0.5)
        while True:
            runner = self.runner
            beat = WorkerBeat(
                worker_id=self.worker_id,
                providers=sorted(self.providers),
                in_flight=self.in_flight,
                concurrency=self.settings.worker.concurrency,
                stats=runner.stats.as_dict() if runner is not None else {},
                windows=runner.window_counts() if runner is not None else {},
                started_at=self.started_at,
            )
            try:
                await kv.put(self.worker_id, encode(beat))
            except Exception as exc:  # NATS away for a moment: the next beat will do
                log.debug("heartbeat failed: %s", exc)
            raise_if_cancelling()
            await asyncio.sleep(every)

    async def start(self) -> None:
        """Called once the broker is connected: prepare the runner and heartbeats."""
        js = self.broker.config.connection_state.stream
        self.board = await HealthBoard(js, self.settings.providers, self.settings.breaker).start()
        self.evidence = await EvidenceView(
            js, self.settings.providers, self.settings.breaker
        ).start()
        legacy = await legacy_jobs_seq(js)
        self.tally = Tally(js, by=self.worker_id).start()
        self.runner = JobRunner(
            js,
            self.providers,
            self.settings.worker,
            max_payload=self.broker.config.connection_state.connection.max_payload,
            legacy_seq=legacy,
            worker_id=self.worker_id,
            board=self.board,
            evidence=self.evidence,
            breaker=self.settings.breaker,
            kinds={name: p.kind for name, p in self.settings.providers.items()},
            provider_settings=self.settings.providers,
            bodies_timeout_s=self.settings.bodies.timeout_s,
            tally=self.tally,
            limits=self.limits,
        )
        self._ready.set()
        self._heartbeat = asyncio.create_task(self._heartbeats())
        self._beat = asyncio.create_task(self._beats(js))

    async def stop(self) -> None:
        """Stop fetching, finish in-flight jobs within the grace period, release the rest."""
        if self._stopping:
            return
        self._stopping = True
        for sub in self._subscribers:
            with contextlib.suppress(Exception):
                await sub.stop()
        tasks = list(self._inflight)
        if tasks:
            log.info(
                "draining %d in-flight jobs (grace %.0fs)",
                len(tasks),
                self.settings.worker.shutdown_grace_s,
            )
            _, late = await asyncio.wait(tasks, timeout=self.settings.worker.shutdown_grace_s)
            for task in late:
                task.cancel()  # JobRunner.process naks on cancellation
            if late:
                await asyncio.wait(late, timeout=5)
                log.info("released %d unfinished jobs for redelivery", len(late))
        for beat in (self._heartbeat, self._beat):
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
        if self.tally is not None:  # what the drained jobs counted too
            await self.tally.stop()
        if self._workers_kv is not None:  # gone from `status` now, not when the beat expires
            with contextlib.suppress(Exception):
                await self._workers_kv.delete(self.worker_id)
        if self.board is not None:
            await self.board.stop()
        if self.evidence is not None:
            await self.evidence.stop()
        for provider in self.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()


class _Held:
    """A fetched batch's jobs not started yet, and when they were last kept alive."""

    __slots__ = ("beaten", "msgs")

    def __init__(self, msgs: deque[Msg], beaten: float) -> None:
        self.msgs = msgs
        self.beaten = beaten


def _broker_options(settings: Settings) -> dict[str, Any]:
    # Credentials and TLS reach FastStream as its ``security=`` object.
    return broker_options(settings)


def build_app(
    settings: Settings, providers: dict[str, Provider], *, apply_topology: bool = True
) -> tuple[FastStream, Worker]:
    """The FastStream app of one worker process, and the ``Worker`` it drives."""
    worker = Worker(settings, providers)

    async def after_startup() -> None:
        await worker.start()

    async def on_startup() -> None:
        if apply_topology:
            from services.jetstream.connection import connect

            nc = await connect(settings, name="ridethrough-topology")
            try:
                await ensure_topology(nc.jetstream(), settings)
            finally:
                await nc.close()

    app = FastStream(
        worker.broker,
        on_startup=[on_startup],
        after_startup=[after_startup],
        on_shutdown=[worker.stop],
        logger=None,
    )
    return app, worker


async def run_worker(
    settings: Settings, providers: dict[str, Provider], *, apply_topology: bool = True
) -> None:
    """Run one worker until SIGINT or SIGTERM."""
    app, _ = build_app(settings, providers, apply_topology=apply_topology)
    await app.run()
