"""Operator commands against a real nats-server, run as a person runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import NoKeysError

from schemas import subjects as s
from schemas.events import decode_ops_event
from services.breaker import transition
from services.config import Settings
from services.producer import Producer, make_job
from services.tools.fake import FaultConfig
from services.tools.stack import child_env, running_recovery, running_worker
from tests.integration.test_cli import cli
from tests.support import ROOT, count_outcomes, fault_request, read_stream, wait_until

pytestmark = pytest.mark.integration


async def _submit(settings: Settings, n: int, **fields: Any) -> list[str]:
    async with await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many(
            [
                make_job("anthropic", "m", prompt=f"job {i}", max_tokens=4, **fields)
                for i in range(n)
            ]
        )
    assert all(o.ok for o in outcomes)
    return [o.job_id for o in outcomes]


async def _messages(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _ops_actions(js: Any) -> list[str]:
    return [
        decode_ops_event(m.data).action
        for m in await read_stream(js, s.EVENTS_STREAM, s.OPS_EVENTS_SUBJECT)
    ]


async def _interrupt_midway(settings: Settings, js: Any, args: list[str], progressed: Any) -> int:
    """Start `ridethrough ARGS`, SIGINT it once ``progressed()`` holds, return its exit code."""
    env = child_env(settings) | {"PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_until(progressed, timeout=60, interval=0.005)
        proc.send_signal(signal.SIGINT)
        return await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_pause_parks_and_resume_replays_at_a_slow_start(settings: Settings, js: Any) -> None:
    """Paused: jobs park and status says so; resumed: they come back and all succeed."""
    code, out, err = await cli(settings, "pause", "anthropic", "--reason", "planned maintenance")
    assert code == 0, err
    async with running_worker(settings), running_recovery(settings):
        ids = await _submit(settings, 20)

        async def all_parked() -> bool:
            return await _messages(js, s.PARKED_STREAM) == 20

        await wait_until(all_parked, timeout=30)
        code, out, _ = await cli(settings, "status", "--json")
        status = json.loads(out)["providers"]["anthropic"]
        assert status["state"] == "paused" and status["parked"] == 20
        assert status["reason"] == "planned maintenance"
        code, out, err = await cli(settings, "resume", "anthropic")
        assert code == 0, err
        async with await Producer.connect(settings) as producer:
            results = await producer.results(ids, timeout=60)
    assert {r.status for r in results.values()} == {"succeeded"}
    assert (await count_outcomes(js))["result_writes"] == 20
    assert await _ops_actions(js) == ["pause", "resume"]


async def test_status_lists_a_running_worker_and_drops_it_when_it_stops(
    settings: Settings, js: Any
) -> None:
    """`status` shows each running worker; one that stops leaves the list at once, not
    when its beat expires (15 s)."""
    workers = await js.key_value(s.WORKERS_BUCKET)
    async with running_worker(settings) as (_, worker):

        async def beating() -> bool:
            try:
                return worker.worker_id in await workers.keys()
            except NoKeysError:  # not even one beat yet
                return False

        await wait_until(beating, timeout=30)
        code, out, err = await cli(settings, "status", "--json")
        assert code == 0, err
        listed = json.loads(out)["workers"]
        assert [(w["id"], w["providers"]) for w in listed] == [
            (worker.worker_id, sorted(settings.providers))
        ]
        assert listed[0]["concurrency"] == settings.worker.concurrency
    code, out, err = await cli(settings, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["workers"] == []


async def test_drain_interrupted_then_rerun_loses_and_duplicates_nothing(
    settings: Settings, js: Any
) -> None:
    """SIGINT in the middle of a drain, then a rerun: every job is parked exactly once,
    and after resume every job has exactly one result."""
    # Enough jobs that the drain is still busy when the SIGINT lands.
    ids = await _submit(settings, 3000)
    code, _, err = await cli(settings, "pause", "anthropic")
    assert code == 0, err

    async def some_parked() -> bool:
        return await _messages(js, s.PARKED_STREAM) >= 50

    await _interrupt_midway(settings, js, ["drain", "anthropic"], some_parked)
    waiting, parked = await _messages(js, s.JOBS_STREAM), await _messages(js, s.PARKED_STREAM)
    assert waiting > 0 and parked > 0
    assert 3000 <= waiting + parked <= 3001  # at most one job caught between the two steps
    code, _, err = await cli(settings, "drain", "anthropic", "--json")
    assert code == 0, err
    assert await _messages(js, s.JOBS_STREAM) == 0
    assert await _messages(js, s.PARKED_STREAM) == 3000
    await cli(settings, "resume", "anthropic")
    async with (
        running_worker(settings),
        running_recovery(settings),
        await Producer.connect(settings) as p,
    ):
        results = await p.results(ids, timeout=120)
    assert len(results) == 3000
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == 3000


async def test_drain_filters_and_refuses_a_closed_provider(settings: Settings, js: Any) -> None:
    """drain moves only the asked priority up to the limit; on a closed provider it refuses."""
    await _submit(settings, 5, priority="low")
    await _submit(settings, 5, priority="high")
    code, _, err = await cli(settings, "drain", "anthropic")
    assert code == 2 and "pause" in err and err.count("\n") == 1
    await cli(settings, "pause", "anthropic")
    code, out, err = await cli(
        settings, "drain", "anthropic", "--priority", "low", "--limit", "3", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["moved"] == 3
    parked = await read_stream(js, s.PARKED_STREAM)
    assert {m.subject for m in parked} == {"ai.parked.anthropic.low.m"}
    code, out, _ = await cli(settings, "drain", "anthropic", "--older-than", "1h", "--json")
    assert json.loads(out)["moved"] == 0  # nothing is an hour old


async def test_replay_dead_letters_after_a_key_rotation(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """Jobs dead on 401 are replayed (interrupted once, then rerun): each ends with one
    succeeded result and is called exactly once more."""
    fake_provider.set_config(FaultConfig(error_rate=1.0, error_mix={401: 1}))
    async with running_worker(settings), await Producer.connect(settings) as producer:
        ids = await _submit(settings, 200)
        failed = await producer.results(ids, timeout=60)
        assert {r.status for r in failed.values()} == {"failed"}
    assert await _messages(js, s.DEAD_STREAM) == 200
    fake_provider.set_config(FaultConfig())  # the key was rotated
    calls_before = fake_provider.counters()["normal"]

    async def some_replayed() -> bool:
        return await _messages(js, s.DEAD_STREAM) <= 170

    await _interrupt_midway(
        settings,
        js,
        ["replay", "anthropic", "--from", "dead", "--reason", "auth", "--rate", "60"],
        some_replayed,
    )
    left = await _messages(js, s.DEAD_STREAM)
    assert 0 < left < 200
    code, _, err = await cli(settings, "replay", "anthropic", "--from", "dead", "--json")
    assert code == 0, err
    assert await _messages(js, s.DEAD_STREAM) == 0
    async with running_worker(settings), await Producer.connect(settings) as producer:

        async def all_succeeded() -> bool:
            found = [await producer.peek_result(j) for j in ids]
            return all(r is not None and r.status == "succeeded" for r in found)

        await wait_until(all_succeeded, timeout=60)
    assert fake_provider.counters()["normal"] - calls_before == 200
    counts = await count_outcomes(js)
    assert counts["results"] == counts["succeeded"] == 200 and counts["dead"] == 0


async def test_dead_list_show_purge(settings: Settings, js: Any) -> None:
    """dead list shows reasons, show finds by job id, purge asks unless --yes."""
    request = fault_request("fault:404", "x", max_tokens=4)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        job_id = await producer.submit(make_job("anthropic", "m", request=request))
        await producer.result(job_id, timeout=30)
    code, out, _ = await cli(settings, "dead", "list", "--json")
    [letter] = json.loads(out)
    assert letter["job_id"] == job_id and letter["reason"] == "not_found"
    code, out, _ = await cli(settings, "dead", "show", job_id, "--json")
    assert code == 0 and json.loads(out)["error"]["type"] == "not_found"
    code, _, err = await cli(settings, "dead", "purge")
    assert code == 2 and "--yes" in err
    assert await _messages(js, s.DEAD_STREAM) == 1
    code, out, _ = await cli(settings, "dead", "purge", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"purged": 1}
    assert await _messages(js, s.DEAD_STREAM) == 0
    code, _, _ = await cli(settings, "dead", "show", job_id)
    assert code == 1


async def test_jobs_show_and_outages_tell_the_story(settings: Settings, js: Any) -> None:
    """A parked job shows where it is and its outage's events; outages lists the outage."""
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    async with running_worker(settings):
        [job_id] = await _submit(settings, 1)

        async def parked() -> bool:
            return await _messages(js, s.PARKED_STREAM) == 1

        await wait_until(parked, timeout=30)
    code, out, _ = await cli(settings, "jobs", "show", job_id, "--json")
    found = json.loads(out)
    assert found["where"] == "parked" and found["parked"]["reason"] == "provider_open"
    assert any("closed -> open" in e["event"] for e in found["history"])
    await transition(js, kv, "anthropic", to="half_open", allowed_from=("open",), by="test")
    await transition(
        js,
        kv,
        "anthropic",
        to="closed",
        allowed_from=("half_open",),
        by="test",
        parked=1,
        replayed=1,
    )
    code, out, _ = await cli(settings, "outages", "--json")
    [outage] = json.loads(out)
    assert outage["provider"] == "anthropic" and outage["duration_s"] >= 0
    assert outage["parked"] == outage["replayed"] == 1
    code, _, _ = await cli(settings, "jobs", "show", "nosuchjob")
    assert code == 1


