"""``ridethrough dev``, ``worker``, ``fake-provider`` and ``demo``: running the services."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    JsonFlag,
    NatsUrl,
    app,
    fail,
    print_json,
    run,
    settings_for,
)
from services.config import Settings
from services.errors import RidethroughError
from services.health import health_file as health_file_beating
from services.health import nats_connected
from services.prober import Prober
from services.providers.base import Provider
from services.providers.registry import build_providers
from services.replayer import Replayer
from services.secrets import scrub_logs
from services.stack import dev_nats_url, local_stack, running_recovery, running_worker
from services.worker.app import build_app

HealthFile = Annotated[
    Path | None,
    typer.Option(
        envvar="RIDETHROUGH_HEALTH_FILE",
        help="Rewrite this file every 5 s (`ready` / `not-ready`) for container probes.",
    ),
]


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("nats", "faststream", "httpx", "httpx2", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Records of every logger (the SDKs' debug lines too) reach these handlers: scrub there.
    scrub_logs()


def _signalled() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM. Installed before a service says it is ready: a
    signal sent the moment it does must stop it cleanly, not kill it (and orphan the
    embedded nats-server)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


@app.command()
def worker(
    provider: Annotated[
        list[str] | None, typer.Option(help="Serve only these providers (repeatable).")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Provider calls in flight.")
    ] = None,
    topology: Annotated[bool, typer.Option(help="Create or update the topology at start.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
    health_file: HealthFile = None,
) -> None:
    """Run one worker process until SIGTERM (in-flight jobs finish or are released)."""
    _logging(verbose)
    settings = settings_for(nats_url)
    if concurrency is not None:
        settings = settings.with_changes(
            worker=settings.worker.model_copy(update={"concurrency": concurrency})
        )
    try:
        providers = build_providers(settings, provider)
    except RidethroughError as exc:
        fail(str(exc))
    run(_serve_worker(settings, providers, topology, health_file))


def _freeze_heap() -> None:
    """Keep what a long-running service allocated to start (modules, settings, SDK
    clients: hundreds of thousands of objects) out of the cyclic GC's scans. Measured
    with ``ridethrough bench -s replay``: 0.51-0.53 of the baseline before, 0.56-0.57
    after."""
    gc.freeze()


async def _serve_worker(
    settings: Settings, providers: dict[str, Provider], topology: bool, health_path: Path | None
) -> None:
    """The worker's FastStream app, beating the health file while its broker is connected."""
    app, w = build_app(settings, providers, apply_topology=topology)
    _freeze_heap()
    async with health_file_beating(health_path, lambda: nats_connected(w.broker)):
        await app.run()


async def _run_recovery_service(
    settings: Settings, role: str, health_path: Path | None = None
) -> None:
    from services.jetstream.connection import connect
    from services.stack import service_owner

    nc = await connect(settings, name=f"ridethrough-{role}")
    service: Prober | Replayer
    if role == "prober":
        service = Prober(
            nc.jetstream(), build_providers(settings), settings, owner=service_owner(role)
        )
    else:
        service = Replayer(nc.jetstream(), settings, owner=service_owner(role))
    stop = _signalled()
    await service.start()
    _freeze_heap()
    logging.getLogger(f"ridethrough.{role}").info("%s running", role)
    try:
        async with health_file_beating(health_path, lambda: nats_connected(nc)):
            await stop.wait()
    finally:
        try:
            # Bounded: whatever is left unacked is redelivered to the next replica after
            # ack_wait, and the lease lapses by itself, so a stuck stop loses nothing.
            await asyncio.wait_for(_stop(service, nc), _STOP_BUDGET_S)
        except TimeoutError:
            logging.getLogger(f"ridethrough.{role}").warning(
                "%s did not stop within %.0fs; exiting anyway", role, _STOP_BUDGET_S
            )


#: Longest a prober or replayer may take to stop before it exits regardless.
_STOP_BUDGET_S = 15.0


async def _stop(service: Prober | Replayer, nc: Any) -> None:
    await service.stop()
    await nc.drain()


@app.command()
def prober(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
    health_file: HealthFile = None,
) -> None:
    """Run the health prober alone (probes providers that are not closed; half-opens them)."""
    _logging(verbose)
    run(_run_recovery_service(settings_for(nats_url), "prober", health_file))


@app.command()
def replayer(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
    health_file: HealthFile = None,
) -> None:
    """Run the replayer alone (parked jobs back to the queue, slow start, priority order)."""
    _logging(verbose)
    run(_run_recovery_service(settings_for(nats_url), "replayer", health_file))


