"""ridethrough on a 3-node JetStream cluster (R3): replicated topology, workers on
different nodes sharing one consumer, and the stream leader's node SIGKILLed under
load while the provider has an outage. NATS does the clustering; we only connect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects as s
from services.config import Settings
from services.errors import InvalidJob, JobRejected, NatsUnavailable, UnknownProvider
from services.jetstream.connection import connect
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.tools.stack import ServiceProcess
from tests.cluster import NatsCluster, gather_leaders
from tests.conftest import make_settings
from tests.support import count_outcomes, read_stream, result_job_ids, wait_until

pytestmark = pytest.mark.integration

STREAMS = (s.JOBS_STREAM, s.PARKED_STREAM, s.RESULTS_STREAM, s.DEAD_STREAM, s.EVENTS_STREAM)
BUCKETS = (s.HEALTH_BUCKET, s.CONTROL_BUCKET, s.WORKERS_BUCKET)
#: What the killed node leads when it dies: every stream and bucket the pipeline touches,
#: and the workers' consumer of the provider under load (the replayer's are made when a
#: model has parked jobs).
LED_STREAMS = [*STREAMS, *(f"KV_{b}" for b in BUCKETS)]
LED_CONSUMERS = [(s.JOBS_STREAM, s.worker_consumer("anthropic", p)) for p in s.PRIORITIES]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three JetStream nodes on loopback, each with its own store and server_name."""
    with NatsCluster(tmp_path / "cluster") as c:
        yield c


def r3(settings: Settings, nats_url: str | None = None) -> Settings:
    """``settings`` with every stream and bucket at three replicas (and other URLs)."""
    changed = settings.with_changes(nats=settings.nats.model_copy(update={"replicas": 3}))
    return changed.with_changes(nats_url=nats_url) if nats_url else changed


@contextlib.asynccontextmanager
async def jetstream(settings: Settings) -> AsyncIterator[Any]:
    """A JetStream context on a connection to the cluster, with the topology applied."""
    nc = await connect(settings, name="test")
    js = nc.jetstream()
    await ensure_topology(js, settings)
    try:
        yield js
    finally:
        await nc.close()


@contextlib.contextmanager
def services(settings: Settings, tmp_path: Path, *specs: tuple[str, ...]) -> Iterator[list[Any]]:
    """``ridethrough <role> ...`` child processes, logging to ``tmp_path``; stopped on exit."""
    procs = [
        ServiceProcess(settings, role, *args, log_path=tmp_path / f"{role}-{i}.log")
        for i, (role, *args) in enumerate(specs)
    ]
    try:
        yield [p.start() for p in procs]
    finally:
        codes = {f"{p.role}-{i}": p.terminate(timeout=30) for i, p in enumerate(procs)}
    # A clean exit on SIGTERM also proves no task inside died of a NATS error meanwhile.
    assert set(codes.values()) == {0}, f"exit codes {codes}; logs in {tmp_path}"


async def test_topology_is_replicated_on_three_nodes(cluster: NatsCluster, tmp_path: Path) -> None:
    """With nats.replicas=3 every stream, consumer and bucket has three current peers,
    and applying the topology again changes nothing."""
    settings = r3(make_settings(cluster.urls, "http://127.0.0.1:9"))
    names = (*STREAMS, *(f"KV_{b}" for b in BUCKETS))
    async with jetstream(settings) as js:
        for name in names:
            info = await js.stream_info(name)
            assert info.config.num_replicas == 3, name
            assert info.cluster.leader in {"n1", "n2", "n3"}, name
            assert len(info.cluster.replicas) == 2, name

        async def all_current() -> bool:
            # A follower catches up a moment after the stream is made (seen lagging by one
            # under load): current is what it must become, not what it is at once.
            for name in names:
                info = await js.stream_info(name)
                if not all(p.current for p in info.cluster.replicas):
                    return False
            return True

        await wait_until(all_current, timeout=30)
        consumer = await js.consumer_info(s.JOBS_STREAM, s.worker_consumer("anthropic", "high"))
        assert consumer.cluster.leader in {"n1", "n2", "n3"}
        assert len(consumer.cluster.replicas) == 2  # the consumer inherits R3
        again = await ensure_topology(js, settings)
    assert not again.changed, again


