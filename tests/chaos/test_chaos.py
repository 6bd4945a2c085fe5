"""Chaos: SIGKILLed workers and replayers, nats-server restarts and flapping providers, under load.

Every service runs in its own process (``python -m services worker|prober|replayer``), so a
kill is a real SIGKILL that leaves nothing settled. Each test ends with the same accounting:
every submitted job has exactly one result (succeeded, or expired where deadlines are
involved), no result was written twice, nothing is dead, and AI_JOBS and AI_PARKED are empty.
Waits are on observable state (stream counts, breaker state, leases, fake-provider counters),
each with a timeout; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.parking import ParkedJob, ParkRecord
from schemas.results import decode_result
from services.breaker import transition
from services.config import Settings
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.tools.fake import FaultConfig
from tests.conftest import make_settings
from tests.support import (
    ServiceProcess,
    breaker_state,
    count_outcomes,
    health_events,
    lease_holder,
    read_stream,
    result_job_ids,
    wait_until,
)

pytestmark = pytest.mark.chaos

PROVIDER = "anthropic"
MODEL = "m"  # the model of the drills' jobs: a 529 storm opens its breaker
Check = Callable[[], Awaitable[bool]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def spawn(nats_server: Any, tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start service processes with logs in ``tmp_path``. At teardown every one still
    running is SIGKILLed and the tail of each log is printed (pytest shows it on failure)."""
    procs: list[ServiceProcess] = []

    def start(settings: Settings, role: str) -> ServiceProcess:
        n = sum(p.role == role for p in procs) + 1
        proc = ServiceProcess(settings, role, log_path=tmp_path / f"{role}{n}.log").start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
    for proc in procs:
        assert proc.log_path is not None
        lines = (
            proc.log_path.read_text(errors="replace").splitlines() if proc.log_path.exists() else []
        )
        print(f"--- {proc.log_path.name} (pid {proc.pid}) ---", *lines[-40:], sep="\n")


async def _settings(js: Any, nats_server: Any, fake_provider: Any, **kw: Any) -> Settings:
    """Chaos settings: few calls in flight per worker (the outage-call bound depends on it),
    short ack waits (a killed process's messages come back within 2 s), and the topology
    updated to match, before any service starts."""
    replay = {"ack_wait_s": 2.0, **kw.pop("replay", {})}
    worker = {"concurrency": 4, "batch_size": 4, "ack_wait_s": 2.0, **kw}
    settings = make_settings(nats_server.url, fake_provider.url, replay=replay, **worker)
    await ensure_topology(js, settings)
    return settings


# --------------------------------------------------------------------------- observations


