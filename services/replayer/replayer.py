"""Move parked jobs back to ``AI_JOBS`` while their provider is half-open or closed.

Pace: replay begins at ``initial_rate`` jobs/s and multiplies by ``ramp_factor``
every ``ramp_interval_s`` for as long as the breaker stays half-open or closed
(replayed jobs that fail trip it open again, and replay stops within
``board_poll_s``), up to ``max_rate``. With ``pace = "adaptive"`` (the default) the
jobs waiting for the provider's workers push back: over ``queue_target_s`` seconds of
the pace, nothing more is replayed until they drain, the rate is cut by
``decrease_factor`` and from then on grows by ``increase`` per interval (``adapt``).
When the rate reaches its cap, or the backlog is empty, the replayer closes the
breaker: the outage ends.

Order: high before normal before low (one consumer per priority), oldest first
within a priority. A job whose deadline passed while parked ends as an
``expired`` result, never as a late provider call, and counts in the tally of the outage
it was parked in (``services/breaker/tally.py``; flushed before the replayer closes a
breaker, so the outage's summary finds those counts stored).

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
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.jobs import Job
from schemas.parking import DeadLetter, decode_parked
from schemas.results import ErrorInfo, JobResult
from schemas.subjects import (
    JOBS_STREAM,
    PARKED_STREAM,
    PRIORITIES,
    parked_filter,
    parked_place,
    replay_tag,
    worker_consumer,
)
from services import metrics, tracing
from services.breaker import PAUSED, LeaseKeeper
from services.breaker.recovery import LeasedPerProvider
from services.breaker.tally import Tally
from services.config import ReplaySettings, Settings
from services.jetstream.connection import max_payload
from services.jetstream.errors import NATS_UNAVAILABLE, NOT_FOUND, TIMEOUT, APIError
from services.jetstream.pull import Puller, ack_position
from services.jetstream.topology import replayer_consumer_config
from services.lifecycle.settle import Settler
from services.overflow import raw_fields
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.replayer")


class ProviderReplay:
    """Replay state of one breaker scope: its pace, counts, the outage it recovers from.
    The provider's also paces its models while both are closed."""

    def __init__(self, initial_rate: float, now: float = 0.0, ramp_interval_s: float = 1.0) -> None:
        self.rate = initial_rate
        self.tokens = 0.0
        self.last = now
        self.ramp_at = now + ramp_interval_s
        self.slow_start = True  # until the first pushback (adaptive pace)
        self.pushbacks = 0
        self.replayed = 0  # in the current outage
        self.expired = 0
        self.total_replayed = 0
        self.outage_id = ""

    def advance(
        self, now: float, r: ReplaySettings, poll: float, queued: int | None = None
    ) -> None:
        """Once per ``ramp_interval_s``, set the rate (``pace``; ``queued``: jobs waiting
        for the provider's workers, None when unknown); then add tokens."""
        if now >= self.ramp_at:
            if r.pace == "adaptive":
                self.rate = adapt(self, r, queued)
            else:
                self.rate *= r.ramp_factor
            if r.max_rate:
                self.rate = min(self.rate, r.max_rate)
            self.ramp_at = now + r.ramp_interval_s
        if r.pace == "adaptive" and pushed_back(self.rate, r, queued):
            # The workers hold enough already: nothing more until their queue drains (the
            # rate itself changes once per interval).
            self.tokens = 0.0
        else:
            self.tokens = min(
                self.tokens + self.rate * (now - self.last), max(self.rate * poll, 1.0)
            )
        self.last = now


def pushed_back(rate: float, r: ReplaySettings, queued: int | None) -> bool:
    """Whether the workers' queue says they do not keep up with ``rate``: more jobs wait
    for them than ``queue_target_s`` seconds of it (never fewer than one batch)."""
    return queued is not None and queued > max(rate * r.queue_target_s, r.batch_size)


