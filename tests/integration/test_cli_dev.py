"""`ridethrough dev`: an explicit --port or --data-dir means the embedded server, even with
NATS_URL set; --nats-url with either is a usage error."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from services.tools.devstack import free_port, port_in_use
from tests.support import ROOT

pytestmark = pytest.mark.integration


def _env(nats_url: str) -> dict[str, str]:
    """The user's environment with NATS_URL set, no provider key, this checkout importable."""
    drop = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "NATS_URL")
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RIDETHROUGH_")
    }
    return env | {"NATS_URL": nats_url, "PYTHONPATH": str(ROOT)}


async def _read_until(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> None:
    """Collect lines of ``stream`` into ``seen`` until one contains ``needle`` (or EOF)."""
    while line := (await stream.readline()).decode(errors="replace"):
        seen.append(line)
        if needle in line:
            return


async def test_dev_port_starts_the_embedded_server_though_nats_url_is_set() -> None:
    """`dev --port P` with NATS_URL pointing elsewhere serves NATS on P; SIGTERM stops it."""
    port, elsewhere = free_port(), free_port()  # nothing listens on `elsewhere`
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services", "dev", "--port", str(port),
        env=_env(f"nats://127.0.0.1:{elsewhere}"), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        await asyncio.wait_for(_read_until(proc.stderr, "ready:", lines), 60)
        assert proc.returncode is None, "".join(lines)
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        try:
            info = await nc.jetstream().stream_info("AI_JOBS")  # the topology is there
            assert info.config.name == "AI_JOBS"
        finally:
            await nc.close()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(_read_until(proc.stderr, "\0", lines), 30)  # to EOF
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not port_in_use(port)  # the embedded server went with it
    assert "Traceback" not in "".join(lines)


@pytest.mark.parametrize("embedded", [["--port", "0"], ["--data-dir", "store"]])
def test_dev_nats_url_with_port_or_data_dir_is_a_usage_error(
    tmp_path: Path, embedded: list[str]
) -> None:
    """`dev --nats-url U --port P` (or --data-dir): exit 2, one line on stderr, nothing started."""
    if embedded[0] == "--port":
        embedded = ["--port", str(free_port())]
    else:
        embedded = ["--data-dir", str(tmp_path / "store")]
    url = f"nats://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "services", "dev", "--nats-url", url, *embedded],
        env=_env(url), capture_output=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err)
    assert err.startswith("ridethrough: ") and err.count("\n") == 1, err
    assert "--nats-url" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()


async def test_dev_serves_the_gateway_the_readmes_example_gets_an_answer() -> None:
    """`dev` starts the gateway with the dev key: the official Anthropic and OpenAI SDKs,
    only base_url and the key changed, get the fake provider's answers; the status page
    opens with the same key."""
    import re

    import anthropic
    import openai

    from services.runner import DEV_GATEWAY_KEY

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services", "dev", "--port", str(port), "--gateway-port", "0",
        env=_env(f"nats://127.0.0.1:{port}"), cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        await asyncio.wait_for(_read_until(proc.stderr, "gateway at", lines), 60)
        found = re.search(r"gateway at (http://\S+)", lines[-1])
        assert found, "".join(lines)
        url = found.group(1)
        assert DEV_GATEWAY_KEY in lines[-1]
        drain = asyncio.create_task(_read_until(proc.stderr, "\0", lines))
        async with anthropic.AsyncAnthropic(base_url=url, api_key=DEV_GATEWAY_KEY) as claude:
            message = await claude.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=32,
                messages=[{"role": "user", "content": "hello from the README"}],
            )
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=DEV_GATEWAY_KEY) as gpt:
            completion = await gpt.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
            )
        import aiohttp

        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/status", headers={"authorization": f"Bearer {DEV_GATEWAY_KEY}"}) as r,
        ):
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(drain, 30)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert message.content[0].type == "text" and message.content[0].text
    assert completion.choices[0].message.content
    assert "Traceback" not in "".join(lines)
