"""Service loops end when cancelled, even when a request inside them loses the
cancellation, as Python 3.11's ``asyncio.wait_for`` does when the reply arrives in the
same turn of the event loop as the cancel (it returns the reply instead)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from services.breaker import HealthBoard, LeaseKeeper
from services.config import BreakerSettings


async def _request_dropping_the_cancel(asked: asyncio.Queue[asyncio.Future[None]]) -> None:
    """A request through a real ``asyncio.wait_for``; the test answers it and cancels
    the task in the same turn."""
    reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    await asked.put(reply)
    await asyncio.wait_for(reply, timeout=60)


def _board(request: Callable[[], Any]) -> tuple[Any, Callable[[], Any]]:
    board = HealthBoard(None, ["anthropic"], BreakerSettings(board_poll_s=0.01))  # type: ignore[arg-type]
    board.refresh = request  # type: ignore[method-assign]
    return board, board._poll


def _lease(request: Callable[[], Any]) -> tuple[Any, Callable[[], Any]]:
    keeper = LeaseKeeper(None, "replay.anthropic", "me", ttl_s=0.04)  # type: ignore[arg-type]
    keeper.try_acquire = request  # type: ignore[method-assign]
    return keeper, keeper._keep


@pytest.mark.parametrize("make", [_board, _lease], ids=["health-board-poll", "lease-keeper"])
async def test_a_loop_ends_when_its_request_drops_the_cancellation(make: Any) -> None:
    asked: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
    _, loop_body = make(lambda: _request_dropping_the_cancel(asked))
    task = asyncio.create_task(loop_body())
    reply = await asked.get()
    reply.set_result(None)
    task.cancel()  # once, as stop() does
    done, _ = await asyncio.wait({task}, timeout=10)
    # Without the check each turn the loop goes on asking, and stop() waits forever.
    assert task in done and task.cancelled()
    assert asked.empty()
