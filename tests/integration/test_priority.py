"""Priority on the live path: high overtakes a backlog, low is not starved, and the upgrade
from one workers' consumer per provider to one per priority loses no job.

Ordering is read from AI_RESULTS, whose sequence is the order the jobs finished in. The
worker runs with two call slots and a 20 ms provider, so a backlog forms at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js import api

from schemas import subjects as s
from schemas.results import decode_result
from services.config import Settings
from services.jetstream.connection import connect
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.tools.fake import FaultConfig
from services.tools.stack import running_worker
from tests.conftest import make_settings
from tests.support import count_outcomes, read_stream

pytestmark = pytest.mark.integration


def _jobs(priority: str, n: int, tag: str = "") -> list[Any]:
    return [
        make_job("anthropic", "m", prompt=f"{priority}{tag} {i}", max_tokens=8, priority=priority)
        for i in range(n)
    ]


async def _submit(producer: Producer, jobs: list[Any]) -> list[str]:
    outcomes = await producer.submit_many(jobs)
    assert all(o.ok for o in outcomes)
    return [o.job_id for o in outcomes]


async def _finish_order(js: Any) -> list[str]:
    """Job ids of AI_RESULTS in the order their results were stored."""
    return [decode_result(m.data).job_id for m in await read_stream(js, s.RESULTS_STREAM)]


def _slow(nats_server: Any, fake_provider: Any) -> Settings:
    fake_provider.set_config(FaultConfig(latency_ms=20))
    return make_settings(nats_server.url, fake_provider.url, concurrency=2)


async def test_high_jobs_submitted_after_a_low_backlog_finish_before_most_of_it(
    nats_server: Any, fake_provider: Any, js: Any
) -> None:
    """20 high jobs submitted after 200 low ones finish before half of the low ones do."""
    settings = _slow(nats_server, fake_provider)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        lows = await _submit(producer, _jobs("low", 200))
        highs = await _submit(producer, _jobs("high", 20))
        results = await producer.results(lows + highs, timeout=120)
    finished = await _finish_order(js)
    last_high = max(finished.index(h) for h in highs)
    low_ids = set(lows)
    lows_before = sum(1 for j in finished[:last_high] if j in low_ids)
    assert lows_before < 100, lows_before
    assert {r.status for r in results.values()} == {"succeeded"}
    counts = await count_outcomes(js)
    assert counts == {**counts, "results": 220, "result_writes": 220, "succeeded": 220}
    assert counts["dead"] == counts["waiting"] == 0
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 220


async def test_low_jobs_finish_while_high_jobs_keep_arriving(
    nats_server: Any, fake_provider: Any, js: Any
) -> None:
    """While at least 50 high jobs are always waiting, 10 low jobs still finish (their share)."""
    settings = _slow(nats_server, fake_provider)
    done: set[str] = set()
    arrived = asyncio.Event()
    prefix = len(s.result_subject(""))

    async def on_result(msg: Any) -> None:
        done.add(msg.subject[prefix:])
        arrived.set()

    nc = await connect(settings, name="results-watch")
    await nc.subscribe(s.result_subject("*"), cb=on_result)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        lows = set(await _submit(producer, _jobs("low", 10)))
        highs: list[str] = []
        rounds = 0
        while not lows <= done:
            if len(highs) - len(done.difference(lows)) < 50:
                rounds += 1
                assert rounds <= 40, "low jobs starved: 2,000 high jobs went first"
                highs += await _submit(producer, _jobs("high", 50, f"-{rounds}"))
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 30)  # a failure bound, not a measurement
        waiting_high = len(highs) - len(done.difference(lows))
        await producer.results(highs, timeout=120)
    await nc.close()
    assert waiting_high > 0  # the last low finished with high jobs still waiting
    finished = await _finish_order(js)
    assert max(finished.index(j) for j in lows) < max(finished.index(h) for h in highs)
    n = len(lows) + len(highs)
    counts = await count_outcomes(js)
    assert counts == {**counts, "results": n, "result_writes": n, "succeeded": n}
    assert counts["dead"] == counts["waiting"] == 0
    assert fake_provider.counters()["by_path"]["/v1/messages"] == n


async def test_upgrade_from_one_workers_consumer_per_provider_loses_no_job(
    settings: Settings, fake_provider: Any
) -> None:
    """Jobs waiting on, or held unacked by, the previous release's workers-<provider> all end
    in one result each after `ridethrough topology` replaces it with per-priority consumers."""
    nc = await connect(settings, name="old-release")
    js = nc.jetstream()
    # The previous release: AI_JOBS on ai.jobs.<p>.>, one consumer per provider.
    await js.add_stream(
        name=s.JOBS_STREAM,
        subjects=["ai.jobs.anthropic.>", "ai.jobs.openai.>"],
        retention="workqueue",
        allow_direct=True,
    )
    for p in ("anthropic", "openai"):
        await js.add_consumer(
            s.JOBS_STREAM,
            api.ConsumerConfig(
                durable_name=f"workers-{p}",
                filter_subject=f"ai.jobs.{p}.>",
                ack_policy=api.AckPolicy.EXPLICIT,
                max_deliver=-1,
            ),
        )
    jobs = [j for prio in s.PRIORITIES for j in _jobs(prio, 20)]
    async with Producer(nc) as producer:
        ids = await _submit(producer, jobs)
    # An old worker took ten and stopped without settling them.
    old = await js.pull_subscribe_bind(durable="workers-anthropic", stream=s.JOBS_STREAM)
    held = await old.fetch(10, timeout=5)
    assert len(held) == 10
    await old.unsubscribe()

    report = await ensure_topology(js, settings)
    assert set(report.removed) == {"AI_JOBS/workers-anthropic", "AI_JOBS/workers-openai"}
    assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 60
    assert not (await ensure_topology(js, settings)).changed

    async with running_worker(settings), Producer(nc) as producer:
        results = await producer.results(ids, timeout=60)
    assert {r.status for r in results.values()} == {"succeeded"}
    counts = await count_outcomes(js)
    assert counts == {**counts, "results": 60, "result_writes": 60, "succeeded": 60}
    assert counts["dead"] == counts["waiting"] == 0
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 60
    await nc.close()
