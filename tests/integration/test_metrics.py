"""The HTTP port of the services: /metrics counts what was settled, /readyz follows NATS
(never the provider), and the fleet's queue depth is exported once.

Services run as child processes (``ridethrough worker --http-port N``), scraped over HTTP
and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas import subjects as s
from services.breaker import transition
from services.config import Settings
from services.producer import Producer, make_job
from services.tools.devstack import free_port
from tests.conftest import make_settings
from tests.support import (
    ServiceProcess,
    count_outcomes,
    fault_request,
    stream_state,
    wait_until,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on the service's port: (status, body); (0, "") when nothing answers."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(5)) as r,
        ):
            return r.status, await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return 0, ""


async def _scrape(port: int) -> Samples:
    """Every sample of /metrics, by (name, labels)."""
    status, text = await _get(port, "/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def _ready(port: int) -> bool:
    return (await _get(port, "/readyz"))[0] == 200


def _worker(settings: Settings, tmp_path: Path, name: str = "w") -> tuple[ServiceProcess, int]:
    port = free_port()
    proc = ServiceProcess(
        settings, "worker", "--http-port", str(port), log_path=tmp_path / f"{name}.log"
    ).start()
    return proc, port


async def test_worker_metrics_count_what_it_settled(
    nats_server: Any, fake_provider: Any, js: Any, tmp_path: Path
) -> None:
    """Jobs that succeed, fail and park show in /metrics as exactly those counts, with
    no job id in any label."""
    settings = make_settings(nats_server.url, fake_provider.url)
    worker, port = _worker(settings, tmp_path)
    try:
        await wait_until(lambda: _ready(port), timeout=60)
        async with await Producer.connect(settings) as producer:
            ok = [
                await producer.submit(make_job("anthropic", "m", prompt=f"ok {i}", max_tokens=8))
                for i in range(5)
            ]
            bad = [
                await producer.submit(
                    make_job("anthropic", "m", request=fault_request("fault:400", f"bad {i}"))
                )
                for i in range(3)
            ]
            for job_id in ok + bad:
                await producer.result(job_id, timeout=60)
            kv = await js.key_value(s.HEALTH_BUCKET)
            await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="t")

            async def parked_n() -> int:
                return int((await stream_state(js, s.PARKED_STREAM)).messages)

            # The worker sees the open breaker at its board's next poll, and calls the jobs
            # it takes before that (seen once under load): submit one at a time, each
            # settled (a result or a parked copy) before the next, until four are parked.
            parked: list[str] = []
            while await parked_n() < 4:
                assert len(parked) < 24, "the worker never saw the open breaker"
                parked.append(
                    await producer.submit(
                        make_job("anthropic", "m", prompt=f"p {len(parked)}", max_tokens=8)
                    )
                )

                async def settled() -> bool:
                    results = (await count_outcomes(js))["results"]
                    return results + await parked_n() == 8 + len(parked)

                await wait_until(settled, timeout=60)
        called_late = (await count_outcomes(js))["results"] - 8
        assert called_late == len(parked) - 4
        samples = await _scrape(port)
    finally:
        worker.terminate()
    finished = "ridethrough_jobs_finished_total"
    ok_n = 5 + called_late
    assert _value(samples, finished, provider="anthropic", status="succeeded") == ok_n
    assert _value(samples, finished, provider="anthropic", status="failed") == 3
    assert _value(samples, "ridethrough_jobs_dead_total", provider="anthropic") == 3
    assert _value(samples, "ridethrough_jobs_parked_total", provider="anthropic") == 4
    duration = "ridethrough_provider_call_duration_seconds_count"
    assert _value(samples, duration, provider="anthropic", outcome="success") == ok_n
    assert _value(samples, duration, provider="anthropic", outcome="permanent") == 3
    assert _value(samples, "ridethrough_provider_errors_total", provider="anthropic") == 3
    assert _value(samples, "ridethrough_provider_calls_in_flight") == 0
    assert _value(samples, "ridethrough_tokens_total", provider="anthropic", kind="input") > 0
    assert _value(samples, "ridethrough_tokens_total", provider="anthropic", kind="output") > 0
    ids = set(ok + bad + parked)
    values = {v for _, labels in samples for _, v in labels}
    assert not {v for v in values if any(i in v for i in ids)}


async def test_readyz_follows_nats_not_the_provider(
    nats_server: Any, fake_provider: Any, js: Any, tmp_path: Path
) -> None:
    """/readyz is 200 while connected and fetching, whatever the provider does; not 200
    while NATS is down (/livez still 200); 200 again once NATS is back."""
    settings = make_settings(nats_server.url, fake_provider.url)
    worker, port = _worker(settings, tmp_path)
    try:
        await wait_until(lambda: _ready(port), timeout=60)
        fake_provider.start_outage(529)
        kv = await js.key_value(s.HEALTH_BUCKET)
        await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="t")
        async with await Producer.connect(settings) as producer:
            await producer.submit(make_job("anthropic", "m", prompt="in the outage"))

        async def parked() -> bool:
            return (await stream_state(js, s.PARKED_STREAM)).messages == 1

        await wait_until(parked, timeout=60)
        assert await _ready(port)  # the provider is down and its breaker open: still ready
        nats_server.stop()

        async def not_ready() -> bool:
            return (await _get(port, "/readyz"))[0] == 503

        await wait_until(not_ready, timeout=60)
        assert (await _get(port, "/livez"))[0] == 200
        nats_server.start()
        await wait_until(lambda: _ready(port), timeout=60)
    finally:
        fake_provider.stop_outage()
        worker.terminate()


async def test_queue_depth_is_exported_once_for_the_fleet(
    nats_server: Any, fake_provider: Any, js: Any, tmp_path: Path
) -> None:
    """Two replayer replicas: the queue depth, breaker state and workers online come from
    the provider's replay lease holder only, so their sum over both scrapes is the queue."""
    settings = make_settings(nats_server.url, fake_provider.url)
    async with await Producer.connect(settings) as producer:
        for i in range(3):
            await producer.submit(make_job("anthropic", "m", prompt=f"w {i}", priority="high"))
    ports = [free_port(), free_port()]
    procs = [
        ServiceProcess(
            settings, "replayer", "--http-port", str(p), log_path=tmp_path / f"r{i}.log"
        ).start()
        for i, p in enumerate(ports)
    ]
    try:
        for p in ports:
            await wait_until(lambda p=p: _ready(p), timeout=60)  # type: ignore[misc]

        async def exported_once() -> bool:
            scrapes = [await _scrape(p) for p in ports]
            waiting = [
                _value(x, "ridethrough_queue_jobs", provider="anthropic", state="waiting")
                for x in scrapes
            ]
            state = "ridethrough_breaker_state"
            closed = [
                _value(x, state, provider="anthropic", model="", state="closed") for x in scrapes
            ]
            return sorted(waiting) == [0, 3] and sorted(closed) == [0, 1]

        await wait_until(exported_once, timeout=60, interval=0.3)
        holder = next(
            x
            for x in [await _scrape(p) for p in ports]
            if _value(x, "ridethrough_queue_jobs", provider="anthropic")
        )
        queue = "ridethrough_queue_jobs"
        assert _value(holder, queue, provider="anthropic", priority="high", state="waiting") == 3
        assert _value(holder, queue, provider="anthropic", state="parked") == 0
        assert _value(holder, queue, provider="anthropic", state="in_flight") == 0
        assert _value(holder, "ridethrough_workers_online", provider="anthropic") == 0
        age = "ridethrough_queue_oldest_job_age_seconds"
        assert _value(holder, age, provider="anthropic", priority="high", state="waiting") > 0
        assert _value(holder, age, provider="anthropic", priority="low", state="waiting") == 0
        assert _value(holder, age, provider="anthropic", state="parked") == 0
        # The storage of the streams: one exporter (the first provider's lease holder).
        scrapes = [await _scrape(p) for p in ports]
        jobs_bytes = [
            _value(x, "ridethrough_jetstream_stream_bytes", stream="AI_JOBS") for x in scrapes
        ]
        assert sorted(v > 0 for v in jobs_bytes) == [False, True]
        assert (
            sum(_value(x, "ridethrough_jetstream_account_bytes", storage="file") for x in scrapes)
            > 0
        )
    finally:
        for proc in procs:
            proc.terminate()


