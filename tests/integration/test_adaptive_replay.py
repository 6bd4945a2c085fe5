"""The adaptive replay pace against workers that cannot keep up: the queue pushes back,
the pace backs off, and every parked job still ends with exactly one result."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.parking import ParkedJob, ParkRecord
from services.breaker import transition
from services.config import Settings
from services.producer import make_job
from services.tools.stack import running_recovery, running_worker
from tests.support import count_outcomes, fault_request, wait_until

pytestmark = pytest.mark.integration

PARKED = 800
MODEL = "claude-slow-fleet"


async def _park(js: Any, n: int) -> None:
    """``n`` jobs parked under an open provider that is then half-open (recovering)."""
    kv = await js.key_value(s.HEALTH_BUCKET)
    opened = await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    assert opened is not None
    for i in range(n):
        # Each call takes 50 ms: 4 slots serve about 80 jobs/s.
        job = make_job("anthropic", MODEL, request=fault_request("fault:slow:50", f"p{i}"))
        body = ParkedJob(
            job=job, park=ParkRecord(reason="provider_open", outage_id=opened.outage_id)
        )
        await js.publish(s.parked_subject("anthropic", job.priority, MODEL), encode(body))
    await transition(js, kv, "anthropic", to="half_open", allowed_from=("open",), by="test")


@pytest.mark.parametrize("pace", ["adaptive", "ramp"])
async def test_a_fleet_that_cannot_keep_up_pushes_the_pace_back(
    settings: Settings, js: Any, pace: str
) -> None:
    """800 parked jobs, a worker of 4 slots at 50 ms a call (~80 jobs/s), a slow start
    from 20 jobs/s: adaptive, the queue pushes back (at least once) and the jobs waiting
    for the workers stay within a few batches of the pace; ramp, the pace never backs off
    and the queue takes most of the backlog at once. Both: every job one result."""
    tuned = settings.with_changes(
        worker=settings.worker.model_copy(update={"concurrency": 4, "batch_size": 4}),
        replay=settings.replay.model_copy(
            update={
                "pace": pace,
                "initial_rate": 20,
                "ramp_interval_s": 1.0,
                "max_rate": 5000,
                # Half a second of the pace (never under a batch): pushed back within 800.
                "queue_target_s": 0.5,
            }
        ),
    )
    await _park(js, PARKED)
    worst_queue = 0
    pushbacks = 0
    async with running_worker(tuned), running_recovery(tuned) as (_, replayer):

        async def all_done() -> bool:
            nonlocal worst_queue, pushbacks
            info = await js.consumer_info(s.JOBS_STREAM, s.worker_consumer("anthropic", "normal"))
            worst_queue = max(worst_queue, int(info.num_pending or 0))
            for prog in replayer.progress["anthropic"].values():
                pushbacks = max(pushbacks, prog.pushbacks)
            return (await count_outcomes(js))["results"] == PARKED

        await wait_until(all_done, timeout=120, interval=0.1)
        await asyncio.sleep(0.5)
    counts = await count_outcomes(js)
    assert (counts["succeeded"], counts["result_writes"], counts["dead"]) == (PARKED, PARKED, 0)
    assert counts["waiting"] == 0
    if pace == "adaptive":
        assert pushbacks >= 1
        assert worst_queue < PARKED // 2, worst_queue
    else:
        assert pushbacks == 0
        assert worst_queue >= PARKED // 2, worst_queue
