"""compose.yaml started for real: the images, the 3-node cluster and every service, drilled.

The module builds the images (``deploy/offline/build-images``: quick when they exist),
brings one compose project up and runs its tests in order against it, then takes it down
with its volumes. The drill drives jobs from the host with the Python producer while the
fake provider has an outage, ``docker kill``s the node that leads AI_JOBS and later a
worker, restarts them, and counts every job to exactly one result. Every wait polls an
observable state with a bound; nothing asserts on elapsed time.

Run by ``.ci/run`` after the main suite (``pytest tests/deploy``); it needs a Docker engine
and the compose plugin, and fails (never skips) without them.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from schemas import subjects as s
from services.errors import NatsUnavailable
from services.jetstream.connection import connect
from services.producer import Producer, make_job
from tests.deploy.stack import (
    CANARY_KEY,
    NATS_NODES,
    ROOT,
    UID,
    Stack,
    docker_ready,
    run,
    wait_for,
)
from tests.support import count_outcomes, result_job_ids, stream_state

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(900)]

MODEL = "claude-fake"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert docker_ready(), "tests/deploy needs a Docker engine and `docker compose` (v2)"
    run([str(ROOT / "deploy/offline/build-images")], timeout=1800)
    st = Stack.make(tmp_path_factory.mktemp("deploy"))
    st.down()  # what an interrupted run left
    try:
        st.up()
        st.wait_healthy(timeout=300)
        yield st
    finally:
        st.down()


# --------------------------------------------------------------------------- helpers


async def _submit(producer: Producer, key: str, timeout: float = 180) -> str:
    """Submit one job, again under the same key while NATS is away (a node killed)."""
    deadline = time.monotonic() + timeout
    job = make_job("anthropic", MODEL, prompt=f"deploy drill {key}", max_tokens=16)
    while True:
        try:
            return await producer.submit(job, idempotency_key=key)
        except (NatsUnavailable, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def _load(producer: Producer, keys: list[str], rate: float, progress: list[str]) -> None:
    for key in keys:
        progress.append(await _submit(producer, key))
        await asyncio.sleep(1 / rate)


async def _until(what: str, check: Any, timeout: float) -> None:
    """Poll ``check`` (a coroutine function); NATS errors while a node is away count as
    "not yet"."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            if await check():
                return
        except (nats.errors.Error, TimeoutError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s (last error: {last!r})")
        await asyncio.sleep(1)


def _keys(tag: str, n: int) -> list[str]:
    run_id = uuid.uuid4().hex[:8]
    return [f"{tag}-{run_id}-{i}" for i in range(n)]


def _successful_calls(counters: dict[str, Any]) -> int:
    """Inference calls (probes aside) the fake answered with success: it injects no other
    fault here than the scripted outage."""
    outage = counters["outage"]
    return int(counters["normal"]) - (int(outage["requests"]) - int(outage["probes"]))


def _finished(container: str) -> float:
    """Jobs this worker stored a result for (its /metrics)."""
    text = Stack.exec_python(
        container,
        "import urllib.request as u;"
        "print(u.urlopen('http://127.0.0.1:9090/metrics', timeout=5).read().decode())",
    )
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if "jobs_finished_total{" in line and not line.startswith("#")
    )


# --------------------------------------------------------------------------- tests


def test_every_service_is_healthy_and_runs_as_the_non_root_user(stack: Stack) -> None:
    containers = stack.containers()
    services = {Stack.service_of(c) for c in containers}
    assert services == {
        "nats-1",
        "nats-2",
        "nats-3",
        "worker",
        "prober",
        "replayer",
        "fake-provider",
    }
    assert len(stack.containers("worker")) == 2
    topology = stack.containers("topology", all_states=True)
    assert [Stack.inspect(c)["State"]["ExitCode"] for c in topology] == [0]
    for c in containers:
        assert Stack.health(c) == "healthy", c
        assert Stack.inspect(c)["Config"]["User"].split(":")[0] == UID, c
        assert run(["docker", "exec", c, "id", "-u"]).strip() == UID, c


