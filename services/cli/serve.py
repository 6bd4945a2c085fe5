"""``ridethrough topology``, ``worker``, ``prober``, ``replayer``, ``gateway``, ``fake-provider``,
``dev`` and ``demo``: setting up and running the services."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from services.cli.common import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    JsonFlag,
    NatsUrl,
    check,
    fail,
    print_json,
    run,
    settings_for,
    with_js,
)
from services.config import Settings
from services.errors import RidethroughError

AliveFile = Annotated[
    Path | None,
    typer.Option(
        "--alive-file",
        "--health-file",  # its name before 0.2, kept for existing manifests
        envvar=["RIDETHROUGH_ALIVE_FILE", "RIDETHROUGH_HEALTH_FILE"],
        help="Rewrite this file every 5 s (`ready` / `not-ready`) for container probes.",
    ),
]

HttpPort = Annotated[
    int | None,
    typer.Option(
        "--http-port",
        min=0,
        max=65535,
        help="Serve /metrics, /livez and /readyz on this port (default: "
        "RIDETHROUGH_HTTP__PORT, else off).",
    ),
]


def _with_port(settings: Settings, port: int | None) -> Settings:
    """``settings`` with the HTTP port of ``--http-port`` (unchanged when not given)."""
    if port is None:
        return settings
    return settings.with_changes(http=settings.http.model_copy(update={"port": port}))


def topology(as_json: JsonFlag = False, nats_url: NatsUrl = None) -> None:
    """Create or update every stream, consumer and bucket (idempotent)."""
    from services.jetstream.topology import ensure_topology

    settings = settings_for(nats_url)
    report = with_js(
        settings, lambda js: ensure_topology(js, settings), name="ridethrough-topology"
    )
    if as_json:
        print_json(
            {
                "created": report.created,
                "updated": report.updated,
                "unchanged": report.unchanged,
                "removed": report.removed,
            }
        )
    else:
        for word, names in (
            ("created", report.created),
            ("updated", report.updated),
            ("removed", report.removed),
        ):
            for name in names:
                typer.echo(f"{word} {name}")
        typer.echo(f"{len(report.unchanged)} unchanged")


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
    alive_file: AliveFile = None,
    http_port: HttpPort = None,
) -> None:
    """Run one worker process until SIGTERM (in-flight jobs finish or are released)."""
    from services.providers.registry import build_providers
    from services.runner import configure_logging, serve_worker

    configure_logging(verbose)
    settings = _with_port(settings_for(nats_url), http_port)
    if concurrency is not None:
        settings = settings.with_changes(
            worker=settings.worker.model_copy(update={"concurrency": concurrency})
        )
    from services import tracing

    # Before the providers: their SDK clients trace (metadata only) only when we do.
    check(tracing.configure, settings.tracing, "worker")
    providers = check(build_providers, settings, provider)
    run(serve_worker(settings, providers, topology, alive_file))


def prober(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
    alive_file: AliveFile = None,
    http_port: HttpPort = None,
) -> None:
    """Run the health prober alone (probes providers that are not closed; half-opens them)."""
    from services.runner import configure_logging, serve_recovery

    configure_logging(verbose)
    run(serve_recovery(_with_port(settings_for(nats_url), http_port), "prober", alive_file))


def replayer(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
    alive_file: AliveFile = None,
    http_port: HttpPort = None,
) -> None:
    """Run the replayer alone (parked jobs back to the queue, slow start, priority order)."""
    from services.runner import configure_logging, serve_recovery

    configure_logging(verbose)
    run(serve_recovery(_with_port(settings_for(nats_url), http_port), "replayer", alive_file))


def notifier(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
    alive_file: AliveFile = None,
    http_port: HttpPort = None,
) -> None:
    """Run the outage notifier: breaker events and operator actions to a signed webhook
    (CloudEvents), Slack and PagerDuty (RIDETHROUGH_NOTIFY__* settings; one active among
    replicas)."""
    from services.notifier import serve_notifier
    from services.runner import configure_logging

    configure_logging(verbose)
    run(serve_notifier(_with_port(settings_for(nats_url), http_port), alive_file))


def gateway(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (0 picks a free one).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    nats_url: NatsUrl = None,
) -> None:
    """Serve the HTTP gateway: the Anthropic Messages API (POST /v1/messages), each call
    a durable job that rides through outages. Keys: RIDETHROUGH_GATEWAY__KEYS or
    RIDETHROUGH_GATEWAY__KEYS_FILE (SHA-256 digests -> tenants)."""
    from services import tracing
    from services.gateway import serve_gateway
    from services.runner import configure_logging

    configure_logging(verbose)
    settings = settings_for(nats_url)
    check(tracing.configure, settings.tracing, "gateway")
    run(serve_gateway(settings, host, port))


def fake_provider(
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(help="0 picks a free port.")] = 8787,
    config: Annotated[
        Path | None,
        typer.Option(help="JSON file with a FaultConfig; the options below override it."),
    ] = None,
    latency_ms: Annotated[float | None, typer.Option(help="Base latency of each answer.")] = None,
    latency_jitter_ms: Annotated[
        float | None, typer.Option(help="Spread of the latency (see --latency-distribution).")
    ] = None,
    latency_distribution: Annotated[
        Literal["uniform", "exponential"] | None,
        typer.Option(help="uniform: latency ± jitter; exponential: a tail of mean jitter."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random draws.")] = None,
    error_rate: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Share of calls that fail.")
    ] = None,
    error_mix: Annotated[
        str | None,
        typer.Option(
            metavar="STATUS:WEIGHT,...", help="Statuses of those failures, e.g. 500:1,529:2."
        ),
    ] = None,
    retry_after_s: Annotated[
        float | None, typer.Option(help="retry-after of a 429 answer.")
    ] = None,
    reset_rate: Annotated[
        float | None, typer.Option(help="Share of calls answered with a connection reset.")
    ] = None,
    midstream_rate: Annotated[
        float | None, typer.Option(help="Share of streaming calls cut by a mid-stream error.")
    ] = None,
    stream_chunk_delay_ms: Annotated[
        float | None, typer.Option(help="Pause between two events of a stream.")
    ] = None,
    outage: Annotated[
        list[str] | None,
        typer.Option(
            metavar="START_S:DURATION_S:STATUS[:MODEL,...]",
            help="Scheduled outage (repeatable); STATUS is a code, reset, midstream or "
            "slow=MS; after a third colon, the only models it hits.",
        ),
    ] = None,
    model: Annotated[list[str] | None, typer.Option(help="A listed model (repeatable).")] = None,
) -> None:
    """Serve the Anthropic and OpenAI wire protocols with scripted faults (for drills and tests).

    Prints `fake provider listening on URL` and serves until SIGINT or SIGTERM."""
    from services.tools import fake

    try:
        faults = fake.config_from_options(
            config,
            latency_ms=latency_ms,
            latency_jitter_ms=latency_jitter_ms,
            latency_distribution=latency_distribution,
            seed=seed,
            error_rate=error_rate,
            error_mix=None if error_mix is None else fake.parse_error_mix(error_mix),
            retry_after_s=retry_after_s,
            reset_rate=reset_rate,
            midstream_rate=midstream_rate,
            stream_chunk_delay_ms=stream_chunk_delay_ms,
            outages=None if outage is None else [fake.parse_outage(o) for o in outage],
            models=model,
        )
    except (ValueError, OSError) as exc:
        fail(str(exc))
    fake.serve(host, port, faults)


def _source(ctx: typer.Context, name: str) -> str:
    """Where option ``name`` came from: ``COMMANDLINE``, ``ENVIRONMENT``, ``DEFAULT``...
    (by name: typer ships its own copy of click's ``ParameterSource``)."""
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else "DEFAULT"


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
    http_port: HttpPort = None,
    gateway_port: Annotated[
        int,
        typer.Option(
            min=-1,
            max=65535,
            help="Port of the HTTP gateway on 127.0.0.1 (0: a free one; -1: none).",
        ),
    ] = 8080,
) -> None:
    """Run everything locally: embedded NATS, topology, a worker, the prober, the replayer,
    the HTTP gateway, and the fake provider for providers without an API key. Ctrl-C stops
    it all.

    NATS: --port or --data-dir starts the embedded server; otherwise --nats-url or
    NATS_URL names a running one; with none of them, the embedded server on 4222."""
    from services.runner import configure_logging, dev_stack, serve_dev
    from services.tools.stack import dev_nats_url

    from_env = _source(ctx, "nats_url") == "ENVIRONMENT"
    url = check(
        dev_nats_url,
        None if from_env else nats_url,
        nats_url if from_env else None,
        port_given=_source(ctx, "port") == "COMMANDLINE",
        data_dir_given=_source(ctx, "data_dir") == "COMMANDLINE",
    )
    configure_logging(verbose)
    settings = _with_port(settings_for(None), http_port)
    if url is None and from_env:
        logging.getLogger("ridethrough.dev").info(
            "NATS_URL ignored: --port/--data-dir start the embedded server"
        )
    try:
        with dev_stack(settings, nats_url=url, port=port, data_dir=data_dir) as stack_settings:
            run(serve_dev(stack_settings, None if gateway_port < 0 else gateway_port))
    except RidethroughError as exc:
        fail(str(exc))


