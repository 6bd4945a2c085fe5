"""The ridethrough command as a user runs it: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from services.config import Settings
from services.tools.stack import running_worker
from tests.support import ROOT, settings_env

pytestmark = pytest.mark.integration


async def cli(settings: Settings | None, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run `ridethrough ARGS` in a child process; return (exit code, stdout, stderr)."""
    if settings is not None:
        env = settings_env(settings)
    else:  # the embedded defaults, never a real provider
        drop = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "NATS_URL")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in drop and not k.startswith("RIDETHROUGH_")
        }
        env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_wait_json_prints_a_succeeded_result(settings: Settings, js: Any) -> None:
    """`submit --wait --json` against a running worker prints the JobResult; `result` finds it."""
    async with running_worker(settings):
        code, out, err = await cli(
            settings, "submit", "--provider", "anthropic", "--model", "claude-x",
            "--prompt", "hi from the shell", "--wait", "--json",
        )  # fmt: skip
        assert code == 0, err
        result = json.loads(out)
        assert result["status"] == "succeeded"
        assert result["response"]["content"][0]["text"] == "echo: hi from the shell"
        code, out, _ = await cli(settings, "result", result["job_id"], "--json")
    assert code == 0 and json.loads(out)["job_id"] == result["job_id"]


async def test_a_tenants_result_is_found_under_its_tenant(settings: Settings, js: Any) -> None:
    """`submit --tenant acme` stores the result under acme: `result --tenant acme` (or
    RIDETHROUGH_TENANT) finds it, `result` without the tenant does not."""
    async with running_worker(settings):
        code, out, err = await cli(
            settings, "submit", "--provider", "anthropic", "--model", "claude-x",
            "--prompt", "for acme", "--tenant", "acme", "--wait", "--json",
        )  # fmt: skip
        assert code == 0, err
        job_id = json.loads(out)["job_id"]
        assert json.loads(out)["tenant"] == "acme"
        code, out, _ = await cli(settings, "result", job_id, "--tenant", "acme", "--json")
        assert code == 0 and json.loads(out)["status"] == "succeeded"
        code, _, err = await cli(settings, "result", job_id)
        assert code == 1 and "no result" in err
        code, out, _ = await cli(settings.with_changes(tenant="acme"), "jobs", "show", job_id)
    assert code == 0 and "done (succeeded)" in out, out


