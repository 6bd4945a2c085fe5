"""The topology step: idempotent, and changed settings reach existing streams and consumers."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from services.config import Settings
from services.jetstream.topology import ensure_topology

pytestmark = pytest.mark.integration


async def test_second_run_changes_nothing(settings: Settings, js: Any) -> None:
    """Running the topology step again (the fixture ran it once) creates and updates nothing."""
    report = await ensure_topology(js, settings)
    assert not report.changed
    # 5 streams, the workers' consumer per provider and priority, the notifier's, 4 buckets
    # (ai_locator too), ai_overflow, ai_bodies (the replayer makes its consumers per priority
    # and model when a model has parked jobs).
    assert len(report.unchanged) == 5 + 3 * len(settings.providers) + 1 + 4 + 1 + 1


async def test_every_name_of_the_design_exists(settings: Settings, js: Any) -> None:
    """Streams, per-provider consumers and buckets carry DESIGN.md's names and retention."""
    jobs = await js.stream_info(s.JOBS_STREAM)
    assert jobs.config.retention == "workqueue"
    assert jobs.config.duplicate_window >= 3600
    assert sorted(jobs.config.subjects) == sorted(
        f"ai.jobs.{p}.{prio}{tail}"
        for p in ("anthropic", "openai")
        for prio in ("high", "normal", "low")
        for tail in ("", ".>")
    )
    results = await js.stream_info(s.RESULTS_STREAM)
    assert results.config.max_msgs_per_subject == 1
    for p in ("anthropic", "openai"):
        for prio in ("high", "normal", "low"):
            w = await js.consumer_info(s.JOBS_STREAM, f"workers-{p}-{prio}")
            assert w.config.filter_subjects == [f"ai.jobs.{p}.{prio}", f"ai.jobs.{p}.{prio}.>"]
            assert w.config.max_deliver == -1
    parked = await js.stream_info(s.PARKED_STREAM)
    assert sorted(parked.config.subjects) == ["ai.parked.*.*", "ai.parked.*.*.*"]
    assert parked.config.retention == "workqueue"
    for bucket in (s.HEALTH_BUCKET, s.CONTROL_BUCKET, s.WORKERS_BUCKET):
        await js.key_value(bucket)
    await js.object_store(s.OVERFLOW_BUCKET)
    bodies = await js.stream_info(f"OBJ_{s.BODIES_BUCKET}")
    assert bodies.config.subjects == [f"$O.{s.BODIES_BUCKET}.C.>", f"$O.{s.BODIES_BUCKET}.M.>"]
    # A producer's `Nats-Rollup: all` on a chunk must not purge everyone's bodies.
    assert not bodies.config.allow_rollup_hdrs
    assert bodies.config.max_age == settings.bodies.max_age_s


async def test_changed_settings_are_applied_to_existing_objects(
    settings: Settings, js: Any
) -> None:
    """A new worker ack_wait reaches the workers' consumers; a new max age reaches the stream."""
    changed = settings.with_changes(
        worker=settings.worker.model_copy(update={"ack_wait_s": 42.0}),
        nats=settings.nats.model_copy(update={"parked_max_age_s": 3 * 86400.0}),
    )
    report = await ensure_topology(js, changed)
    assert set(report.updated) == {
        s.PARKED_STREAM,
        *(f"AI_JOBS/workers-{p}-{prio}" for p in ("anthropic", "openai") for prio in s.PRIORITIES),
    }
    assert (await js.consumer_info(s.JOBS_STREAM, "workers-openai-low")).config.ack_wait == 42.0
    assert (await js.stream_info(s.PARKED_STREAM)).config.max_age == 3 * 86400.0
    assert not (await ensure_topology(js, changed)).changed


async def test_new_provider_is_added_to_the_jobs_stream(settings: Settings, js: Any) -> None:
    """Adding a provider to the settings adds its subject and consumers."""
    from services.config import ProviderSettings

    more = settings.with_changes(
        providers={
            **settings.providers,
            "vllm": ProviderSettings(kind="openai", base_url="http://x"),
        }
    )
    report = await ensure_topology(js, more)
    assert s.JOBS_STREAM in report.updated
    assert {f"AI_JOBS/workers-vllm-{prio}" for prio in s.PRIORITIES} <= set(report.created)


