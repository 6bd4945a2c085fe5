"""The tally of jobs failed over and expired per outage (``services/breaker/tally.py``)
against a real nats-server: coalesced into one event per outage and flush, kept across a
failed publish, and summed by the notifier for an incident's outages only."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from nats.js.errors import NoStreamResponseError

from schemas import subjects as s
from schemas.codec import encode
from schemas.events import TallyEvent, decode_tally_event
from services.breaker.tally import Tally
from services.notifier.notifier import tallied
from tests.support import read_stream

pytestmark = pytest.mark.integration


async def _tallies(js: Any) -> list[TallyEvent]:
    return [
        decode_tally_event(m.data) for m in await read_stream(js, s.EVENTS_STREAM, s.TALLY_FILTER)
    ]


async def test_counts_are_coalesced_into_one_event_per_outage_and_flush(js: Any) -> None:
    """Five hundred fail-overs and three expiries of one outage, seven expiries of another:
    one flush stores two events with those counts; a flush with nothing new stores none."""
    tally = Tally(js, by="w1")
    for _ in range(500):
        tally.failed_over("anthropic", "A")
    for _ in range(3):
        tally.expired("anthropic", "A")
    tally.expired("openai", "B", 7)
    tally.failed_over("anthropic", "")  # no outage: not counted
    assert await tally.flush() == 2
    assert await tally.flush() == 0
    events = sorted(await _tallies(js), key=lambda e: e.outage_id)
    assert [(e.provider, e.outage_id, e.failed_over, e.expired, e.by) for e in events] == [
        ("anthropic", "A", 500, 3, "w1"),
        ("openai", "B", 0, 7, "w1"),
    ]


async def test_a_failed_flush_keeps_its_counts_for_the_next(js: Any) -> None:
    """While AI_EVENTS does not take tallies the flush fails and nothing is lost: the next
    flush stores the kept event (with its msg id) and the counts made meanwhile."""
    cfg = (await js.stream_info(s.EVENTS_STREAM)).config
    full = list(cfg.subjects)
    cfg.subjects = [x for x in full if x != s.TALLY_FILTER]
    await js.update_stream(cfg)
    tally = Tally(js, by="w1")
    tally.failed_over("anthropic", "A", 4)
    with pytest.raises(NoStreamResponseError):  # no stream listens there
        await tally.flush()
    tally.failed_over("anthropic", "A", 2)
    cfg.subjects = full
    await js.update_stream(cfg)
    assert await tally.flush() == 2
    assert sum(e.failed_over for e in await _tallies(js)) == 6


async def test_stop_flushes_what_is_left(js: Any) -> None:
    """A process that stops publishes its last counts (no second to wait for)."""
    tally = Tally(js, by="w1", flush_s=3600).start()
    tally.expired("anthropic", "A", 5)
    await tally.stop()
    assert [e.expired for e in await _tallies(js)] == [5]


async def test_the_summary_sums_the_tallies_of_its_outages_only(js: Any) -> None:
    """``tallied``: the tallies of the incident's outages stored since its open; one of
    another outage, one before the open, and one that does not decode are left out."""
    subject = s.tally_subject("anthropic")
    old = TallyEvent(provider="anthropic", outage_id="A", failed_over=100)
    await js.publish(subject, encode(old))
    await asyncio.sleep(0.05)  # the summary finds its first tally by time
    since = datetime.now(UTC)
    for event in (
        TallyEvent(provider="anthropic", outage_id="A", failed_over=3, expired=1),
        TallyEvent(provider="anthropic", outage_id="A2", expired=2),
        TallyEvent(provider="anthropic", outage_id="Z", failed_over=50, expired=50),
    ):
        await js.publish(subject, encode(event))
    await js.publish(subject, b"not a tally")
    await js.publish(
        s.tally_subject("openai"), encode(TallyEvent(provider="openai", outage_id="A", expired=9))
    )
    assert await tallied(js, "anthropic", {"A", "A2"}, since) == {"failed_over": 3, "expired": 3}
    assert await tallied(js, "anthropic", {"nothing"}, since) == {"failed_over": 0, "expired": 0}
    assert await tallied(js, "anthropic", {"A"}, datetime.now(UTC)) == {
        "failed_over": 0,
        "expired": 0,
    }
