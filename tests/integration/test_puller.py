"""The replayer's Puller on a real nats-server: batches in stream order, the next batch
prefetched while one is worked on, nothing delivered twice, and what it still holds when
it stops handed back at once rather than after ack_wait."""

from __future__ import annotations

import contextlib
from typing import Any

import nats.errors
import pytest

from schemas import subjects as s
from services.jetstream.pull import Puller, ack_position
from services.jetstream.topology import replayer_consumer_config
from tests.support import wait_until

pytestmark = pytest.mark.integration

CONSUMER = s.replayer_consumer("anthropic", "normal", "m")


async def _ack_pending(js: Any) -> int:
    return int((await js.consumer_info(s.PARKED_STREAM, CONSUMER)).num_ack_pending)


async def test_prefetch_keeps_order_and_stop_hands_back_what_it_holds(
    js: Any, settings: Any
) -> None:
    await js.add_consumer(
        s.PARKED_STREAM, replayer_consumer_config(settings, "anthropic", "normal", "m")
    )
    for i in range(10):
        await js.publish(s.parked_subject("anthropic", "normal", "m"), f"job {i}".encode())
    puller = Puller(js, s.PARKED_STREAM, CONSUMER)

    first = await puller.fetch(3, timeout=2, prefetch=True)
    assert [ack_position(m)[0] for m in first] == [1, 2, 3]

    async def delivered(n: int) -> bool:
        return await _ack_pending(js) == n

    await wait_until(lambda: delivered(6), timeout=5)  # 4-6 arrived without a fetch
    assert puller.left == 7  # 3 kept, 4 not yet delivered

    second = await puller.fetch(3, timeout=2, prefetch=True)
    assert [ack_position(m)[0] for m in second] == [4, 5, 6]
    await wait_until(lambda: delivered(9), timeout=5)  # and 7-9 are on their way

    await puller.unsubscribe()
    # 7-9 were received but never handed out: the next pull gets them now (they were
    # nakked), not after the consumer's ack_wait of 10 s.
    again = Puller(js, s.PARKED_STREAM, CONSUMER)
    rest: list[Any] = []
    for _ in range(4):  # the server handles naks apart from pulls: give it a few
        with contextlib.suppress(nats.errors.TimeoutError):
            rest += await again.fetch(10, timeout=1)
        if len(rest) >= 4:
            break
    assert sorted(ack_position(m)[0] for m in rest) == [7, 8, 9, 10]
    for m in [*first, *second, *rest]:
        await m.ack()
    await again.unsubscribe()
    await wait_until(lambda: delivered(0), timeout=5)
    assert (await js.stream_info(s.PARKED_STREAM)).state.messages == 0