async def _status_json(settings: Settings) -> dict[str, Any]:
    """`ridethrough status --json`, run as a user runs it."""
    import asyncio
    import json
    import sys

    from tests.support import ROOT, settings_env

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services", "status", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=settings_env(settings), cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    status: dict[str, Any] = json.loads(out)
    return status


def _shared_counts(status: dict[str, Any], fleet: Samples, workers: Samples) -> list[Any]:
    """Every count `status --json` and the metrics both show, as (what, status, metrics)."""
    pairs: list[Any] = []
    for name, p in status["providers"].items():
        pairs.append((f"{name} state", 1.0, _value(
            fleet, "ridethrough_breaker_state", provider=name, model="", state=p["state"]
        )))  # fmt: skip
        for prio in s.PRIORITIES:
            pairs.append((f"{name} {prio} waiting", p["waiting_by_priority"].get(prio, 0), _value(
                fleet, "ridethrough_queue_jobs", provider=name, priority=prio, state="waiting"
            )))  # fmt: skip
        q, dead = "ridethrough_queue_jobs", "ridethrough_dead_letters_jobs"
        online = sum(name in w["providers"] for w in status["workers"])
        pairs += [
            (f"{name} busy", p["in_flight"], _value(fleet, q, provider=name, state="in_flight")),
            (f"{name} parked", p["parked"], _value(fleet, q, provider=name, state="parked")),
            (f"{name} dead", p["dead"], _value(fleet, dead, provider=name)),
            (f"{name} workers", online, _value(fleet, "ridethrough_workers_online", provider=name)),
        ]  # fmt: skip
        for model, m in p["models"].items():
            token = s.scope_model(model) or ""
            exported = _value(fleet, "ridethrough_breaker_state", provider=name, model=token)
            if exported:  # a scope the board knows (a model with parked jobs alone has none)
                pairs.append((f"{name}/{model} state", 1.0, _value(
                    fleet, "ridethrough_breaker_state", provider=name, model=token,
                    state=m["state"],
                )))  # fmt: skip
    # What the worker counted since it started: every dead letter and every park is there.
    pairs.append(
        (
            "anthropic dead (worker's counter)",
            status["providers"]["anthropic"]["dead"],
            _value(workers, "ridethrough_jobs_dead_total", provider="anthropic"),
        )
    )
    pairs.append(
        (
            "anthropic parked (worker's counter)",
            status["providers"]["anthropic"]["parked"],
            _value(workers, "ridethrough_jobs_parked_total", provider="anthropic"),
        )
    )
    return pairs


