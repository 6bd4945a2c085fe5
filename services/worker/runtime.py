"""What a worker does with one message: decode, call, settle.

Every message ends in exactly one JetStream settlement, chosen here:

    success                    publish result (Nats-Msg-Id = job id), then ack
    result already stored      ack without calling the provider (redelivery must not pay twice)
    deadline passed            publish an ``expired`` result, then ack
    permanent provider error   dead letter + ``failed`` result, then ack
    transient, attempts left   nak with exponential backoff and jitter, or the retry-after
    transient, no attempts     dead letter ``retries_exhausted`` + ``failed`` result, then ack
    malformed message          dead letter ``invalid`` (its exact bytes), then ack
    provider open or paused    park (``AI_PARKED``) / fail over / fail, as the job asks, then ack
    reply too large to store   reply kept in ``ai_overflow``, dead letter
                               ``response_too_large`` + ``failed`` result, then ack
    NATS away for a moment     warning, nak with backoff (the job comes back; nothing is lost)
    our own bug                nak with backoff; after ``max_attempts`` deliveries, dead letter
                               ``internal_error``, then ack (never an endless loop)
    shutdown                   nak at once

"Then ack" means after the PubAck of what was published, never before. Every record is
checked against the server's ``max_payload`` before it is published (``services.overflow``).
Once the provider has answered, storing the answer is retried in place while NATS is away
(``store_retry_s``) rather than released: a released job would pay for a second call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from datetime import UTC, datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.codec import encode
from schemas.jobs import Job, decode_job
from schemas.parking import DeadLetter, ParkedJob, ParkRecord
from schemas.results import ErrorInfo, JobResult, Timings, decode_result
from schemas.subjects import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID_HEADER,
    REPLAY_HEADER,
    RESULTS_STREAM,
    WRONG_LAST_SEQUENCE,
    JobOrigin,
    dead_subject,
    is_token,
    job_msg_id,
    job_origin,
    parked_subject,
    requeue_subject,
    result_subject,
)
from services.breaker import PAUSED, HealthBoard, SlidingWindow
from services.config import BreakerSettings, ProviderKind, WorkerSettings
from services.connection import NATS_UNAVAILABLE
from services.errors import PermanentError, ProviderError, RateLimited, Unmappable
from services.overflow import dead_letter_bytes, fits, put_aside, raw_fields
from services.providers.base import Provider
from services.providers.classify import message_of
from services.providers.mapping import convert

log = logging.getLogger("ridethrough.worker")


def backoff_delay(attempt: int, settings: WorkerSettings, retry_after: float | None) -> float:
    """Seconds before the next delivery: exponential with full jitter, at least the
    provider's retry-after, and never more than ``backoff_max_s`` (a provider asking for
    longer is having an outage, not giving a schedule: see ``long_retry_after``)."""
    cap = min(settings.backoff_max_s, settings.backoff_base_s * (2 ** min(max(attempt - 1, 0), 64)))
    delay = random.uniform(cap / 2, cap)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, settings.backoff_max_s)


def long_retry_after(exc: ProviderError, settings: WorkerSettings) -> bool:
    """Whether the provider asked to wait longer than we ever back off: a sign of an outage."""
    return exc.retry_after is not None and exc.retry_after > settings.backoff_max_s


class Stats:
    """Counters of one worker process (exposed for logs, status and benchmarks)."""

    __slots__ = (
        "dead",
        "duplicates_skipped",
        "expired",
        "failed",
        "failed_over",
        "internal_errors",
        "nats_errors",
        "parked",
        "retried",
        "succeeded",
    )

    def __init__(self) -> None:
        self.internal_errors = 0
        self.nats_errors = 0
        self.parked = 0
        self.failed_over = 0
        self.succeeded = 0
        self.failed = 0
        self.dead = 0
        self.retried = 0
        self.expired = 0
        self.duplicates_skipped = 0

    def as_dict(self) -> dict[str, int]:
        """A snapshot."""
        return {k: getattr(self, k) for k in self.__slots__}


class JobRunner:
    """Processes one message at a time for any provider it knows."""

    def __init__(
        self,
        js: JetStreamContext,
        providers: dict[str, Provider],
        settings: WorkerSettings,
        *,
        publish_timeout_s: float = 10.0,
        max_payload: int = 0,
        store_retry_s: float = 120.0,
        legacy_seq: int = 0,
        worker_id: str = "",
        board: HealthBoard | None = None,
        breaker: BreakerSettings | None = None,
        kinds: dict[str, ProviderKind] | None = None,
    ) -> None:
        self.js = js
        self.worker_id = worker_id
        self.providers = providers
        self.settings = settings
        self.publish_timeout_s = publish_timeout_s
        #: The server's max_payload (0: unknown); every record is checked against it.
        self.max_payload = max_payload
        #: How long an answer the provider gave is retried in place while NATS is away.
        self.store_retry_s = store_retry_s
        #: The last AI_JOBS sequence stored before the trusted-subject layout (0: none).
        self.legacy_seq = legacy_seq
        self.stats = Stats()
        self.board = board
        self.breaker = breaker or BreakerSettings()
        self.kinds = kinds or {}
        #: Jobs (tenant, id) whose call or answer this process has under way.
        self._calling: set[tuple[str | None, str]] = set()
        # Per provider: the local failure window, and the breaker (state, outage) it belongs to.
        self._windows: dict[str, tuple[tuple[str, str], SlidingWindow]] = {}

    async def process(self, msg: Msg) -> None:
        """Settle ``msg``; never raises except ``CancelledError`` (after a nak)."""
        try:
            await self._process(msg)
        except asyncio.CancelledError:
            # Shutdown past the grace period: hand the job back at once.
            await _quiet_nak(msg, 0)
            raise
        except NATS_UNAVAILABLE as exc:
            # An expected blip (a restart, a leader election): one line, and the job back.
            self.stats.nats_errors += 1
            attempts = _attempts(msg)
            log.warning(
                "NATS did not answer while settling %s (%s); released for retry",
                msg.subject,
                type(exc).__name__,
            )
            await _quiet_nak(msg, backoff_delay(attempts, self.settings, None))
        except Exception as exc:
            await self._unexpected(msg, exc)

    async def _unexpected(self, msg: Msg, exc: Exception) -> None:
        """Our own bug, or input we did not foresee: it counts as an attempt, and after
        ``max_attempts`` deliveries the message becomes a dead letter, never a loop."""
        self.stats.internal_errors += 1
        attempts = _attempts(msg)
        if attempts < self.settings.max_attempts:
            log.error(
                "unexpected error handling %s (attempt %d of %d); released for retry",
                msg.subject,
                attempts,
                self.settings.max_attempts,
                exc_info=exc,
            )
            await _quiet_nak(msg, backoff_delay(attempts, self.settings, None))
            return
        log.error("unexpected error handling %s; dead-lettered", msg.subject, exc_info=exc)
        message = f"unexpected error after {attempts} attempts: {message_of(exc)}"
        try:
            await self._dead_invalid(msg, _token(msg, 2), message, attempts, "internal_error")
        except Exception as again:  # NATS away too: the next delivery tries again
            log.warning("could not dead-letter %s: %s", msg.subject, message_of(again))
            await _quiet_nak(msg, backoff_delay(attempts, self.settings, None))

    async def _process(self, msg: Msg) -> None:
        attempts = _attempts(msg)
        origin = job_origin(msg.subject)  # the subject is parsed once per job
        subject_provider = origin.provider if origin is not None else _token(msg, 2)
        try:
            job = decode_job(msg.data)
        except Exception as exc:  # not only ValidationError: a RecursionError, say
            await self._dead_invalid(msg, subject_provider, f"malformed job: {exc}", attempts)
            return
        trusted, refused = self._check_origin(msg, job, origin)
        if refused:
            # No `failed` result for it: its id may be someone else's job.
            await self._dead_invalid(msg, subject_provider, refused, attempts)
            return
        provider = self.providers.get(job.provider)
        if provider is None or job.provider != subject_provider:
            why = (
                f"job for provider {job.provider!r} arrived on {msg.subject}"
                if provider is not None
                else f"unknown provider {job.provider!r}: this worker serves "
                f"{sorted(self.providers)}"
            )
            await self._dead(msg, job, subject_provider, "invalid", why, attempts, retryable=False)
            return

        replay = msg.headers.get(REPLAY_HEADER) if trusted and msg.headers else None
        if (attempts > 1 or replay) and await self._has_result(job, replayed=bool(replay)):
            self.stats.duplicates_skipped += 1
            await msg.ack()
            return

        if job.deadline is not None and job.deadline <= datetime.now(UTC):
            self.stats.expired += 1
            await self._publish_result(
                msg,
                job,
                JobResult(
                    job_id=job.id,
                    status="expired",
                    provider=job.provider,
                    model=job.model,
                    error=ErrorInfo(type="expired", message="deadline passed before the call"),
                    attempts=attempts,
                    timings=_timings(job, time.time(), 0.0),
                    worker=self.worker_id,
                ),
            )
            await msg.ack()
            return

        if self.board is not None and self.board.blocked(job.provider):
            await self._outage(msg, job, attempts, last_error="")
            return

        key = (job.tenant, job.id)
        if key in self._calling:
            # Redelivered while this process still calls for it, or still stores the answer
            # (NATS was away longer than ack_wait): that copy settles it; this one waits.
            self.stats.duplicates_skipped += 1
            await msg.nak(delay=backoff_delay(attempts, self.settings, None))
            return
        self._calling.add(key)
        try:
            await self._call(msg, job, provider, attempts)
        finally:
            self._calling.discard(key)

    async def _call(self, msg: Msg, job: Job, provider: Provider, attempts: int) -> None:
        started = time.time()
        try:
            reply = await provider.call(job.model, job.request)
        except ProviderError as exc:
            await self._on_provider_error(msg, job, exc, attempts)
            return
        if self.board is not None:
            self._window(job.provider).success()
        provider_s = time.time() - started
        result = JobResult(
            job_id=job.id,
            status="succeeded",
            provider=job.provider,
            model=reply.model or job.model,
            response=reply.response,
            usage=reply.usage,
            attempts=attempts,
            timings=_timings(job, started, provider_s),
            worker=self.worker_id,
            tenant=job.tenant or "",
        )
        await self._store_answer(msg, job, result)

    async def _store_answer(self, msg: Msg, job: Job, result: JobResult) -> None:
        """Store what the provider answered (paid for): kept aside when it cannot fit in a
        message, retried in place while NATS is away, never released to be paid again."""
        data = encode(result)
        until = time.monotonic() + self.store_retry_s
        delay = 0.1
        while True:
            try:
                if fits(data, self.max_payload):
                    await self._publish_result(msg, job, result, data)
                    self.stats.succeeded += 1
                else:
                    await self._too_large_answer(msg, job, result, data)
                    return  # _dead has acked
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
        await msg.ack()

    async def _too_large_answer(self, msg: Msg, job: Job, result: JobResult, data: bytes) -> None:
        """A reply too large for one message: kept whole in ``ai_overflow``; the job ends
        ``failed`` (``response_too_large``) with a dead letter naming where it is."""
        name = await put_aside(self.js, f"response.{msg.metadata.stream}.{_seq(msg)}", data)
        message = (
            f"the provider's reply ({len(data)} bytes as a result) is over the server's "
            f"max_payload of {self.max_payload} bytes; it is kept whole in object store "
            f"ai_overflow as {name!r}"
        )
        await self._dead(
            msg,
            job,
            job.provider,
            "response_too_large",
            message,
            _attempts(msg),
            False,
            overflow=name,
        )

    def _check_origin(self, msg: Msg, job: Job, origin: JobOrigin | None) -> tuple[bool, str]:
        """(whether ridethrough itself published the job, why it is refused or "").

        A producer's job is believed only as far as NATS permissions bind its subject: its
        tenant must be the subject's, and its msg id the job id in that tenant's scope, so
        one job id is one job per tenant (dedup) and no producer marks a replay or writes
        into another tenant's results. Jobs stored before this layout (at or below the
        recorded AI_JOBS sequence) keep the old rules.
        """
        if origin is None:
            return False, f"{msg.subject} is not a job subject"
        if origin.requeued or (self.legacy_seq and _seq(msg) <= self.legacy_seq):
            return True, ""
        if job.tenant != origin.tenant:
            return False, (
                f"job names tenant {job.tenant!r} but was published "
                + (f"for tenant {origin.tenant!r}" if origin.tenant else "without one")
            )
        msg_id = msg.headers.get(MSG_ID_HEADER) if msg.headers else None
        want = job_msg_id(job.id, job.tenant)
        if msg_id != want:
            return False, f"Nats-Msg-Id must be {want!r} (the job id in its tenant's scope)"
        return False, ""

    async def _on_provider_error(
        self, msg: Msg, job: Job, exc: ProviderError, attempts: int
    ) -> None:
        if isinstance(exc, PermanentError):
            if exc.reason == "config":  # every job will fail alike until someone fixes it
                log.error("provider %s is misconfigured (config): %s", job.provider, exc.message)
            elif self.board is not None:
                self._window(job.provider).success()  # it answered: no outage
            await self._dead(msg, job, job.provider, exc.reason, exc.message, attempts, False)
            return
        if self.board is not None and (
            not isinstance(exc, RateLimited) or long_retry_after(exc, self.settings)
        ):
            window = self._window(job.provider)
            if window.failure():
                await self._trip(job.provider, window, exc)
            if self.board.blocked(job.provider):
                await self._outage(msg, job, attempts, last_error=f"{exc.reason}: {exc.message}")
                return
        # A 429 asks us to slow down, not to give up: rate-limited jobs get a larger budget.
        limit = (
            self.settings.rate_limited_max_attempts
            if isinstance(exc, RateLimited)
            else self.settings.max_attempts
        )
        if attempts >= limit:
            message = f"gave up after {attempts} attempts; last error ({exc.reason}): {exc.message}"
            await self._dead(msg, job, job.provider, "retries_exhausted", message, attempts, True)
            return
        delay = backoff_delay(attempts, self.settings, exc.retry_after)
        self.stats.retried += 1
        log.debug("job %s: %s, retry in %.1fs", job.id, exc.reason, delay)
        await msg.nak(delay=delay)

    def window_counts(self) -> dict[str, tuple[int, int]]:
        """(calls, transient failures) per provider in the current breaker window."""
        return {p: held[1].counts() for p, held in self._windows.items()}

    def _window(self, provider: str) -> SlidingWindow:
        """The failure window of ``provider``, emptied whenever its breaker changes."""
        assert self.board is not None
        st = self.board.states.get(provider)
        epoch = (st.state, st.outage_id) if st is not None else ("closed", "")
        held = self._windows.get(provider)
        if held is None or held[0] != epoch:
            held = (epoch, SlidingWindow(self.breaker))
            self._windows[provider] = held
        return held[1]

    async def _trip(self, provider: str, window: SlidingWindow, exc: ProviderError) -> None:
        assert self.board is not None
        calls, failures = window.counts()
        await self.board.move(
            provider,
            to="open",
            allowed_from=("closed", "half_open"),
            by=self.worker_id,
            reason=f"{window.consecutive} consecutive / {failures} of {calls} calls failed",
            last_error=f"{exc.reason}: {exc.message}",
            calls=calls,
            failures=failures,
        )

    async def _outage(self, msg: Msg, job: Job, attempts: int, *, last_error: str) -> None:
        """The provider is open or paused: do what the job asked for an outage."""
        assert self.board is not None
        state = self.board.state(job.provider)
        reason = "paused" if state == PAUSED else "provider_open"
        if job.on_outage == "fail":
            message = f"provider {job.provider} is {state}" + (
                f"; {last_error}" if last_error else ""
            )
            await self._dead(msg, job, job.provider, "provider_outage", message, attempts, True)
            return
        if job.on_outage == "failover" and await self._failover(msg, job):
            return
        await self._park(msg, job, attempts, reason=reason, last_error=last_error)

    async def _park(
        self, msg: Msg, job: Job, attempts: int, *, reason: str, last_error: str
    ) -> None:
        assert self.board is not None
        parked = ParkedJob(
            job=job,
            park=ParkRecord(
                reason=reason,
                outage_id=self.board.outage_id(job.provider),
                last_error=last_error[:500],
                attempts=attempts,
            ),
        )
        data = encode(parked)
        if not fits(data, self.max_payload):
            # A job published past the producer's limit: it can neither wait here nor be
            # parked. It ends now, with its bytes kept (aside, if need be).
            message = f"the job is too large to park ({len(data)} bytes with its record)"
            await self._dead(msg, job, job.provider, "too_large", message, attempts, False)
            return
        await self.js.publish(
            parked_subject(job.provider, job.priority),
            data,
            timeout=self.publish_timeout_s,
            headers={MSG_ID_HEADER: f"park:{msg.metadata.stream}:{_seq(msg)}"},
        )
        self.stats.parked += 1
        await msg.ack()

    async def _failover(self, msg: Msg, job: Job) -> bool:
        """Send the job to its first healthy fallback; False if none can take it faithfully."""
        assert self.board is not None
        src_kind = self.kinds.get(job.provider)
        for target in job.fallbacks:
            dst_kind = self.kinds.get(target.provider)
            if (
                src_kind is None
                or dst_kind is None
                or self.board.state(target.provider) != "closed"
            ):
                continue
            try:
                request = convert(job.request, src_kind=src_kind, dst_kind=dst_kind)
            except Unmappable as exc:
                log.info("job %s cannot fail over to %s: %s", job.id, target.provider, exc)
                continue
            moved = msgspec.structs.replace(
                job,
                provider=target.provider,
                model=target.model,
                request=request,
                fallbacks=[],
                metadata={**job.metadata, "failover_from": f"{job.provider}/{job.model}"},
            )
            data = encode(moved)
            if not fits(data, self.max_payload):
                log.info("job %s cannot fail over to %s: too large", job.id, target.provider)
                continue
            await self.js.publish(
                requeue_subject(target.provider, job.priority, job.tenant),
                data,
                timeout=self.publish_timeout_s,
                headers={MSG_ID_HEADER: f"failover:{msg.metadata.stream}:{_seq(msg)}"},
            )
            self.stats.failed_over += 1
            await msg.ack()
            return True
        return False

    async def _has_result(self, job: Job, *, replayed: bool) -> bool:
        """Whether the job already has its result. A replayed job (say, from the dead
        letters after a key rotation) may replace a ``failed`` result, nothing else."""
        subject = result_subject(job.id, job.tenant)
        try:
            raw = await self.js.get_last_msg(RESULTS_STREAM, subject, direct=True)
        except nats.js.errors.NotFoundError:
            return False
        return not replayed or decode_result(raw.data or b"").status != "failed"

    async def _publish_result(
        self, msg: Msg, job: Job, result: JobResult, data: bytes | None = None
    ) -> None:
        """Store the job's one result. The write is conditional on the subject's last
        sequence, so when two copies of a job race (one parked and replayed, one
        redelivered), the second result is refused by the server rather than stored."""
        replay = msg.headers.get(REPLAY_HEADER) if msg.headers else None
        # A replay gets its own dedup id, or the dedup window would swallow a result
        # that replaces the ``failed`` one of an earlier attempt.
        # Scoped by tenant like the job's own msg id: two tenants' jobs may share an id, and
        # AI_RESULTS has one dedup window for all (a second tenant's result would be dropped).
        scoped = job_msg_id(job.id, job.tenant)
        msg_id = f"{scoped}:r{replay}" if replay else scoped
        subject = result_subject(job.id, job.tenant)
        if job.tenant and result.tenant != job.tenant:
            result = msgspec.structs.replace(result, tenant=job.tenant)
            data = None
        expect = 0
        if replay and replay.startswith("d"):  # from the dead letters: may replace `failed`
            with contextlib.suppress(nats.js.errors.NotFoundError):
                raw = await self.js.get_last_msg(RESULTS_STREAM, subject, direct=True)
                expect = int(raw.seq or 0)
        try:
            await self.js.publish(
                subject,
                data if data is not None else encode(result),
                timeout=self.publish_timeout_s,
                headers={MSG_ID_HEADER: msg_id, EXPECTED_LAST_SUBJECT_SEQ: str(expect)},
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            self.stats.duplicates_skipped += 1
            log.info(
                "job %s already has a result; this copy's %s is dropped", job.id, result.status
            )

    async def _dead(
        self,
        msg: Msg,
        job: Job,
        provider: str,
        reason: str,
        message: str,
        attempts: int,
        retryable: bool,
        *,
        overflow: str | None = None,
    ) -> None:
        error = ErrorInfo(type=reason, message=message, retryable=retryable)
        letter = DeadLetter(
            reason=reason,
            error=error,
            job_id=job.id,
            job=msgspec.to_builtins(job),
            subject=msg.subject,
            attempts=attempts,
            overflow=overflow,
        )
        await self._publish_dead(msg, provider, reason, letter)
        # The producer waiting on the result learns of the failure too.
        await self._publish_result(
            msg,
            job,
            JobResult(
                job_id=job.id,
                status="failed",
                provider=job.provider,
                model=job.model,
                error=error,
                attempts=attempts,
                timings=_timings(job, time.time(), 0.0),
                worker=self.worker_id,
            ),
        )
        self.stats.dead += 1
        log.info("job %s dead-lettered (%s): %s", job.id, reason, message)
        await msg.ack()

    async def _dead_invalid(
        self, msg: Msg, provider: str, message: str, attempts: int, reason: str = "invalid"
    ) -> None:
        """Dead-letter a message that is not a job we can read, keeping its exact bytes."""
        letter = DeadLetter(
            reason=reason,
            error=ErrorInfo(type=reason, message=message[:500]),
            subject=msg.subject,
            attempts=attempts,
            **raw_fields(msg.data),
        )
        await self._publish_dead(msg, provider, reason, letter)
        self.stats.dead += 1
        log.info("message %s on %s dead-lettered: %s", _seq(msg), msg.subject, message)
        await msg.ack()

    async def _publish_dead(self, msg: Msg, provider: str, reason: str, letter: DeadLetter) -> None:
        # The id is stable across redeliveries of this stored message, so a crash
        # between the dead-letter publish and the ack cannot write it twice.
        stream, seq = msg.metadata.stream, _seq(msg)
        data = await dead_letter_bytes(self.js, letter, msg.data, stream, seq)
        await self.js.publish(
            dead_subject(provider if is_token(provider) else "unknown", reason),
            data,
            timeout=self.publish_timeout_s,
            headers={MSG_ID_HEADER: f"dead:{stream}:{seq}"},
        )


def _seq(msg: Msg) -> int:
    return msg.metadata.sequence.stream


def _attempts(msg: Msg) -> int:
    """How many times this message has been delivered, this time included."""
    return msg.metadata.num_delivered or 1


def _token(msg: Msg, index: int) -> str:
    """Token ``index`` of the message's subject ("" when it has fewer)."""
    tokens = msg.subject.split(".")
    return tokens[index] if len(tokens) > index else ""


def _timings(job: Job, started: float, provider_s: float) -> Timings:
    now = time.time()
    created = job.created_at.timestamp()
    return Timings(
        queued_ms=round(max(started - created, 0.0) * 1000, 3),
        provider_ms=round(provider_s * 1000, 3),
        total_ms=round(max(now - created, 0.0) * 1000, 3),
    )


async def _quiet_nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay or None)
    except Exception as exc:  # the connection may be gone; ack_wait will redeliver
        log.warning("could not release %s: %s", msg.subject, exc)
