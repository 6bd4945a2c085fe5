"""The optional HTTP port of a service: ``/metrics``, ``/livez``, ``/readyz``.

    /metrics   Prometheus text (``services.metrics``); gauges of the fleet's view are read
               from NATS at scrape time by the replay lease holder (``fleet_view``)
    /livez     200 while the event loop answers (nothing else is asked)
    /readyz    200 when the service can do its work: connected to NATS, and for a worker
               its consumers present and fetching; for the prober and the replayer the
               breaker board read. Never a provider's health: an outage must not empty
               the pods. 503 with the reason otherwise.

Off unless a port is configured (``--http-port``, ``RIDETHROUGH_HTTP__PORT``); the alive
file (``services.liveness``) stays for those who cannot open a port. ``aiohttp.web`` and
``prometheus_client`` are imported only when the port is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from nats.js import JetStreamContext

from schemas import subjects as s
from services import metrics
from services.config import HttpSettings
from services.jetstream.errors import NOT_FOUND
from services.jetstream.streams import subject_counts

log = logging.getLogger("ridethrough.http")

#: Whether a service is ready, and why not ("" when it is).
Readiness = Callable[[], Awaitable[str]]
#: Reads what a scrape exports from NATS (the fleet's view) before the registry is rendered.
Refresh = Callable[[], Awaitable[None]]

#: Longest a readiness check or a scrape's refresh may take.
CHECK_TIMEOUT_S = 5.0


@contextlib.asynccontextmanager
async def http_port(
    settings: HttpSettings, ready: Readiness, refresh: Sequence[Refresh] = ()
) -> AsyncIterator[int | None]:
    """Serve the endpoints while the block runs; yield the bound port (None: off)."""
    if settings.port is None:
        yield None
        return
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    enabled_here = metrics.active is None
    m = metrics.enable(settings)

    async def scrape(_: web.Request) -> web.Response:
        for step in refresh:
            try:
                await asyncio.wait_for(step(), CHECK_TIMEOUT_S)
            except Exception as exc:  # NATS away: the last values stay, the scrape answers
                log.debug("metrics refresh failed: %r", exc)
        body = generate_latest(m.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def livez(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        try:
            why = await asyncio.wait_for(ready(), CHECK_TIMEOUT_S)
        except Exception as exc:
            why = f"readiness check failed: {type(exc).__name__}"
        if why:
            return web.Response(status=503, text=f"not ready: {why}\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = _bound_port(site) or settings.port
    log.info("metrics and health on http://%s:%d (/metrics /livez /readyz)", settings.host, port)
    try:
        yield port
    finally:
        await runner.cleanup()
        if enabled_here:  # a test's port: the next one in this process starts from zero
            metrics.disable()


def preload() -> None:
    """Import what serving the port needs now, so that a service's ``freeze_heap`` keeps
    those modules out of the cyclic GC's scans (imported later, every full collection
    walks them)."""
    import aiohttp.web  # noqa: F401
    import prometheus_client.exposition  # noqa: F401


def _bound_port(site: Any) -> int | None:
    server = getattr(site, "_server", None)
    for sock in getattr(server, "sockets", None) or []:
        return int(sock.getsockname()[1])
    return None


def fleet_view(js: JetStreamContext, replayer: Any) -> Refresh:
    """The scrape step of a replayer: for each provider whose replay lease this replica
    holds, read the fleet's queues, dead letters and workers, and its board's breakers;
    drop the providers it does not hold (their holder exports them)."""

    async def refresh() -> None:
        m = metrics.active
        if m is None:
            return
        held = [name for name, lease in replayer.leases().items() if lease.held]
        for name in replayer.leases():
            if name not in held:
                m.forget(name)
        # The fleet-wide storage: the holder of the first provider's lease alone.
        first = min(replayer.leases(), default=None)
        if first is None or first not in held:
            m.forget_storage()
        else:
            await _step("storage", _storage(js, m))
        if not held:
            return
        parked = await subject_counts(js, s.PARKED_STREAM, s.parked_filter())
        dead = await subject_counts(js, s.DEAD_STREAM, s.dead_filter())
        online = await _workers_online(js)
        board = replayer.board
        for name in held:
            queue: dict[tuple[str, str], int] = {}
            for prio in s.PRIORITIES:
                try:
                    info = await js.consumer_info(s.JOBS_STREAM, s.worker_consumer(name, prio))
                except NOT_FOUND:
                    waiting = in_flight = 0
                else:
                    waiting, in_flight = int(info.num_pending or 0), int(info.num_ack_pending or 0)
                queue[prio, "waiting"] = waiting
                queue[prio, "in_flight"] = in_flight
                queue[prio, "parked"] = 0
            for subject, n in parked.items():
                place = s.parked_place(subject)
                if place is not None and place.provider == name:
                    queue[place.priority, "parked"] = queue.get((place.priority, "parked"), 0) + n
            reasons: dict[str, int] = {}
            for subject, n in dead.items():
                tokens = subject.split(".")
                if len(tokens) > 3 and tokens[2] == name:
                    reasons[tokens[3]] = reasons.get(tokens[3], 0) + n
            states: dict[str | None, str] = {None: board.state(name)}
            states.update({model: board.state(name, model) for model in board.models(name)})
            m.fleet_view(name, states, queue, reasons, online.get(name, 0))
            await _step("backlog age", _ages(js, m, name))

    return refresh


async def _step(what: str, step: Awaitable[None]) -> None:
    """One optional part of a scrape's refresh: its failure (a permission the user lacks,
    NATS away) leaves its gauges as they were and the rest of the scrape unharmed."""
    try:
        await step
    except Exception as exc:
        log.debug("metrics refresh of %s failed: %r", what, exc)


async def _oldest(js: JetStreamContext, stream: str, subjects: Sequence[str]) -> float:
    """Seconds since the oldest message of ``stream`` on ``subjects`` was stored (0: none)."""
    import time

    oldest: float | None = None
    for subject in subjects:
        try:
            msg = await js.get_msg(stream, seq=1, subject=subject, next=True)
        except NOT_FOUND:
            continue
        if msg.time is not None:
            at = msg.time.timestamp()
            oldest = at if oldest is None else min(oldest, at)
    return 0.0 if oldest is None else max(time.time() - oldest, 0.0)


async def _ages(js: JetStreamContext, m: metrics.Metrics, provider: str) -> None:
    """The backlog age of ``provider``: its oldest job per priority, waiting and parked."""
    ages: dict[tuple[str, str], float] = {}
    for prio in s.PRIORITIES:
        ages[prio, "waiting"] = await _oldest(
            js, s.JOBS_STREAM, s.jobs_priority_filters(provider, prio)
        )
        ages[prio, "parked"] = await _oldest(
            js,
            s.PARKED_STREAM,
            (s.legacy_parked_subject(provider, prio), f"ai.parked.{provider}.{prio}.*"),
        )
    m.backlog_ages(provider, ages)


#: The streams whose storage is exported.
STREAMS = (s.JOBS_STREAM, s.PARKED_STREAM, s.RESULTS_STREAM, s.DEAD_STREAM, s.EVENTS_STREAM)


async def _storage(js: JetStreamContext, m: metrics.Metrics) -> None:
    """Bytes and limits of the ridethrough streams and of the account's JetStream."""
    streams: dict[str, tuple[int, int]] = {}
    for name in STREAMS:
        try:
            info = await js.stream_info(name)
        except NOT_FOUND:
            continue
        streams[name] = (int(info.state.bytes or 0), int(info.config.max_bytes or -1))
    account: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(Exception):  # $JS.API.INFO may be refused to this user
        acc = await js.account_info()
        account["file"] = (int(acc.storage), int(acc.limits.max_storage))
        account["memory"] = (int(acc.memory), int(acc.limits.max_memory))
    m.storage(streams, account)


async def _workers_online(js: JetStreamContext) -> dict[str, int]:
    """Per provider, the workers whose live heartbeat names it."""
    from schemas.health import try_decode_beat
    from services.jetstream.kv import keys_of

    kv = await js.key_value(s.WORKERS_BUCKET)
    # One stream-info request (kv.keys() would create a consumer: more than the
    # replayer's user may do, and more than a scrape needs).
    keys = await keys_of(js, s.WORKERS_BUCKET)
    out: dict[str, int] = {}
    for key in keys:
        with contextlib.suppress(Exception):
            entry = await kv.get(key)
            beat = try_decode_beat(entry.value) if entry.value else None
            for provider in beat.providers if beat is not None else []:
                out[provider] = out.get(provider, 0) + 1
    return out
