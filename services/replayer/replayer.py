"""Move parked jobs back to ``AI_JOBS`` while their provider is half-open or closed.

Slow start: replay begins at ``initial_rate`` jobs/s and multiplies by
``ramp_factor`` every ``ramp_interval_s`` for as long as the breaker stays
half-open or closed (replayed jobs that fail trip it open again, and replay
stops within ``board_poll_s``), up to ``max_rate``. When the ramp reaches its
cap, or the backlog is empty, the replayer closes the breaker: the outage ends.

Order: high before normal before low (one consumer per priority), oldest first
within a priority. A job whose deadline passed while parked ends as an
``expired`` result, never as a late provider call.

Each parked job is republished under a fresh msg id ``<job_id>:r<seq>`` (``seq``
its sequence in AI_PARKED, stable across redeliveries) and acked in AI_PARKED
only after the PubAck: a replayer killed between the two leaves the parked job
to be replayed again, and the dedup window drops the second copy.

One replayer per provider is active among replicas (lease ``replay.<provider>``
in ai_control, which also carries the replay progress for ``status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from schemas.codec import encode
from schemas.parking import DeadLetter, decode_parked
from schemas.results import ErrorInfo, JobResult
from schemas.subjects import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID_HEADER,
    PARKED_STREAM,
    PRIORITIES,
    REPLAY_HEADER,
    WRONG_LAST_SEQUENCE,
    dead_subject,
    job_msg_id,
    parked_filter,
    parked_subject,
    replayer_consumer,
    requeue_subject,
    result_subject,
)
from services.breaker import LeaseKeeper
from services.config import Settings
from services.overflow import dead_letter_bytes, raw_fields
from services.recovery import LeasedPerProvider
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.replayer")


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


class Puller:
    """Fetches batches from one durable pull consumer, collecting them in a callback.

    It stands in for nats-py's ``PullSubscription`` (``fetch``, ``unsubscribe``) with
    the same requests: a ``no_wait`` pull first, then one that waits until ``timeout``.
    nats-py's ``fetch`` waits for each message in a task of its own (two on Python
    3.11) and draws a uuid4 for each: measured, a third of the replayer's time.
    Messages of a pull that arrive after its ``fetch`` gave up are kept for the next.
    """

    def __init__(self, nc: Client, stream: str, consumer: str) -> None:
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
                    raise nats.js.errors.APIError.from_msg(ended)
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


class ProviderReplay:
    """Replay state of one provider: rate, counts, the outage being recovered."""

    def __init__(self, initial_rate: float) -> None:
        self.rate = initial_rate
        self.replayed = 0  # in the current outage
        self.expired = 0
        self.total_replayed = 0
        self.outage_id = ""


class Replayer(LeasedPerProvider):
    """One replay task per configured provider."""

    lease = "replay"
    log = log

    def __init__(self, js: JetStreamContext, settings: Settings, *, owner: str) -> None:
        super().__init__(js, settings, settings.providers, owner=owner)
        self.progress: dict[str, ProviderReplay] = {
            p: ProviderReplay(settings.replay.initial_rate) for p in settings.providers
        }
        # Per provider, a puller per priority: bound once, kept across restarts of _run.
        self._subs: dict[str, dict[str, Puller]] = {
            name: {
                prio: Puller(js._nc, PARKED_STREAM, replayer_consumer(name, prio))
                for prio in PRIORITIES
            }
            for name in settings.providers
        }

    async def _stopped(self) -> None:
        """Unsubscribe: after a leader change a pull subscription can hold status messages
        nobody reads, and a connection drain would wait on them for its timeout.
        Unacked parked jobs stay parked; prefetched ones are handed back."""
        for subs in self._subs.values():
            for sub in subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _run(self, name: str, lease: LeaseKeeper) -> None:
        subs = self._subs[name]
        r = self.settings.replay
        poll = self.settings.breaker.board_poll_s
        prog = self.progress[name]
        tokens = 0.0
        last = time.monotonic()
        ramp_at = last + r.ramp_interval_s
        # One batch waits for its PubAcks (``settling``) while the next is fetched and
        # republished: measured, the replayer otherwise sat idle a third of the time.
        settling: asyncio.Task[int] | None = None
        free: dict[str, int] = {}  # per priority: parked jobs not yet delivered to us
        counted_at = last  # when to count the backlog on the server again

        async def settled() -> int:
            nonlocal settling
            task, settling = settling, None
            done = await task if task is not None else 0
            prog.replayed += done
            prog.total_replayed += done
            return done

        try:
            while True:
                # A wait_for whose result came with the cancellation drops it (3.11):
                # stop() then waited forever (seen when stopping mid-replay).
                raise_if_cancelling()
                state = self.board.state(name)
                now = time.monotonic()
                if not lease.held or state not in ("half_open", "closed"):
                    # Blocked (or not ours): the next recovery starts slow again.
                    prog.rate, tokens, last = r.initial_rate, 0.0, now
                    ramp_at = now + r.ramp_interval_s
                    await settled()
                    await asyncio.sleep(poll)
                    continue
                if prog.outage_id != self.board.outage_id(name):
                    prog.outage_id, prog.replayed = self.board.outage_id(name), 0
                if now >= ramp_at:
                    prog.rate = prog.rate * r.ramp_factor
                    if r.max_rate:
                        prog.rate = min(prog.rate, r.max_rate)
                    ramp_at = now + r.ramp_interval_s
                tokens = min(tokens + prog.rate * (now - last), max(prog.rate * poll, 1.0))
                last = now
                if tokens < 1:
                    await asyncio.sleep(min(poll, (1 - tokens) / prog.rate))
                    continue
                if now >= counted_at or not any(free.values()):
                    # Counted on the server once per poll (new jobs may park meanwhile);
                    # between counts each delivery says how many its consumer has left.
                    await settled()
                    counts = await self._backlog(name)
                    counted_at = now + poll
                    free = dict(counts)
                    if not any(counts.values()):
                        if state == "half_open":
                            await self._close(name, prog, "parked backlog empty")
                        lease.info = self._info(name, prog, 0)
                        await asyncio.sleep(poll)
                        continue
                if state == "half_open" and r.max_rate and prog.rate >= r.max_rate:
                    await settled()
                    await self._close(name, prog, f"replay reached {r.max_rate:g} jobs/s")
                want = min(int(tokens), r.batch_size)
                msgs = await self._fetch(subs, free, want)
                tokens -= len(msgs)
                pending = await self._republish(name, msgs)
                await settled()
                if pending:
                    settling = asyncio.create_task(self._settle(pending))
                lease.info = self._info(name, prog, sum(free.values()) + len(pending))
        finally:
            if settling is not None:
                # Stopped or interrupted: its unacked jobs stay parked and come back after
                # ack_wait (the dedup window drops a second copy of any already republished).
                settling.cancel()

    def _info(self, name: str, prog: ProviderReplay, backlog: int) -> dict[str, Any]:
        return {
            "state": self.board.state(name),
            "rate": round(prog.rate, 1),
            "replayed": prog.replayed,
            "expired": prog.expired,
            "backlog": backlog,
            "outage_id": prog.outage_id,
        }

    async def _backlog(self, name: str) -> dict[str, int]:
        """Parked jobs of ``name`` per priority (including ones being replayed now)."""
        info = await self.js.stream_info(PARKED_STREAM, subjects_filter=parked_filter(name))
        subjects = info.state.subjects or {}
        return {prio: int(subjects.get(parked_subject(name, prio), 0)) for prio in PRIORITIES}

    async def _fetch(self, subs: dict[str, Any], free: dict[str, int], want: int) -> list[Msg]:
        """Up to ``want`` parked jobs, high priority first, oldest first within one;
        ``free`` (jobs per priority not yet delivered) is updated from the deliveries."""
        got: list[Msg] = []
        for prio in PRIORITIES:
            need = want - len(got)
            if need <= 0:
                break
            if free.get(prio, 0) <= 0:
                continue
            try:
                got += await subs[prio].fetch(min(need, free[prio]), timeout=0.5, prefetch=True)
            except nats.errors.TimeoutError:
                free[prio] = 0  # until the next count
                continue
            free[prio] = subs[prio].left
        return got

    async def _republish(self, name: str, msgs: list[Msg]) -> list[tuple[Msg, asyncio.Future[Any]]]:
        """Publish each parked job back to AI_JOBS (expire or dead-letter the ones that
        cannot go); return the jobs and their PubAck futures."""
        pending: list[tuple[Msg, asyncio.Future[Any]]] = []
        now = datetime.now(UTC)
        expired = 0
        for msg in msgs:
            seq, _ = ack_position(msg)
            try:
                parked = decode_parked(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                await self._dead_invalid(name, msg, f"unreadable parked job: {exc}")
                continue
            job = parked.job
            if job.deadline is not None and job.deadline <= now:
                await self._expire(msg, job, parked.park.attempts)
                expired += 1
                continue
            fut = await self.js.publish_async(
                requeue_subject(job.provider, job.priority, job.tenant),
                encode(job),
                headers={MSG_ID_HEADER: f"{job.id}:r{seq}", REPLAY_HEADER: str(seq)},
            )
            pending.append((msg, fut))
        self.progress[name].expired += expired
        return pending

    async def _settle(self, pending: list[tuple[Msg, asyncio.Future[Any]]]) -> int:
        """Ack each republished job after its PubAck (nak it if none came); how many went."""
        if pending:
            # One wait for the whole batch: a wait_for per PubAck costs a loop turn each.
            _, late = await asyncio.wait([fut for _, fut in pending], timeout=10)
            for fut in late:
                fut.cancel()
        done = 0
        for msg, fut in pending:
            failure = TimeoutError("no PubAck within 10s") if fut.cancelled() else fut.exception()
            if failure is not None:
                log.warning("replay publish failed, job stays parked: %s", failure)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1)
                continue
            await msg.ack()
            done += 1
        return done

    async def _expire(self, msg: Msg, job: Any, attempts: int) -> None:
        """End a job whose deadline passed while parked with an ``expired`` result, unless
        it has a result already (a copy of it ran): the write is conditional, as a worker's."""
        result = JobResult(
            job_id=job.id,
            status="expired",
            provider=job.provider,
            model=job.model,
            error=ErrorInfo(type="expired", message="deadline passed while parked"),
            attempts=attempts,
            worker=self.owner,
            tenant=job.tenant or "",
        )
        try:
            await self.js.publish(
                result_subject(job.id, job.tenant),
                encode(result),
                headers={
                    MSG_ID_HEADER: job_msg_id(job.id, job.tenant),
                    EXPECTED_LAST_SUBJECT_SEQ: "0",
                },
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
        await msg.ack()

    async def _dead_invalid(self, name: str, msg: Msg, message: str) -> None:
        seq, _ = ack_position(msg)
        letter = DeadLetter(
            reason="invalid",
            error=ErrorInfo(type="invalid", message=message[:500]),
            subject=msg.subject,
            **raw_fields(msg.data),
        )
        data = await dead_letter_bytes(self.js, letter, msg.data, PARKED_STREAM, seq)
        await self.js.publish(
            dead_subject(name, "invalid"),
            data,
            headers={MSG_ID_HEADER: f"dead:{PARKED_STREAM}:{seq}"},
        )
        await msg.ack()

    async def _close(self, name: str, prog: ProviderReplay, reason: str) -> None:
        backlog = sum((await self._backlog(name)).values())
        await self.board.move(
            name,
            to="closed",
            allowed_from=("half_open",),
            by=self.owner,
            reason=reason,
            parked=prog.replayed + backlog,
            replayed=prog.replayed,
        )
