"""The outage drill: a whole fleet on this machine, a 529 storm, and a report.

``ridethrough demo`` starts embedded NATS, the fake provider, two worker
processes, the prober and the replayer; submits a steady stream of jobs; turns
a 529 storm on for a while and off; shows live progress; and ends with an
outage report. It exits non-zero if any job was lost or duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from rich.console import Console
from rich.live import Live
from rich.table import Table

from schemas import subjects as s
from services.breaker import HealthBoard, decode_lease
from services.config import Settings
from services.jetstream.errors import NOT_FOUND
from services.producer import Producer, make_job
from services.tools.fake import FaultConfig
from services.tools.stack import ServiceProcess, local_stack

log = logging.getLogger("ridethrough.demo")

REPORT_KEYS = (
    "submitted",
    "succeeded",
    "dead",
    "lost",
    "duplicates",
    "calls_during_outage",
    "probes_during_outage",
    "detect_s",
    "drain_s",
    "peak_parked",
)


@dataclass(frozen=True)
class Drill:
    """What the drill does: how many jobs, how fast, when and how long the outage lasts."""

    jobs: int = 600
    rate: float = 50.0
    outage_s: float = 8.0
    outage_at_s: float = 3.0
    seed: int = 1
    provider: str = "anthropic"
    model: str = "claude-drill"
    latency_ms: float = 40.0
    deadline_s: float = 120.0


@dataclass
class Progress:
    """What the monitor has seen so far."""

    submitted: int = 0
    results: int = 0
    parked: int = 0
    peak_parked: int = 0
    dead: int = 0
    replayed: int = 0
    states: dict[str, str] = field(default_factory=dict)
    outage_started: float | None = None
    outage_ended: float | None = None
    opened: float | None = None
    drained: float | None = None
    first_replayed_result: float | None = None
    phase: str = "starting"


def drill_settings(base: Settings) -> Settings:
    """The drill's settings: quick probes and backoff so a short drill shows a full cycle."""
    return base.with_changes(
        breaker=base.breaker.model_copy(
            update={"probe_interval_s": 0.5, "probe_max_interval_s": 2.0, "board_poll_s": 0.2}
        ),
        replay=base.replay.model_copy(
            update={"initial_rate": 10.0, "ramp_interval_s": 0.5, "max_rate": 400.0, "lease_s": 2.0}
        ),
        worker=base.worker.model_copy(update={"backoff_base_s": 0.2, "backoff_max_s": 2.0}),
    )


def _table(drill: Drill, p: Progress) -> Table:
    t = Table(title=f"ridethrough outage drill — {p.phase}", show_header=True)
    for col in ("submitted", "completed", "parked", "replayed", "dead"):
        t.add_column(col, justify="right")
    t.add_column("breaker")
    breakers = ", ".join(f"{k}: {v}" for k, v in sorted(p.states.items()))
    t.add_row(
        f"{p.submitted}/{drill.jobs}",
        str(p.results - p.dead),
        str(p.parked),
        str(p.replayed),
        str(p.dead),
        breakers,
    )
    return t


async def _count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _replayed(js: JetStreamContext, provider: str) -> int:
    kv = await js.key_value(s.CONTROL_BUCKET)
    try:
        entry = await kv.get(f"replay.{provider}")
    except Exception:
        return 0
    if not entry.value:
        return 0
    value = decode_lease(entry.value).info.get("replayed", 0)
    return int(value) if isinstance(value, int | float) else 0


async def _final_counts(js: JetStreamContext, ids: list[str]) -> dict[str, int]:
    succeeded = 0
    found = 0
    for job_id in ids:
        try:
            raw = await js.get_last_msg(s.RESULTS_STREAM, s.result_subject(job_id), direct=True)
        except NOT_FOUND:
            continue
        found += 1
        if b'"status":"succeeded"' in (raw.data or b""):
            succeeded += 1
    info = (await js.stream_info(s.RESULTS_STREAM)).state
    return {
        "found": found,
        "succeeded": succeeded,
        "duplicates": int(info.last_seq) - int(info.messages),
        "dead": await _count(js, s.DEAD_STREAM),
    }


async def run_drill(drill: Drill, base: Settings, *, console: Console | None) -> dict[str, Any]:
    """Run the drill on a private stack; return the report (``REPORT_KEYS``)."""
    settings = drill_settings(base)
    fake_cfg = FaultConfig(
        seed=drill.seed, latency_ms=drill.latency_ms, latency_jitter_ms=drill.latency_ms / 2
    )
    logs = Path(tempfile.mkdtemp(prefix="ridethrough-drill-"))
    with local_stack(settings, fake_config=fake_cfg) as stack:
        if drill.provider not in stack.fake_providers:
            raise RuntimeError(f"the drill needs {drill.provider} on the fake provider")
        st = stack.settings
        procs = [
            ServiceProcess(st, "worker", log_path=logs / f"worker{i}.log") for i in range(2)
        ] + [
            ServiceProcess(st, role, log_path=logs / f"{role}.log")
            for role in ("prober", "replayer")
        ]
        try:
            async with await Producer.connect(st) as producer:
                from services.jetstream.topology import ensure_topology

                await ensure_topology(producer.js, st)
                for proc in procs:
                    proc.start()
                return await _drive(drill, st, stack.fake, producer, console)
        finally:
            for proc in procs:
                proc.terminate(timeout=30)
            log.info("service logs in %s", logs)


