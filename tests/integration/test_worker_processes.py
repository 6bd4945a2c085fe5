"""Worker processes: SIGKILL mid-call, SIGTERM mid-load, two processes on one consumer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects as s
from services.config import Settings
from services.producer import Producer, make_job
from tests.conftest import make_settings
from tests.support import ServiceProcess, count_outcomes, wait_until

pytestmark = pytest.mark.integration


async def _submit(settings: Settings, n: int, prompt: str = "job") -> list[str]:
    async with await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many(
            [make_job("anthropic", "m", prompt=f"{prompt} {i}", max_tokens=8) for i in range(n)]
        )
    assert all(o.ok for o in outcomes)
    return [o.job_id for o in outcomes]


async def test_worker_killed_mid_call_gives_exactly_one_result(
    nats_server: Any, fake_provider: Any, js: Any, tmp_path: Path
) -> None:
    """SIGKILL while a call is in flight: the job is redelivered and ends in one result."""
    from services.tools.fake import FaultConfig

    fake_provider.set_config(FaultConfig(latency_ms=1500))
    settings = make_settings(nats_server.url, fake_provider.url, ack_wait_s=2.0)
    [job_id] = await _submit(settings, 1)
    first = ServiceProcess(settings, "worker", log_path=tmp_path / "w1.log").start()
    try:
        await wait_until(lambda: _calls(fake_provider, 1), timeout=30)
        first.kill()
    finally:
        first.stop()
    fake_provider.set_config(FaultConfig())
    second = ServiceProcess(settings, "worker", log_path=tmp_path / "w2.log").start()
    try:
        async with await Producer.connect(settings) as producer:
            result = await producer.result(job_id, timeout=60)
    finally:
        second.terminate()
    assert result.status == "succeeded"
    assert result.attempts == 2  # the killed delivery, then the one that finished
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == 1
    assert counts["waiting"] == 0


async def test_sigterm_mid_load_loses_nothing(
    nats_server: Any, fake_provider: Any, js: Any, tmp_path: Path
) -> None:
    """SIGTERM under load: the worker finishes or releases its jobs, exits 0, and a new
    worker completes the rest; every job has exactly one result."""
    from services.tools.fake import FaultConfig

    fake_provider.set_config(FaultConfig(latency_ms=300))
    # A grace shorter than the calls forces the release path as well as the finish path.
    settings = make_settings(
        nats_server.url, fake_provider.url, shutdown_grace_s=0.1, concurrency=40
    )
    ids = await _submit(settings, 300)
    first = ServiceProcess(settings, "worker", log_path=tmp_path / "w1.log").start()
    try:
        await wait_until(lambda: _calls(fake_provider, 60), timeout=60)
        assert first.terminate() == 0
    finally:
        first.stop()
    done_by_first = (await count_outcomes(js))["results"]
    assert 0 < done_by_first < 300
    second = ServiceProcess(settings, "worker", log_path=tmp_path / "w2.log").start()
    try:
        async with await Producer.connect(settings) as producer:
            results = await producer.results(ids, timeout=120)
    finally:
        second.terminate()
    assert len(results) == 300
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == 300
    assert counts["waiting"] == 0


async def test_two_workers_share_one_consumer_without_double_results(
    nats_server: Any, fake_provider: Any, js: Any, tmp_path: Path
) -> None:
    """Two processes on workers-anthropic split the jobs: each job is called and written once."""
    from services.tools.fake import FaultConfig

    # Against the instant fake, one process could finish all 500 before the other's next pull
    # (CI saw it on a loaded machine): 100 ms calls make the work last a few seconds, so a
    # process that fetches at all gets some.
    fake_provider.set_config(FaultConfig(latency_ms=100))
    settings = make_settings(nats_server.url, fake_provider.url, concurrency=16, batch_size=8)
    workers = [
        ServiceProcess(settings, "worker", log_path=tmp_path / f"w{i}.log").start()
        for i in range(2)
    ]
    try:

        async def both_fetching() -> bool:  # each keeps a pull waiting once it is up
            consumer = s.worker_consumer("anthropic", "normal")
            return (await js.consumer_info(s.JOBS_STREAM, consumer)).num_waiting >= 2

        # Submitted before both were up, the jobs could all go to the first (seen under load).
        await wait_until(both_fetching, timeout=60)
        ids = await _submit(settings, 500)
        async with await Producer.connect(settings) as producer:
            results = await producer.results(ids, timeout=120)
    finally:
        for w in workers:
            w.stop()
    assert len(results) == 500
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == 500
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 500
    # Both processes did work (the consumer is really shared).
    assert len({r.worker for r in results.values()}) == 2


async def _calls(fake_provider: Any, n: int) -> bool:
    await asyncio.sleep(0)
    return int(fake_provider.counters()["total"]) >= n