async def test_an_events_stream_of_the_last_release_takes_the_tallies(
    settings: Settings, js: Any
) -> None:
    """AI_EVENTS made without the tally subject (the last release) is updated in place:
    it then stores ``ai.events.tally.<provider>``, keeps the events it had, and the
    notifier's consumer still does not deliver tallies."""
    from nats.js.errors import NoStreamResponseError

    cfg = (await js.stream_info(s.EVENTS_STREAM)).config
    cfg.subjects = [x for x in cfg.subjects if x != s.TALLY_FILTER]
    await js.update_stream(cfg)
    await js.publish(s.OPS_EVENTS_SUBJECT, b'{"action": "pause", "who": "op"}')
    with pytest.raises(NoStreamResponseError):  # the old stream does not listen there
        await js.publish(s.tally_subject("anthropic"), b"{}", timeout=1.0)
    report = await ensure_topology(js, settings)
    assert report.updated == [s.EVENTS_STREAM]
    await js.publish(s.tally_subject("anthropic"), b'{"provider": "anthropic"}')
    info = await js.stream_info(s.EVENTS_STREAM, subjects_filter=">")
    assert info.state.subjects == {s.OPS_EVENTS_SUBJECT: 1, s.tally_subject("anthropic"): 1}
    notifier = await js.consumer_info(s.EVENTS_STREAM, s.NOTIFIER_CONSUMER)
    assert s.TALLY_FILTER not in (notifier.config.filter_subjects or [])
    assert notifier.num_pending == 1  # the audit event only
    assert not (await ensure_topology(js, settings)).changed


async def test_an_upgrade_moves_results_and_keeps_jobs_stored_under_the_old_layout(
    settings: Settings, nats_server: Any, fake_provider: Any
) -> None:
    """Results and jobs stored by the previous release (results on ai.results.<id> and
    ai.results.<tenant>.<id>; jobs of a tenant on ai.jobs.<p>.<prio>, a replay marked by its
    header) all reach their terminal state after the upgrade: the results are moved to the
    scoped subjects once, the old jobs are run under the old rules, new forgeries are not."""
    import msgspec

    from schemas.codec import encode
    from schemas.results import JobResult, decode_result
    from services.jetstream.connection import connect
    from services.producer import Producer, make_job
    from services.tools.stack import running_worker

    nc = await connect(settings, name="old-release")
    js = nc.jetstream()
    # The previous release's topology: results on two legacy shapes, jobs on <p>.<prio>.
    await js.add_stream(
        name=s.RESULTS_STREAM, subjects=["ai.results.*", "ai.results.*.*"], allow_direct=True
    )
    await js.add_stream(
        name=s.JOBS_STREAM,
        subjects=["ai.jobs.anthropic.*", "ai.jobs.openai.*"],
        retention="workqueue",
        allow_direct=True,
    )
    old = {
        "ai.results.plain1": JobResult(
            job_id="plain1", status="succeeded", provider="a", model="m"
        ),
        "ai.results.shared.x1": JobResult(
            job_id="x1", status="succeeded", provider="a", model="m", tenant="shared"
        ),
        "ai.results.acme.a1": JobResult(
            job_id="a1", status="failed", provider="a", model="m", tenant="acme"
        ),
    }
    for subject, result in old.items():
        await js.publish(subject, encode(result))
    legacy_job = make_job("anthropic", "m", prompt="from before", tenant="acme")
    await js.publish(
        "ai.jobs.anthropic.normal", encode(legacy_job), headers={s.MSG_ID_HEADER: "key-1"}
    )

    report = await ensure_topology(js, settings)
    assert any("3 results moved" in u for u in report.updated), report.updated
    assert not any("moved" in u for u in (await ensure_topology(js, settings)).updated)
    for job_id, tenant in (("plain1", None), ("x1", "shared"), ("a1", "acme")):
        raw = await js.get_last_msg(s.RESULTS_STREAM, s.result_subject(job_id, tenant))
        assert decode_result(raw.data).job_id == job_id

    # After the upgrade, the same forgery a producer could make before is refused.
    forged = msgspec.structs.replace(legacy_job, id="forged")
    await js.publish(
        "ai.jobs.anthropic.normal", encode(forged), headers={s.MSG_ID_HEADER: "forged"}
    )
    async with running_worker(settings), Producer(nc, tenant="acme") as producer:
        done = await producer.result(legacy_job.id, timeout=30)
        assert done.status == "succeeded" and done.tenant == "acme"
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 1
    letters = [m.subject for m in await _read(js, s.DEAD_STREAM)]
    assert letters == ["ai.dead.anthropic.invalid"]
    await nc.close()


async def _read(js: Any, stream: str) -> list[Any]:
    from tests.support import read_stream

    return await read_stream(js, stream)