async def _drive(
    drill: Drill, settings: Settings, fake: Any, producer: Producer, console: Console | None
) -> dict[str, Any]:
    js = producer.js
    progress = Progress()
    board = await HealthBoard(js, settings.providers, settings.breaker).start()
    ids: list[str] = []

    async def workers_ready() -> None:
        consumer = s.worker_consumer(drill.provider, "normal")  # the drill's jobs are normal
        # Each worker keeps a pull request waiting on its consumers once it is up.
        while (await js.consumer_info(s.JOBS_STREAM, consumer)).num_waiting < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    async def submit() -> None:
        start = time.monotonic()
        for i in range(drill.jobs):
            delay = start + i / drill.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            job = make_job(
                drill.provider, drill.model, prompt=f"Incident {i}: summarise.", max_tokens=16
            )
            ids.append(await producer.submit(job))
            progress.submitted += 1

    async def outage() -> None:
        await asyncio.sleep(drill.outage_at_s)
        fake.start_outage(529)
        progress.outage_started = time.monotonic()
        progress.phase = "529 storm"
        await asyncio.sleep(drill.outage_s)
        fake.stop_outage()
        progress.outage_ended = time.monotonic()
        progress.phase = "recovering"

    async def monitor(live: Live | None) -> None:
        while True:
            progress.states = {p: board.state(p) for p in sorted(settings.providers)}
            progress.parked = await _count(js, s.PARKED_STREAM)
            progress.peak_parked = max(progress.peak_parked, progress.parked)
            progress.results = await _count(js, s.RESULTS_STREAM)
            progress.dead = await _count(js, s.DEAD_STREAM)
            progress.replayed = await _replayed(js, drill.provider)
            if (
                progress.outage_started is not None
                and progress.opened is None
                and board.state(drill.provider) == "open"
            ):
                progress.opened = time.monotonic()
            if live is not None:
                live.update(_table(drill, progress))
            done = (
                progress.submitted == drill.jobs
                and progress.outage_ended is not None
                and progress.parked == 0
                and progress.results >= drill.jobs
            )
            if done:
                progress.drained = time.monotonic()
                progress.phase = "done"
                if live is not None:
                    live.update(_table(drill, progress))
                return
            await asyncio.sleep(0.2)

    async def on_result(msg: Any) -> None:
        # A replayed job's result carries the replay's dedup id, "<job_id>:r<seq>".
        msg_id = (msg.headers or {}).get(s.MSG_ID_HEADER, "")
        if progress.first_replayed_result is None and ":r" in msg_id:
            progress.first_replayed_result = time.monotonic()

    watch = await producer.nc.subscribe(s.result_subject("*"), cb=on_result)
    live_ctx: Any = (
        Live(_table(drill, progress), console=console, refresh_per_second=4)
        if console is not None
        else contextlib.nullcontext()
    )
    try:
        with live_ctx as live:
            await asyncio.wait_for(workers_ready(), 60)
            progress.phase = "steady load"
            mon = asyncio.create_task(monitor(live))
            try:
                await asyncio.wait_for(
                    asyncio.gather(submit(), outage(), mon),
                    timeout=drill.jobs / drill.rate
                    + drill.outage_at_s
                    + drill.outage_s
                    + drill.deadline_s,
                )
            except TimeoutError:
                progress.phase = "gave up waiting"
    finally:
        await board.stop()
        await watch.unsubscribe()
    final = await _final_counts(js, ids)
    counters = fake.counters()["outage"]
    return {
        "submitted": len(ids),
        "succeeded": final["succeeded"],
        "dead": final["dead"],
        "lost": len(ids) - final["found"],
        "duplicates": final["duplicates"],
        "calls_during_outage": int(counters["requests"]) - int(counters["probes"]),
        "probes_during_outage": int(counters["probes"]),
        "detect_s": _delta(progress.outage_started, progress.opened),
        "drain_s": _delta(progress.outage_ended, progress.drained),
        "peak_parked": progress.peak_parked,
        # Not part of the --json report (its keys are fixed); the numbers script reads it.
        "first_replay_s": _delta(progress.outage_ended, progress.first_replayed_result),
    }


def _delta(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(end - start, 3)


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as lines of text for a person."""
    return [
        "outage report",
        f"  jobs submitted        {report['submitted']}",
        f"  succeeded             {report['succeeded']}",
        f"  dead                  {report['dead']}",
        f"  lost                  {report['lost']}",
        f"  duplicated            {report['duplicates']}",
        f"  provider calls during the outage: {report['calls_during_outage']} real, "
        f"{report['probes_during_outage']} probes",
        f"  time to detect        {report['detect_s']} s",
        f"  recovery to drained   {report['drain_s']} s",
        f"  peak parked           {report['peak_parked']}",
    ]
