"""The shared PubAck inbox and the quick fetch on a real nats-server: each publish gets
its own PubAck among many at once, the stream's refusals and silences come back as
``js.publish`` gives them, and a fetch takes messages already received without waiting
for each."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import nats.js.errors
import pytest

from schemas import subjects as s
from services.jetstream.connection import client
from services.jetstream.errors import NATS_UNAVAILABLE
from services.jetstream.pubacks import pubacks
from services.jetstream.pull import quick_next_msg
from services.jetstream.streams import last_msg, publish_if_last
from tests.support import wait_until

pytestmark = pytest.mark.integration


async def test_many_publishes_at_once_each_get_their_own_puback(js: Any) -> None:
    """200 publishes in flight together: each returns the sequence its own message was
    stored at, and none is left waiting."""
    acks = pubacks(client(js))
    subjects = [s.result_subject(f"job-{i}", None) for i in range(200)]
    seqs = await asyncio.gather(
        *(
            acks.publish(subject, f"result {i}".encode(), None, 10)
            for i, subject in enumerate(subjects)
        )
    )
    assert sorted(seqs) == list(range(1, 201))
    for i, subject in enumerate(subjects):
        found = await last_msg(js, s.RESULTS_STREAM, subject)
        assert found == (seqs[i], f"result {i}".encode())
    assert acks._waiting == {}


async def test_a_refused_condition_is_false_and_keeps_the_first(js: Any) -> None:
    """The conditional write of a subject that has a message is refused (False), through
    the shared inbox as through a request; the first message stays the only one."""
    subject = s.result_subject("once", None)
    assert await publish_if_last(js, subject, b"first", 0, msg_id="once-1")
    assert not await publish_if_last(js, subject, b"second", 0, msg_id="once-2")
    found = await last_msg(js, s.RESULTS_STREAM, subject)
    assert found is not None and found[1] == b"first"


async def test_no_stream_raises_what_js_publish_raises(js: Any) -> None:
    """A subject no stream listens on: nats-py's NoStreamResponseError (NATS away, for
    the worker), not a hang."""
    with pytest.raises(nats.js.errors.NoStreamResponseError) as caught:
        await pubacks(client(js)).publish("nostream.anywhere", b"x", None, 10)
    assert isinstance(caught.value, NATS_UNAVAILABLE)


async def test_a_puback_that_never_comes_times_out(js: Any) -> None:
    """Something answers nothing on the subject: the publish gives up after its timeout
    with nats-py's TimeoutError (the worker's "NATS away"), and nothing is left waiting."""
    nc = client(js)
    silent = await nc.subscribe("silent.subject")  # a responder that never replies
    acks = pubacks(nc)
    try:
        with pytest.raises(nats.errors.TimeoutError) as caught:
            await acks.publish("silent.subject", b"x", None, 0.2)
    finally:
        await silent.unsubscribe()
    assert isinstance(caught.value, NATS_UNAVAILABLE)
    assert acks._waiting == {}


async def test_a_fetch_takes_received_messages_without_waiting_for_each(js: Any) -> None:
    """A batch already received is fetched whole and in order, nats-py's per-message wait
    used at most for the first; with nothing stored, the fetch still times out."""
    for i in range(100):
        await js.publish(s.result_subject(f"f-{i}", None), f"{i}".encode())
    psub = await js.pull_subscribe(">", durable="quick", stream=s.RESULTS_STREAM)
    waits = 0
    wait = psub._sub.next_msg

    async def counted(timeout: float | None = 1.0) -> Any:
        nonlocal waits
        waits += 1
        return await wait(timeout)

    psub._sub.next_msg = counted
    quick_next_msg(psub._sub)

    msgs = await psub.fetch(100, timeout=10)
    assert [m.data for m in msgs] == [f"{i}".encode() for i in range(100)]
    assert waits < 10  # nats-py's wait would have been asked for each of the 100
    assert psub._sub.pending_bytes == 0
    for m in msgs:
        await m.ack()

    async def acked() -> bool:
        info = await js.consumer_info(s.RESULTS_STREAM, "quick")
        return int(info.num_ack_pending) == 0

    await wait_until(acked)
    with pytest.raises(nats.errors.TimeoutError):
        await psub.fetch(10, timeout=0.2)


async def test_send_pipelines_publishes_with_backpressure_and_duplicates(js: Any) -> None:
    """``send`` (the producer's batch path): 60 publishes through a window of 8 all
    stored, each future its own PubAck; a msg id sent again is a duplicate of the first."""
    acks = pubacks(client(js))
    acks.limit = 8
    futures = []
    for i in range(60):
        subject = s.result_subject(f"sent-{i}", None)
        futures.append(await acks.send(subject, b"x", {"Nats-Msg-Id": f"sent-{i}"}, 10))
        assert len(acks._waiting) <= 8  # never more awaited than the window
    answers = await asyncio.gather(*futures)
    assert sorted(a.seq for a in answers) == list(range(1, 61))
    assert not any(a.duplicate for a in answers)
    again = await acks.send(s.result_subject("sent-3", None), b"x", {"Nats-Msg-Id": "sent-3"}, 10)
    answer = await again
    assert answer.duplicate and answer.seq == answers[3].seq
    assert acks._waiting == {}


async def test_send_stalls_with_a_timeout_and_forgets_what_was_given_up(js: Any) -> None:
    """PubAcks that never come: once the window is full, ``send`` waits at most its stall
    and raises nats-py's TimeoutError; futures given up on (cancelled) are forgotten."""
    nc = client(js)
    silent = await nc.subscribe("silent.send")
    acks = pubacks(nc)
    acks.limit = 4
    try:
        futures = [await acks.send("silent.send", b"x", None, 0.2) for _ in range(4)]
        with pytest.raises(nats.errors.TimeoutError):
            await acks.send("silent.send", b"x", None, 0.2)
    finally:
        await silent.unsubscribe()
    assert len(acks._waiting) == 4
    for fut in futures:
        fut.cancel()
    acks.forget()
    assert acks._waiting == {}