def adapt(prog: ProviderReplay, r: ReplaySettings, queued: int | None) -> float:
    """The next rate of an adaptive replay: on a pushback, the rate times
    ``decrease_factor`` (never under ``initial_rate``) and the slow start ends; else
    doubling (``ramp_factor``) during the slow start, ``increase`` jobs/s after it."""
    if pushed_back(prog.rate, r, queued):
        prog.slow_start = False
        prog.pushbacks += 1
        return max(r.initial_rate, prog.rate * r.decrease_factor)
    if prog.slow_start:
        return prog.rate * r.ramp_factor
    return prog.rate + r.increase


class WorkerQueue:
    """Jobs waiting for one provider's workers (every priority): not yet delivered, or
    delivered again after a failure (a 429 or an overload brings them back), sampled in the
    background: the adaptive pace's pushback signal. ``queued`` is None while unknown (not
    read yet, or the read failed): no pushback is then assumed, and the slow start's cap
    and the breaker still bound the pace."""

    def __init__(self, js: JetStreamContext, provider: str) -> None:
        self.js = js
        self.provider = provider
        self.queued: int | None = None

    async def read(self) -> int | None:
        """Jobs of the provider waiting for a worker, or for their retry, over its
        priorities."""
        total = 0
        for prio in PRIORITIES:
            try:
                info = await self.js.consumer_info(
                    JOBS_STREAM, worker_consumer(self.provider, prio), timeout=1.0
                )
            except NOT_FOUND:
                continue  # no worker of this priority yet: nothing waits for it
            except _UNREADABLE:
                return None
            # Not yet delivered, and being retried (a 429, an overload, a timeout: those
            # jobs wait again, after their backoff).
            total += int(info.num_pending or 0) + int(info.num_redelivered or 0)
        return total

    async def watch(self, every_s: float) -> None:
        """Keep ``queued`` fresh until cancelled."""
        while True:
            self.queued = await self.read()
            await asyncio.sleep(every_s)


#: Parked jobs of one provider: per (priority, model) their count; model None stands for
#: jobs whose model has no scope of its own.
Backlog = dict[tuple[str, str | None], int]


