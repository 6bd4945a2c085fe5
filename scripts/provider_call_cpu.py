"""CPU per call of the ways to call the Messages API through the anthropic SDK, against the
fake provider (instant) in a child process; one JSON list, two rounds of each:

``models``       ``client.messages.create``: the SDK's Message models (a bare SDK loop)
``raw``          ``messages.with_raw_response.create`` + msgspec decode
``post``         ``client.post("/v1/messages", cast_to=httpx2.Response)`` + msgspec decode
``adapter``      ridethrough's adapter (``AnthropicProvider.call``), a plain job (``post``)
``adapter-sdk``  the adapter with max_tokens 9000 (through ``messages.create``'s raw path)

CPU is this process's (``time.process_time``) over the measured calls after a warm-up, so
a busy machine moves it far less than calls/s.

Usage: ``PYTHONPATH=. python scripts/provider_call_cpu.py``
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from typing import Any

import anthropic
import httpx2
import msgspec

from services.providers.anthropic import AnthropicProvider

REQ: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "bench " + "x" * 900}],
}
HOWS = ("models", "raw", "post", "adapter", "adapter-sdk")


def start_fake() -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "services", "fake-provider", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if found := re.search(r"http://[0-9.:]+", line):
            return proc, found.group(0)
    raise SystemExit("the fake provider did not start")


async def run(url: str, how: str, n: int = 3000, conc: int = 64) -> dict[str, Any]:
    timeout = httpx2.Timeout(60, connect=5)
    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
    http = anthropic.DefaultAioHttpClient(timeout=timeout, limits=limits)
    client = anthropic.AsyncAnthropic(
        api_key="k", base_url=url, max_retries=0, timeout=timeout, http_client=http
    )
    adapter = AnthropicProvider("a", api_key="k", base_url=url, timeout_s=60)
    big = {**REQ, "max_tokens": 9000}

    async def one() -> None:
        if how == "adapter":
            await adapter.call("claude-x", REQ)
        elif how == "adapter-sdk":
            await adapter.call("claude-x", big)
        elif how == "models":
            await client.messages.create(**REQ)
        elif how == "raw":
            raw = await client.messages.with_raw_response.create(**REQ)
            msgspec.json.decode(await raw.read())
        else:
            resp = await client.post("/v1/messages", cast_to=httpx2.Response, body=REQ)
            msgspec.json.decode(await resp.aread())

    left = 0

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    left = 300  # warm-up
    await asyncio.gather(*(lane() for _ in range(conc)))
    left = n
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane() for _ in range(conc)))
    t1, c1 = time.perf_counter(), time.process_time()
    await client.close()
    await adapter.aclose()
    per_call = round((c1 - c0) / n * 1e6, 1)
    return {"how": how, "cpu_us_per_call": per_call, "calls_s": round(n / (t1 - t0))}


async def main() -> None:
    proc, url = start_fake()
    try:
        print(json.dumps([await run(url, how) for _ in range(2) for how in HOWS]))
    finally:
        proc.terminate()


if __name__ == "__main__":
    asyncio.run(main())
