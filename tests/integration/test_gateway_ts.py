"""The official TypeScript SDK (``@anthropic-ai/sdk``, installed by ``.ci/run`` with
``npm ci --prefix tests/ts``) through the gateway and an outage: every call, streamed or
not, gets the provider's answer once the outage ends, with one provider call per job."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects as s
from services.config import GatewaySettings, Settings
from services.gateway import key_digest, running_gateway
from services.tools.stack import running_recovery, running_worker
from tests.support import count_outcomes, stream_state, wait_until

pytestmark = pytest.mark.integration

TS = Path(__file__).resolve().parents[1] / "ts"
NODE = shutil.which("node")
KEY = "ts-gateway-key"
CALLS = 6


NPM = shutil.which("npm")
SDK = TS / "node_modules" / "@anthropic-ai" / "sdk"


@pytest.fixture(scope="module")
def typescript_sdk() -> Path:
    """The official SDK under tests/ts (``npm ci`` there first when it is missing: the
    README's test command alone then installs it too; .ci/run does it beforehand)."""
    if not SDK.is_dir():
        assert NPM is not None
        subprocess.run(
            [NPM, "ci", "--prefix", str(TS), "--no-audit", "--no-fund", "--silent"],
            check=True,
            timeout=300,
        )
    return SDK


@pytest.mark.skipif(
    NODE is None or (NPM is None and not SDK.is_dir()),
    reason="no node/npm on this machine: the TypeScript SDK cannot run",
)
@pytest.mark.usefixtures("typescript_sdk")
async def test_the_typescript_sdk_rides_through_an_outage(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """Six calls (three streamed) start during a 529 outage: the SDK's own retries (the
    gateway's 529 says x-should-retry: true, retry-after 1) carry the Idempotency-Key back
    to the same parked job; after recovery each call gets its job's answer, the provider
    is called once per job, nothing is dead or left waiting."""
    gw = settings.with_changes(
        gateway=GatewaySettings(keys={key_digest(KEY): "acme"}, retry_after_s=1)
    )
    fake_provider.start_outage(529)
    async with (
        running_gateway(gw, "127.0.0.1", 0) as url,
        running_worker(gw),
        running_recovery(gw),
    ):
        assert NODE is not None
        node = await asyncio.create_subprocess_exec(
            NODE,
            str(TS / "gateway_client.mjs"),
            url,
            KEY,
            "claude-ts",
            str(CALLS),
            "ts",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

        async def all_parked() -> bool:
            return (await stream_state(js, s.PARKED_STREAM)).messages == CALLS

        try:
            await wait_until(all_parked, timeout=90)
            # Let the SDK retry into the parked jobs a while: still no second job.
            await asyncio.sleep(3)
            assert (await stream_state(js, s.PARKED_STREAM)).messages == CALLS
            before = fake_provider.counters()["normal"]
            fake_provider.stop_outage()
            out, err = await asyncio.wait_for(node.communicate(), 150)
        finally:
            if node.returncode is None:
                node.kill()
                await node.wait()
    assert node.returncode == 0, err.decode()[-2000:]
    answers = [json.loads(line) for line in out.decode().splitlines()]
    assert sorted(a["key"] for a in answers) == [f"ts-{i}" for i in range(CALLS)]
    assert all(a["text"] for a in answers)
    streamed = [a for a in answers if a["streamed"]]
    assert len(streamed) == CALLS // 2
    assert all(a["streamedText"] == a["text"] for a in streamed)
    assert {a["job"] for a in answers if not a["streamed"]} == {
        a["key"] for a in answers if not a["streamed"]
    }
    assert len({a["id"] for a in answers}) == CALLS  # a message of its own per call
    assert fake_provider.counters()["normal"] - before == CALLS  # one call per job
    counts = await count_outcomes(js)
    assert (counts["succeeded"], counts["result_writes"], counts["dead"]) == (CALLS, CALLS, 0)
    assert counts["waiting"] == 0