async def test_workers_on_different_nodes_share_the_consumer(
    cluster: NatsCluster, fake_provider: Any, tmp_path: Path
) -> None:
    """A worker connected to n1 and one connected to n2 split workers-anthropic-normal: every job
    is called and written once, and both did work."""
    base = r3(make_settings(cluster.urls, fake_provider.url, concurrency=16, batch_size=8))
    on_n1 = base.with_changes(nats_url=cluster.node("n1").url)
    on_n2 = base.with_changes(nats_url=cluster.node("n2").url)
    async with jetstream(base) as js:
        health = tmp_path / "w1.health"
        w1 = ServiceProcess(
            on_n1, "worker", "--no-topology", "--alive-file", str(health),
            log_path=tmp_path / "w1.log",
        )  # fmt: skip
        w2 = ServiceProcess(on_n2, "worker", "--no-topology", log_path=tmp_path / "w2.log")
        try:
            w1.start()
            w2.start()
            await wait_until(lambda: _consumers_on(cluster, {"n1": 1, "n2": 1}), timeout=30)
            await wait_until(lambda: _says(health, "ready"), timeout=30)
            async with await Producer.connect(base) as producer:
                outcomes = await producer.submit_many(
                    [make_job("anthropic", "m", prompt=f"j{i}", max_tokens=8) for i in range(300)]
                )
                assert all(o.ok for o in outcomes)
                results = await producer.results([o.job_id for o in outcomes], timeout=90)
        finally:
            w1.terminate(timeout=30)
            w2.terminate(timeout=30)
        counts = await count_outcomes(js)
    assert len(results) == 300
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == 300
    assert counts["waiting"] == 0
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 300
    assert len({r.worker for r in results.values()}) == 2
    assert not health.exists()  # a stopped worker leaves no "ready" behind


async def _says(path: Path, status: str) -> bool:
    def read() -> str:
        return path.read_text().strip() if path.exists() else ""

    return await asyncio.to_thread(read) == status


async def _consumers_on(cluster: NatsCluster, want: dict[str, int]) -> bool:
    """Whether each named node has (at least) the wanted number of worker connections
    (the worker's FastStream broker names its connection ``faststream-<version>``)."""
    await asyncio.sleep(0)
    for name, n in want.items():
        conns = cluster.node(name).monitor("/connz?subs=1&limit=1024").get("connections") or []
        workers = [c for c in conns if str(c.get("name", "")).startswith("faststream")]
        if len(workers) < n:
            return False
    return True


