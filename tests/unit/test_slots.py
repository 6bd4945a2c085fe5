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


async def test_resize_grows_to_waiters_and_shrinks_only_as_slots_come_back() -> None:
    """Growing hands the new slots to waiters at once; shrinking takes none from their
    holders: the slots in use above the new size are not handed on when released."""
    slots = PrioritySlots(2, WEIGHTS)
    await slots.acquire("normal")
    await slots.acquire("normal")
    waiter = asyncio.create_task(slots.acquire("normal"))
    await asyncio.sleep(0)
    assert not waiter.done()
    slots.resize(3)
    await asyncio.sleep(0)
    assert waiter.done() and slots.capacity == 3
    slots.resize(1)  # three held, room for one
    second = asyncio.create_task(slots.acquire("high"))
    await asyncio.sleep(0)
    slots.release()
    slots.release()
    await asyncio.sleep(0)
    assert not second.done()  # two released, but one is still held: the one slot is in use
    slots.release()
    await asyncio.sleep(0)
    assert second.done()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_adaptive_limit_halves_once_per_round_and_grows_back() -> None:
    """A 429 halves the limit; the 429s of calls sent before that cut do not cut again.
    Successes then add 1/limit each: one more per round."""
    from services.worker.slots import AdaptiveLimit

    clock = _Clock()
    limit = AdaptiveLimit(64, WEIGHTS, clock=clock)
    sent = clock.now
    clock.now += 0.02
    limit.pushed_back(sent)
    assert limit.slots.capacity == 32 and limit.cuts == 1
    for _ in range(20):  # the rest of that round's 429s
        limit.pushed_back(sent)
    assert limit.slots.capacity == 32 and limit.cuts == 1
    clock.now += 0.02
    limit.pushed_back(clock.now - 0.01)  # sent after the cut: a new round
    assert limit.slots.capacity == 16 and limit.threshold == 16
    for _ in range(15):  # at the threshold: 1/limit each, one more per round of successes
        limit.success()
    assert limit.slots.capacity == 16
    limit.success()
    limit.success()
    assert limit.slots.capacity == 17
    for _ in range(10_000):
        limit.success()
    assert limit.slots.capacity == 64  # never above the ceiling


def test_adaptive_limit_floor_and_slow_start_after_quiet() -> None:
    """It never drops below 1; after ``recover_s`` without a cut it grows by 1 a success
    (doubling per round) instead of 1/limit, back to the ceiling."""
    from services.worker.slots import AdaptiveLimit

    clock = _Clock()
    limit = AdaptiveLimit(256, WEIGHTS, recover_s=10.0, clock=clock)
    for _ in range(20):
        clock.now += 1.0
        limit.pushed_back(clock.now - 0.5)
    assert limit.slots.capacity == 1 and limit.limit == 1.0
    limit.success()  # within recover_s: 1 / limit
    assert limit.limit == 2.0
    limit.success()
    assert limit.limit == 2.5
    clock.now += 10.0
    for _ in range(10):  # slow start again: +1 each
        limit.success()
    assert limit.slots.capacity == 12
    for _ in range(300):
        limit.success()
    assert limit.slots.capacity == 256
