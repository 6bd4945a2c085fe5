"""Garbage on the breaker board (ai_health, ai_control) is read as unknown, never fatal."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.health import BreakerState, Pause, decode_state
from services.breaker import HealthBoard, LeaseKeeper, paused_key, transition
from services.config import Settings
from services.ops.status import collect_status
from services.producer import Producer, make_job
from services.tools.stack import running_recovery, running_worker
from tests.support import lease_holder, wait_until

pytestmark = pytest.mark.integration

# Not JSON; JSON of the wrong shape; the right shape with wrong types or values, for
# every entry at once (an object of unknown fields alone would be a valid, default pause).
GARBAGE = [
    b"\xff\x00not json",
    b"[]",
    b"null",
    b'{"state": 5, "reason": 5, "owner": 5}',
    b'{"state": "melted", "since": "yesterday", "until": "soon"}',
]


async def _scribble(js: Any, provider: str, value: bytes) -> None:
    """Write ``value`` where an operator's KV put could: breaker, pause and both leases."""
    health = await js.key_value(s.HEALTH_BUCKET)
    control = await js.key_value(s.CONTROL_BUCKET)
    await health.put(provider, value)
    for key in (paused_key(provider), f"probe.{provider}", f"replay.{provider}"):
        await control.put(key, value)


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_every_board_reader_survives_garbage(
    settings: Settings, js: Any, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Board, transition, leases and status read garbage as unknown; none raises."""
    await _scribble(js, "anthropic", garbage)
    board = await HealthBoard(js, settings.providers, settings.breaker).start()
    try:
        assert board.state("anthropic") == "closed"  # nothing known before: closed
        assert not board.blocked("anthropic")
        assert board.unreadable == 2  # the breaker and the pause
        await board.refresh()
        assert board.unreadable == 2  # one count (and one warning) per entry revision
        warned = [r for r in caplog.records if r.name == "ridethrough.breaker"]
        assert [r.levelname for r in warned] == ["WARNING", "WARNING"]
        assert all(r.exc_info is None and "\n" not in r.getMessage() for r in warned)
        assert "ai_health/anthropic" in warned[0].getMessage()

        status = (await collect_status(js, settings))["providers"]
        assert status["anthropic"]["state"] == "unknown"
        assert status["anthropic"]["breaker"] == "unknown"
        assert status["anthropic"]["replay"] is None
        assert status["openai"]["state"] == "closed"

        control = await js.key_value(s.CONTROL_BUCKET)
        keeper = LeaseKeeper(control, "probe.anthropic", "me", ttl_s=5)
        assert await keeper.try_acquire()  # garbage is a free lease
        assert keeper.unreadable == 1
        await keeper.stop()
        other = LeaseKeeper(control, "replay.anthropic", "me", ttl_s=5)
        await other.release()  # garbage is nobody's lease: left alone, no error

        # Garbage is no state a prober may move from ...
        kv = board.health_kv
        assert kv is not None
        assert (
            await transition(js, kv, "anthropic", to="half_open", allowed_from=("open",), by="t")
            is None
        )
        # ... but a trip (allowed from closed) repairs it.
        new = await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="t")
        assert new is not None and new.state == "open" and new.outage_id
        health = await js.key_value(s.HEALTH_BUCKET)
        assert decode_state((await health.get("anthropic")).value or b"").state == "open"
        await board.refresh()
        assert board.state("anthropic") == "open"
    finally:
        await board.stop()


async def test_board_keeps_the_last_known_state_over_garbage(settings: Settings, js: Any) -> None:
    """A running board that sees garbage replace a good entry keeps the last good one."""
    health = await js.key_value(s.HEALTH_BUCKET)
    control = await js.key_value(s.CONTROL_BUCKET)
    await health.put("anthropic", encode(BreakerState(state="open", outage_id="o-1")))
    await control.put(paused_key("openai"), encode(Pause(reason="maintenance")))
    board = await HealthBoard(js, settings.providers, settings.breaker).start()
    try:
        assert board.state("anthropic") == "open" and board.state("openai") == "paused"
        await health.put("anthropic", b"\x00")
        await control.put(paused_key("openai"), b'{"reason": 1}')
        await board.refresh()
        assert board.state("anthropic") == "open" and board.outage_id("anthropic") == "o-1"
        assert board.state("openai") == "paused"
        assert board.unreadable == 2
        await health.put("anthropic", encode(BreakerState(state="closed")))
        await board.refresh()
        assert board.state("anthropic") == "closed"
    finally:
        await board.stop()


async def test_a_worker_serves_jobs_with_garbage_on_the_board(settings: Settings, js: Any) -> None:
    """A worker, prober and replayer start over a garbage board; a job gets served and
    the prober and replayer take the garbage leases as free ones."""
    await _scribble(js, "anthropic", b"\xff\x00not json")
    await _scribble(js, "openai", b"[]")
    async with (
        running_worker(settings),
        running_recovery(settings),
        await Producer.connect(settings) as producer,
    ):
        job_id = await producer.submit(make_job("anthropic", "m", prompt="still here"))
        result = await producer.result(job_id, timeout=30)
        for key in ("probe.anthropic", "replay.anthropic", "probe.openai", "replay.openai"):

            async def taken(key: str = key) -> bool:
                return await lease_holder(js, key) != ""

            await wait_until(taken, timeout=10)
    assert result.status == "succeeded", result.error
