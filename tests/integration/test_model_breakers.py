"""Breakers per model, and per provider: one sick model parks only its own jobs, the
provider opens only on its own failures or when enough of its models are open, and jobs
parked under the last release's layout still come back after an upgrade."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.parking import ParkedJob, ParkRecord, decode_parked
from services.breaker import transition
from services.config import Settings
from services.jetstream.topology import ensure_topology
from services.ops.status import collect_status
from services.producer import Producer, make_job
from services.tools.stack import running_recovery, running_worker
from tests.support import (
    breaker_state,
    count_outcomes,
    fault_request,
    health_events,
    read_stream,
    wait_until,
)

pytestmark = pytest.mark.integration

SICK = "claude-sick-4.5"  # a '.' in the name: its token spells it _2E
WELL = "claude-well"


async def test_a_sick_model_parks_only_its_own_jobs(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """529s from one model open that model's breaker: its jobs park on its own subject,
    the other model's jobs are served throughout, and the provider stays closed."""
    async with running_worker(settings), await Producer.connect(settings) as producer:
        sick = [
            make_job("anthropic", SICK, request=fault_request("fault:529", f"s{i}"))
            for i in range(12)
        ]
        for job in sick:
            await producer.submit(job)

        async def sick_open() -> bool:
            return await breaker_state(js, "anthropic", SICK) == "open"

        await wait_until(sick_open, timeout=30)
        well = [make_job("anthropic", WELL, prompt=f"w{i}", max_tokens=8) for i in range(20)]
        results = [await producer.result(await producer.submit(j), timeout=30) for j in well]

        async def all_sick_parked() -> bool:
            parked = await read_stream(js, s.PARKED_STREAM)
            return len(parked) == len(sick)

        await wait_until(all_sick_parked, timeout=30)
        status = await collect_status(js, settings)
    assert [r.status for r in results] == ["succeeded"] * len(well)
    assert await breaker_state(js, "anthropic") == "closed"
    assert await breaker_state(js, "anthropic", WELL) == "closed"
    parked = await read_stream(js, s.PARKED_STREAM)
    assert {m.subject for m in parked} == {f"ai.parked.anthropic.normal.{s.model_token(SICK)}"}
    assert sorted(decode_parked(m.data).job.id for m in parked) == sorted(j.id for j in sick)
    assert all(
        decode_parked(m.data).park.outage_id.startswith(f"anthropic/{SICK}-") for m in parked
    )
    # The transition is an event of the model's scope, not of the provider's.
    assert [e.state for e in await health_events(js, "anthropic", SICK)] == ["open"]
    assert await health_events(js, "anthropic") == []
    # status shows the model under its provider.
    model = status["providers"]["anthropic"]["models"][SICK]
    assert (model["state"], model["parked"]) == ("open", len(sick))
    assert status["providers"]["anthropic"]["state"] == "closed"


