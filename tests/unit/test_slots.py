"""Call slots by priority: the weighted pick as a table, and the semaphore around it."""

from __future__ import annotations

import asyncio

import pytest

from services.config import WorkerSettings
from services.worker.slots import PrioritySlots, next_priority

WEIGHTS = {"high": 16, "normal": 4, "low": 1}


def _picks(waiting: tuple[str, ...], n: int, weights: dict[str, int] = WEIGHTS) -> list[str]:
    credit: dict[str, int] = {}
    out = []
    for _ in range(n):
        p, credit = next_priority(waiting, credit, weights)
        out.append(p)
    return out


@pytest.mark.parametrize(
    ("waiting", "n", "want"),
    [
        (("high", "normal", "low"), 21, {"high": 16, "normal": 4, "low": 1}),
        (("high", "normal", "low"), 42, {"high": 32, "normal": 8, "low": 2}),
        (("high", "low"), 17, {"high": 16, "low": 1}),
        (("normal", "low"), 5, {"normal": 4, "low": 1}),
        (("high", "normal"), 20, {"high": 16, "normal": 4}),
        (("low",), 3, {"low": 3}),
    ],
)
def test_each_waiting_priority_gets_its_weight_per_round(
    waiting: tuple[str, ...], n: int, want: dict[str, int]
) -> None:
    """Over one round of the weights' sum, each waiting priority gets exactly its weight."""
    picks = _picks(waiting, n)
    assert {p: picks.count(p) for p in set(picks)} == want


def test_one_round_is_spread_out_with_high_first() -> None:
    """One round of 21 with all three waiting: high first, normal and low spread through it."""
    h, n, lo = "high", "normal", "low"
    assert _picks((h, n, lo), 21) == [
        h, h, n, h, h, h, h, n, h, h, lo, h, h, h, n, h, h, h, n, h, h,
    ]  # fmt: skip


def test_a_priority_that_does_not_wait_neither_earns_nor_pays() -> None:
    """Credits of priorities not waiting are left as they were."""
    _, after = next_priority(("high",), {"low": 3, "high": 0}, WEIGHTS)
    assert after == {"low": 3, "high": 0}


def test_weights_must_name_every_priority_and_be_positive() -> None:
    """A zero weight (a starved priority) or a missing priority is refused."""
    with pytest.raises(ValueError, match="positive"):
        WorkerSettings(priority_weights={"high": 1, "normal": 1, "low": 0})
    with pytest.raises(ValueError, match="exactly"):
        WorkerSettings(priority_weights={"high": 1, "normal": 1})


async def test_freed_slots_go_to_waiters_by_priority_and_share() -> None:
    """With one slot held, 17 low and 17 high waiters: of 17 freed slots 16 go to high."""
    slots = PrioritySlots(1, WEIGHTS)
    await slots.acquire("low")
    order: list[str] = []

    async def waiter(priority: str) -> None:
        await slots.acquire(priority)
        order.append(priority)

    tasks = [asyncio.create_task(waiter(p)) for p in ["low"] * 17 + ["high"] * 17]
    await asyncio.sleep(0)
    assert slots.waiting == {"high": 17, "normal": 0, "low": 17}
    for _ in range(17):
        slots.release()
        await asyncio.sleep(0)
    assert order[0] == "high"
    assert order.count("high") == 16 and order.count("low") == 1
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    """A waiter cancelled before its turn is skipped; the slot goes to the next one."""
    slots = PrioritySlots(1, WEIGHTS)
    await slots.acquire("normal")
    gone = asyncio.create_task(slots.acquire("high"))
    stays = asyncio.create_task(slots.acquire("low"))
    await asyncio.sleep(0)
    gone.cancel()
    slots.release()
    await asyncio.wait_for(stays, 5)
    assert gone.cancelled()
    assert slots.waiting == {"high": 0, "normal": 0, "low": 0}
