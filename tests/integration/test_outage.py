"""Riding through an outage: breaker, parking, probes, paced replay, failover, deadlines."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.events import decode_health_event
from schemas.jobs import Target, decode_job
from schemas.parking import ParkedJob, ParkRecord
from services.breaker import HealthBoard, transition
from services.config import Settings
from services.producer import Producer, make_job
from services.tools.stack import running_recovery, running_worker
from tests.support import count_outcomes, read_stream, wait_until

pytestmark = pytest.mark.integration


async def _health_events(js: Any, provider: str = "anthropic") -> list[Any]:
    """Transitions of every scope of ``provider`` (itself and its models), oldest first."""
    msgs = await read_stream(js, s.EVENTS_STREAM, s.HEALTH_EVENTS_FILTER)
    events = [decode_health_event(m.data) for m in msgs]
    return [e for e in events if e.provider == provider]


async def _state(js: Any, provider: str = "anthropic", model: str | None = "m") -> str:
    """The state of the jobs of ``model`` (the tests' jobs use ``m``): the worse of the
    provider's breaker and the model's."""
    board = HealthBoard(js, [provider], Settings().breaker)
    board.health_kv = await js.key_value(s.HEALTH_BUCKET)
    board.control_kv = await js.key_value(s.CONTROL_BUCKET)
    await board.refresh()
    return board.state(provider, model)


async def test_outage_parks_jobs_and_recovery_replays_them_all(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A 529 storm opens the breaker, jobs park instead of retrying, probes half-open it
    after recovery, the replayer drains the backlog and closes it; every job succeeds once."""
    async with (
        running_worker(settings),
        running_recovery(settings),
        await Producer.connect(settings) as producer,
    ):
        fake_provider.start_outage(529)

        async def submit(n: int, tag: str) -> list[str]:
            jobs = [make_job("anthropic", "m", prompt=f"{tag} {i}", max_tokens=8) for i in range(n)]
            return [await producer.submit(j) for j in jobs]

        def parked(n: int) -> Any:
            async def check() -> bool:
                return (await js.stream_info(s.PARKED_STREAM)).state.messages == n

            return check

        ids = await submit(30, "trips")
        await wait_until(parked(30), timeout=30)
        assert await _state(js) == "open"
        calls_to_trip = fake_provider.counters()["normal"]
        ids += await submit(30, "while open")
        await wait_until(parked(60), timeout=30)
        # No retry storm: once open, jobs are parked without a single provider call.
        assert fake_provider.counters()["normal"] == calls_to_trip
        fake_provider.stop_outage()
        results = await producer.results(ids, timeout=60)
        await wait_until(lambda: _is(js, "closed"), timeout=30)
    assert {r.status for r in results.values()} == {"succeeded"}
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == 60
    assert counts["dead"] == 0
    assert (await js.stream_info(s.PARKED_STREAM)).state.messages == 0
    assert fake_provider.counters()["probes"] >= settings.breaker.probe_successes
    events = await _health_events(js)
    assert [e.state for e in events] == ["open", "half_open", "closed"]
    assert len({e.outage_id for e in events}) == 1
    assert events[-1].replayed == 60


async def _is(js: Any, state: str) -> bool:
    return await _state(js) == state


async def test_concurrent_trips_make_one_transition(settings: Settings, js: Any) -> None:
    """Ten workers tripping at once: one CAS wins, one event is published."""
    kv = await js.key_value(s.HEALTH_BUCKET)
    outcomes = await asyncio.gather(
        *(
            transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by=f"w{i}")
            for i in range(10)
        )
    )
    assert sum(o is not None for o in outcomes) == 1
    assert [e.state for e in await _health_events(js)] == ["open"]


