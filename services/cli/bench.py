"""``ridethrough bench``: measure the hot path against baselines in the same run."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import JsonFlag, fail, print_json, run, settings_for


class ScenarioName(StrEnum):
    """The scenarios of ``ridethrough bench`` (see ``services.tools.bench``)."""

    publish = "publish"
    worker = "worker"
    provider = "provider"
    replay = "replay"
    latency = "latency"
    gateway = "gateway"
    metrics = "metrics"
    scale = "scale"
    peers = "peers"


class PeerName(StrEnum):
    """The peers of the ``peers`` scenario (see ``services.tools.peers``)."""

    taskiq = "taskiq"
    faststream = "faststream"


class ChildKind(StrEnum):
    """What ``bench-child`` runs."""

    worker = "worker"
    raw = "raw"
    raw_replay = "raw-replay"
    sdk = "sdk"


def bench(
    scenario: Annotated[
        list[ScenarioName] | None,
        typer.Option("--scenario", "-s", help="Run only this scenario (repeatable)."),
    ] = None,
    jobs: Annotated[
        int, typer.Option(min=10, help="Jobs per run of publish, worker, replay and latency.")
    ] = 20_000,
    provider_jobs: Annotated[
        int, typer.Option(min=10, help="Jobs per run of the provider scenario.")
    ] = 4_000,
    in_flight: Annotated[
        int, typer.Option(min=1, help="Provider calls in flight (provider scenario).")
    ] = 1_000,
    latency_ms: Annotated[
        float, typer.Option(min=0.0, help="Latency of the fake provider (provider scenario).")
    ] = 1_000.0,
    latency_s: Annotated[
        float, typer.Option(min=0.1, help="Seconds of paced load in the latency scenario.")
    ] = 6.0,
    gateway_requests: Annotated[
        int, typer.Option(min=10, help="Requests per run of each path of the gateway scenario.")
    ] = 3_000,
    repeat: Annotated[int, typer.Option(min=1, help="Runs per figure (the median is kept).")] = 5,
    scale_parked: Annotated[
        int, typer.Option(min=1, help="Jobs parked (and as many waiting) in the scale scenario.")
    ] = 10_000,
    peer: Annotated[
        list[PeerName] | None,
        typer.Option("--peer", help="Peers scenario: only this peer (repeatable; default: all)."),
    ] = None,
    peer_jobs: Annotated[
        int, typer.Option(min=10, help="Jobs per run of each contender of the peers scenario.")
    ] = 5_000,
    peer_in_flight: Annotated[
        int, typer.Option(min=1, help="Calls in flight, ours and each peer's (peers scenario).")
    ] = 64,
    peers_python: Annotated[
        Path | None,
        typer.Option(help="Run the peers with this Python (it has their packages) instead."),
    ] = None,
    peers_env: Annotated[
        Path | None,
        typer.Option(help="Where the peers' environment is built (default ~/.cache/ridethrough)."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Also draw the ratios into this PNG (needs matplotlib).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded nats-server stores (default: temp).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Measure each hot path next to a baseline in the same run, on this machine.

    Starts its own nats-servers, worker and replayer processes and the fake provider
    (no existing NATS is touched), and prints a table; with --json, one object
    {scenario: {"ours", "baseline", "ratio", "unit", ...}}. The peers scenario (taskiq and
    FastStream doing the worker's job) runs only when asked for with -s peers: it first
    builds the peers' own environment, which needs the package index.
    """
    from services.tools import bench as b

    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install matplotlib (or the `dev` extra)")
    logging.basicConfig(level=logging.WARNING)
    opts = b.BenchOptions(
        scenarios=tuple(s.value for s in scenario) if scenario else b.SCENARIOS,
        jobs=jobs,
        provider_jobs=provider_jobs,
        in_flight=in_flight,
        latency_ms=latency_ms,
        latency_s=latency_s,
        gateway_requests=gateway_requests,
        repeat=repeat,
        data_dir=data_dir,
        scale_parked=scale_parked,
        peers=tuple(p.value for p in (peer or PeerName)),
        peer_jobs=peer_jobs,
        peer_in_flight=peer_in_flight,
        peers_python=peers_python,
        peers_env=peers_env,
    )
    settings = settings_for(None)
    if as_json:
        figures = run(b.run_bench(settings, opts))
        print_json({name: f.as_json() for name, f in figures.items()})
    else:
        from rich.console import Console

        console = Console(stderr=True)
        with console.status("ridethrough bench") as status:
            figures = run(b.run_bench(settings, opts, lambda text: status.update(text)))
        Console().print(b.table(figures, b.machine()))
    if plot is not None:
        b.plot(figures, plot)


def bench_child(
    kind: ChildKind,
    batch: Annotated[int, typer.Option(min=1)] = 64,
    jobs: Annotated[int, typer.Option(min=1)] = 1000,
    concurrency: Annotated[int, typer.Option(min=1)] = 1000,
    out: Annotated[Path | None, typer.Option()] = None,
    as_service: Annotated[
        bool, typer.Option(help="Run the worker as `ridethrough worker` does (metrics, tracing).")
    ] = False,
    http_port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="With --as-service: metrics on here.")
    ] = None,
) -> None:
    """A process ``ridethrough bench`` starts: a worker with the instant provider, the raw
    nats-py loop of the worker or of the replayer, or the bare SDK loop. Settings come from
    the environment."""
    from services.tools import bench as b

    logging.basicConfig(level=logging.WARNING)
    settings = settings_for(None)
    if kind is ChildKind.worker:
        from services.providers.base import Provider
        from services.worker.app import run_worker

        providers: dict[str, Provider] = {n: b.InstantProvider(n) for n in settings.providers}
        if as_service:
            # Metrics when RIDETHROUGH_HTTP's port is set, tracing when RIDETHROUGH_TRACING
            # turns it on: the `metrics` scenario's variants, all through one path.
            from services.runner import serve_worker

            if http_port is not None:
                http = settings.http.model_copy(update={"port": http_port, "host": "127.0.0.1"})
                settings = settings.with_changes(http=http)

            run(serve_worker(settings, providers, False, None))
        else:
            from services.runner import worker_gc

            worker_gc()  # as `ridethrough worker` does before it runs
            run(run_worker(settings, providers, apply_topology=False))
    elif kind is ChildKind.raw:
        run(b.raw_worker_loop(settings, batch))
    elif kind is ChildKind.raw_replay:
        run(b.raw_replay_loop(settings, batch))
    else:
        outcome = run(b.sdk_loop(settings, jobs, concurrency))
        if out is None:
            print_json(outcome)
        else:
            tmp = out.with_suffix(".tmp")
            import msgspec

            tmp.write_bytes(msgspec.json.encode(outcome))
            tmp.replace(out)