async def test_failed_job_and_missing_result_exit_1(settings: Settings, js: Any) -> None:
    """A job that fails, and a result that is not there, exit with 1 and say why in one line."""
    code, out, err = await cli(settings, "result", "nosuchjob")
    assert code == 1 and err.strip().count("\n") == 0 and "no result" in err
    code, _, err = await cli(settings, "result", "nosuchjob", "--wait", "0.2")
    assert code == 1 and "within" in err
    code, out, err = await cli(
        settings, "submit", "--provider", "anthropic", "--model", "m", "--prompt", "x",
        "--system", "be brief", "--wait", "--timeout", "0.5",
    )  # fmt: skip
    assert code == 1, (out, err)  # nobody is consuming: the wait times out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["submit", "--provider", "anthropic"], "Missing option"),
        (
            [
                "submit",
                "--provider",
                "anthropic",
                "--model",
                "m",
                "--prompt",
                "x",
                "--priority",
                "urgent",
            ],
            "priority",
        ),
        (["nosuchcommand"], "No such command"),
        (["result"], "Missing argument"),
        (["demo", "--jobs", "0"], "--jobs"),
        (["demo", "--scenario", "meteor"], "--scenario"),
        (["submit", "--provider", "nosuch", "--model", "m", "--prompt", "x"], "nosuch"),
        (["result", "abc", "--tenant", "acme.corp"], "tenant"),
        (["result", ">"], "not a valid job id"),
        (["result", "*"], "not a valid job id"),
        (["jobs", "show", ">"], "not a valid job id"),
        (["jobs", "show", "a.b"], "not a valid job id"),
    ],
)
async def test_misuse_gives_one_line_and_exit_2(
    settings: Settings, js: Any, args: list[str], needle: str
) -> None:
    """Bad options, unknown commands and bad values: exit 2, one line on stderr, no traceback."""
    code, _, err = await cli(settings, *args)
    assert code == 2
    assert err.startswith("ridethrough: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err


async def test_no_nats_is_a_one_line_connection_error() -> None:
    """With no server at --nats-url, commands exit 2 with one line naming the URL."""
    from services.tools.devstack import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    code, _, err = await cli(None, "result", "abc", "--nats-url", url)
    assert code == 2 and url in err and err.count("\n") == 1


async def test_demo_drill_reports_an_outage_with_nothing_lost() -> None:
    """`ridethrough demo --json` runs the outage drill on its own stack: the report has
    exactly the documented keys, the breaker opened, and no job was lost or duplicated."""
    from services.tools.demo import REPORT_KEYS

    code, out, err = await cli(
        None,
        "demo",
        "--jobs",
        "80",
        "--rate",
        "40",
        "--outage",
        "1",
        "--outage-at",
        "0.5",
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert list(report) == list(REPORT_KEYS)
    # Where its metrics are: one port per service, said before the drill (on stderr).
    import re

    urls = re.findall(r"(worker 1|worker 2|prober|replayer) +http://127\.0\.0\.1:\d+/metrics", err)
    assert urls == ["worker 1", "worker 2", "prober", "replayer"], err
    assert report["submitted"] == report["succeeded"] == 80
    assert report["lost"] == report["duplicates"] == report["dead"] == 0
    assert report["detect_s"] is not None and report["peak_parked"] > 0
    # Two models, both hit by the provider-wide storm; each job counted under its model.
    models = report["models"]
    assert [m["role"] for m in models.values()] == ["sick", "sick"]
    assert sum(m["submitted"] for m in models.values()) == 80
    assert sum(m["succeeded"] for m in models.values()) == 80


async def test_demo_gateway_calls_made_in_the_outage_get_their_answers() -> None:
    """`ridethrough demo --gateway 6`: six calls of the official anthropic SDK through the
    gateway, made during the outage, all get answers once it ends: six jobs, six results,
    nothing lost or duplicated (the command's exit code says the same)."""
    code, out, err = await cli(
        None, "demo", "--jobs", "80", "--rate", "40", "--outage", "3", "--outage-at", "0.5",
        "--gateway", "6", "--json",
    )  # fmt: skip
    assert code == 0, out + err
    report = json.loads(out)
    assert report["lost"] == report["duplicates"] == 0
    g = report["gateway"]
    assert (g["calls"], g["answered"], g["jobs"], g["results_stored"]) == (6, 6, 6, 6)


async def test_demo_failover_drill_rides_through_on_the_bedrock_door() -> None:
    """`ridethrough demo --scenario failover`: the first-party door has an outage, jobs with
    tools and images fail over to the fake's Bedrock door; none parked, lost or duplicated,
    every request at the Bedrock door is the job's byte for byte (checked on the fake's
    side), and the results name the door."""
    code, out, err = await cli(
        None, "demo", "--scenario", "failover", "--jobs", "80", "--rate", "40",
        "--outage", "1.5", "--outage-at", "0.5", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["submitted"] == report["succeeded"] == 80
    assert report["lost"] == report["duplicates"] == report["dead"] == 0
    assert report["peak_parked"] == 0
    assert sum(m["parked"] for m in report["models"].values()) == 0
    f = report["failover"]
    assert f["requests_at_fallback"] > 0
    assert f["identical_apart_from_model"] == f["with_tools_and_images"]
    assert f["identical_apart_from_model"] == f["requests_at_fallback"]
    assert f["results_from_fallback"] == f["results_by_door"].get("bedrock", 0) > 0
    assert sum(f["results_by_door"].values()) == 80


async def test_status_over_a_websocket_url(tmp_path: Path) -> None:
    """A brief command starts with aiohttp deferred (``services.cli.defer_aiohttp``); over a
    ``ws://`` URL nats-py's websocket transport loads it at first use and the command
    works: topology, then status, through nats-server's websocket listener."""
    from services.tools.devstack import MAX_PAYLOAD, NatsServer, free_port

    ws_port = free_port()
    conf = tmp_path / "ws.conf"
    conf.write_text(
        f"max_payload: {MAX_PAYLOAD}\n"
        f'websocket {{\n  listen: "127.0.0.1:{ws_port}"\n  no_tls: true\n}}\n'
    )
    server = NatsServer(data_dir=tmp_path / "nats", extra_args=["-c", str(conf)]).start()
    try:
        env = {
            k: v
            for k, v in os.environ.items()
            if k != "NATS_URL" and not k.startswith("RIDETHROUGH_")
        }
        env.update(NATS_URL=f"ws://127.0.0.1:{ws_port}", PYTHONPATH=str(ROOT))
        for args in (["topology"], ["status", "--json"]):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services", *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
        assert "providers" in json.loads(out)
    finally:
        server.cleanup()