async def test_a_stream_without_a_leader_is_not_an_unknown_provider(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    """AI_JOBS at one replica, its node SIGKILLed: the stream exists but has no leader, and
    a publish gets "no responders", as for a provider nobody configured. The producer
    tells the two apart: it waits its ack timeout, then says NATS is unavailable, while a
    job for an unknown provider is still refused as such; once the node is back, the same
    job submitted again (same key) is stored once."""
    settings = make_settings(cluster.urls, "http://127.0.0.1:9")  # streams at one replica
    async with jetstream(settings) as js:
        home = (await js.stream_info(s.JOBS_STREAM)).cluster.leader
        cluster.kill(home)
        await asyncio.to_thread(cluster.wait_healthy)  # the others agree on a meta leader
        job = make_job("anthropic", "m", prompt="patience", max_tokens=8)
        async with await Producer.connect(settings, ack_timeout_s=2.0) as producer:
            with pytest.raises(NatsUnavailable, match="no leader"):
                await producer.submit(job, idempotency_key="patient-1")
            with pytest.raises(UnknownProvider):
                await producer.submit(make_job("nosuch", "m", prompt="x", max_tokens=8))
            outcomes = await producer.submit_many([job], idempotency_keys=["patient-1"])
            assert isinstance(outcomes[0].error, NatsUnavailable), outcomes
            cluster.restart(home)
            assert await producer.submit(job, idempotency_key="patient-1") == "patient-1"
            again = await producer.submit_many([job], idempotency_keys=["patient-1"])
            assert again[0].ok and again[0].duplicate, again
        assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 1


@pytest.mark.chaos
async def test_losing_the_stream_leader_node_under_load_loses_no_job(
    cluster: NatsCluster, fake_provider: Any, tmp_path: Path
) -> None:
    """Jobs flow steadily; the provider has an outage (jobs park); the node leading AI_JOBS
    (and, moved there first, every other stream, bucket and consumer) is SIGKILLed; the
    outage ends while that node is down (prober half-opens, replayer
    replays); the node comes back. Workers, producer, prober and replayer reconnect and
    carry on: every job ends in exactly one result, none twice."""
    from services.tools.fake import FaultConfig

    fake_provider.set_config(FaultConfig(latency_ms=20, seed=3))
    settings = r3(
        make_settings(cluster.urls, fake_provider.url, concurrency=32, batch_size=16, ack_wait_s=4)
    )
    total, rate = 480, 40.0
    keys = [f"cluster-{i:04d}" for i in range(total)]
    retries = 0

    async def produce() -> None:
        nonlocal retries
        async with await Producer.connect(settings) as producer:
            for i, key in enumerate(keys):
                job = make_job("anthropic", "m", prompt=f"job {i}", max_tokens=8)
                for _ in range(100):  # bounded: a leader election takes seconds, not minutes
                    try:
                        await producer.submit(job, idempotency_key=key)
                        break
                    except InvalidJob:
                        raise
                    except (NatsUnavailable, JobRejected):
                        # Not acknowledged: NATS away, or AI_JOBS without a leader for
                        # longer than the ack timeout. Submit again with the same key;
                        # dedup drops a second copy.
                        retries += 1
                        await asyncio.sleep(0.2)
                else:
                    raise AssertionError(f"job {key} was never accepted")
                await asyncio.sleep(1 / rate)

    async with jetstream(settings) as js:
        with services(
            settings,
            tmp_path,
            ("worker", "--no-topology"),
            ("worker", "--no-topology"),
            ("prober",),
            ("replayer",),
        ) as procs:
            producer = asyncio.create_task(produce())
            try:
                # Four processes start first: on a loaded machine that alone takes a while.
                await wait_until(lambda: _results_at_least(js, 60), timeout=90)
                fake_provider.start_outage(529)
                await wait_until(lambda: _parked_at_least(js, 20), timeout=30)

                leader = (await js.stream_info(s.JOBS_STREAM)).cluster.leader
                await gather_leaders(js._nc, leader, LED_STREAMS, LED_CONSUMERS)
                cluster.kill(leader)
                await wait_until(lambda: _new_leader(js, s.JOBS_STREAM, leader), timeout=30)
                fake_provider.stop_outage()
                # Recovery runs while the old leader is down: the backlog is replayed.
                await wait_until(lambda: _closed_and_drained(js), timeout=45)
                cluster.restart(leader)

                await asyncio.wait_for(producer, timeout=60)
                await wait_until(lambda: _results_at_least(js, total), timeout=60)
                await wait_until(lambda: _settled(js), timeout=30)
            finally:
                producer.cancel()
                with contextlib.suppress(BaseException):
                    await producer
            assert all(p.proc is not None and p.proc.poll() is None for p in procs), (
                "a service process died instead of reconnecting; see the logs in "
                f"{tmp_path}: {[p.proc.poll() if p.proc else None for p in procs]}"
            )
        counts = await count_outcomes(js)
        ids = await result_job_ids(js)
        events = await health_events(js)
        breaker = await _breaker_state(js)
    assert sorted(ids) == keys  # every accepted job has a result, and nothing else does
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == total
    assert counts["dead"] == counts["waiting"] == 0
    # The breaker went open and came back closed, with the parked jobs replayed. The
    # half_open event in between may be missing: the prober's write to ai_health can
    # succeed while AI_EVENTS has no leader, and the event published after it then fails.
    states = [e.state for e in events]
    assert states[0] == "open" and states[-1] == "closed", states
    assert breaker == "closed"
    assert sum(e.replayed for e in events if e.state == "closed") >= 20


async def health_events(js: Any, provider: str = "anthropic") -> list[Any]:
    """Every breaker transition of ``provider`` and of its models on AI_EVENTS, oldest first."""
    from schemas.events import decode_health_event

    msgs = await read_stream(js, s.EVENTS_STREAM, s.HEALTH_EVENTS_FILTER)
    return [e for e in map(decode_health_event, (m.data for m in msgs)) if e.provider == provider]


async def _breaker_state(js: Any, provider: str = "anthropic", model: str = "m") -> str:
    """The breaker state of ``model`` of ``provider`` in KV ai_health (the tests' jobs are
    all of model ``m``, so a 529 storm opens that model's breaker)."""
    from nats.js.errors import KeyNotFoundError

    from schemas.health import decode_state

    kv = await js.key_value(s.HEALTH_BUCKET)
    try:
        entry = await kv.get(s.scope_key(provider, model))
    except KeyNotFoundError:
        return "closed"
    return decode_state(entry.value).state if entry.value else "closed"


async def _results_at_least(js: Any, n: int) -> bool:
    return bool((await js.stream_info(s.RESULTS_STREAM)).state.messages >= n)


async def _parked_at_least(js: Any, n: int) -> bool:
    return bool((await js.stream_info(s.PARKED_STREAM)).state.messages >= n)


async def _new_leader(js: Any, stream: str, old: str) -> bool:
    try:
        info = await js.stream_info(stream)
    except Exception:  # no leader yet, or our own connection is reconnecting
        return False
    return bool(info.cluster.leader and info.cluster.leader != old)


async def _closed_and_drained(js: Any) -> bool:
    try:
        events = await health_events(js)
        parked = (await js.stream_info(s.PARKED_STREAM)).state.messages
    except Exception:  # a stream is electing a new leader
        return False
    return bool(events and events[-1].state == "closed" and parked == 0)


async def _settled(js: Any) -> bool:
    try:
        counts = await count_outcomes(js)
        parked = (await js.stream_info(s.PARKED_STREAM)).state.messages
    except Exception:
        return False
    return counts["waiting"] == 0 and parked == 0
