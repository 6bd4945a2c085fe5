"""A provider that accepts fewer calls at once than the worker's slots: the worker learns
its limit from the 429s (``AdaptiveLimit``) instead of spending most calls on them, and
every job still ends in exactly one result."""

from __future__ import annotations

from typing import Any

import pytest

from services.config import Settings
from services.producer import Producer, make_job
from services.tools.fake import FaultConfig
from services.tools.stack import running_worker
from tests.conftest import make_settings
from tests.support import count_outcomes

pytestmark = pytest.mark.integration

JOBS = 240


async def _run(settings: Settings, fake_provider: Any, tag: str) -> tuple[int, int, list[int]]:
    """Submit ``JOBS`` jobs to one worker; once all have their result, the fake's 429s
    and answered calls, and the limit's capacity after (empty when not adaptive)."""
    fake_provider.reset_counters()
    async with running_worker(settings) as (_, worker):
        async with await Producer.connect(settings) as producer:
            outcomes = await producer.submit_many(
                [make_job("anthropic", "m", prompt=f"{tag} {i}", max_tokens=8) for i in range(JOBS)]
            )
            assert all(o.ok for o in outcomes)
            results = await producer.results([o.job_id for o in outcomes], timeout=120)
        limits = [lim.slots.capacity for lim in worker.limits.values()]
    assert len(results) == JOBS and {r.status for r in results.values()} == {"succeeded"}
    counters = fake_provider.counters()
    over = int(counters["by_fault"].get("over_capacity", 0))
    return over, int(counters["by_status"].get("200", 0)), limits


async def test_the_worker_learns_how_many_calls_the_provider_accepts(
    nats_server: Any, fake_provider: Any, js: Any
) -> None:
    """Capacity 4 at 30 ms a call, 64 slots. Without the adaptive limit, most calls are
    429s; with it, the 429s fall to a fraction of those (measured: 1,622 → 95), the
    limit ends near the capacity, and each run gives every job one result and one call."""
    fake_provider.set_config(FaultConfig(capacity=4, latency_ms=30, retry_after_s=0.2))
    base = make_settings(nats_server.url, fake_provider.url, concurrency=64, batch_size=64)
    fixed = base.with_changes(worker=base.worker.model_copy(update={"adaptive_limit": False}))
    over_fixed, answered_fixed, limits_fixed = await _run(fixed, fake_provider, "fixed")
    over_adaptive, answered_adaptive, limits_adaptive = await _run(base, fake_provider, "adaptive")
    assert limits_fixed == [] and len(limits_adaptive) == 2  # both providers of the settings
    assert answered_fixed == answered_adaptive == JOBS  # one answered call per job
    assert over_fixed > JOBS  # the fixed 64 slots: most calls meet the limit
    assert over_adaptive * 4 < over_fixed
    assert min(limits_adaptive) <= 16  # anthropic's limit came down from 64
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == 2 * JOBS
    assert counts["dead"] == 0
