"""How the gateway's requests wait for results: one consumer per tenant on a real
nats-server, delivering only what the stream stored, to the right tenant's requests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from schemas.codec import encode
from schemas.results import JobResult
from schemas.subjects import EXPECTED_LAST_SUBJECT_SEQ, RESULTS_STREAM, result_subject
from services.config import Settings
from services.errors import ResultTimeout
from services.gateway.results import ResultWaiter
from services.jetstream.connection import connect
from services.jetstream.streams import last_msg, publish_if_last
from services.jetstream.topology import ensure_topology
from services.producer import Producer

pytestmark = pytest.mark.integration


def _result(job_id: str, tenant: str, text: str) -> JobResult:
    return JobResult(
        job_id=job_id,
        status="succeeded",
        provider="anthropic",
        model="m",
        response={"text": text},
        tenant=tenant,
    )


async def _store(js: Any, result: JobResult) -> None:
    stored = await publish_if_last(
        js, result_subject(result.job_id, result.tenant), encode(result), 0
    )
    assert stored


async def test_a_wait_gets_its_own_tenants_result_not_anothers_with_the_same_id(js: Any) -> None:
    """Two tenants' jobs share an id: acme's wait skips globex's result (delivered first)
    and gets acme's."""
    waiter = ResultWaiter(js._nc)
    acme = Producer(js._nc, tenant="acme")
    expected = await waiter.expect("acme", "same-id")
    try:
        await _store(js, _result("same-id", "globex", "globex's"))
        await _store(js, _result("same-id", "acme", "acme's"))
        got = await expected.result(30, acme)
    finally:
        expected.close()
        await waiter.close()
    assert got.tenant == "acme"
    assert got.response == {"text": "acme's"}


async def test_a_copy_the_stream_refused_never_answers_a_wait(js: Any) -> None:
    """A result published on the subject but refused by the stream (a racing second copy)
    reaches core subscribers first; the wait answers the stored one."""
    waiter = ResultWaiter(js._nc)
    acme = Producer(js._nc, tenant="acme")
    expected = await waiter.expect("acme", "j1")
    refused = _result("j1", "acme", "refused copy")
    try:
        # Refused: the subject is empty, not at sequence 7. Core subscribers still see it.
        with pytest.raises(Exception):  # noqa: B017, PT011 (nats-py's APIError for a wrong sequence)
            await js.publish(
                result_subject("j1", "acme"),
                encode(refused),
                headers={EXPECTED_LAST_SUBJECT_SEQ: "7"},
            )
        await _store(js, _result("j1", "acme", "stored"))
        got = await expected.result(30, acme)
    finally:
        expected.close()
        await waiter.close()
    assert got.response == {"text": "stored"}
    stored = await last_msg(js, RESULTS_STREAM, result_subject("j1", "acme"))
    assert stored is not None


async def test_a_result_the_consumer_never_delivers_is_found_by_lookup(js: Any) -> None:
    """A result stored before the tenant's consumer started is not delivered; the wait
    finds it by looking it up."""
    await _store(js, _result("early", "acme", "stored before"))
    waiter = ResultWaiter(js._nc, recheck_s=0.05)
    expected = await waiter.expect("acme", "early")
    try:
        got = await expected.result(30, Producer(js._nc, tenant="acme"))
    finally:
        expected.close()
        await waiter.close()
    assert got.response == {"text": "stored before"}


async def test_waits_that_end_leave_nothing_behind(js: Any) -> None:
    """Answered, timed-out and abandoned waits all leave the waiter's table empty."""
    waiter = ResultWaiter(js._nc, recheck_s=0.05)
    acme = Producer(js._nc, tenant="acme")
    answered = await waiter.expect("acme", "a")
    timed_out = await waiter.expect("acme", "b")
    abandoned = await waiter.expect("acme", "c")
    assert waiter.waiting == 3
    try:
        await _store(js, _result("a", "acme", "a"))
        assert (await answered.result(30, acme)).job_id == "a"
        answered.close()
        with pytest.raises(ResultTimeout):
            await timed_out.result(0.1, acme)
        timed_out.close()
        task = asyncio.create_task(abandoned.result(30, acme))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        abandoned.close()
        assert waiter.waiting == 0
    finally:
        await waiter.close()


async def test_without_a_consumer_the_wait_goes_through_the_producer(settings: Settings) -> None:
    """A tenant whose consumer cannot be created (no results stream yet) still gets its
    result: the request waits as ``Producer.result`` does."""
    nc = await connect(settings, name="test")
    try:
        waiter = ResultWaiter(nc)
        expected = await waiter.expect("acme", "j2")  # AI_RESULTS does not exist yet
        assert waiter.waiting == 0
        js = nc.jetstream()
        await ensure_topology(js, settings)
        await _store(js, _result("j2", "acme", "found"))
        got = await expected.result(30, Producer(nc, tenant="acme"))
        expected.close()
        await waiter.close()
    finally:
        await nc.close()
    assert got.response == {"text": "found"}