def test_the_demo_job_succeeds(stack: Stack) -> None:
    out = stack.compose("run", "--rm", "--no-deps", "submit", timeout=300)
    assert '"succeeded"' in out, out


async def test_drill_node_and_worker_killed_under_load_lose_and_duplicate_nothing(
    stack: Stack,
) -> None:
    """Healthy load with the AI_JOBS leader killed, then an outage with a worker killed:
    every job ends in exactly one succeeded result, each called once with success."""
    nc = await connect(stack.settings("operator"), name="deploy-test")
    js = nc.jetstream()
    try:
        async with await Producer.connect(stack.settings("producer")) as producer:
            # Warm up: the fleet answers, then the fake's counters start from zero.
            before = (await stream_state(js, s.RESULTS_STREAM)).messages
            warm = [await _submit(producer, k) for k in _keys("warm", 10)]
            await producer.results(warm, timeout=120)
            stack.fake("POST", "/admin/counters/reset")
            ids: list[str] = []

            # 1. The node leading AI_JOBS SIGKILLed while jobs come in; restarted after.
            keys = _keys("leader", 150)
            load = asyncio.create_task(_load(producer, keys, rate=25, progress=ids))
            await _until("40 jobs in", lambda: asyncio.sleep(0, len(ids) >= 40), 120)
            leader = (await js.stream_info(s.JOBS_STREAM)).cluster.leader
            assert leader in NATS_NODES, leader
            (node,) = stack.containers(leader)
            stack.kill(node)
            await asyncio.wait_for(load, 600)
            run(["docker", "start", node])
            wait_for(f"{leader} healthy again", lambda: Stack.health(node) == "healthy", 300)
            await _until(
                "the leader phase's results",
                lambda: _results_at_least(js, before + len(ids) + 10),
                300,
            )

            # 2. An outage on the fake: jobs park; a worker SIGKILLed meanwhile; the
            #    outage ends, the replayer replays, the restarted worker helps.
            stack.fake("POST", "/admin/outage", {"status": 529})
            keys = _keys("outage", 100)
            load = asyncio.create_task(_load(producer, keys, rate=25, progress=ids))
            await _until("30 jobs parked", lambda: _parked_at_least(js, 30), 300)
            worker = stack.containers("worker")[0]
            stack.kill(worker)
            await asyncio.wait_for(load, 600)
            await _until("all outage jobs parked", lambda: _parked_at_least(js, 100), 300)
            run(["docker", "start", worker])
            stack.fake("DELETE", "/admin/outage")
            await _until("every result", lambda: _results_at_least(js, before + len(ids) + 10), 600)
            await _until("nothing parked", lambda: _empty(js, s.PARKED_STREAM), 300)
            wait_for("the worker healthy again", lambda: Stack.health(worker) == "healthy", 300)
    finally:
        await nc.close()

    assert len(ids) == len(set(ids)) == 250
    nc = await connect(stack.settings("operator"), name="deploy-test")
    try:
        js = nc.jetstream()
        counts = await count_outcomes(js)
        stored = set(await result_job_ids(js))
        parked = (await stream_state(js, s.PARKED_STREAM)).messages
    finally:
        await nc.close()
    total = before + len(ids) + 10
    assert set(ids) <= stored
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == total, counts
    assert counts["dead"] == counts["waiting"] == parked == 0, (counts, parked)
    counters = stack.fake("GET", "/admin/counters")
    # After the reset: one successful call per job of the drill, no second one.
    assert _successful_calls(counters) == len(ids), counters
    assert counters["outage"]["requests"] > 0, counters


async def _results_at_least(js: Any, n: int) -> bool:
    return bool((await stream_state(js, s.RESULTS_STREAM)).messages >= n)


async def _parked_at_least(js: Any, n: int) -> bool:
    return bool((await stream_state(js, s.PARKED_STREAM)).messages >= n)


async def _empty(js: Any, stream: str) -> bool:
    return bool((await stream_state(js, stream)).messages == 0)


