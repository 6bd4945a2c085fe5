"""Publishing to a stream and awaiting the PubAck, many at once on one connection.

``js.publish`` is a request per message: a fresh inbox token (NUID plus random bytes
read from the OS), a future, and ``asyncio.wait_for`` (a second future and a timer
callback) around it, then ``json.loads`` and a dataclass for the answer. A worker
settles hundreds of jobs at once, each waiting for its own PubAck, so here every
publish of a connection shares one inbox subscription: a counter names each publish,
one timer bounds its wait, and msgspec reads the answer.

What a caller sees is what ``js.publish`` gives: the PubAck's sequence, nats-py's
``APIError`` (its subclasses by code) when the stream refuses the message, its
``NoStreamResponseError`` when no stream listens, its ``TimeoutError`` when no answer
came in time (a PubAck that never arrives never holds a job forever), and the
connection's own errors from the publish.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

#: The status header of a "no responders" answer (no stream listens on the subject).
_STATUS = "Status"
_NO_RESPONDERS = "503"


class _Answer(msgspec.Struct):
    """A PubAck (``seq``; ``duplicate`` when the stream had the msg id already), or the
    stream's refusal (``error``)."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_answer = msgspec.json.Decoder(_Answer)


class PubAcks:
    """The PubAcks of one connection's publishes, awaited through one subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Any = None
        self._starting: asyncio.Lock | None = None
        self._waiting: dict[str, asyncio.Future[_Answer]] = {}
        self._count = itertools.count()
        #: Most PubAcks ``send`` lets be awaited at once.
        self.limit = 4000

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None, timeout: float
    ) -> int:
        """Publish ``data`` on ``subject`` and wait for its PubAck; its sequence."""
        token, ack = await self._emit(subject, data, headers)
        timer = asyncio.get_running_loop().call_later(timeout, _expire, ack)
        try:
            return (await ack).seq
        finally:
            timer.cancel()
            self._waiting.pop(token, None)

    async def send(
        self, subject: str, data: bytes, headers: dict[str, str] | None, stall_s: float
    ) -> asyncio.Future[_Answer]:
        """Publish ``data`` on ``subject``; a future of its PubAck (``seq``,
        ``duplicate``), or of the error ``publish`` would raise. No timer: the caller
        bounds its wait, and ``forget``s the futures it gave up on (cancelled). While
        ``limit`` PubAcks are awaited, waits until half of them came (backpressure), at
        most ``stall_s`` (then nats-py's ``TimeoutError``)."""
        if len(self._waiting) >= self.limit:
            try:
                await asyncio.wait_for(self._below_half(), stall_s)
            except TimeoutError:
                raise nats.errors.TimeoutError() from None
        _, ack = await self._emit(subject, data, headers)
        return ack

    async def _emit(
        self, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> tuple[str, asyncio.Future[_Answer]]:
        """Publish with a reply token of the shared inbox; the token and its future (not
        awaited while the publish raises)."""
        if self._sub is None:
            await self._start()
        token = str(next(self._count))
        ack: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._waiting[token] = ack
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._waiting.pop(token, None)
            raise
        return token, ack

    def forget(self) -> None:
        """Drop the futures given up on (done without an answer: cancelled, timed out)."""
        for token in [k for k, f in self._waiting.items() if f.done()]:
            del self._waiting[token]

    async def _below_half(self) -> None:
        while len(self._waiting) > self.limit // 2:
            pending = [f for f in self._waiting.values() if not f.done()]
            if not pending:
                self.forget()
                return
            await asyncio.wait(pending[: len(pending) - self.limit // 2 + 1])
            self.forget()

    async def _start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._sub is None:
                prefix = self._nc.new_inbox() + "."
                self._sub = await self._nc.subscribe(prefix + "*", cb=self._answered)
                self._prefix = prefix

    async def _answered(self, msg: Msg) -> None:
        ack = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if ack is None or ack.done():  # too late: it timed out
            return
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            ack.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            answer = _answer.decode(msg.data)
            if answer.error is not None:
                nats.js.errors.APIError.from_error(answer.error)  # raises its class
        except Exception as exc:
            ack.set_exception(exc)
            return
        ack.set_result(answer)


def _expire(ack: asyncio.Future[_Answer]) -> None:
    if not ack.done():
        ack.set_exception(nats.errors.TimeoutError())


_per_connection: weakref.WeakKeyDictionary[Client, PubAcks] = weakref.WeakKeyDictionary()


def pubacks(nc: Client) -> PubAcks:
    """The ``PubAcks`` of connection ``nc`` (one subscription per connection)."""
    found = _per_connection.get(nc)
    if found is None:
        found = _per_connection[nc] = PubAcks(nc)
    return found
