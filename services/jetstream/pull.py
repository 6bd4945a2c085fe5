"""Pulling from durable pull consumers: the one JetStream idea, in two mechanisms.

The worker pulls with FastStream's batch pull subscriber (``PullSub(batch=True)``): it
is the worker's framework, and its loop (fetch a batch, hand it to the handler, fetch
again when there is room) is all the worker needs. ``guard_fetch`` mends the one way
that loop loses a batch.

The replayer pulls with ``Puller``: it must fetch exactly as many messages as its rate
allows, high priority before normal before low across three consumers, and know how
many each consumer has left; FastStream's loop decides batch sizes itself, and
nats-py's ``fetch`` costs a task and a uuid per message (measured, a third of the
replayer's time). Both speak the same protocol: ``$JS.API.CONSUMER.MSG.NEXT``.

``ack_position`` reads a delivery's stream sequence and the consumer's pending count
from its ack subject, for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from services.jetstream.connection import client
from services.jetstream.errors import APIError


def ack_position(msg: Msg) -> tuple[int, int]:
    """The stream sequence of a delivered JetStream message and how many messages its
    consumer still had undelivered, read from the ack subject. ``msg.metadata`` parses
    every field into dataclasses and a datetime: measured, 6% of the replayer's time."""
    tokens = (msg.reply or "").split(".")
    if tokens[:2] == ["$JS", "ACK"]:
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11:  # $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>...
            return int(tokens[7]), int(tokens[10])
    meta = msg.metadata  # raises NotJSMessageError with nats-py's own message
    return meta.sequence.stream, meta.num_pending


def deliveries(msg: Msg) -> int:
    """How many times a JetStream message has been delivered, this time included (read
    from the ack subject, as ``ack_position``: ``msg.metadata`` costs a worker about 4 µs
    of CPU per job)."""
    tokens = (msg.reply or "").split(".")
    if tokens[:2] == ["$JS", "ACK"]:
        if len(tokens) == 9:
            return int(tokens[4]) or 1
        if len(tokens) >= 11:
            return int(tokens[6]) or 1
    return msg.metadata.num_delivered or 1


class Puller:
    """Fetches batches from one durable pull consumer, collecting them in a callback.

    It stands in for nats-py's ``PullSubscription`` (``fetch``, ``unsubscribe``) with
    the same requests: a ``no_wait`` pull first, then one that waits until ``timeout``.
    nats-py's ``fetch`` waits for each message in a task of its own (two on Python
    3.11) and draws a uuid4 for each: measured, a third of the replayer's time.
    Messages of a pull that arrive after its ``fetch`` gave up are kept for the next.
    """

    def __init__(self, js: JetStreamContext, stream: str, consumer: str) -> None:
        nc = client(js)
        self._nc = nc
        self._subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._got: list[Msg] = []
        self._wanted = 0
        self._expect = 0  # messages the open pull can still deliver; 0: no pull open
        self._last: Msg | None = None  # the last message received
        self._ended: Msg | None = None  # the status that ended the last pull
        self._wake = asyncio.Event()

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(api.Header.STATUS) if msg.headers else None
        if not status:
            self._got.append(msg)
            self._last = msg
            self._expect -= 1
            if len(self._got) >= self._wanted or self._expect <= 0:
                self._wake.set()
        elif status != api.StatusCode.CONTROL_MESSAGE:  # 404 none, 408 expired, 409, ...
            self._ended, self._expect = msg, 0
            self._wake.set()

    async def _wait(self, until: float) -> None:
        """Wait until ``_wanted`` messages are in, the open pull ends, or ``until``."""
        self._wake.clear()
        if len(self._got) >= self._wanted or self._expect <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(until - time.monotonic()):
                await self._wake.wait()

    async def _pull(self, batch: int, expires: float | None) -> None:
        pull: dict[str, Any] = {"batch": batch}
        if expires is None:
            pull["no_wait"] = True
        else:
            pull["expires"] = max(int(expires * 1e9) - 100_000, 1)
        self._expect, self._ended = batch, None
        await self._nc.publish(self._subject, json.dumps(pull).encode(), reply=self._inbox)

    async def fetch(self, batch: int, timeout: float, *, prefetch: bool = False) -> list[Msg]:
        """Up to ``batch`` messages; ``nats.errors.TimeoutError`` if none came in time.

        With ``prefetch``, a full batch is followed at once by a ``no_wait`` pull for
        the next, so its messages arrive while this one is being worked on (the replayer
        otherwise sat idle for each round trip)."""
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        deadline = time.monotonic() + timeout
        self._wanted = batch
        if self._expect > 0:  # a prefetch (or a pull a fetch gave up on) is still open
            await self._wait(deadline)
            if self._expect > 0 and len(self._got) < batch:
                self._expect = 0  # it went quiet: stop waiting for it
        for expires in (None, timeout):
            if self._got:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._pull(batch, None if expires is None else left)
            await self._wait(deadline)
            ended = self._ended
            if ended is not None and not self._got:
                status = ended.headers.get(api.Header.STATUS) if ended.headers else None
                if status not in (
                    api.StatusCode.NO_MESSAGES,
                    api.StatusCode.REQUEST_TIMEOUT,
                    api.StatusCode.CONFLICT,
                ):
                    raise APIError.from_msg(ended)
        if not self._got:
            raise nats.errors.TimeoutError
        msgs, self._got = self._got[:batch], self._got[batch:]
        if prefetch and len(msgs) == batch and self._expect <= 0 and not self._got:
            await self._pull(batch, None)
        return msgs

    @property
    def left(self) -> int:
        """Messages of the consumer not yet returned by ``fetch``: those received and
        kept, and those the server had not delivered when the last one came."""
        pending = ack_position(self._last)[1] if self._last is not None else 0
        return len(self._got) + pending

    async def unsubscribe(self) -> None:
        """Stop receiving, and hand back (nak) what was received and not yet returned,
        so another replica gets it now rather than after ack_wait."""
        if self._sub is not None:
            # A drain, not a plain unsubscribe: messages already in the subscription's
            # queue reach _got first, and are handed back with the rest.
            try:
                await asyncio.wait_for(self._sub.drain(), 1)
            except Exception:  # NATS away or slow: drop the subscription all the same
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
        kept, self._got = self._got, []
        for msg in kept:
            with contextlib.suppress(Exception):
                await msg.nak()