async def test_four_workers_share_the_work(stack: Stack) -> None:
    stack.up("--scale", "worker=4")
    workers = stack.containers("worker")
    assert len(workers) == 4
    wait_for(
        "four healthy workers", lambda: all(Stack.health(w) == "healthy" for w in workers), 300
    )
    before = {w: _finished(w) for w in workers}
    nc = await connect(stack.settings("operator"), name="deploy-test")
    try:
        js = nc.jetstream()
        start = (await stream_state(js, s.RESULTS_STREAM)).messages
        async with await Producer.connect(stack.settings("producer")) as producer:
            ids: list[str] = []
            await _load(producer, _keys("scale", 200), rate=40, progress=ids)
            await producer.results(ids, timeout=300)
        assert (await stream_state(js, s.RESULTS_STREAM)).messages == start + 200
    finally:
        await nc.close()
    served = {w: _finished(w) - before[w] for w in workers}
    assert sum(served.values()) == 200, served
    assert all(n > 0 for n in served.values()), served
    stack.up("--scale", "worker=2")
    assert len(stack.containers("worker")) == 2


def test_no_provider_key_in_any_log(stack: Stack) -> None:
    containers = stack.containers(all_states=True)
    (worker, *_) = stack.containers("worker")
    env = "\n".join(Stack.inspect(worker)["Config"]["Env"])
    assert CANARY_KEY in env  # the key was given, so its absence below means something
    logs = "".join(Stack.logs(c) for c in containers)
    assert "worker" in logs or "nats" in logs.lower(), "no logs read at all"
    assert CANARY_KEY not in logs


def test_health_checks_turn_unhealthy_without_nats_and_liveness_holds(stack: Stack) -> None:
    services = [
        c for c in stack.containers() if Stack.service_of(c) in ("worker", "prober", "replayer")
    ]
    restarts = {c: Stack.inspect(c)["RestartCount"] for c in services}
    stack.compose("kill", *NATS_NODES)
    try:
        wait_for(
            "every service unhealthy",
            lambda: all(Stack.health(c) == "unhealthy" for c in services),
            300,
            2,
        )
        for c in services:
            state = Stack.inspect(c)
            assert state["State"]["Running"] and state["RestartCount"] == restarts[c], c
            live = Stack.exec_python(
                c,
                "import urllib.request as u;"
                "print(u.urlopen('http://127.0.0.1:9090/livez', timeout=5).status)",
            )
            assert live.strip() == "200", c
            ready = Stack.exec_python(
                c,
                "import urllib.request as u\n"
                "try: u.urlopen('http://127.0.0.1:9090/readyz', timeout=5); print('ok')\n"
                "except OSError as e: print(getattr(e, 'code', e))",
            )
            assert ready.strip() == "503", (c, ready)
            assert run(["docker", "exec", c, "cat", "/tmp/alive"]).strip() == "not-ready", c
        assert Stack.health(stack.containers("fake-provider")[0]) == "healthy"
    finally:
        stack.compose("start", *NATS_NODES)
    stack.wait_healthy(timeout=300)
    assert all(Stack.inspect(c)["RestartCount"] == restarts[c] for c in services)


def test_build_context_is_small_and_both_ignore_files_agree(stack: Stack) -> None:
    rules = [
        ln
        for ln in (ROOT / "deploy/Dockerfile.dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    root_rules = [
        ln
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert rules == root_rules
    path = Path(ROOT / "deploy/Dockerfile")
    assert "syntax=" not in path.read_text()  # BuildKit would fetch that frontend
    # The classic builder says what it sends (a cached build: the fixture built it).
    out = run(
        ["docker", "build", "-f", "deploy/Dockerfile", "-t", "ridethrough:local", "."],
        env_extra={"DOCKER_BUILDKIT": "0"},
        timeout=900,
    )
    match = re.search(r"Sending build context to Docker daemon\s+([\d.]+)([kMG]?B)", out)
    assert match, out
    size = float(match[1]) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[match[2]]
    assert size < 5e6, match[0]  # the tree with .venv is hundreds of MB