async def test_connection_failures_open_the_provider(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """Connection resets say the provider is unreachable: they open the provider's breaker,
    not a model's, and then every model's jobs park."""
    async with running_worker(settings), await Producer.connect(settings) as producer:
        for i in range(8):
            await producer.submit(
                make_job("anthropic", WELL, request=fault_request("fault:reset", f"r{i}"))
            )

        async def provider_open() -> bool:
            return await breaker_state(js, "anthropic") == "open"

        await wait_until(provider_open, timeout=30)
        other = make_job("anthropic", SICK, prompt="another model", max_tokens=8)
        await producer.submit(other)

        async def parked_other() -> bool:
            jobs = [decode_parked(m.data).job.id for m in await read_stream(js, s.PARKED_STREAM)]
            return other.id in jobs

        await wait_until(parked_other, timeout=30)
    assert await breaker_state(js, "anthropic", WELL) == "open"  # through its provider
    assert [e.state for e in await health_events(js, "anthropic", WELL)] == []


async def test_enough_sick_models_open_the_provider(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """When ``models_to_open_provider`` (2) of its models are open, the provider opens:
    several models failing at once is the provider's trouble."""
    async with running_worker(settings), await Producer.connect(settings) as producer:
        for model in ("m-one", "m-two"):
            for i in range(8):
                await producer.submit(
                    make_job("anthropic", model, request=fault_request("fault:529", f"{i}"))
                )

        async def provider_open() -> bool:
            return await breaker_state(js, "anthropic") == "open"

        await wait_until(provider_open, timeout=30)
    (opened,) = await health_events(js, "anthropic")
    assert opened.state == "open" and "2 of its models are open" in opened.reason


async def _old_layout(js: Any) -> None:
    """Put AI_PARKED and AI_EVENTS back as the last release made them, with its replayer
    consumers (the streams the upgrade finds)."""
    for name, subjects in (
        (s.PARKED_STREAM, ["ai.parked.*.*"]),
        (s.EVENTS_STREAM, ["ai.events.health.*", s.OPS_EVENTS_SUBJECT]),
    ):
        info = await js.stream_info(name)
        info.config.subjects = subjects
        await js.update_stream(info.config)
    from nats.js import api

    for prio in s.PRIORITIES:
        name = s.legacy_replayer_consumer("anthropic", prio)
        await js.add_consumer(
            s.PARKED_STREAM,
            api.ConsumerConfig(
                name=name,
                durable_name=name,
                filter_subject=s.legacy_parked_subject("anthropic", prio),
                ack_policy=api.AckPolicy.EXPLICIT,
            ),
        )


async def _park_legacy(js: Any, jobs: list[Any]) -> None:
    for job in jobs:
        body = ParkedJob(job=job, park=ParkRecord(reason="provider_open", outage_id="old-1"))
        await js.publish(s.legacy_parked_subject(job.provider, job.priority), encode(body))


async def test_jobs_parked_under_the_old_layout_come_back_after_an_upgrade(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """An upgrade finds jobs parked on ai.parked.<p>.<priority> and the provider open (its
    KV key and events as the last release wrote them): ``ridethrough topology`` moves the
    jobs to the per-model layout and drops the old consumers; a job an old worker parks
    after that is moved by running it again; every one is served once."""
    await _old_layout(js)
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="old")
    models = ["claude-a", "claude-3.5-b", "x" * 300]  # the last has no scope of its own
    before = [
        make_job("anthropic", models[i // 3 % 3], prompt=f"old {i}", max_tokens=8, priority=p)
        for i, p in enumerate(["high", "normal", "low"] * 6)
    ]
    await _park_legacy(js, before)

    report = await ensure_topology(js, settings)

    assert f"{s.PARKED_STREAM}: {len(before)} parked jobs moved to per-model subjects" in (
        report.updated
    )
    names = {c.name async for c in _consumers(js)}
    assert not names & {s.legacy_replayer_consumer("anthropic", p) for p in s.PRIORITIES}
    parked = await read_stream(js, s.PARKED_STREAM)
    assert len(parked) == len(before)
    assert {m.subject for m in parked} == {
        s.parked_subject(j.provider, j.priority, j.model) for j in before
    }
    assert f"ai.parked.anthropic.high.{s.NO_MODEL}" in {m.subject for m in parked}

    straggler = make_job("anthropic", "claude-a", prompt="parked mid-upgrade", max_tokens=8)
    await _park_legacy(js, [straggler])
    again = await ensure_topology(js, settings)
    assert f"{s.PARKED_STREAM}: 1 parked jobs moved to per-model subjects" in again.updated
    everyone = [*before, straggler]
    async with running_worker(settings), running_recovery(settings):
        # The outage ends: the prober half-opens the provider, the replayer drains it.
        async def all_served_and_closed() -> bool:
            # The replayer closes the provider a poll after the backlog is gone: the last
            # result may come first.
            served = (await count_outcomes(js))["succeeded"] == len(everyone)
            return served and await breaker_state(js, "anthropic") == "closed"

        await wait_until(all_served_and_closed, timeout=60)
    outcomes = await count_outcomes(js)
    assert outcomes["succeeded"] == len(everyone) and outcomes["dead"] == 0
    assert await read_stream(js, s.PARKED_STREAM) == []
    by_model = fake_provider.counters()["by_model"]
    assert sum(by_model.get(m, 0) for m in models) == len(everyone)  # each called once


async def _consumers(js: Any) -> Any:
    for info in await js.consumers_info(s.PARKED_STREAM):
        yield info


async def test_a_model_outage_recovers_on_its_own_without_touching_the_provider(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """One model answers 529 for a while: its breaker opens, the prober probes that model,
    half-opens it when it answers, the replayer brings back its parked jobs and closes
    it; the other model is served throughout; every job succeeds once."""
    fake_provider.start_outage(529, models=[SICK])
    async with (
        running_worker(settings),
        running_recovery(settings),
        await Producer.connect(settings) as producer,
    ):
        sick = [make_job("anthropic", SICK, prompt=f"s{i}", max_tokens=8) for i in range(15)]
        ids = [await producer.submit(j) for j in sick]

        async def sick_parked() -> bool:
            parked = len(await read_stream(js, s.PARKED_STREAM))
            return await breaker_state(js, "anthropic", SICK) == "open" and parked > 0

        await wait_until(sick_parked, timeout=30)
        well = [make_job("anthropic", WELL, prompt=f"w{i}", max_tokens=8) for i in range(10)]
        well_results = [await producer.result(await producer.submit(j), timeout=30) for j in well]
        fake_provider.stop_outage()
        results = await producer.results(ids, timeout=60)

        async def closed() -> bool:
            return await breaker_state(js, "anthropic", SICK) == "closed"

        await wait_until(closed, timeout=30)
    assert {r.status for r in [*results.values(), *well_results]} == {"succeeded"}
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == len(sick) + len(well)
    assert counts["dead"] == 0 and await read_stream(js, s.PARKED_STREAM) == []
    assert [e.state for e in await health_events(js, "anthropic", SICK)] == [
        "open",
        "half_open",
        "closed",
    ]
    assert await health_events(js, "anthropic") == []  # the provider never moved
    assert await health_events(js, "anthropic", WELL) == []


@pytest.mark.parametrize("degraded", [True, False])
async def test_a_status_page_calling_a_model_degraded_trips_it_sooner(
    nats_server: Any, js: Any, fake_provider: Any, degraded: bool
) -> None:
    """With the status page's evidence that the model is degraded, three failures in a row
    open its breaker (half of six); without it, three leave it closed. The evidence alone
    opened nothing: it only lowered the threshold real failures had to reach."""
    from schemas.health import Evidence, PageComponent
    from tests.conftest import make_settings

    settings = make_settings(
        nats_server.url,
        fake_provider.url,
        breaker={"consecutive_failures": 6, "min_calls": 1000},
        max_attempts=1,
    )
    await ensure_topology(js, settings)
    if degraded:
        evidence = Evidence(
            provider="anthropic",
            degraded=[PageComponent(name="Claude Sick", status="partial_outage", model=SICK)],
        )
        control = await js.key_value(s.CONTROL_BUCKET)
        await control.put(s.evidence_key("anthropic"), encode(evidence))
    async with running_worker(settings), await Producer.connect(settings) as producer:
        assert await breaker_state(js, "anthropic", SICK) == "closed"  # evidence is no proof
        for i in range(3):
            await producer.submit(
                make_job("anthropic", SICK, request=fault_request("fault:529", f"d{i}"))
            )

            async def settled(n: int = i + 1) -> bool:
                outcomes = await count_outcomes(js)
                return outcomes["dead"] + len(await read_stream(js, s.PARKED_STREAM)) == n

            await wait_until(settled, timeout=30)
    assert await breaker_state(js, "anthropic", SICK) == ("open" if degraded else "closed")
    assert await breaker_state(js, "anthropic") == "closed"


async def test_jobs_parked_under_a_token_no_model_has_are_moved_not_lost(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A parked job on a model token ``model_token`` never writes (a hand-made publish), and
    garbage beside it: the replayer does not read those subjects, ``ridethrough topology``
    moves them; the job is then served once and the garbage becomes a dead letter."""
    job = make_job("anthropic", "claude-a", prompt="misplaced", max_tokens=8)
    body = ParkedJob(job=job, park=ParkRecord(reason="provider_open"))
    await js.publish("ai.parked.anthropic.normal.zz_ZZ", encode(body))
    await js.publish("ai.parked.anthropic.low.bad_token", b"not a parked job")
    report = await ensure_topology(js, settings)
    assert f"{s.PARKED_STREAM}: 2 parked jobs moved to per-model subjects" in report.updated
    assert {m.subject for m in await read_stream(js, s.PARKED_STREAM)} == {
        s.parked_subject("anthropic", "normal", "claude-a"),
        s.parked_subject("anthropic", "low", None),
    }
    async with running_worker(settings), running_recovery(settings):

        async def settled() -> bool:
            outcomes = await count_outcomes(js)
            return outcomes["succeeded"] == 1 and outcomes["dead"] == 1

        await wait_until(settled, timeout=30)
    assert await read_stream(js, s.PARKED_STREAM) == []
    assert fake_provider.counters()["by_model"].get("claude-a") == 1


async def test_a_model_the_provider_no_longer_serves_is_half_opened_and_its_jobs_end(
    nats_server: Any, js: Any, fake_provider: Any
) -> None:
    """A model open while its probes get a permanent error (a retired model: 404) is not
    held open for ever, its jobs parked until they age out: the answer half-opens it, its
    parked jobs replay and end as dead letters with the reason, and it closes."""
    from tests.conftest import make_settings

    base = make_settings(nats_server.url, fake_provider.url)
    retired = fault_request("fault:404", "gone")
    anthropic = base.providers["anthropic"].model_copy(update={"probe_request": retired})
    settings = base.with_changes(providers={**base.providers, "anthropic": anthropic})
    await ensure_topology(js, settings)
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", SICK, to="open", allowed_from=("closed",), by="test")
    jobs = [make_job("anthropic", SICK, request=retired) for _ in range(3)]
    for job in jobs:
        body = ParkedJob(job=job, park=ParkRecord(reason="provider_open"))
        await js.publish(s.parked_subject("anthropic", job.priority, SICK), encode(body))
    async with running_worker(settings), running_recovery(settings):

        async def ended() -> bool:
            closed = await breaker_state(js, "anthropic", SICK) == "closed"
            return closed and (await count_outcomes(js))["dead"] == len(jobs)

        await wait_until(ended, timeout=30)
    outcomes = await count_outcomes(js)
    assert outcomes["failed"] == len(jobs) and await read_stream(js, s.PARKED_STREAM) == []


@pytest.mark.parametrize("probe_model_open", [True, False])
async def test_a_provider_probed_through_a_sick_model_half_opens_only_if_that_model_is_open(
    nats_server: Any, js: Any, fake_provider: Any, probe_model_open: bool
) -> None:
    """The provider's probe model answers 529: when that model's own breaker is open the
    answer is the provider's (it is reachable, the model is sick on its own) and the
    provider half-opens; when the model is not known sick, the 529 keeps the provider open."""
    from tests.conftest import make_settings

    base = make_settings(nats_server.url, fake_provider.url)
    probe = {"probe_model": SICK, "probe_request": fault_request("fault:529", "ping")}
    anthropic = base.providers["anthropic"].model_copy(update=probe)
    settings = base.with_changes(providers={**base.providers, "anthropic": anthropic})
    await ensure_topology(js, settings)
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    if probe_model_open:
        await transition(js, kv, "anthropic", SICK, to="open", allowed_from=("closed",), by="t")
    async with running_recovery(settings) as (prober, _):

        async def decided() -> bool:
            moved = await breaker_state(js, "anthropic") != "open"
            return moved or prober.probes["anthropic"] >= 6

        await wait_until(decided, timeout=30)
    assert (await breaker_state(js, "anthropic") != "open") is probe_model_open
    assert await breaker_state(js, "anthropic", SICK) == "open"  # still sick on its own
