"""Settling: the one writer of a job's terminal and holding places.

Every record that ends or holds a job is written here and nowhere else:

    store_result   AI_RESULTS  the job's one result (a conditional write: never a second)
    dead_letter    AI_DEAD     a job, or a message that is not one, with its reason
    park           AI_PARKED   a job waiting for its provider to recover
    republish      AI_JOBS     a replay (parked or dead → jobs) or a fail-over copy

and, for a parked job or a job's dead letter, where it was put (``ai_locator``, after the
PubAck and before the ack: ``services/lifecycle/locator.py``),

with the msg ids of ``schemas.subjects`` (so a write a crash repeats is dropped by the
stream's dedup window) and every record checked against the server's ``max_payload``
(``services.overflow``). The worker, the replayer, the operator's moves and ``import``
call these; ``Settler.settle`` performs a worker's ``decide()`` outcome for one delivered
message and then acks or naks it ("then ack" means after the PubAck, never before):

    Duplicate   ack                          Retry      nak with its delay
    Succeeded   result, then ack; a reply too large to store is kept aside in
                ai_overflow and the job ends dead ``response_too_large``; while NATS
                is away the answer is retried in place (``store_retry_s``), never
                released: a released job would pay for a second call
    Expired     ``expired`` result, ack      Park       parked copy, ack (too large to
    FailOver    copy on the fallback, ack               park: dead ``too_large``)
    Dead        dead letter (+ ``failed`` result when answered), ack

A large job's body (``services/bodies.py``) is deleted once the job has its result
(Succeeded, Expired, Duplicate), after the result and before the ack; a parked job and
a dead letter keep it. A delete that fails is logged and counted (``bodies_left``): the
bucket's max age removes the body, and the result is never held back for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.codec import encode
from schemas.jobs import Job
from schemas.parking import DeadLetter, ParkedJob, ParkRecord
from schemas.results import ErrorInfo, JobResult, ServedBy, Status, Timings, decode_result
from schemas.subjects import (
    DEAD_STREAM,
    MSG_ID_HEADER,
    PARKED_STREAM,
    REPLAY_HEADER,
    RESULTS_STREAM,
    dead_msg_id,
    dead_subject,
    failover_msg_id,
    is_token,
    park_msg_id,
    parked_subject,
    replaces_failed,
    replay_msg_id,
    requeue_subject,
    result_msg_id,
    result_subject,
)
from services import metrics, tracing
from services.bodies import drop_body
from services.jetstream.errors import NATS_UNAVAILABLE
from services.jetstream.streams import last_msg, publish, publish_if_last
from services.lifecycle import locator
from services.lifecycle.decide import (
    Dead,
    Duplicate,
    Expired,
    FailOver,
    Outcome,
    Park,
    Retry,
    Succeeded,
)
from services.overflow import fits, put_aside, raw_fields
from services.providers.doors import dropped_note

log = logging.getLogger("ridethrough.settle")


@dataclass(slots=True)
class Stats:
    """What one process settled (exposed for logs, status and benchmarks)."""

    dead: int = 0
    duplicates_skipped: int = 0
    expired: int = 0
    failed: int = 0
    failed_over: int = 0
    internal_errors: int = 0
    nats_errors: int = 0
    parked: int = 0
    retried: int = 0
    succeeded: int = 0
    bodies_deleted: int = 0
    bodies_left: int = 0  # large jobs' bodies a delete failed for (the bucket's max age takes them)

    def as_dict(self) -> dict[str, int]:
        """A snapshot."""
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Delivery:
    """One delivered message of AI_JOBS, as the worker read it."""

    msg: Msg
    attempts: int
    #: The provider token of its subject (where a dead letter of it is filed).
    provider: str
    #: The job, once decoded (None: the message is not a job we can read).
    job: Job | None = None
    #: The replay tag, when ridethrough itself republished it (REPLAY_HEADER).
    replay: str | None = None
    started: float = 0.0  # when the call started (0: no call)
    provider_s: float = 0.0  # how long the call took

    @property
    def stream(self) -> str:
        return str(self.msg.metadata.stream)

    @property
    def seq(self) -> int:
        return int(self.msg.metadata.sequence.stream)


class Settler:
    """Writes every record of a job's lifecycle (see the module's table)."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_payload: int = 0,
        publish_timeout_s: float = 10.0,
        store_retry_s: float = 120.0,
        worker_id: str = "",
        stats: Stats | None = None,
        kinds: dict[str, str] | None = None,
    ) -> None:
        self.js = js
        #: The kind of each provider, named in a result's ``served_by``.
        self.kinds = kinds or {}
        #: The server's max_payload (0: unknown); every record is checked against it.
        self.max_payload = max_payload
        self.publish_timeout_s = publish_timeout_s
        #: How long an answer the provider gave is retried in place while NATS is away.
        self.store_retry_s = store_retry_s
        self.worker_id = worker_id
        self.stats = stats or Stats()

    # -- the writers ---------------------------------------------------------------------

    async def has_result(self, job: Job, *, replayed: bool) -> bool:
        """Whether the job already has its result. A replayed job (say, from the dead
        letters after a key rotation) may replace a ``failed`` result, nothing else."""
        found = await last_msg(self.js, RESULTS_STREAM, result_subject(job.id, job.tenant))
        if found is None:
            return False
        return not replayed or decode_result(found[1]).status != "failed"

    async def store_result(
        self,
        result: JobResult,
        *,
        replay: str | None = None,
        data: bytes | None = None,
        dedup: bool = True,
    ) -> bool:
        """Store a job's one result; False if it had one (this one is dropped).

        The write is conditional on the subject's last sequence, so when two copies of a
        job race (one parked and replayed, one redelivered), the second result is refused
        by the server rather than stored. A job replayed from the dead letters may replace
        its ``failed`` result. The msg id is scoped by tenant like the job's (two tenants'
        jobs may share an id, and AI_RESULTS has one dedup window for all); ``dedup=False``
        (an import) sends none.
        """
        tenant = result.tenant or None  # the job's: results are scoped as their jobs
        subject = result_subject(result.job_id, tenant)
        expect = 0
        if replay and replaces_failed(replay):
            found = await last_msg(self.js, RESULTS_STREAM, subject)
            expect = found[0] if found is not None else 0
        stored = await publish_if_last(
            self.js,
            subject,
            data if data is not None else encode(result),
            expect,
            msg_id=result_msg_id(result.job_id, tenant, replay) if dedup else None,
            timeout=self.publish_timeout_s,
        )
        if stored and (m := metrics.active) is not None:
            m.result_stored(result)
        if (t := tracing.active) is not None:
            t.event("result", {"ridethrough.status": result.status, "ridethrough.stored": stored})
        if not stored:
            self.stats.duplicates_skipped += 1
            log.info(
                "job %s already has a result; this copy's %s is dropped",
                result.job_id,
                result.status,
            )
        return stored

    async def release_body(self, job: Job) -> None:
        """Delete the body of a large job that has its result (never of a parked one, nor
        of a dead letter's). A failure is logged and counted, never raised: the result is
        stored, and the bucket's max age removes what is left."""
        ref = job.request_ref
        if ref is None:
            return
        try:
            await asyncio.wait_for(drop_body(self.js, ref.name), self.publish_timeout_s)
        except Exception as exc:
            self.stats.bodies_left += 1
            log.warning(
                "job %s: its body %s was not deleted (%s); the bucket's max age removes it",
                job.id,
                ref.name,
                type(exc).__name__,
            )
            return
        self.stats.bodies_deleted += 1

    async def dead_letter(
        self, letter: DeadLetter, *, provider: str, original: bytes, stream: str, seq: int
    ) -> None:
        """File ``letter`` for stored message ``stream``/``seq`` (whose bytes are
        ``original``) under ``provider``. The msg id is stable across redeliveries, so a
        crash between this and the ack cannot write it twice. A letter too large for one
        message keeps the message's exact bytes aside (object ``dead.<stream>.<seq>``)."""
        data = encode(letter)
        if not fits(data, self.max_payload):
            name = await put_aside(self.js, f"dead.{stream}.{seq}", original)
            data = encode(
                msgspec.structs.replace(letter, job=None, raw=None, raw_base64=None, overflow=name)
            )
        stored = await publish(
            self.js,
            dead_subject(provider if is_token(provider) else "unknown", letter.reason),
            data,
            msg_id=dead_msg_id(stream, seq),
            timeout=self.publish_timeout_s,
        )
        if (owner := locator.letter_owner(letter)) is not None:
            await locator.record(
                self.js, *owner, DEAD_STREAM, stored, timeout=self.publish_timeout_s
            )
        self.stats.dead += 1
        if (m := metrics.active) is not None:
            m.dead_lettered(provider, letter.reason)

    async def park(self, job: Job, record: ParkRecord, *, stream: str, seq: int) -> bool:
        """Hold ``job`` (stored as ``stream``/``seq``) in AI_PARKED; False if the parked
        record would not fit in one message (nothing is written then)."""
        data = encode(ParkedJob(job=job, park=record))
        if not fits(data, self.max_payload):
            return False
        stored = await publish(
            self.js,
            parked_subject(job.provider, job.priority, job.model),
            data,
            msg_id=park_msg_id(stream, seq),
            timeout=self.publish_timeout_s,
        )
        await locator.record(
            self.js, job.id, job.tenant, PARKED_STREAM, stored, timeout=self.publish_timeout_s
        )
        self.stats.parked += 1
        if (m := metrics.active) is not None:
            m.parked.labels(job.provider, job.priority).inc()
        return True

    def _requeue(
        self, job: Job, replay: str | None, failover_of: tuple[str, int] | None
    ) -> tuple[str, bytes, dict[str, str]]:
        if replay is not None:
            headers = {REPLAY_HEADER: replay, MSG_ID_HEADER: replay_msg_id(job.id, replay)}
        elif failover_of is not None:
            headers = {MSG_ID_HEADER: failover_msg_id(*failover_of)}
        else:
            raise ValueError("a republished job is a replay or a fail-over")
        if (t := tracing.active) is not None:
            t.inject_current(headers)  # the worker's span of a fail-over, the replay's
        return requeue_subject(job.provider, job.priority, job.tenant), encode(job), headers

    async def republish(
        self,
        job: Job,
        *,
        replay: str | None = None,
        failover_of: tuple[str, int] | None = None,
    ) -> None:
        """Put ``job`` back on AI_JOBS: a replay with tag ``replay`` (see
        ``schemas.subjects.replay_tag``), or the fail-over copy of stored job
        ``failover_of`` = (stream, seq)."""
        subject, data, headers = self._requeue(job, replay, failover_of)
        await publish(self.js, subject, data, headers=headers, timeout=self.publish_timeout_s)

    async def republish_async(self, job: Job, *, replay: str) -> asyncio.Future[Any]:
        """``republish`` of a replay without waiting for its PubAck (the replayer's
        pipeline): the future resolves to it."""
        subject, data, headers = self._requeue(job, replay, None)
        return await self.js.publish_async(subject, data, headers=headers)

    # -- a worker's delivery ---------------------------------------------------------------

    async def settle(self, d: Delivery, outcome: Outcome) -> None:
        """Perform ``outcome`` for delivery ``d``, then ack or nak its message."""
        msg, job = d.msg, d.job
        if isinstance(outcome, Retry):
            self.stats.retried += 1
            if (m := metrics.active) is not None:
                m.retries.labels(d.provider).inc()
            await msg.nak(delay=outcome.delay)
            return
        if isinstance(outcome, Dead):
            await self._dead(d, outcome)
        elif job is None:
            raise TypeError(f"{outcome!r} needs a job; {msg.subject} has none")
        elif isinstance(outcome, Duplicate):
            self.stats.duplicates_skipped += 1
            await self.release_body(job)
        elif isinstance(outcome, Succeeded):
            await self._store_answer(d, job, outcome)
            return  # acked there
        elif isinstance(outcome, Expired):
            self.stats.expired += 1
            error = ErrorInfo(type="expired", message=outcome.message)
            await self.store_result(self._result(d, job, "expired", error=error), replay=d.replay)
            await self.release_body(job)
        elif isinstance(outcome, Park):
            record = ParkRecord(
                reason=outcome.reason,
                outage_id=outcome.outage_id,
                last_error=outcome.last_error[:500],
                attempts=d.attempts,
            )
            if not await self.park(job, record, stream=d.stream, seq=d.seq):
                # A job published past the producer's limit: it can neither wait here nor
                # be parked. It ends now, with its bytes kept (aside, if need be).
                size = len(encode(ParkedJob(job=job, park=record)))
                message = f"the job is too large to park ({size} bytes with its record)"
                await self._dead(d, Dead("too_large", message))
        elif isinstance(outcome, FailOver):
            await self.republish(outcome.job, failover_of=(d.stream, d.seq))
            self.stats.failed_over += 1
            if (m := metrics.active) is not None:
                m.failed_over.labels(job.provider).inc()
        else:  # Call: the caller's to perform, never to ack
            raise TypeError(f"{outcome!r} is not an outcome to settle")
        await msg.ack()

    async def _store_answer(self, d: Delivery, job: Job, outcome: Succeeded) -> None:
        """Store what the provider answered (paid for): kept aside when it cannot fit in a
        message, retried in place while NATS is away, never released to be paid again."""
        reply = outcome.reply
        origin = job.metadata.get("failover_from", "")
        served = ServedBy(
            provider=job.provider,
            kind=self.kinds.get(job.provider, ""),
            fallback=bool(origin),
            fallback_from=origin,
        )
        result = self._result(
            d,
            job,
            "succeeded",
            response=reply.response,
            usage=reply.usage,
            model=reply.model,
            served_by=served,
            provider_usage=reply.provider_usage,
        )
        data = encode(result)
        until = time.monotonic() + self.store_retry_s
        delay = 0.1
        while True:
            try:
                if fits(data, self.max_payload):
                    await self.store_result(result, replay=d.replay, data=data)
                    self.stats.succeeded += 1
                    await self.release_body(job)
                    break
                name = await put_aside(self.js, f"response.{d.stream}.{d.seq}", data)
                message = (
                    f"the provider's reply ({len(data)} bytes as a result) is over the "
                    f"server's max_payload of {self.max_payload} bytes; it is kept whole in "
                    f"object store ai_overflow as {name!r}"
                )
                await self._dead(d, Dead("response_too_large", message), overflow=name)
                break
            except NATS_UNAVAILABLE as exc:
                if time.monotonic() + delay > until:
                    raise
                log.warning(
                    "job %s: NATS did not take its answer (%s); trying again in %.1fs",
                    job.id,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await d.msg.ack()

    async def _dead(self, d: Delivery, dead: Dead, *, overflow: str | None = None) -> None:
        """Dead-letter the delivery; when ``answered``, its producer gets a ``failed``
        result; otherwise the letter keeps the message's exact bytes."""
        msg, job = d.msg, d.job
        if not dead.answered or job is None:
            letter = DeadLetter(
                reason=dead.reason,
                error=ErrorInfo(type=dead.reason, message=dead.message[:500]),
                subject=msg.subject,
                attempts=d.attempts,
                **raw_fields(msg.data),
            )
            await self.dead_letter(
                letter, provider=d.provider, original=msg.data, stream=d.stream, seq=d.seq
            )
            log.info("message %s on %s dead-lettered: %s", d.seq, msg.subject, dead.message)
            return
        error = ErrorInfo(type=dead.reason, message=dead.message, retryable=dead.retryable)
        letter = DeadLetter(
            reason=dead.reason,
            error=error,
            job_id=job.id,
            job=msgspec.to_builtins(job),
            subject=msg.subject,
            attempts=d.attempts,
            overflow=overflow,
        )
        await self.dead_letter(
            letter, provider=d.provider, original=msg.data, stream=d.stream, seq=d.seq
        )
        # The producer waiting on the result learns of the failure too.
        await self.store_result(
            self._result(d, job, "failed", error=error, calling=False),
            replay=d.replay,
        )
        log.info("job %s dead-lettered (%s): %s", job.id, dead.reason, dead.message)

    def _result(
        self,
        d: Delivery,
        job: Job,
        status: Status,
        *,
        error: ErrorInfo | None = None,
        calling: bool = True,
        **fields: Any,
    ) -> JobResult:
        started = d.started if calling and d.started else time.time()
        provider_s = d.provider_s if calling else 0.0
        dropped = job.metadata.get("betas_dropped")
        if dropped:
            fields["notes"] = [dropped_note(dropped.split(","), job.provider)]
        return JobResult(
            job_id=job.id,
            status=status,
            provider=job.provider,
            model=fields.pop("model", None) or job.model,
            error=error,
            attempts=d.attempts,
            timings=timings(job, started, provider_s),
            worker=self.worker_id,
            tenant=job.tenant or "",
            **fields,
        )


def timings(job: Job, started: float, provider_s: float) -> Timings:
    """A result's timings: queued until ``started``, ``provider_s`` in the call, total."""
    now = time.time()
    created = job.created_at.timestamp()
    return Timings(
        queued_ms=round(max(started - created, 0.0) * 1000, 3),
        provider_ms=round(provider_s * 1000, 3),
        total_ms=round(max(now - created, 0.0) * 1000, 3),
    )
