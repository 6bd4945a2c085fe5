"""``ridethrough bench`` at tiny sizes: it keeps working. No figure is asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.tools.bench import SCALE_COMMANDS as _SCALE
from services.tools.bench import SCENARIOS, Figure, InstantProvider
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
