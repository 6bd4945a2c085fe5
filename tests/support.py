"""Helpers shared by the test suites: settings for child processes, waits, stream counts.

Service processes are ``services.tools.stack.ServiceProcess``, the one ``ridethrough bench``
and ``ridethrough demo`` start too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from schemas import subjects as s
from services.config import Settings
from services.tools.stack import ServiceProcess as ServiceProcess  # the tools' own, reused
from services.tools.stack import child_env

ROOT = Path(__file__).resolve().parent.parent


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that rebuild ``settings`` in a child process (keys included),
    with this checkout on the import path."""
    return child_env(settings) | {"PYTHONPATH": str(ROOT)}


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 60.0, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it holds; fail the test with a clear message after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def stream_state(js: JetStreamContext, stream: str) -> Any:
    """The stream's state (messages, first and last sequence)."""
    return (await js.stream_info(stream)).state


async def read_stream(js: JetStreamContext, stream: str, subject: str = ">") -> list[Any]:
    """Every message stored in ``stream`` (optionally only ``subject``), oldest first,
    read by direct get so that even a work-queue stream is left untouched."""
    from nats.js.errors import NotFoundError

    out: list[Any] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
        except NotFoundError:
            return out
        out.append(msg)
        seq = msg.seq + 1


async def count_outcomes(js: JetStreamContext) -> dict[str, int]:
    """What the terminal streams hold: results by status, dead letters, and rewrites.

    ``result_writes`` counts every result ever stored (the stream keeps one per job,
    so a second write for a job would show as ``result_writes > results``).
    """
    results = await read_stream(js, s.RESULTS_STREAM)
    from schemas.results import decode_result

    statuses: dict[str, int] = {}
    for m in results:
        st = decode_result(m.data).status
        statuses[st] = statuses.get(st, 0) + 1
    rs = await stream_state(js, s.RESULTS_STREAM)
    ds = await stream_state(js, s.DEAD_STREAM)
    js_state = await stream_state(js, s.JOBS_STREAM)
    return {
        "results": rs.messages,
        "result_writes": rs.last_seq,
        "succeeded": statuses.get("succeeded", 0),
        "failed": statuses.get("failed", 0),
        "expired": statuses.get("expired", 0),
        "dead": ds.messages,
        "waiting": js_state.messages,
    }


# --------------------------------------------------------------------------- chaos helpers


async def breaker_state(
    js: JetStreamContext, provider: str = "anthropic", model: str | None = None
) -> str:
    """The breaker state of ``provider`` (with ``model``: of the pair, the worse of the two)
    as the fleet sees it (one HealthBoard refresh)."""
    from services.breaker import HealthBoard
    from services.config import BreakerSettings

    board = HealthBoard(js, [provider], BreakerSettings())
    board.health_kv = await js.key_value(s.HEALTH_BUCKET)
    board.control_kv = await js.key_value(s.CONTROL_BUCKET)
    await board.refresh()
    return board.state(provider, model)


async def health_events(
    js: JetStreamContext, provider: str = "anthropic", model: str | None = None
) -> list[Any]:
    """Every breaker transition of ``provider`` (or of its ``model``) on AI_EVENTS, oldest
    first."""
    from schemas.events import decode_health_event

    msgs = await read_stream(js, s.EVENTS_STREAM, s.health_event_subject(provider, model))
    return [decode_health_event(m.data) for m in msgs]


async def lease_holder(js: JetStreamContext, key: str) -> str:
    """Owner of the unexpired lease ``key`` in ai_control (``replay.<p>``, ``probe.<p>``),
    or ``""`` when nobody holds it."""
    from nats.js.errors import KeyNotFoundError, NotFoundError

    from services.breaker import decode_lease

    kv = await js.key_value(s.CONTROL_BUCKET)
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):
        return ""
    if not entry.value:
        return ""
    lease = decode_lease(entry.value)
    return lease.owner if lease.until > time.time() else ""


async def result_job_ids(js: JetStreamContext) -> list[str]:
    """The job id of every result stored in AI_RESULTS (one per job: the stream keeps one)."""
    return [m.subject.rsplit(".", 1)[1] for m in await read_stream(js, s.RESULTS_STREAM)]


def fault_request(trigger: str, text: str = "x", max_tokens: int = 8) -> dict[str, Any]:
    """An Anthropic Messages request the fake provider answers with fault ``trigger``
    (``fault:529``, ``fault:400``...: see ``services/tools/fake/faults.py``)."""
    return {
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
        "metadata": {"user_id": trigger},
    }
