"""Dry runs that only count (per-subject counts) give the numbers a full walk gives."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from services.config import Settings
from services.ops import moves
from services.ops.inspect import locate_job
from services.producer import Producer, make_job

pytestmark = pytest.mark.integration


async def _submit(settings: Settings, provider: str, priority: str, n: int, **kw: Any) -> None:
    async with await Producer.connect(settings, **kw) as producer:
        outcomes = await producer.submit_many(
            [
                make_job(provider, f"m{i % 3}", prompt=f"{priority} {i}", priority=priority)
                for i in range(n)
            ]
        )
    assert all(o.ok for o in outcomes)


async def _take(js: Any, provider: str, priority: str, n: int) -> None:
    """``n`` jobs of ``priority`` received by a 'worker' and not acked: in flight."""
    sub = await js.pull_subscribe_bind(
        durable=s.worker_consumer(provider, priority), stream=s.JOBS_STREAM
    )
    got = await sub.fetch(n, timeout=5)
    assert len(got) == n


def _numbers(r: moves.MoveReport) -> tuple[int, int, int, int]:
    return r.examined, r.matched, r.moved, r.skipped


async def test_counted_dry_runs_equal_the_walks(settings: Settings, js: Any) -> None:
    await _submit(settings, "anthropic", "high", 40)
    await _submit(settings, "anthropic", "normal", 70)
    await _submit(settings, "anthropic", "low", 25)
    await _submit(settings, "anthropic", "low", 5, tenant="acme")  # ai.jobs.<p>.low.<t>...
    await _submit(settings, "openai", "normal", 30)
    await _take(js, "anthropic", "high", 6)
    await _take(js, "anthropic", "normal", 9)
    for priority in (None, "high", "normal", "low"):
        walked = await moves.drain(js, "anthropic", priority=priority, dry_run=True)
        counted = await moves.drain(
            js, "anthropic", priority=priority, dry_run=True, count_only=True
        )
        assert _numbers(counted) == _numbers(walked), priority
        assert counted.job_ids == []
    walked = await moves.drain(js, "anthropic", dry_run=True)
    assert _numbers(walked) == (140, 125, 0, 15)
    # Park some (the drain moves what no worker has), then count the parked ones.
    moved = await moves.drain(js, "anthropic", priority="normal", limit=50)
    assert moved.moved == 50
    await moves.drain(js, "openai")
    for provider in (None, "anthropic", "openai"):
        walked = await moves.replay(js, settings, provider, dry_run=True)
        counted = await moves.replay(js, settings, provider, dry_run=True, count_only=True)
        assert _numbers(counted) == _numbers(walked), provider
    assert _numbers(await moves.replay(js, settings, dry_run=True, count_only=True)) == (
        80,
        80,
        0,
        0,
    )
    # A filter the subjects do not carry still walks (and so still lists the job ids).
    filtered = await moves.replay(js, settings, model="m1", dry_run=True, count_only=True)
    assert 0 < filtered.matched == len(filtered.job_ids) < 80


async def test_jobs_show_finds_a_parked_job_among_many(settings: Settings, js: Any) -> None:
    """The parked lookup decodes only messages holding the id's bytes, and still tells a
    job from one whose id merely contains it."""
    async with await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many(
            [make_job("anthropic", "m", prompt=f"p {i}", max_tokens=4) for i in range(300)]
        )
    ids = [o.job_id for o in outcomes]
    assert (await moves.drain(js, "anthropic")).moved == 300
    found = await locate_job(js, ids[150])
    assert found["where"] == "parked" and found["parked"]["reason"] == "drained"
    # The drain's audit event names the job: its history has it.
    assert [e["event"] for e in found["history"]] == ["drain"]
    assert (await locate_job(js, ids[150][:-1]))["where"] == "unknown"
    assert (await locate_job(js, "nosuchjob"))["where"] == "unknown"