async def _messages(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


def _tolerant(check: Check) -> Check:
    """``check``, reading False while NATS is away (during a server restart)."""

    async def run() -> bool:
        try:
            return await check()
        except (nats.errors.Error, TimeoutError):
            return False

    return run


async def _snapshot(js: Any) -> str:
    try:
        jobs = await _messages(js, s.JOBS_STREAM)
        parked = await _messages(js, s.PARKED_STREAM)
        results = await _messages(js, s.RESULTS_STREAM)
        state = await breaker_state(js, PROVIDER, MODEL)
    except Exception as exc:
        return f"(no snapshot: {exc!r})"
    return f"jobs={jobs} parked={parked} results={results} breaker={state}"


async def _wait(js: Any, what: str, check: Check, timeout: float) -> None:
    """Wait until ``check`` holds; on timeout fail with ``what`` and the queue's state."""
    try:
        await wait_until(_tolerant(check), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"{what}: not within {timeout}s; {await _snapshot(js)}") from None


def _state_is(js: Any, state: str) -> Check:
    async def check() -> bool:
        return await breaker_state(js, PROVIDER, MODEL) == state

    return check


def _count(
    js: Any, stream: str, *, at_least: int | None = None, exactly: int | None = None
) -> Check:
    async def check() -> bool:
        n = await _messages(js, stream)
        return n == exactly if exactly is not None else n >= (at_least or 0)

    return check


def _all_parked(js: Any, n: int) -> Check:
    """Nothing waiting or unacked in AI_JOBS, and exactly ``n`` jobs parked."""

    async def check() -> bool:
        return await _messages(js, s.JOBS_STREAM) == 0 and await _messages(js, s.PARKED_STREAM) == n

    return check


def _outage_calls(fake_provider: Any) -> int:
    """Non-probe requests the fake answered with its outage fault."""
    outage = fake_provider.counters()["outage"]
    return int(outage["requests"]) - int(outage["probes"])


def _owner_pid(owner: str) -> int:
    """The pid inside a prober or replayer id (``<role>-<host>-<pid>-<hex>``)."""
    return int(owner.rsplit("-", 2)[1])


def _holder_is(js: Any, key: str, proc: ServiceProcess) -> Check:
    async def check() -> bool:
        owner = await lease_holder(js, key)
        return bool(owner) and _owner_pid(owner) == proc.pid

    return check


def _logged(proc: ServiceProcess, text: str) -> Check:
    async def check() -> bool:
        assert proc.log_path is not None
        return proc.log_path.exists() and text in proc.log_path.read_text(errors="replace")

    return check


# --------------------------------------------------------------------------- load


def _jobs(tag: str, n: int, **fields: Any) -> list[Any]:
    model = fields.pop("model", MODEL)
    return [
        make_job(PROVIDER, model, prompt=f"{tag} {i}", max_tokens=8, **fields) for i in range(n)
    ]


async def _submit(producer: Producer, jobs: list[Any]) -> list[str]:
    outcomes = await producer.submit_many(jobs)
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    return [o.job_id for o in outcomes]


class Load:
    """Submits ``total`` jobs at about ``rate`` a second in the background; ``ids`` holds
    the ones JetStream has stored. Cancelled on exit if still running."""

    def __init__(self, producer: Producer, total: int, rate: float, tag: str) -> None:
        self.producer = producer
        self.jobs = _jobs(tag, total)
        self.rate = rate
        self.ids: list[str] = []
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Load:
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        for job in self.jobs:
            self.ids.append(await self.producer.submit(job))
            await asyncio.sleep(1 / self.rate)  # pacing of the producer, not a wait

    def reached(self, n: int) -> Check:
        async def check() -> bool:
            assert self.task is not None
            if self.task.done():
                self.task.result()  # surface a producer failure at once
            return len(self.ids) >= n

        return check

    async def finished(self, timeout: float = 60) -> list[str]:
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return list(self.ids)


async def _warm_up(producer: Producer, workers: list[ServiceProcess]) -> list[str]:
    """Submit small batches until every worker process has written a result (so all are
    connected and consuming); returns the ids of the warm-up jobs."""
    want = {w.worker_id for w in workers}
    seen: set[str] = set()
    ids: list[str] = []

    async def all_serving() -> bool:
        batch = await _submit(producer, _jobs(f"warm-up {len(ids)}", 8))
        ids.extend(batch)
        seen.update(r.worker for r in (await producer.results(batch, timeout=30)).values())
        return want <= seen

    await wait_until(all_serving, timeout=60, interval=0)
    return ids


async def _recovery_ready(js: Any) -> None:
    """The prober and the replayer are up: each holds its lease."""

    async def held() -> bool:
        return bool(await lease_holder(js, f"probe.{PROVIDER}")) and bool(
            await lease_holder(js, f"replay.{PROVIDER}")
        )

    await _wait(js, "prober and replayer leases held", held, 30)


# --------------------------------------------------------------------------- accounting


async def _account(
    js: Any, submitted: list[str], *, expired: frozenset[str] = frozenset()
) -> dict[str, int]:
    """Every submitted job ends in exactly one terminal place; nothing is left behind."""

    async def drained() -> bool:
        return await _messages(js, s.JOBS_STREAM) == 0 and await _messages(js, s.PARKED_STREAM) == 0

    await _wait(js, "AI_JOBS and AI_PARKED drained", drained, 30)
    counts = await count_outcomes(js)
    assert len(set(submitted)) == len(submitted)
    ids = await result_job_ids(js)
    assert sorted(ids) == sorted(submitted), "lost or unknown jobs"
    # A second write for a job would leave result_writes above results.
    assert counts["results"] == counts["result_writes"] == len(submitted), counts
    assert counts["dead"] == counts["failed"] == 0, counts
    assert counts["succeeded"] + counts["dead"] + counts["expired"] == len(submitted), counts
    statuses = {
        decode_result(m.data).job_id: decode_result(m.data).status
        for m in await read_stream(js, s.RESULTS_STREAM)
    }
    assert {j for j, st in statuses.items() if st == "expired"} == set(expired)
    assert counts["waiting"] == 0
    return counts


async def _states(js: Any) -> list[str]:
    return [e.state for e in await health_events(js, PROVIDER, MODEL)]


# --------------------------------------------------------------------------- scenarios


async def test_outage_under_load_parks_without_a_retry_storm_and_loses_nothing(
    nats_server: Any, fake_provider: Any, js: Any, spawn: Any
) -> None:
    """A 529 outage under steady load parks jobs without a retry storm; every job succeeds once."""
    settings = await _settings(js, nats_server, fake_provider)
    workers = [spawn(settings, "worker") for _ in range(2)]
    spawn(settings, "prober")
    spawn(settings, "replayer")
    async with await Producer.connect(settings) as producer:
        ids = await _warm_up(producer, workers)
        await _recovery_ready(js)
        async with Load(producer, total=250, rate=50, tag="load") as load:
            await _wait(js, "50 jobs submitted", load.reached(50), 30)
            fake_provider.start_outage(529)
            await _wait(js, "breaker open", _state_is(js, "open"), 30)
            await _wait(js, "100 jobs parked", _count(js, s.PARKED_STREAM, at_least=100), 30)
            fake_provider.stop_outage()
            ids += await load.finished(60)
        await producer.results(ids, timeout=60)
    await _wait(js, "breaker closed", _state_is(js, "closed"), 30)

    # Calls the outage answered, bounded per worker process. Every such call fails, and a
    # worker that has not yet learned of the trip can let a failed job go (nak, freeing its
    # slot) only while its consecutive-failure count is below F; that count is reset only
    # by a success, i.e. by one of the <= C calls answered before the outage began. A
    # failure that reaches F trips (or re-reads) the breaker and holds its slot until the
    # worker knows it is open; from then on the worker calls nothing. So, per worker,
    # released failures <= (C + 1) * (F - 1), plus <= C calls holding a slot when it learns.
    c = settings.worker.concurrency
    f = settings.breaker.consecutive_failures
    bound = len(workers) * ((c + 1) * (f - 1) + c)
    assert _outage_calls(fake_provider) <= bound
    # A retry storm would cost at least one call per parked job, and >= 100 were parked.
    assert bound < 100

    await _account(js, ids)
    events = await health_events(js, PROVIDER, MODEL)
    assert [e.state for e in events] == ["open", "half_open", "closed"]
    assert len({e.outage_id for e in events}) == 1
    assert all(w.alive for w in workers)


async def test_workers_killed_during_outage_and_replay_lose_nothing(
    nats_server: Any, fake_provider: Any, js: Any, spawn: Any
) -> None:
    """Workers SIGKILLed while parking and mid-replay: no job lost, parked twice or run twice."""
    settings = await _settings(js, nats_server, fake_provider)
    first, second = spawn(settings, "worker"), spawn(settings, "worker")
    spawn(settings, "prober")
    spawn(settings, "replayer")
    async with await Producer.connect(settings) as producer:
        ids = await _warm_up(producer, [first, second])
        await _recovery_ready(js)
        fake_provider.start_outage(529)
        async with Load(producer, total=150, rate=60, tag="outage") as load:
            await _wait(js, "breaker open", _state_is(js, "open"), 30)
            await _wait(js, "30 jobs parked", _count(js, s.PARKED_STREAM, at_least=30), 30)
            first.kill()
            spawn(settings, "worker")
            outage_ids = await load.finished(60)
        ids += outage_ids
        # What the killed worker held comes back after ack_wait and is parked again; the
        # park's msg id (stream sequence of the job) drops a second copy.
        await _wait(js, "every outage job parked once", _all_parked(js, len(outage_ids)), 30)

        # Slow answers, so that the second kill finds calls in flight.
        fake_provider.set_config(FaultConfig(latency_ms=100, seed=7))
        fake_provider.stop_outage()
        warm = len(ids) - len(outage_ids)
        await _wait(js, "replay under way", _count(js, s.RESULTS_STREAM, at_least=warm + 20), 30)
        second.kill()
        spawn(settings, "worker")
        await producer.results(ids, timeout=60)
    await _wait(js, "breaker closed", _state_is(js, "closed"), 30)
    await _account(js, ids)
    assert await _states(js) == ["open", "half_open", "closed"]


async def test_nats_restart_keeps_parked_jobs_and_services_reconnect(
    nats_server: Any, fake_provider: Any, js: Any, spawn: Any
) -> None:
    """Parked jobs survive nats-server restarts (SIGTERM, SIGKILL); every service reconnects."""
    if not hasattr(nats_server, "restart"):
        pytest.skip("needs the embedded nats-server (restart keeps its store)")
    settings = await _settings(js, nats_server, fake_provider)
    worker = spawn(settings, "worker")
    prober = spawn(settings, "prober")
    replayer = spawn(settings, "replayer")
    async with await Producer.connect(settings) as producer:
        ids = await _warm_up(producer, [worker])
        await _recovery_ready(js)
        fake_provider.start_outage(529)
        parked_ids = await _submit(producer, _jobs("parked", 100))
        ids += parked_ids
    await _wait(js, "breaker open", _state_is(js, "open"), 30)
    await _wait(js, "100 jobs parked", _all_parked(js, 100), 30)

    nats_server.restart()
    await _wait(js, "parked jobs after the restart", _all_parked(js, 100), 30)
    assert await breaker_state(js, PROVIDER, MODEL) == "open"

    fake_provider.set_config(FaultConfig(latency_ms=20, seed=7))
    fake_provider.stop_outage()
    warm = len(ids) - len(parked_ids)
    await _wait(js, "replay under way", _count(js, s.RESULTS_STREAM, at_least=warm + 30), 30)
    nats_server.restart(kill=True)
    await _wait(js, "every job has a result", _count(js, s.RESULTS_STREAM, exactly=len(ids)), 60)
    await _wait(js, "breaker closed", _state_is(js, "closed"), 30)

    # Nobody was restarted but the server: the same processes reconnected and did the work.
    assert worker.alive and prober.alive and replayer.alive
    events = await health_events(js, PROVIDER, MODEL)
    assert [e.state for e in events] == ["open", "half_open", "closed"]
    assert _owner_pid(events[1].by) == prober.pid
    assert _owner_pid(events[2].by) == replayer.pid
    results = [decode_result(m.data) for m in await read_stream(js, s.RESULTS_STREAM)]
    assert {r.worker for r in results} == {worker.worker_id}
    await _account(js, ids)


async def test_flapping_provider_keeps_one_outage_and_loses_nothing(
    nats_server: Any, fake_provider: Any, js: Any, spawn: Any
) -> None:
    """A flapping provider re-opens from half_open under one outage id; nothing lost or doubled."""
    # A slow ramp (5 jobs/s, doubling every 2 s, cap 40) keeps the breaker half-open for
    # seconds, long enough to fail again before the replayer would close it.
    settings = await _settings(
        js, nats_server, fake_provider,
        replay={"initial_rate": 5, "ramp_interval_s": 2.0, "max_rate": 40},
    )  # fmt: skip
    worker = spawn(settings, "worker")
    spawn(settings, "prober")
    spawn(settings, "replayer")
    async with await Producer.connect(settings) as producer:
        ids = await _warm_up(producer, [worker])
        warm = len(ids)
        await _recovery_ready(js)
        fake_provider.start_outage(529)
        ids += await _submit(producer, _jobs("first outage", 60))
        await _wait(js, "breaker open", _state_is(js, "open"), 30)
        await _wait(js, "60 jobs parked", _all_parked(js, 60), 30)

        fake_provider.stop_outage()
        await _wait(js, "half-open", _state_is(js, "half_open"), 30)
        await _wait(js, "replay under way", _count(js, s.RESULTS_STREAM, at_least=warm + 3), 30)

        fake_provider.start_outage(529)
        # Fresh jobs fail at once, so the breaker re-opens even between two replays.
        ids += await _submit(producer, _jobs("second outage", 10))
        await _wait(js, "breaker open again", _state_is(js, "open"), 30)
        assert await _states(js) == ["open", "half_open", "open"]

        fake_provider.stop_outage()
        await producer.results(ids, timeout=60)
    await _wait(js, "breaker closed", _state_is(js, "closed"), 30)
    await _account(js, ids)
    events = await health_events(js, PROVIDER, MODEL)
    assert [e.state for e in events] == ["open", "half_open", "open", "half_open", "closed"]
    assert len({e.outage_id for e in events}) == 1


async def test_replayer_killed_mid_replay_is_replaced_by_its_replica(
    nats_server: Any, fake_provider: Any, js: Any, spawn: Any
) -> None:
    """A replayer SIGKILLed mid-replay hands its lease to its replica; nothing lost or doubled."""
    settings = await _settings(
        js, nats_server, fake_provider, replay={"initial_rate": 5, "max_rate": 20}
    )
    kv = await js.key_value(s.HEALTH_BUCKET)
    opened = await transition(js, kv, PROVIDER, to="open", allowed_from=("closed",), by="test")
    assert opened is not None
    jobs = _jobs("parked", 150)
    for job in jobs:
        body = ParkedJob(
            job=job, park=ParkRecord(reason="provider_open", outage_id=opened.outage_id)
        )
        await js.publish(s.parked_subject(PROVIDER, job.priority), encode(body))
    await transition(js, kv, PROVIDER, to="half_open", allowed_from=("open",), by="test")

    spawn(settings, "worker")
    replayers = [spawn(settings, "replayer"), spawn(settings, "replayer")]

    async def someone_holds() -> bool:
        return bool(await lease_holder(js, f"replay.{PROVIDER}"))

    await _wait(js, "replay lease taken", someone_holds, 30)
    holder_pid = _owner_pid(await lease_holder(js, f"replay.{PROVIDER}"))
    [holder] = [r for r in replayers if r.pid == holder_pid]
    [other] = [r for r in replayers if r is not holder]
    await _wait(js, "second replica running", _logged(other, "replayer running"), 30)
    await _wait(js, "replay under way", _count(js, s.RESULTS_STREAM, at_least=20), 30)

    holder.kill()
    await _wait(js, "lease taken over", _holder_is(js, f"replay.{PROVIDER}", other), 30)
    await _wait(js, "every job has a result", _count(js, s.RESULTS_STREAM, exactly=150), 60)
    await _wait(js, "breaker closed", _state_is(js, "closed"), 30)
    await _account(js, [j.id for j in jobs])
    assert other.alive


async def test_deadlines_expire_while_parked_without_a_provider_call(
    nats_server: Any, fake_provider: Any, js: Any, spawn: Any
) -> None:
    """Jobs whose deadline passes while parked expire without a provider call; the rest succeed."""
    settings = await _settings(js, nats_server, fake_provider)
    # One worker: once it has parked a job it knows the breaker is open (a second worker
    # could still be a board poll behind and call the provider).
    worker = spawn(settings, "worker")
    spawn(settings, "prober")
    spawn(settings, "replayer")
    async with await Producer.connect(settings) as producer:
        ids = await _warm_up(producer, [worker])
        await _recovery_ready(js)
        # The provider unreachable (connection resets): its own breaker opens, so the
        # jobs of every model park, the short ones' model included, without a call.
        fake_provider.start_outage("reset")
        ids += await _submit(producer, _jobs("trip", 10))
        await _wait(js, "breaker open", _state_is(js, "open"), 30)
        await _wait(js, "trip jobs parked", _all_parked(js, 10), 30)

        deadline = datetime.now(UTC) + timedelta(seconds=1)
        short = await _submit(producer, _jobs("short", 20, model="m-short", deadline=deadline))
        ids += short + await _submit(producer, _jobs("patient", 20))
        await _wait(js, "all 50 parked", _all_parked(js, 50), 30)

        async def deadline_passed() -> bool:
            return datetime.now(UTC) > deadline

        await wait_until(deadline_passed, timeout=10)
        fake_provider.stop_outage()
        await producer.results(ids, timeout=60)
    await _wait(js, "breaker closed", _state_is(js, "closed"), 30)
    counts = await _account(js, ids, expired=frozenset(short))
    assert counts["expired"] == 20
    assert fake_provider.counters()["by_model"].get("m-short", 0) == 0
