"""``ridethrough bench`` at tiny sizes: it keeps working. No figure is asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.tools.bench import SCALE_COMMANDS as _SCALE
from services.tools.bench import (
    SCENARIOS,
    Figure,
    InstantProvider,
    cpu_seconds,
    tree_cpu_seconds,
)
from tests.support import ROOT

pytestmark = pytest.mark.integration

SCALE_COMMANDS = [name for name, _ in _SCALE]

TINY = (
    "--jobs", "200", "--provider-jobs", "60", "--in-flight", "20", "--latency-ms", "20",
    "--latency-s", "0.5", "--repeat", "1", "--gateway-requests", "100", "--scale-parked", "50",
)  # fmt: skip


def _env() -> dict[str, str]:
    drop = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "NATS_URL")
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RIDETHROUGH_")
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_bench_json_reports_every_scenario() -> None:
    """`bench --json` at tiny sizes prints one object with every scenario, each with
    positive numbers, a null baseline and ratio only for latency, the worker's RSS, and
    the gateway's latencies (p99 over p50, the added latency their difference) and CPU per
    request, and the tracing ratio of the metrics scenario."""
    proc = subprocess.run(
        [sys.executable, "-m", "services", "bench", "--json", *TINY],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == set(SCENARIOS)
    for name, figure in report.items():
        assert figure["ours"] > 0 and figure["unit"], name
        if name == "latency":
            assert figure["baseline"] is None and figure["ratio"] is None
            assert figure["p99_ms"] >= figure["ours"]
        elif name == "scale":  # absolute targets: no baseline
            assert figure["baseline"] is None and figure["ratio"] is None
        else:
            assert figure["baseline"] > 0 and figure["ratio"] > 0, name
            assert figure["ratio"] == pytest.approx(figure["ours"] / figure["baseline"], rel=1e-2)
    assert report["provider"]["peak_rss_mb"] > 0
    # Every operator command ran (and succeeded: jobs show found the newest parked job).
    scale = report["scale"]
    assert scale["parked"] == 50
    for cmd in SCALE_COMMANDS:
        assert scale[f"{cmd}_s"] > 0 and scale[f"{cmd}_rss_mb"] > 0, cmd
        assert scale[f"{cmd}_s"] <= scale["ours"]
    gateway = report["gateway"]
    assert gateway["p99_ms"] >= gateway["p50_ms"] > 0
    assert gateway["added_p50_ms"] == pytest.approx(
        gateway["p50_ms"] - gateway["producer_p50_ms"], abs=0.01
    )
    # The CPU each path spent per request: the gateway process's, the producer's.
    assert gateway["gateway_cpu_us_per_request"] > 0
    assert gateway["producer_cpu_us_per_request"] > 0
    # Metrics on against off, and tracing on (its spans reached the OTLP sink) against off.
    assert report["metrics"]["tracing_ratio"] > 0
    assert report["metrics"]["otlp_requests"] >= 1
    assert report["metrics"]["cpu_us_per_job_off"] >= 0 and "cpu_ratio" in report["metrics"]


def test_bench_replay_repeats_on_fresh_parked_jobs() -> None:
    """Every run of the replay scenario parks jobs anew: a second run whose parked copies
    reused the first run's msg ids met the dedup window, parked nothing and timed out."""
    proc = subprocess.run(
        [sys.executable, "-m", "services", "bench", "--json", "-s", "replay", "--jobs", "200",
         "--repeat", "2"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["replay"]["ours"] > 0


def test_bench_rejects_an_unknown_scenario() -> None:
    """An unknown --scenario is a usage error: exit 2 and one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "services", "bench", "--scenario", "nosuch"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nosuch" in proc.stderr


async def test_instant_provider_answers_without_io() -> None:
    """The bench's instant provider returns its canned reply and counts the call."""
    provider = InstantProvider("anthropic")
    reply = await provider.call("claude-bench", {"messages": []})
    assert reply.usage.output_tokens > 0 and reply.response["content"]
    assert provider.calls == 1
    await provider.aclose()


def test_figure_ratio_and_target() -> None:
    """A figure's ratio is ours/baseline; the RSS budget counts toward its target."""
    assert Figure(8.0, 10.0, "jobs/s", 0.7).met is True
    assert Figure(6.0, 10.0, "jobs/s", 0.7).met is False
    assert Figure(8.0, 10.0, "calls/s", 0.7, extra={"peak_rss_mb": 400.0}).met is False
    latency = Figure(12.0, None, "ms p50")
    assert latency.ratio is None and latency.met is None
    assert latency.as_json()["baseline"] is None


def test_bench_peers_runs_ours_and_the_faststream_peer() -> None:
    """`bench -s peers` at a tiny size, with the FastStream peer run by this environment's
    Python (FastStream, nats-py and the SDK are dependencies of the project; taskiq is not,
    and its environment needs the package index): every contender stored a result for every
    job, with and without the SDK call, and the ratios are ours over the peer's."""
    proc = subprocess.run(
        [sys.executable, "-m", "services", "bench", "--json", "-s", "peers",
         "--peer", "faststream", "--peers-python", sys.executable,
         "--peer-jobs", "60", "--peer-in-flight", "8", "--repeat", "1"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    peers = json.loads(proc.stdout)["peers"]
    assert peers["baseline"] == peers["faststream"] > 0 and peers["ours"] > 0
    assert peers["faststream_ratio"] == pytest.approx(peers["ours"] / peers["faststream"], rel=1e-2)
    assert peers["faststream_queue_only_ratio"] == pytest.approx(
        peers["ours_queue_only"] / peers["faststream_queue_only"], rel=1e-2
    )
    for name in ("ours", "ours_queue_only", "faststream", "faststream_queue_only"):
        assert peers[f"{name}_cpu_us_per_job"] > 0, name
    assert not any(key.startswith("taskiq") for key in peers)


def test_bench_peers_says_when_their_environment_cannot_be_built(tmp_path: Path) -> None:
    """Without the package index the peers' environment cannot be built: the bench says so
    in one line and exits 2 (as every command does on our errors), and leaves no half-built
    environment behind."""
    env = {**_env(), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run(
        [sys.executable, "-m", "services", "bench", "-s", "peers", "--peers-env", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "cannot build the peers' environment" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_tree_cpu_counts_a_process_and_its_children() -> None:
    """The CPU time of a process tree includes its children's: a parent waiting on a child
    that has spun for a while counts at least its own time plus the child's."""
    spin = "import sys; sum(range(10**7)); sys.stdin.read()"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
        while not children.read_text().strip():  # its one child, once started
            time.sleep(0.01)
        child = int(children.read_text())
        while cpu_seconds(child) < 0.05:  # the child has spun
            time.sleep(0.01)
        # Read the parts first: CPU times only grow, so the total read after is no less.
        parts = cpu_seconds(parent.pid) + cpu_seconds(child)
        assert parts >= 0.05
        assert tree_cpu_seconds(parent.pid) >= parts
    finally:
        parent.kill()
        parent.wait()
