"""Move parked jobs back to ``AI_JOBS`` while their provider is half-open or closed.

Slow start: replay begins at ``initial_rate`` jobs/s and multiplies by
``ramp_factor`` every ``ramp_interval_s`` for as long as the breaker stays
half-open or closed (replayed jobs that fail trip it open again, and replay
stops within ``board_poll_s``), up to ``max_rate``. When the ramp reaches its
cap, or the backlog is empty, the replayer closes the breaker: the outage ends.

Order: high before normal before low (one consumer per priority), oldest first
within a priority. A job whose deadline passed while parked ends as an
``expired`` result, never as a late provider call.

Each parked job is republished by ``services.lifecycle.settle`` (a replay: its msg id
and REPLAY_HEADER come from its sequence in AI_PARKED, stable across redeliveries)
and acked in AI_PARKED only after the PubAck: a replayer killed between the two leaves
the parked job to be replayed again, and the dedup window drops the second copy.

One replayer per provider is active among replicas (lease ``replay.<provider>``
in ai_control, which also carries the replay progress for ``status``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.jobs import Job
from schemas.parking import DeadLetter, decode_parked
from schemas.results import ErrorInfo, JobResult
from schemas.subjects import (
    PARKED_STREAM,
    PRIORITIES,
    parked_filter,
    parked_subject,
    replay_tag,
    replayer_consumer,
)
from services.breaker import LeaseKeeper
from services.breaker.recovery import LeasedPerProvider
from services.config import Settings
from services.jetstream.connection import max_payload
from services.jetstream.errors import TIMEOUT
from services.jetstream.pull import Puller, ack_position
from services.lifecycle.settle import Settler
from services.overflow import raw_fields
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.replayer")


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
        self.settler = Settler(js, max_payload=max_payload(js), worker_id=owner)
        # Per provider, a puller per priority: bound once, kept across restarts of _run.
        self._subs: dict[str, dict[str, Puller]] = {
            name: {
                prio: Puller(js, PARKED_STREAM, replayer_consumer(name, prio))
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
                    settling = asyncio.create_task(self._ack_republished(pending))
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
            except TIMEOUT:
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
            fut = await self.settler.republish_async(job, replay=replay_tag(seq))
            pending.append((msg, fut))
        self.progress[name].expired += expired
        return pending

    async def _ack_republished(self, pending: list[tuple[Msg, asyncio.Future[Any]]]) -> int:
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

    async def _expire(self, msg: Msg, job: Job, attempts: int) -> None:
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
        await self.settler.store_result(result)
        await msg.ack()

    async def _dead_invalid(self, name: str, msg: Msg, message: str) -> None:
        seq, _ = ack_position(msg)
        letter = DeadLetter(
            reason="invalid",
            error=ErrorInfo(type="invalid", message=message[:500]),
            subject=msg.subject,
            **raw_fields(msg.data),
        )
        await self.settler.dead_letter(
            letter, provider=name, original=msg.data, stream=PARKED_STREAM, seq=seq
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
