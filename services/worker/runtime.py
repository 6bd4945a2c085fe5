"""What a worker does with one message: decode, call, settle.

Every message ends in exactly one JetStream settlement, chosen here:

    success                    publish result (Nats-Msg-Id = job id), then ack
    result already stored      ack without calling the provider (redelivery must not pay twice)
    deadline passed            publish an ``expired`` result, then ack
    permanent provider error   dead letter + ``failed`` result, then ack
    transient, attempts left   nak with exponential backoff and jitter, or the retry-after
    transient, no attempts     dead letter ``retries_exhausted`` + ``failed`` result, then ack
    malformed message          dead letter ``invalid``, then ack
    provider open or paused    park (``AI_PARKED``) / fail over / fail, as the job asks, then ack
    our own bug / shutdown     nak (the job comes back; nothing is lost)

"Then ack" means after the PubAck of what was published, never before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from datetime import UTC, datetime

import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.jobs import Job, decode_job, encode
from schemas.parking import DeadLetter, ParkedJob, ParkRecord
from schemas.results import ErrorInfo, JobResult, Timings, decode_result
from schemas.subjects import (
    EXPECTED_LAST_SUBJECT_SEQ,
    MSG_ID_HEADER,
    REPLAY_HEADER,
    RESULTS_STREAM,
    WRONG_LAST_SEQUENCE,
    dead_subject,
    jobs_subject,
    parked_subject,
    result_subject,
)
from services.breaker import PAUSED, HealthBoard, SlidingWindow, transition
from services.config import BreakerSettings, ProviderKind, WorkerSettings
from services.errors import PermanentError, ProviderError, RateLimited
from services.providers.base import Provider
from services.providers.mapping import Unmappable, convert

log = logging.getLogger("ridethrough.worker")


def backoff_delay(attempt: int, settings: WorkerSettings, retry_after: float | None) -> float:
    """Seconds before the next delivery: exponential with full jitter, never below retry-after."""
    cap = min(settings.backoff_max_s, settings.backoff_base_s * (2 ** max(attempt - 1, 0)))
    delay = random.uniform(cap / 2, cap)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class Stats:
    """Counters of one worker process (exposed for logs, status and benchmarks)."""

    __slots__ = (
        "dead",
        "duplicates_skipped",
        "expired",
        "failed",
        "failed_over",
        "parked",
        "retried",
        "succeeded",
    )

    def __init__(self) -> None:
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
        self.stats = Stats()
        self.board = board
        self.breaker = breaker or BreakerSettings()
        self.kinds = kinds or {}
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
        except Exception:
            log.exception(
                "unexpected error handling %s; the job is released for retry", msg.subject
            )
            await _quiet_nak(msg, self.settings.backoff_base_s)

    async def _process(self, msg: Msg) -> None:
        meta = msg.metadata
        attempts = meta.num_delivered or 1
        subject_provider = msg.subject.split(".")[2]
        try:
            job = decode_job(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            await self._dead_invalid(msg, subject_provider, f"malformed job: {exc}", attempts)
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

        replay = msg.headers.get(REPLAY_HEADER) if msg.headers else None
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

        started = time.time()
        try:
            reply = await provider.call(job.model, job.request)
        except ProviderError as exc:
            await self._on_provider_error(msg, job, exc, attempts)
            return
        if self.board is not None:
            self._window(job.provider).success()
        provider_s = time.time() - started
        await self._publish_result(
            msg,
            job,
            JobResult(
                job_id=job.id,
                status="succeeded",
                provider=job.provider,
                model=reply.model or job.model,
                response=reply.response,
                usage=reply.usage,
                attempts=attempts,
                timings=_timings(job, started, provider_s),
                worker=self.worker_id,
            ),
        )
        self.stats.succeeded += 1
        await msg.ack()

    async def _on_provider_error(
        self, msg: Msg, job: Job, exc: ProviderError, attempts: int
    ) -> None:
        if isinstance(exc, PermanentError):
            if self.board is not None:
                self._window(job.provider).success()  # it answered: no outage
            await self._dead(msg, job, job.provider, exc.reason, exc.message, attempts, False)
            return
        if self.board is not None and not isinstance(exc, RateLimited):
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
        assert self.board is not None and self.board.health_kv is not None
        calls, failures = window.counts()
        new = await transition(
            self.js,
            self.board.health_kv,
            provider,
            to="open",
            allowed_from=("closed", "half_open"),
            by=self.worker_id,
            reason=f"{window.consecutive} consecutive / {failures} of {calls} calls failed",
            last_error=f"{exc.reason}: {exc.message}",
            calls=calls,
            failures=failures,
        )
        if new is not None:
            self.board.note(provider, new)
        else:  # another worker tripped it first: learn its state now
            await self.board.refresh()

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
        await self.js.publish(
            parked_subject(job.provider, job.priority),
            encode(parked),
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
            await self.js.publish(
                jobs_subject(target.provider, job.priority),
                encode(moved),
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

    async def _publish_result(self, msg: Msg, job: Job, result: JobResult) -> None:
        """Store the job's one result. The write is conditional on the subject's last
        sequence, so when two copies of a job race (one parked and replayed, one
        redelivered), the second result is refused by the server rather than stored."""
        replay = msg.headers.get(REPLAY_HEADER) if msg.headers else None
        # A replay gets its own dedup id, or the dedup window would swallow a result
        # that replaces the ``failed`` one of an earlier attempt.
        msg_id = f"{job.id}:r{replay}" if replay else job.id
        subject = result_subject(job.id, job.tenant)
        if job.tenant:
            result = msgspec.structs.replace(result, tenant=job.tenant)
        expect = 0
        if replay and replay.startswith("d"):  # from the dead letters: may replace `failed`
            with contextlib.suppress(nats.js.errors.NotFoundError):
                raw = await self.js.get_last_msg(RESULTS_STREAM, subject, direct=True)
                expect = int(raw.seq or 0)
        try:
            await self.js.publish(
                subject,
                encode(result),
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
    ) -> None:
        error = ErrorInfo(type=reason, message=message, retryable=retryable)
        letter = DeadLetter(
            reason=reason,
            error=error,
            job_id=job.id,
            job=msgspec.to_builtins(job),
            subject=msg.subject,
            attempts=attempts,
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

    async def _dead_invalid(self, msg: Msg, provider: str, message: str, attempts: int) -> None:
        letter = DeadLetter(
            reason="invalid",
            error=ErrorInfo(type="invalid", message=message),
            raw=msg.data.decode("utf-8", errors="replace"),
            subject=msg.subject,
            attempts=attempts,
        )
        await self._publish_dead(msg, provider, "invalid", letter)
        self.stats.dead += 1
        log.info("message %s on %s dead-lettered: %s", _seq(msg), msg.subject, message)
        await msg.ack()

    async def _publish_dead(self, msg: Msg, provider: str, reason: str, letter: DeadLetter) -> None:
        # The id is stable across redeliveries of this stored message, so a crash
        # between the dead-letter publish and the ack cannot write it twice.
        await self.js.publish(
            dead_subject(provider, reason),
            encode(letter),
            timeout=self.publish_timeout_s,
            headers={MSG_ID_HEADER: f"dead:{msg.metadata.stream}:{_seq(msg)}"},
        )


def _seq(msg: Msg) -> int:
    return msg.metadata.sequence.stream


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
