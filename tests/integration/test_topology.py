"""The topology step: idempotent, and changed settings reach existing streams and consumers."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from services.config import Settings
from services.topology import ensure_topology

pytestmark = pytest.mark.integration


async def test_second_run_changes_nothing(settings: Settings, js: Any) -> None:
    """Running the topology step again (the fixture ran it once) creates and updates nothing."""
    report = await ensure_topology(js, settings)
    assert not report.changed
    assert len(report.unchanged) == 5 + 4 * len(settings.providers) + 3


async def test_every_name_of_the_design_exists(settings: Settings, js: Any) -> None:
    """Streams, per-provider consumers and buckets carry DESIGN.md's names and retention."""
    jobs = await js.stream_info(s.JOBS_STREAM)
    assert jobs.config.retention == "workqueue"
    assert jobs.config.duplicate_window >= 3600
    assert sorted(jobs.config.subjects) == ["ai.jobs.anthropic.*", "ai.jobs.openai.*"]
    results = await js.stream_info(s.RESULTS_STREAM)
    assert results.config.max_msgs_per_subject == 1
    for p in ("anthropic", "openai"):
        w = await js.consumer_info(s.JOBS_STREAM, f"workers-{p}")
        assert w.config.filter_subject == f"ai.jobs.{p}.*"
        assert w.config.max_deliver == -1
        for prio in ("high", "normal", "low"):
            r = await js.consumer_info(s.PARKED_STREAM, f"replayer-{p}-{prio}")
            assert r.config.filter_subject == f"ai.parked.{p}.{prio}"
    for bucket in (s.HEALTH_BUCKET, s.CONTROL_BUCKET, s.WORKERS_BUCKET):
        await js.key_value(bucket)


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
        "AI_JOBS/workers-anthropic",
        "AI_JOBS/workers-openai",
    }
    assert (await js.consumer_info(s.JOBS_STREAM, "workers-openai")).config.ack_wait == 42.0
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
    assert "AI_JOBS/workers-vllm" in report.created
