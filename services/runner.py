"""Running a service in this process until SIGTERM: the worker, the prober, the replayer,
or all of them on one machine (``ridethrough dev``).

Each beats its alive file (``services/liveness.py``) while its NATS connection is up,
serves ``/metrics``, ``/livez`` and ``/readyz`` when an HTTP port is configured
(``services/monitor.py``), and keeps the objects it allocated to start out of the cyclic
GC's scans.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

from services import tracing
from services.config import Settings
from services.liveness import alive_file, nats_connected
from services.monitor import fleet_view, http_port
from services.prober import Prober
from services.providers.base import Provider
from services.providers.registry import build_providers
from services.replayer import Replayer
from services.secrets import scrub_logs
from services.worker.app import build_app

#: Longest a prober or replayer may take to stop before it exits regardless.
STOP_BUDGET_S = 15.0


def configure_logging(verbose: bool) -> None:
    """The logging every service runs with: INFO (DEBUG if ``verbose``), the chatty
    libraries at WARNING, and every record scrubbed of secrets."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("nats", "faststream", "httpx", "httpx2", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Records of every logger (the SDKs' debug lines too) reach these handlers: scrub there.
    scrub_logs()


def signalled() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM. Installed before a service says it is ready: a
    signal sent the moment it does must stop it cleanly, not kill it (and orphan the
    embedded nats-server of ``dev``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def freeze_heap() -> None:
    """Keep what a long-running service allocated to start (modules, settings, SDK
    clients: hundreds of thousands of objects) out of the cyclic GC's scans. Measured
    with ``ridethrough bench -s replay``: 0.51-0.53 of the baseline before, 0.56-0.57
    after."""
    gc.freeze()


#: A worker's young-generation threshold (allocations between collections; CPython's
#: default is 700). A worker allocates some 40 containers per job and holds hundreds of
#: jobs in flight, so at 700 each collection mostly scans, and promotes to the older
#: generations, the live objects of jobs under way: about 30 µs of CPU per job.
WORKER_GC_YOUNG: Final = 10_000


def worker_gc() -> None:
    """``freeze_heap``, and young collections every ``WORKER_GC_YOUNG`` allocations: a
    job's short-lived objects are freed by reference counting long before a collection,
    which then finds few live ones (cycles wait a little longer to be freed). Measured
    with ``ridethrough bench -s worker``: GC time from ~30 µs to ~1 µs per job."""
    freeze_heap()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(WORKER_GC_YOUNG, older, oldest)


async def serve_worker(
    settings: Settings, providers: dict[str, Provider], topology: bool, alive_path: Path | None
) -> None:
    """The worker's FastStream app, beating the alive file while its broker is connected."""
    tracing.configure(settings.tracing, "worker")
    if settings.http.port is not None:
        from services import metrics
        from services.monitor import preload

        metrics.enable(settings.http)  # before the first job: its hooks count from the start
        preload()  # before freeze_heap: the web server's modules out of the GC's scans
    app, w = build_app(settings, providers, apply_topology=topology)
    worker_gc()
    try:
        async with (
            alive_file(alive_path, lambda: nats_connected(w.broker)),
            http_port(settings.http, w.readiness),
        ):
            await app.run()
    finally:
        tracing.shutdown()  # queued spans are sent


async def serve_recovery(settings: Settings, role: str, alive_path: Path | None = None) -> None:
    """The prober or the replayer (``role``) until signalled, beating the alive file
    while connected; then a stop bounded by ``STOP_BUDGET_S``."""
    from services.breaker.recovery import service_owner
    from services.jetstream.connection import connect

    tracing.configure(settings.tracing, role)
    if settings.http.port is not None:
        from services import metrics

        metrics.enable(settings.http)
    nc = await connect(settings, name=f"ridethrough-{role}")
    service: Prober | Replayer
    if role == "prober":
        service = Prober(
            nc.jetstream(), build_providers(settings), settings, owner=service_owner(role)
        )
    else:
        service = Replayer(nc.jetstream(), settings, owner=service_owner(role))
    stop = signalled()
    await service.start()
    freeze_heap()
    logging.getLogger(f"ridethrough.{role}").info("%s running", role)
    refresh = [fleet_view(nc.jetstream(), service)] if role == "replayer" else []

    async def readiness() -> str:
        if not nats_connected(nc):
            return "not connected to NATS"
        return "" if service.board.health_kv is not None else "breaker board not read"

    try:
        async with (
            alive_file(alive_path, lambda: nats_connected(nc)),
            http_port(settings.http, readiness, refresh),
        ):
            await stop.wait()
    finally:
        try:
            # Bounded: whatever is left unacked is redelivered to the next replica after
            # ack_wait, and the lease lapses by itself, so a stuck stop loses nothing.
            await asyncio.wait_for(_stop(service, nc), STOP_BUDGET_S)
        except TimeoutError:
            logging.getLogger(f"ridethrough.{role}").warning(
                "%s did not stop within %.0fs; exiting anyway", role, STOP_BUDGET_S
            )
        tracing.shutdown()


async def _stop(service: Prober | Replayer, nc: Any) -> None:
    await service.stop()
    await nc.drain()


_dev_log = logging.getLogger("ridethrough.dev")


@contextlib.asynccontextmanager
async def _no_gateway() -> AsyncIterator[str | None]:
    yield None


@contextlib.contextmanager
def dev_stack(
    settings: Settings, *, nats_url: str | None, port: int, data_dir: Path | None
) -> Iterator[Settings]:
    """Embedded NATS (on ``port``, storing in ``data_dir``) unless ``nats_url``, and the
    fake provider for providers without a key; yield settings pointing at them."""
    from services.tools.stack import local_stack

    with local_stack(
        settings,
        nats_url=nats_url,
        port=port if nats_url is None else None,
        data_dir=data_dir if nats_url is None else None,
    ) as stack:
        where = stack.settings.nats_servers[0]
        _dev_log.info("NATS at %s%s", where, "" if nats_url else " (embedded)")
        if stack.fake is not None:
            _dev_log.info(
                "fake provider at %s for %s", stack.fake.url, ", ".join(stack.fake_providers)
            )
        yield stack.settings


#: The gateway key ``ridethrough dev`` opens its gateway with when none is configured
#: (tenant ``dev``; it opens the status page too). For a laptop, never for production.
DEV_GATEWAY_KEY = "ridethrough-dev-key"


def dev_gateway_settings(settings: Settings, port: int) -> Settings:
    """The gateway of ``ridethrough dev``: on ``port`` (0: any free one) of 127.0.0.1, with
    the dev key when no gateway key is configured."""
    from services.gateway.keys import key_digest

    gw = settings.gateway
    update: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if not gw.keys and gw.keys_file is None:
        update["keys"] = {key_digest(DEV_GATEWAY_KEY): "dev"}
        if not gw.operator_keys:
            update["operator_keys"] = [key_digest(DEV_GATEWAY_KEY)]
    if gw.openai_provider is not None and gw.openai_provider not in settings.providers:
        update["openai_provider"] = None
    return settings.with_changes(gateway=gw.model_copy(update=update))


async def serve_dev(settings: Settings, gateway_port: int | None = 8080) -> None:
    """A worker, the prober, the replayer and the gateway (unless ``gateway_port`` is
    None) in this event loop until signalled."""
    from services.tools.devstack import port_in_use
    from services.tools.stack import running_recovery, running_worker

    stop = signalled()
    tracing.configure(settings.tracing, "dev")
    gateway: contextlib.AbstractAsyncContextManager[str | None] = _no_gateway()
    if gateway_port is not None:
        from services.gateway import running_gateway

        if gateway_port and port_in_use(gateway_port):
            _dev_log.warning("port %d is taken: the gateway takes a free one", gateway_port)
            gateway_port = 0
        gateway = running_gateway(dev_gateway_settings(settings, gateway_port))
    if settings.http.port is not None:
        from services import metrics

        metrics.enable(settings.http)
    async with (
        running_worker(settings) as (_, worker),
        running_recovery(settings) as (_, replayer),
        http_port(settings.http, worker.readiness, [fleet_view(replayer.js, replayer)]),
        gateway as gateway_url,
    ):
        where = settings.nats_servers[0]
        if gateway_url is not None:
            keyed = not settings.gateway.keys and settings.gateway.keys_file is None
            _dev_log.info(
                "gateway at %s (POST /v1/messages, /v1/chat/completions; status page %s/status)%s",
                gateway_url,
                gateway_url,
                f": API key {DEV_GATEWAY_KEY!r}" if keyed else "",
            )
        _dev_log.info(
            "ready: try `ridethrough submit --provider anthropic --model claude-x "
            "--prompt hi --wait --nats-url %s`",
            where,
        )
        await stop.wait()
    _dev_log.info("stopped")