async def test_export_then_import_restores_every_result_once(
    settings: Settings, js: Any, tmp_path: Path
) -> None:
    """export writes every result; after the stream is purged, import restores them, and a
    second import changes nothing."""
    async with running_worker(settings), await Producer.connect(settings) as producer:
        ids = await _submit(settings, 30)
        await producer.results(ids, timeout=60)
    out_file = tmp_path / "results.jsonl"
    code, out, err = await cli(settings, "export", "results", "--out", str(out_file), "--json")
    assert code == 0, err
    assert json.loads(out)["results"] == 30
    assert {json.loads(line)["job_id"] for line in out_file.read_text().splitlines()} == set(ids)
    await js.purge_stream(s.RESULTS_STREAM)
    code, out, _ = await cli(settings, "import", str(out_file), "--json")
    assert json.loads(out) == {"imported": 30, "already_present": 0, "invalid": 0}
    code, out, _ = await cli(settings, "import", str(out_file), "--json")
    assert json.loads(out) == {"imported": 0, "already_present": 30, "invalid": 0}
    assert {"export", "import"} <= set(await _ops_actions(js))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["drain", "nosuch"], "unknown provider"),
        (["drain", "anthropic", "--older-than", "soon"], "invalid duration"),
        (["replay", "--from", "somewhere"], "--from"),
        (["replay", "--since", "yesterday"], "invalid time"),
        (["pause"], "Missing argument"),
        (["import", "/nonexistent.jsonl"], "no such file"),
        (["dead"], ""),
    ],
)
async def test_operator_misuse_is_one_line_and_exit_2(
    settings: Settings, js: Any, args: list[str], needle: str
) -> None:
    """Operator commands given bad input exit 2 with one line and no traceback."""
    code, _, err = await cli(settings, *args)
    assert code == 2
    assert "Traceback" not in err
    if needle:
        assert err.count("\n") == 1 and needle in err


