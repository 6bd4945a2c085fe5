"""Throughput of the fake provider on one core.

Starts ``ridethrough fake-provider --port 0`` in a child process pinned to one CPU
(``os.sched_setaffinity``), drives it from this process (pinned to the other CPUs) over
keep-alive connections, and prints one JSON document with requests/s per driver:

``aiohttp``
    A bare ``aiohttp.ClientSession`` posting a fixed body: the server is the bottleneck
    when ``server_cpu_util`` is near 1.0.
``anthropic``
    The real ``anthropic.AsyncAnthropic`` SDK (``openai.AsyncOpenAI`` for ``--endpoint
    chat``) over its aiohttp transport. The SDK costs far more CPU per request than the
    server, so this mostly measures the SDK.
``raw``
    A minimal hand-written HTTP/1.1 keep-alive client (one request in flight per
    connection, no pipelining), cheap enough to saturate the server from one core.

Server CPU time is read from ``/proc`` around the measured window (after a warm-up):
``server_cpu_util`` near 1.0 means the server was the bottleneck, and
``rps_per_server_cpu_s`` (requests per second of server CPU) is the server's capacity on
one fully busy core, whichever side was the bottleneck.

Usage::

    PYTHONPATH=. python scripts/bench_fake_provider.py [--requests 20000] [--concurrency 64]
        [--time-limit 20] [--drivers aiohttp,anthropic,raw] [--stream]
        [--endpoint messages|chat]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "the quick brown fox jumps over the lazy dog"


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_server(cpu: int) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "services", "fake-provider", "--port", "0"],  # ridethrough ...
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"fake provider did not start: {line!r}")
    return process, line.rsplit(" ", 1)[1].strip()


def _request_body(endpoint: str, stream: bool) -> tuple[str, bytes]:
    if endpoint == "chat":
        body = {
            "model": "gpt-fake",
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": stream,
        }
        return "/v1/chat/completions", msgspec.json.encode(body)
    body = {
        "model": "claude-fake",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
    }
    return "/v1/messages", msgspec.json.encode(body)


async def _run_workers(
    call: Callable[[], Awaitable[bool]],
    total: int,
    concurrency: int,
    time_limit: float,
    server_pid: int | None = None,
) -> dict[str, Any]:
    issued = 0
    ok = 0
    errors = 0
    deadline = time.monotonic() + time_limit

    async def worker() -> None:
        nonlocal issued, ok, errors
        while issued < total and time.monotonic() < deadline:
            issued += 1
            try:
                good = await call()
            except Exception:
                good = False
            if good:
                ok += 1
            else:
                errors += 1

    cpu_before = _cpu_seconds(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = _cpu_seconds(server_pid) - cpu_before if server_pid else 0.0
    return {"ok": ok, "errors": errors, "elapsed_s": elapsed, "server_cpu_s": cpu}


async def _drive_aiohttp(
    url: str,
    total: int,
    concurrency: int,
    time_limit: float,
    endpoint: str,
    stream: bool,
    server_pid: int,
) -> dict[str, Any]:
    path, body = _request_body(endpoint, stream)
    headers = {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": "bench",
        "authorization": "Bearer bench",
    }
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> bool:
            async with session.post(url + path, data=body, headers=headers) as response:
                await response.read()
                return response.status == 200

        await _run_workers(call, concurrency * 4, concurrency, time_limit)  # warm-up
        return await _run_workers(call, total, concurrency, time_limit, server_pid)


async def _drive_anthropic(
    url: str,
    total: int,
    concurrency: int,
    time_limit: float,
    endpoint: str,
    stream: bool,
    server_pid: int,
) -> dict[str, Any]:
    import anthropic
    import openai

    if endpoint == "chat":
        oclient = openai.AsyncOpenAI(
            base_url=url + "/v1",
            api_key="bench",
            max_retries=0,
            http_client=openai.DefaultAioHttpClient(),
        )

        async def call() -> bool:
            if stream:
                chunks = await oclient.chat.completions.create(
                    model="gpt-fake", messages=[{"role": "user", "content": PROMPT}], stream=True
                )
                async for _ in chunks:
                    pass
                return True
            reply = await oclient.chat.completions.create(
                model="gpt-fake", messages=[{"role": "user", "content": PROMPT}]
            )
            return bool(reply.choices)

        close: Callable[[], Awaitable[None]] = oclient.close
    else:
        aclient = anthropic.AsyncAnthropic(
            base_url=url,
            api_key="bench",
            max_retries=0,
            http_client=anthropic.DefaultAioHttpClient(),
        )

        async def call() -> bool:
            if stream:
                async with aclient.messages.stream(
                    model="claude-fake",
                    max_tokens=64,
                    messages=[{"role": "user", "content": PROMPT}],
                ) as events:
                    final = await events.get_final_message()
                return bool(final.content)
            message = await aclient.messages.create(
                model="claude-fake", max_tokens=64, messages=[{"role": "user", "content": PROMPT}]
            )
            return bool(message.content)

        close = aclient.close
    try:
        await _run_workers(call, concurrency * 2, concurrency, time_limit)  # warm-up
        return await _run_workers(call, total, concurrency, time_limit, server_pid)
    finally:
        await close()


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a fixed request and awaits each reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self.buffer[:head_end]).lower()
        marker = head.find(b"content-length:")
        if marker >= 0:
            line_end = head.find(b"\r\n", marker)
            length = int(head[marker + 15 : line_end if line_end >= 0 else None])
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
        elif self.buffer.endswith(b"0\r\n\r\n"):  # chunked (SSE) reply
            end = len(self.buffer)
        else:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:end]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    async def send(self, request: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def _drive_raw(
    url: str,
    total: int,
    concurrency: int,
    time_limit: float,
    endpoint: str,
    stream: bool,
    server_pid: int,
) -> dict[str, Any]:
    path, body = _request_body(endpoint, stream)
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\ncontent-type: application/json\r\n"
        f"anthropic-version: 2023-06-01\r\nx-api-key: bench\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    pool: list[_RawConnection] = []
    for _ in range(concurrency):
        _, protocol = await loop.create_connection(_RawConnection, host, int(port))
        pool.append(protocol)

    async def call() -> bool:
        connection = pool.pop()
        try:
            return await connection.send(request) == 200
        finally:
            if not connection.lost:
                pool.append(connection)

    try:
        await _run_workers(call, concurrency * 4, concurrency, time_limit)  # warm-up
        return await _run_workers(call, total, concurrency, time_limit, server_pid)
    finally:
        for connection in pool:
            if connection.transport is not None:
                connection.transport.close()


DRIVERS = {"aiohttp": _drive_aiohttp, "anthropic": _drive_anthropic, "raw": _drive_raw}


def _driver_process(
    name: str,
    url: str,
    args: tuple[int, int, float, str, bool, int],
    cpus: set[int],
    results: Any,
) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    total, concurrency, time_limit, endpoint, stream, server_pid = args
    driver = DRIVERS[name]
    results.put(
        asyncio.run(driver(url, total, concurrency, time_limit, endpoint, stream, server_pid))
    )


def _measure(
    name: str, url: str, server_pid: int, args: argparse.Namespace, cpus: set[int]
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    worker = context.Process(
        target=_driver_process,
        args=(
            name,
            url,
            (
                args.requests,
                args.concurrency,
                args.time_limit,
                args.endpoint,
                args.stream,
                server_pid,
            ),
            cpus,
            results,
        ),
    )
    worker.start()
    part = results.get(timeout=args.time_limit * 3 + 60)
    worker.join()
    elapsed = part["elapsed_s"]
    server_cpu = part["server_cpu_s"]
    handled = part["ok"] + part["errors"]
    return {
        "driver": name,
        "requests_ok": part["ok"],
        "errors": part["errors"],
        "elapsed_s": round(elapsed, 3),
        "rps": round(part["ok"] / elapsed, 1),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_util": round(server_cpu / elapsed, 3),
        "rps_per_server_cpu_s": round(handled / server_cpu, 1) if server_cpu else None,
    }


def main() -> None:
    """Parse flags, run each driver against a pinned server, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per driver")
    parser.add_argument("--drivers", default="aiohttp,anthropic,raw")
    parser.add_argument("--endpoint", choices=["messages", "chat"], default="messages")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--server-cpu", type=int, default=None, help="default: first CPU")
    args = parser.parse_args()

    available = sorted(os.sched_getaffinity(0))
    server_cpu = args.server_cpu if args.server_cpu is not None else available[0]
    driver_cpus = {c for c in available if c != server_cpu}
    process, url = _start_server(server_cpu)
    try:
        results = [
            _measure(name, url, process.pid, args, driver_cpus)
            for name in args.drivers.split(",")
            if name
        ]
    finally:
        process.terminate()
        process.wait(timeout=10)
    report = {
        "endpoint": args.endpoint,
        "stream": args.stream,
        "server_cpu": server_cpu,
        "driver_cpus": sorted(driver_cpus),
        "concurrency": args.concurrency,
        "python": sys.version.split()[0],
        "results": results,
    }
    print(msgspec.json.format(msgspec.json.encode(report)).decode())


if __name__ == "__main__":
    main()