@app.command("fake-provider")
def fake_provider(
    host: str = "127.0.0.1",
    port: int = 8787,
    latency_ms: Annotated[float, typer.Option(help="Mean latency of each answer.")] = 0.0,
    error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of calls that fail.")
    ] = 0.0,
    seed: int | None = None,
) -> None:
    """Serve the Anthropic and OpenAI wire protocols with scripted faults (for drills and tests)."""
    from services.providers import fake

    config = fake.FaultConfig(latency_ms=latency_ms, error_rate=error_rate, seed=seed)
    fake.serve(host, port, config)


def _source(ctx: typer.Context, name: str) -> str:
    """Where option ``name`` came from: ``COMMANDLINE``, ``ENVIRONMENT``, ``DEFAULT``...
    (by name: typer ships its own copy of click's ``ParameterSource``)."""
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else "DEFAULT"


@app.command()
def dev(
    ctx: typer.Context,
    port: Annotated[
        int,
        typer.Option(help="Port of the embedded NATS server (starts it, even if NATS_URL is set)."),
    ] = 4222,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="JetStream store (default: a temp dir); starts the embedded server."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
) -> None:
    """Run everything locally: embedded NATS, topology, a worker, the prober, the replayer,
    and the fake provider for providers without an API key. Ctrl-C stops it all.

    NATS: --port or --data-dir starts the embedded server; otherwise --nats-url or
    NATS_URL names a running one; with none of them, the embedded server on 4222."""
    from_env = _source(ctx, "nats_url") == "ENVIRONMENT"
    try:
        url = dev_nats_url(
            None if from_env else nats_url,
            nats_url if from_env else None,
            port_given=_source(ctx, "port") == "COMMANDLINE",
            data_dir_given=_source(ctx, "data_dir") == "COMMANDLINE",
        )
    except RidethroughError as exc:
        fail(str(exc))
    _logging(verbose)
    settings = settings_for(None)
    log = logging.getLogger("ridethrough.dev")
    if url is None and from_env:
        log.info("NATS_URL ignored: --port/--data-dir start the embedded server")

    async def go(stack_settings: Settings) -> None:
        stop = _signalled()
        async with running_worker(stack_settings), running_recovery(stack_settings):
            where = stack_settings.nats_servers[0]
            log.info(
                "ready: try `ridethrough submit --provider anthropic --model claude-x "
                "--prompt hi --wait --nats-url %s`",
                where,
            )
            await stop.wait()
        log.info("stopped")

    try:
        with local_stack(
            settings,
            nats_url=url,
            port=port if url is None else None,
            data_dir=data_dir if url is None else None,
        ) as stack:
            where = stack.settings.nats_servers[0]
            log.info("NATS at %s%s", where, "" if url else " (embedded)")
            if stack.fake is not None:
                log.info(
                    "fake provider at %s for %s", stack.fake.url, ", ".join(stack.fake_providers)
                )
            run(go(stack.settings))
    except RidethroughError as exc:
        fail(str(exc))


@app.command()
def demo(
    jobs: Annotated[int, typer.Option(min=1, help="How many jobs to submit.")] = 600,
    rate: Annotated[float, typer.Option(min=0.1, help="Jobs submitted per second.")] = 50.0,
    outage: Annotated[float, typer.Option(min=0.0, help="Seconds the 529 storm lasts.")] = 8.0,
    outage_at: Annotated[float, typer.Option(min=0.0, help="Seconds of load before it.")] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of the fake provider's latencies.")] = 1,
    as_json: JsonFlag = False,
) -> None:
    """The outage drill: a fleet on this machine rides through a 529 storm.

    Starts embedded NATS, the fake provider, two workers, the prober and the
    replayer; submits jobs steadily; turns a 529 storm on and off; reports.
    Exits 1 if any job was lost or duplicated.
    """
    from rich.console import Console

    from services.demo import REPORT_KEYS, Drill, report_lines, run_drill

    logging.basicConfig(level=logging.WARNING)
    drill = Drill(jobs=jobs, rate=rate, outage_s=outage, outage_at_s=outage_at, seed=seed)
    console = None if as_json else Console()
    try:
        report = run(run_drill(drill, settings_for(None), console=console))
    except RidethroughError as exc:
        fail(str(exc))
    if as_json:
        print_json({key: report[key] for key in REPORT_KEYS})
    else:
        for line in report_lines(report):
            typer.echo(line)
    ok = report["lost"] == 0 and report["duplicates"] == 0
    raise typer.Exit(EXIT_OK if ok else EXIT_JOB_FAILED)