class Replayer(LeasedPerProvider):
    """One replay task per configured provider, for all its models."""

    lease = "replay"
    log = log

    def __init__(self, js: JetStreamContext, settings: Settings, *, owner: str) -> None:
        super().__init__(js, settings, settings.providers, owner=owner)
        #: Per provider, per scope (None: the provider itself; else a model).
        self.progress: dict[str, dict[str | None, ProviderReplay]] = {
            p: {} for p in settings.providers
        }
        self.settler = Settler(js, max_payload=max_payload(js), worker_id=owner)
        #: Parked jobs expired, per outage they were parked in.
        self.tally = Tally(js, by=owner)
        self._legacy: dict[str, int] = {}  # per provider: jobs under the legacy layout
        # Per provider, a puller per (priority, model): made when the model has parked jobs,
        # kept across restarts of _run.
        self._subs: dict[str, dict[tuple[str, str | None], Puller]] = {
            name: {} for name in settings.providers
        }

    async def start(self) -> Replayer:
        """Start the board, the leases, one task per provider, and the tally's flushes."""
        self.tally.start()
        await super().start()
        return self

    async def _stopped(self) -> None:
        """Unsubscribe: after a leader change a pull subscription can hold status messages
        nobody reads, and a connection drain would wait on them for its timeout.
        Unacked parked jobs stay parked; prefetched ones are handed back. The tally's
        last counts are published."""
        await self.tally.stop()
        for subs in self._subs.values():
            for sub in subs.values():
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    def _prog(self, name: str, model: str | None, now: float) -> ProviderReplay:
        """The replay state of a scope, made afresh if it had none: a slow start while it
        is half-open, or always with the adaptive pace; at the cap once it is closed (the
        outage is over) with the ramp."""
        r = self.settings.replay
        progs = self.progress[name]
        prog = progs.get(model)
        if prog is None:
            # Adaptive, every scope starts slow and finds its pace; ramp, a closed one
            # (the outage is over) replays at the cap.
            closed = self.board.state(name, model) == "closed" and r.pace == "ramp"
            rate = r.max_rate if closed and r.max_rate else r.initial_rate
            prog = progs[model] = ProviderReplay(rate, now, r.ramp_interval_s)
        outage = self.board.own_outage_id(name, model)
        if prog.outage_id != outage:
            prog.outage_id, prog.replayed = outage, 0
        return prog

    def _pacing(self, name: str, backlog: Backlog) -> dict[str | None, list[str | None]]:
        """Which scope paces the replay of which models' parked jobs (None: the provider).

        Nothing replays while the provider is open or paused, nor a model that is. The
        provider paces every model while it is half-open (its recovery is being tested)
        and every closed model; a half-open model paces its own jobs."""
        out: dict[str | None, list[str | None]] = {}
        if self.board.own_state(name) in _HOLDING:
            return out
        provider_half_open = self.board.own_state(name) == "half_open"
        for model in sorted({m for (_, m), n in backlog.items() if n > 0}, key=str):
            own = self.board.own_state(name, model) if model is not None else "closed"
            if own in _HOLDING:
                continue
            pacer = None if provider_half_open or own == "closed" else model
            out.setdefault(pacer, []).append(model)
        return out

    async def _run(self, name: str, lease: LeaseKeeper) -> None:
        r = self.settings.replay
        poll = self.settings.breaker.board_poll_s
        progs = self.progress[name]
        # One batch waits for its PubAcks (``settling``) while the next is fetched and
        # republished: measured, the replayer otherwise sat idle a third of the time.
        settling: asyncio.Task[Counter[str | None]] | None = None
        backlog: Backlog = {}  # counted on the server
        free: Backlog = {}  # parked jobs not yet delivered to us, per (priority, model)
        counted_at = time.monotonic()  # when to count the backlog on the server again
        # The adaptive pace's signal: jobs waiting for the provider's workers.
        queue = WorkerQueue(self.js, name) if r.pace == "adaptive" else None
        every = max(0.05, min(poll, r.ramp_interval_s / 4))
        watching = asyncio.create_task(queue.watch(every)) if queue is not None else None

        async def settled() -> None:
            nonlocal settling
            task, settling = settling, None
            done = await task if task is not None else Counter()
            for scope, n in done.items():
                if scope in progs:
                    progs[scope].replayed += n
                    progs[scope].total_replayed += n
                if (m := metrics.active) is not None:
                    m.replayed.labels(name, m.model(scope)).inc(n)

        try:
            while True:
                # A wait_for whose result came with the cancellation drops it (3.11):
                # stop() then waited forever (seen when stopping mid-replay).
                raise_if_cancelling()
                now = time.monotonic()
                if not lease.held or self.board.own_state(name) in _HOLDING:
                    # Blocked (or not ours): the next recovery starts slow again.
                    progs.clear()
                    await settled()
                    await asyncio.sleep(poll)
                    continue
                if now >= counted_at or not any(free.values()):
                    # Counted on the server once per poll (new jobs may park meanwhile);
                    # between counts each delivery says how many its consumer has left.
                    await settled()
                    backlog = await self._backlog(name)
                    counted_at = now + poll
                    free = dict(backlog)
                await self._close_idle(name, backlog)
                pacing = self._pacing(name, backlog)
                for scope in set(progs) - set(pacing):
                    del progs[scope]  # blocked again, or done: it starts afresh next time
                if not pacing:
                    lease.info = self._info(name, backlog)
                    await asyncio.sleep(poll)
                    continue
                pending: list[tuple[Msg, asyncio.Future[Any], str | None]] = []
                wait = poll
                for scope, models in pacing.items():
                    prog = self._prog(name, scope, now)
                    prog.advance(now, r, poll, queue.queued if queue is not None else None)
                    if self._half_open(name, scope) and r.max_rate and prog.rate >= r.max_rate:
                        await settled()
                        await self._close(name, scope, f"replay reached {r.max_rate:g} jobs/s")
                    if prog.tokens < 1:
                        wait = min(wait, (1 - prog.tokens) / prog.rate)
                        continue
                    want = min(int(prog.tokens), r.batch_size)
                    msgs = await self._fetch(name, models, free, want)
                    prog.tokens -= len(msgs)
                    pending += [(m, f, scope) for m, f in await self._republish(name, msgs)]
                    if msgs:  # nothing fetched: wait, or the loop spins until the next count
                        wait = 0.0
                await settled()
                if pending:
                    settling = asyncio.create_task(self._ack_republished(pending))
                lease.info = self._info(name, free, len(pending))
                if wait > 0:
                    await asyncio.sleep(min(poll, wait))
        finally:
            if watching is not None:
                watching.cancel()
            if settling is not None:
                # Stopped or interrupted: its unacked jobs stay parked and come back after
                # ack_wait (the dedup window drops a second copy of any already republished).
                settling.cancel()

    def _half_open(self, name: str, scope: str | None) -> bool:
        return self.board.own_state(name, scope) == "half_open"

    async def _close_idle(self, name: str, backlog: Backlog) -> None:
        """Close each half-open scope with nothing of its own left to replay: the provider
        when no model it may replay has parked jobs, a model when it has none."""
        waiting = {m for (_, m), n in backlog.items() if n > 0}
        if self._half_open(name, None):
            replayable = {
                m for m in waiting if m is None or self.board.own_state(name, m) not in _HOLDING
            }
            if not replayable:
                await self._close(name, None, "parked backlog empty")
        for model in self.board.models(name):
            if model not in waiting and self._half_open(name, model):
                await self._close(name, model, "parked backlog empty")

    def _info(self, name: str, backlog: Backlog, extra: int = 0) -> dict[str, Any]:
        """The replay progress ``status`` shows: the provider's, and its models'."""
        progs = self.progress[name]
        prov = progs.get(None)
        models: dict[str, Any] = {}
        named = {m for (_, m) in backlog if m is not None}
        named |= {m for m in progs if m is not None}
        for model in sorted(named):
            prog = progs.get(model)
            models[model] = {
                "state": self.board.own_state(name, model),
                "rate": round(prog.rate, 1) if prog else None,
                "pushbacks": prog.pushbacks if prog else 0,
                "replayed": prog.replayed if prog else 0,
                "backlog": sum(n for (_, m), n in backlog.items() if m == model),
            }
        info: dict[str, Any] = {
            "state": self.board.state(name),
            "rate": round(prov.rate, 1) if prov else self.settings.replay.initial_rate,
            "pace": self.settings.replay.pace,
            "pushbacks": sum(p.pushbacks for p in progs.values()),
            "replayed": sum(p.replayed for p in progs.values()),
            "expired": sum(p.expired for p in progs.values()),
            "backlog": sum(backlog.values()) + extra,
            "outage_id": self.board.own_outage_id(name),
            "models": models,
        }
        if (metric := metrics.active) is not None:
            metric.replay_progress(name, info)
        return info

    async def _backlog(self, name: str) -> Backlog:
        """Parked jobs of ``name`` per (priority, model), including ones being replayed now.
        Jobs parked where it does not read (the legacy layout, parked by a worker of the
        last release after the upgrade's ``ridethrough topology``, or under a token no model
        has) are not replayed here: a warning asks for ``ridethrough topology`` again, which
        moves them (the replayer may not delete)."""
        info = await self.js.stream_info(PARKED_STREAM, subjects_filter=parked_filter(name))
        out: Backlog = {}
        misplaced = 0
        for subject, n in (info.state.subjects or {}).items():
            place = parked_place(subject)
            if place is None or place.legacy:
                misplaced += int(n)
                continue
            out[place.priority, place.model] = int(n)
        if misplaced != self._legacy.get(name, 0):
            self._legacy[name] = misplaced
            if misplaced:
                log.warning(
                    "%d jobs of %s are parked where the replayer does not read them (the "
                    "legacy layout, or a token no model has): run `ridethrough topology` to "
                    "move them (they wait until then)",
                    misplaced,
                    name,
                )
        return out

    async def _puller(self, name: str, prio: str, model: str | None) -> Puller:
        """The puller of one priority of one model's parked jobs (its consumer made first)."""
        subs = self._subs[name]
        sub = subs.get((prio, model))
        if sub is None:
            cfg = replayer_consumer_config(self.settings, name, prio, model)
            await self.js.add_consumer(PARKED_STREAM, cfg)  # create-or-update: idempotent
            assert cfg.durable_name is not None
            sub = subs[prio, model] = Puller(self.js, PARKED_STREAM, cfg.durable_name)
        return sub

    async def _fetch(
        self, name: str, models: list[str | None], free: Backlog, want: int
    ) -> list[Msg]:
        """Up to ``want`` parked jobs of ``models``, high priority before normal before low,
        oldest first within one model; ``free`` (jobs not yet delivered) is updated from
        the deliveries."""
        got: list[Msg] = []
        for prio in PRIORITIES:
            for model in models:
                need = want - len(got)
                if need <= 0:
                    return got
                if free.get((prio, model), 0) <= 0:
                    continue
                try:
                    sub = await self._puller(name, prio, model)
                except Exception as exc:
                    # This model's consumer cannot be made now (a limit, a leader election):
                    # the other models go on; it is tried again at the next count.
                    log.warning("no replay consumer for %s/%s %s: %r", name, model, prio, exc)
                    free[prio, model] = 0
                    continue
                try:
                    got += await sub.fetch(min(need, free[prio, model]), timeout=0.5, prefetch=True)
                except TIMEOUT:
                    free[prio, model] = 0  # until the next count
                    continue
                except Exception:
                    # Its consumer may be gone (unused past inactive_threshold): make it
                    # again next time rather than pull from nothing for ever.
                    del self._subs[name][prio, model]
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    raise
                free[prio, model] = sub.left
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
                if parked.park.reason == "provider_open":  # a pause is no outage
                    self.tally.expired(job.provider, parked.park.outage_id)
                continue
            tag = replay_tag(seq)
            if (t := tracing.active) is None:
                fut = await self.settler.republish_async(job, replay=tag)
            else:
                with t.replay(job, tag):
                    fut = await self.settler.republish_async(job, replay=tag)
            pending.append((msg, fut))
        if expired:
            self._prog(name, None, time.monotonic()).expired += expired
        return pending

    async def _ack_republished(
        self, pending: list[tuple[Msg, asyncio.Future[Any], str | None]]
    ) -> Counter[str | None]:
        """Ack each republished job after its PubAck (nak it if none came); how many went,
        per scope that paced them."""
        if pending:
            # One wait for the whole batch: a wait_for per PubAck costs a loop turn each.
            _, late = await asyncio.wait([fut for _, fut, _ in pending], timeout=10)
            for fut in late:
                fut.cancel()
        done: Counter[str | None] = Counter()
        for msg, fut, scope in pending:
            failure = TimeoutError("no PubAck within 10s") if fut.cancelled() else fut.exception()
            if failure is not None:
                log.warning("replay publish failed, job stays parked: %s", failure)
                with contextlib.suppress(Exception):
                    await msg.nak(delay=1)
                continue
            await msg.ack()
            done[scope] += 1
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
        await self.settler.release_body(job)  # the job has ended: its body goes (if large)
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

    async def _close(self, name: str, model: str | None, reason: str) -> None:
        """End the outage of a half-open scope (the event counts its jobs)."""
        backlog = await self._backlog(name)
        left = sum(n for (_, m), n in backlog.items() if model is None or m == model)
        prog = self.progress[name].get(model)
        replayed = prog.replayed if prog else 0
        try:  # the outage's expired jobs stored before its end (the summary reads them)
            await self.tally.flush()
        except Exception as exc:
            log.info("tally not published before the close (%r): flushed later", exc)
        await self.board.move(
            name,
            model,
            to="closed",
            allowed_from=("half_open",),
            by=self.owner,
            reason=reason,
            parked=replayed + left,
            replayed=replayed,
        )


_HOLDING = ("open", PAUSED)
#: A read of the workers' queue that failed: NATS away, no answer (a refused request gets
#: none), or a JetStream API error.
_UNREADABLE: tuple[type[BaseException], ...] = (*TIMEOUT, *NATS_UNAVAILABLE, APIError)