async def test_operator_commands_act_on_one_model(settings: Settings, js: Any) -> None:
    """pause --model parks that model's jobs only (status shows it under its provider);
    drain, replay and outages take --model and touch that model's jobs alone; resume
    --model hands it back and every job succeeds once."""
    code, out, err = await cli(settings, "pause", "anthropic", "--model", "m.1", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "provider": "anthropic", "model": "m.1", "paused": True, "reason": "paused by operator"
    }  # fmt: skip
    async with await Producer.connect(settings) as producer:
        held = [make_job("anthropic", "m.1", prompt=f"h{i}", max_tokens=4) for i in range(4)]
        free = [make_job("anthropic", "m.2", prompt=f"f{i}", max_tokens=4) for i in range(4)]
        # Waiting in AI_JOBS (no worker yet): drain --model moves the paused model's only.
        for job in [*held, *free]:
            await producer.submit(job)
    code, out, err = await cli(settings, "drain", "anthropic", "--model", "m.1", "--json")
    assert code == 0, err
    assert json.loads(out)["moved"] == len(held)
    code, _, err = await cli(settings, "drain", "anthropic", "--model", "m.2")
    assert code == 2 and "pause anthropic --model m.2" in err  # m.2 is closed: refused
    code, out, _ = await cli(settings, "status", "--json")
    anthropic = json.loads(out)["providers"]["anthropic"]
    assert anthropic["state"] == "closed"
    assert anthropic["models"]["m.1"]["state"] == "paused"
    assert anthropic["models"]["m.1"]["parked"] == len(held)
    code, out, _ = await cli(
        settings, "replay", "anthropic", "--model", "m.2", "--dry-run", "--json"
    )
    assert json.loads(out)["matched"] == 0  # nothing of m.2 is parked
    async with (
        running_worker(settings),
        running_recovery(settings),
        await Producer.connect(settings) as producer,
    ):
        served = await producer.results([j.id for j in free], timeout=30)
        assert {r.status for r in served.values()} == {"succeeded"}
        assert await _messages(js, s.PARKED_STREAM) == len(held)  # still held
        code, out, err = await cli(settings, "resume", "anthropic", "--model", "m.1")
        assert code == 0 and "anthropic/m.1 resumed" in out, err
        back = await producer.results([j.id for j in held], timeout=30)
    assert {r.status for r in back.values()} == {"succeeded"}
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == len(held) + len(free)
    code, out, _ = await cli(settings, "outages", "--model", "m.2", "--json")
    assert json.loads(out) == []  # a pause is no outage, and m.2 had none
    actions = await _ops_actions(js)
    assert actions.count("pause") == 1 and actions.count("resume") == 1