async def test_rate_limit_storm_slows_down_without_opening(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """429s with retry-after are retried after the delay; the breaker stays closed."""
    from services.tools.fake import FaultConfig

    fake_provider.set_config(
        FaultConfig(error_rate=0.6, error_mix={429: 1}, retry_after_s=0.2, seed=3)
    )
    async with running_worker(settings), await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many(
            [make_job("anthropic", "m", prompt=f"r{i}", max_tokens=4) for i in range(40)]
        )
        ids = [o.job_id for o in outcomes]
        results = await producer.results(ids, timeout=60)
    assert {r.status for r in results.values()} == {"succeeded"}
    assert fake_provider.counters()["by_status"].get("429", 0) > 10
    assert await _state(js) == "closed"
    assert await _health_events(js) == []


async def test_on_outage_fail_gives_a_failed_result(settings: Settings, js: Any) -> None:
    """A job asking to fail during an outage gets status failed, reason provider_outage."""
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    async with running_worker(settings), await Producer.connect(settings) as producer:
        job_id = await producer.submit(make_job("anthropic", "m", prompt="x", on_outage="fail"))
        result = await producer.result(job_id, timeout=30)
    assert result.status == "failed"
    assert result.error is not None and result.error.type == "provider_outage"


async def test_failover_sends_the_job_to_a_healthy_fallback(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """With anthropic open, a failover job is mapped to the OpenAI shape and answered there;
    an unmappable one is parked, not mangled."""
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    fallback = [Target(provider="openai", model="gpt-fallback")]
    mappable = make_job(
        "anthropic", "m",
        request={"system": "be brief", "max_tokens": 8,
                 "messages": [{"role": "user", "content": "hello fallback"}]},
        on_outage="failover", fallbacks=fallback,
    )  # fmt: skip
    unmappable = make_job(
        "anthropic", "m",
        request={"max_tokens": 8, "tools": [{"name": "t", "input_schema": {}}],
                 "messages": [{"role": "user", "content": "needs tools"}]},
        on_outage="failover", fallbacks=fallback,
    )  # fmt: skip
    async with running_worker(settings), await Producer.connect(settings) as producer:
        await producer.submit(unmappable)
        result = await producer.result(await producer.submit(mappable), timeout=30)

        async def one_parked() -> bool:
            return (await js.stream_info(s.PARKED_STREAM)).state.messages == 1

        await wait_until(one_parked, timeout=30)
    assert result.status == "succeeded"
    assert result.provider == "openai" and result.model == "gpt-fallback"
    assert result.response is not None
    assert result.response["choices"][0]["message"]["content"] == "echo: hello fallback"
    assert fake_provider.counters()["by_path"].get("/v1/messages", 0) == 0


async def _park_directly(js: Any, jobs: list[Any]) -> None:
    for job in jobs:
        body = ParkedJob(job=job, park=ParkRecord(reason="provider_open", outage_id="o1"))
        await js.publish(s.parked_subject(job.provider, job.priority), encode(body))


async def test_replay_goes_high_then_normal_then_low_oldest_first(
    settings: Settings, js: Any
) -> None:
    """Parked jobs come back to AI_JOBS by priority, oldest first within a priority."""
    prios = ["low", "normal", "high"] * 5
    jobs = [make_job("anthropic", "m", prompt=f"p{i}", priority=p) for i, p in enumerate(prios)]
    await _park_directly(js, jobs)
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    await transition(js, kv, "anthropic", to="half_open", allowed_from=("open",), by="test")
    async with running_recovery(settings):

        async def drained_and_closed() -> bool:
            parked = (await js.stream_info(s.PARKED_STREAM)).state.messages
            return parked == 0 and await _state(js) == "closed"

        await wait_until(drained_and_closed, timeout=30)
    replayed = [decode_job(m.data) for m in await read_stream(js, s.JOBS_STREAM)]
    rank = {"high": 0, "normal": 1, "low": 2}
    expected = sorted(jobs, key=lambda j: rank[j.priority])  # stable: oldest first within
    assert [j.id for j in replayed] == [j.id for j in expected]


async def test_deadline_passed_while_parked_expires_without_a_call(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A parked job whose deadline passed ends as an expired result; the provider is not called."""
    past = datetime.now(UTC) - timedelta(seconds=1)
    late = make_job("anthropic", "m", prompt="too late", deadline=past)
    fresh = make_job("anthropic", "m", prompt="in time")
    await _park_directly(js, [late, fresh])
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    await transition(js, kv, "anthropic", to="half_open", allowed_from=("open",), by="test")
    async with (
        running_worker(settings),
        running_recovery(settings),
        await Producer.connect(settings) as producer,
    ):
        expired = await producer.result(late.id, timeout=30)
        done = await producer.result(fresh.id, timeout=30)
    assert expired.status == "expired" and done.status == "succeeded"
    assert fake_provider.counters()["normal"] == 1


async def test_one_replayer_holds_the_lease(settings: Settings, js: Any) -> None:
    """Two replayer replicas: exactly one holds each provider's lease."""
    async with running_recovery(settings) as (_, r1), running_recovery(settings) as (_, r2):

        async def settled() -> bool:
            held = [lease.held for lease in r1._leases + r2._leases]
            return sum(held) == len(settings.providers)

        await wait_until(settled, timeout=10)
