"""The batched stream walk reads exactly what one direct get per message reads."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.js.api import RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from services.jetstream import streams
from services.jetstream.streams import iter_stream, iter_stream_naive, scan_stream

pytestmark = pytest.mark.integration

SUBJECTS = ["w.a.x", "w.a.y", "w.b.x", "w.c.z"]
FILTERS = [">", "w.>", "w.a.>", "w.*.x", "w.c.z", "w.none"]


async def _walk(it: Any) -> list[tuple[int, str, bytes]]:
    return [(m.seq, m.subject, m.data) async for m in it]


async def _fill(js: Any, name: str, n: int) -> None:
    await js.add_stream(StreamConfig(name=name, subjects=["w.>"], allow_direct=True))
    for i in range(n):
        await js.publish(SUBJECTS[(i * 7) % len(SUBJECTS)], f"m{i}".encode() * (1 + i % 5))
    for seq in range(3, n, 11):  # holes in the sequence
        await js.delete_msg(name, seq)


async def test_batched_walk_equals_the_naive_one(js: Any, monkeypatch: Any) -> None:
    await _fill(js, "WALK", 600)
    for batch, max_bytes in ((2000, 8 << 20), (7, 8 << 20), (50, 64)):
        monkeypatch.setattr(streams, "WALK_BATCH", batch)
        monkeypatch.setattr(streams, "WALK_MAX_BYTES", max_bytes)
        for filt in FILTERS:
            for start in (1, 2, 299, 600, 700):
                fast = await _walk(iter_stream(js, "WALK", filt, start_seq=start))
                naive = await _walk(iter_stream_naive(js, "WALK", filt, start_seq=start))
                assert fast == naive, (batch, max_bytes, filt, start)
    everything = await _walk(iter_stream(js, "WALK"))
    assert len(everything) == 600 - len(range(3, 600, 11))
    assert {subject for _, subject, _ in everything} == set(SUBJECTS)


async def test_walk_can_stop_early_and_walk_again(js: Any, monkeypatch: Any) -> None:
    await _fill(js, "WALK", 120)
    monkeypatch.setattr(streams, "WALK_BATCH", 10)
    first = []
    async for msg in iter_stream(js, "WALK", "w.a.>"):
        first.append(msg.seq)
        if len(first) == 25:
            break
    again = await _walk(iter_stream_naive(js, "WALK", "w.a.>"))
    assert first == [seq for seq, _, _ in again][:25]


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    subjects=st.lists(st.sampled_from(SUBJECTS), min_size=0, max_size=80),
    deleted=st.sets(st.integers(min_value=1, max_value=80)),
    batch=st.integers(min_value=1, max_value=30),
    filt=st.sampled_from(FILTERS),
)
async def test_walk_property(
    js: Any, subjects: list[str], deleted: set[int], batch: int, filt: str
) -> None:
    with contextlib.suppress(NotFoundError):
        await js.delete_stream("PROP")
    await js.add_stream(StreamConfig(name="PROP", subjects=["w.>"], allow_direct=True))
    for i, subject in enumerate(subjects):
        await js.publish(subject, str(i).encode())
    for seq in deleted:
        if seq <= len(subjects):
            await js.delete_msg("PROP", seq)
    old = streams.WALK_BATCH
    streams.WALK_BATCH = batch
    try:
        fast = await _walk(iter_stream(js, "PROP", filt))
    finally:
        streams.WALK_BATCH = old
    assert fast == await _walk(iter_stream_naive(js, "PROP", filt))


async def _naive_many(js: Any, stream: str, filters: list[str]) -> list[tuple[int, str, bytes]]:
    found: list[tuple[int, str, bytes]] = []
    for filt in filters:
        found += await _walk(iter_stream_naive(js, stream, filt))
    return sorted(set(found))


async def test_scan_equals_the_naive_walk(js: Any, monkeypatch: Any) -> None:
    await _fill(js, "WALK", 600)
    for batch in (2000, 7, 1):
        monkeypatch.setattr(streams, "WALK_BATCH", batch)
        for filt in FILTERS:
            fast = await _walk(scan_stream(js, "WALK", filt))
            assert fast == await _walk(iter_stream_naive(js, "WALK", filt)), (batch, filt)
        for filters in (["w.a.x", "w.c.z"], ["w.b.>", "w.a.y"]):
            assert await _walk(scan_stream(js, "WALK", filters)) == await _naive_many(
                js, "WALK", filters
            )
    # The scans' consumers are gone.
    assert (await js.stream_info("WALK")).state.consumer_count == 0


async def test_scan_of_a_work_queue_stream_walks(js: Any) -> None:
    await js.add_stream(
        StreamConfig(
            name="WQ", subjects=["q.>"], allow_direct=True, retention=RetentionPolicy.WORK_QUEUE
        )
    )
    for i in range(50):
        await js.publish(f"q.{i % 3}", str(i).encode())
    assert await _walk(scan_stream(js, "WQ", "q.1")) == await _walk(
        iter_stream_naive(js, "WQ", "q.1")
    )
    assert len(await _walk(scan_stream(js, "WQ", ["q.0", "q.2"]))) == 50 - 17