def demo(
    jobs: Annotated[int, typer.Option(min=1, help="How many jobs to submit.")] = 600,
    rate: Annotated[float, typer.Option(min=0.1, help="Jobs submitted per second.")] = 50.0,
    outage: Annotated[
        float, typer.Option(min=0.0, help="Seconds the outage lasts (flapping: both, and the gap).")
    ] = 8.0,
    outage_at: Annotated[float, typer.Option(min=0.0, help="Seconds of load before it.")] = 3.0,
    seed: Annotated[int, typer.Option(help="Seed of the fake provider's latencies.")] = 1,
    scenario: Annotated[
        Literal["provider-outage", "model-outage", "slow", "flapping", "failover"],
        typer.Option(
            help="provider-outage: every model 529s; model-outage: one model 529s, the other "
            "stays healthy; slow: one model's calls time out; flapping: one model 529s, "
            "recovers briefly, 529s again; failover: the first-party door 529s and jobs with "
            "tools and images fail over to the Bedrock door, none parked."
        ),
    ] = "provider-outage",
    notify: Annotated[
        bool,
        typer.Option(
            "--notify",
            help="Also run the notifier, its webhook, Slack and PagerDuty sinks on a local "
            "receiver that prints each notification it gets.",
        ),
    ] = False,
    gateway: Annotated[
        int,
        typer.Option(
            "--gateway",
            min=0,
            help="Also make this many calls through the HTTP gateway with the official "
            "anthropic SDK as the outage starts: they wait, then get their answers.",
        ),
    ] = 0,
    as_json: JsonFlag = False,
) -> None:
    """The outage drill: a fleet on this machine rides through an outage of a real shape.

    Starts embedded NATS, the fake provider, two workers, the prober and the
    replayer; submits jobs for two models steadily; has the fake play the
    scenario's outage; reports, per model too (parked, parked while healthy,
    calls beyond the trip). Exits 1 if any job was lost or duplicated.
    """
    from rich.console import Console

    from services.tools.demo import REPORT_KEYS, Drill, report_lines, run_drill

    logging.basicConfig(level=logging.WARNING)
    drill = Drill(
        jobs=jobs,
        rate=rate,
        outage_s=outage,
        outage_at_s=outage_at,
        seed=seed,
        scenario=scenario,
        notify=notify,
        gateway_calls=gateway,
    )
    console = None if as_json else Console()
    try:
        report = run(run_drill(drill, settings_for(None), console=console))
    except RidethroughError as exc:
        fail(str(exc))
    if as_json:
        extra = tuple(k for k in ("failover", "gateway") if k in report)
        print_json({key: report[key] for key in REPORT_KEYS + extra})
    else:
        typer.echo()  # the live table's last line has no newline of its own
        for line in report_lines(report):
            typer.echo(line)
    ok = report["lost"] == 0 and report["duplicates"] == 0
    if "failover" in report:  # the drill's promise: nothing parked, every request whole
        f = report["failover"]
        parked = sum(m["parked"] for m in report["models"].values())
        ok = ok and parked == 0 and f["identical_apart_from_model"] == f["requests_at_fallback"]
    if "gateway" in report:  # every call answered, one job and one result each
        g = report["gateway"]
        ok = ok and g["answered"] == g["jobs"] == g["results_stored"] == g["calls"]
    raise typer.Exit(EXIT_OK if ok else EXIT_JOB_FAILED)