def guard_fetch(subscriber: Any) -> None:
    """Make FastStream's batch loop's fetch raise only the timeout it expects, and take
    the messages already received without a task each (``quick_next_msg``).

    FastStream's batch pull loop collects a batch over several ``fetch`` calls and
    catches ``nats.errors.TimeoutError``; nats-py also raises the builtin
    ``TimeoutError`` when the time left is used up. That one escapes the loop and
    drops the messages collected so far, which then wait out ``ack_wait`` (measured:
    11 of 300 jobs delayed by 30 s at 50 jobs/s). Translating it keeps them.
    """
    pull = subscriber.subscription
    if pull is None or getattr(pull, "_ridethrough_guarded", False):
        return
    quick_next_msg(pull._sub)
    fetch = pull.fetch

    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fetch(*args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    pull.fetch = guarded
    pull._ridethrough_guarded = True


def quick_next_msg(sub: Any) -> None:
    """Let ``sub.next_msg`` (a nats-py subscription without callback, as a pull
    subscription's) return a message already received at once. nats-py's waits for each
    message in two tasks with a timer and draws a uuid4 for it, even when the message is
    in the queue; a fetch asks for it once per message, and a batch arrives in a burst
    (measured with ``ridethrough bench -s worker``: about 10 µs of CPU per job). While
    nothing is queued, nats-py's own ``next_msg`` waits, as before. A nats-py whose
    subscription lacks what this reads keeps its own ``next_msg``."""
    queue = getattr(sub, "_pending_queue", None)
    if queue is None or not all(hasattr(sub, a) for a in ("_pending_size", "_conn")):
        return
    wait = sub.next_msg

    async def next_msg(timeout: float | None = 1.0) -> Msg:
        if queue.empty() or sub._conn.is_closed:
            got: Msg = await wait(timeout)
            return got
        msg: Msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        queue.task_done()
        return msg

    sub.next_msg = next_msg


def guard_fetch_from_start(subscriber: Any) -> None:
    """``guard_fetch`` as soon as FastStream creates the subscription, before its first
    fetch: a fetch at start-up, while the process is busy starting, is the likeliest to
    run out of time, and a batch it dropped was delivered again only after ``ack_wait``
    (measured: a job waiting when a worker started was delivered twice before it ran)."""
    create = subscriber._create_subscription

    async def created() -> None:
        await create()
        # No await between FastStream starting the fetch task and this: it has not run.
        guard_fetch(subscriber)

    subscriber._create_subscription = created
