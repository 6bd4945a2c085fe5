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
import logging
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.jobs import encode
from schemas.parking import DeadLetter, decode_parked
from schemas.results import ErrorInfo, JobResult
from schemas.subjects import (
    CONTROL_BUCKET,
    MSG_ID_HEADER,
    PARKED_STREAM,
    PRIORITIES,
    REPLAY_HEADER,
    dead_subject,
    jobs_subject,
    parked_filter,
    replayer_consumer,
    result_subject,
)
from services.breaker import HealthBoard, LeaseKeeper, transition
from services.config import Settings

log = logging.getLogger("ridethrough.replayer")


class ProviderReplay:
    """Replay state of one provider: rate, counts, the outage being recovered."""

    def __init__(self, initial_rate: float) -> None:
        self.rate = initial_rate
        self.replayed = 0  # in the current outage
        self.expired = 0
        self.total_replayed = 0
        self.outage_id = ""


class Replayer:
    """One replay task per configured provider."""

    def __init__(self, js: JetStreamContext, settings: Settings, *, owner: str) -> None:
        self.js = js
        self.settings = settings
        self.owner = owner
        self.board = HealthBoard(js, settings.providers, settings.breaker)
        self.progress: dict[str, ProviderReplay] = {
            p: ProviderReplay(settings.replay.initial_rate) for p in settings.providers
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._leases: list[LeaseKeeper] = []

    async def start(self) -> Replayer:
        """Start the board, the leases and one replay task per provider."""
        await self.board.start()
        control = await self.js.key_value(CONTROL_BUCKET)
        for name in sorted(self.settings.providers):
            lease = LeaseKeeper(control, f"replay.{name}", self.owner, self.settings.replay.lease_s)
            self._leases.append(lease.start())
            self._tasks.append(asyncio.create_task(self._run(name, lease)))
        return self

    async def stop(self) -> None:
        """Stop replaying (unacked parked jobs stay parked) and give the leases up."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for lease in self._leases:
            await lease.stop()
        await self.board.stop()

    async def _run(self, name: str, lease: LeaseKeeper) -> None:
        r = self.settings.replay
        poll = self.settings.breaker.board_poll_s
        prog = self.progress[name]
        subs = {
            prio: await self.js.pull_subscribe_bind(
                durable=replayer_consumer(name, prio), stream=PARKED_STREAM
            )
            for prio in PRIORITIES
        }
        tokens = 0.0
        last = time.monotonic()
        ramp_at = last + r.ramp_interval_s
        while True:
            state = self.board.state(name)
            now = time.monotonic()
            if not lease.held or state not in ("half_open", "closed"):
                # Blocked (or not ours): the next recovery starts slow again.
                prog.rate, tokens, last = r.initial_rate, 0.0, now
                ramp_at = now + r.ramp_interval_s
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
            counts = await self._backlog(name)
            if not any(counts.values()):
                if state == "half_open":
                    await self._close(name, prog, "parked backlog empty")
                lease.info = self._info(name, prog, 0)
                await asyncio.sleep(poll)
                continue
            if state == "half_open" and r.max_rate and prog.rate >= r.max_rate:
                await self._close(name, prog, f"replay reached {r.max_rate:g} jobs/s")
            want = min(int(tokens), r.batch_size)
            msgs = await self._fetch(subs, counts, want)
            tokens -= len(msgs)
            done = await self._replay(name, msgs)
            prog.replayed += done
            prog.total_replayed += done
            lease.info = self._info(name, prog, sum(counts.values()) - done)

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
        return {prio: int(subjects.get(f"ai.parked.{name}.{prio}", 0)) for prio in PRIORITIES}

    async def _fetch(self, subs: dict[str, Any], counts: dict[str, int], want: int) -> list[Msg]:
        """Up to ``want`` parked jobs, high priority first, oldest first within one."""
        got: list[Msg] = []
        for prio in PRIORITIES:
            need = want - len(got)
            if need <= 0:
                break
            if not counts.get(prio):
                continue
            with contextlib.suppress(nats.errors.TimeoutError):
                got += await subs[prio].fetch(min(need, counts[prio]), timeout=0.5)
        return got

    async def _replay(self, name: str, msgs: list[Msg]) -> int:
        """Republish (or expire) each parked job; ack each only after its PubAck."""
        pending: list[tuple[Msg, asyncio.Future[Any]]] = []
        now = datetime.now(UTC)
        expired = 0
        for msg in msgs:
            seq = msg.metadata.sequence.stream
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
                jobs_subject(job.provider, job.priority),
                encode(job),
                headers={MSG_ID_HEADER: f"{job.id}:r{seq}", REPLAY_HEADER: str(seq)},
            )
            pending.append((msg, fut))
        self.progress[name].expired += expired
        done = 0
        for msg, fut in pending:
            try:
                await asyncio.wait_for(fut, 10)
            except Exception as exc:
                log.warning("replay publish failed, job stays parked: %s", exc)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1)
                continue
            await msg.ack()
            done += 1
        return done

    async def _expire(self, msg: Msg, job: Any, attempts: int) -> None:
        result = JobResult(
            job_id=job.id,
            status="expired",
            provider=job.provider,
            model=job.model,
            error=ErrorInfo(type="expired", message="deadline passed while parked"),
            attempts=attempts,
            worker=self.owner,
        )
        await self.js.publish(
            result_subject(job.id), encode(result), headers={MSG_ID_HEADER: job.id}
        )
        await msg.ack()

    async def _dead_invalid(self, name: str, msg: Msg, message: str) -> None:
        letter = DeadLetter(
            reason="invalid",
            error=ErrorInfo(type="invalid", message=message),
            raw=msg.data.decode("utf-8", errors="replace"),
            subject=msg.subject,
        )
        seq = msg.metadata.sequence.stream
        await self.js.publish(
            dead_subject(name, "invalid"),
            encode(letter),
            headers={MSG_ID_HEADER: f"dead:{PARKED_STREAM}:{seq}"},
        )
        await msg.ack()

    async def _close(self, name: str, prog: ProviderReplay, reason: str) -> None:
        assert self.board.health_kv is not None
        backlog = sum((await self._backlog(name)).values())
        new = await transition(
            self.js,
            self.board.health_kv,
            name,
            to="closed",
            allowed_from=("half_open",),
            by=self.owner,
            reason=reason,
            parked=prog.replayed + backlog,
            replayed=prog.replayed,
        )
        if new is not None:
            self.board.note(name, new)