async def test_status_and_metrics_agree_during_an_outage(
    nats_server: Any, fake_provider: Any, js: Any, tmp_path: Path
) -> None:
    """During an outage (anthropic open, jobs parked; openai jobs waiting with no worker
    of theirs; dead letters from before), every count `ridethrough status --json` shows
    is the one the metrics show: breaker states, waiting per priority, in flight, parked,
    dead letters, workers online."""
    settings = make_settings(nats_server.url, fake_provider.url)
    wport, rport = free_port(), free_port()
    procs = [
        ServiceProcess(
            settings, "worker", "--provider", "anthropic", "--http-port", str(wport),
            log_path=tmp_path / "w.log",
        ).start(),
        ServiceProcess(
            settings, "replayer", "--http-port", str(rport), log_path=tmp_path / "r.log"
        ).start(),
    ]  # fmt: skip
    try:
        await wait_until(lambda: _ready(wport), timeout=60)
        await wait_until(lambda: _ready(rport), timeout=60)
        kv = await js.key_value(s.HEALTH_BUCKET)
        async with await Producer.connect(settings) as producer:
            bad = [
                await producer.submit(
                    make_job("anthropic", "m", request=fault_request("fault:400", f"bad {i}"))
                )
                for i in range(2)
            ]
            for job_id in bad:
                await producer.result(job_id, timeout=60)
            await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="t")
            for i, prio in enumerate(["normal"] * 4 + ["high"] * 2):
                await producer.submit(make_job("anthropic", "m", prompt=f"p {i}", priority=prio))
            for i in range(3):
                await producer.submit(make_job("openai", "gpt-x", prompt=f"o {i}", priority="low"))

        async def settled() -> bool:
            parked = (await stream_state(js, s.PARKED_STREAM)).messages == 6
            fleet = await _scrape(rport)
            return parked and _value(fleet, "ridethrough_workers_online", provider="anthropic") == 1

        await wait_until(settled, timeout=120, interval=0.3)
        before = await _status_json(settings)
        fleet, workers = await _scrape(rport), await _scrape(wport)
        after = await _status_json(settings)
    finally:
        for proc in procs:
            proc.terminate()
    pairs = _shared_counts(before, fleet, workers)
    assert pairs == _shared_counts(after, fleet, workers)  # nothing moved meanwhile
    assert [p for p in pairs if p[1] != p[2]] == []
    named = {what: got for what, got, _ in pairs}
    assert named["anthropic parked"] == 6 and named["anthropic dead"] == 2
    assert named["openai low waiting"] == 3 and named["openai workers"] == 0
    assert before["providers"]["anthropic"]["state"] == "open"
