"""What a worker does with one delivered message: decode → decide → settle.

    decode   the message becomes a job, or a dead letter ``invalid`` with its exact
             bytes (unreadable, or not believable from where it was published)
    decide   ``services.lifecycle.decide``: the one outcome of this delivery, asked
             before the call (duplicate? expired? provider blocked?) and after it
    settle   ``services.lifecycle.settle``: the outcome written (result, dead letter,
             parked copy, fail-over copy), then the message acked or nakked

Around that, this module keeps what is local to one process: the breaker's failure
window per scope, a provider and each model (a trip moves the fleet's board), the set
of jobs it is calling
(a redelivered copy waits), the tally of jobs failed over or expired while their scope
was open or half-open (``services/breaker/tally.py``: a counter per outage, published
about once a second, for the outage's summary), and what happens when settling itself
fails:

    NATS away for a moment     warning, nak with backoff (the job comes back; nothing is lost)
    our own bug                nak with backoff; after ``max_attempts`` deliveries, dead letter
                               ``internal_error``, then ack (never an endless loop)
    shutdown                   nak at once
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas.jobs import Job, decode_job
from schemas.subjects import (
    MSG_ID_HEADER,
    REPLAY_HEADER,
    JobOrigin,
    job_msg_id,
    job_origin,
    scope_key,
    scope_model,
)
from services import metrics, tracing
from services.bodies import by_reference, resolve
from services.breaker import HealthBoard, SlidingWindow
from services.breaker.evidence import EvidenceView
from services.breaker.tally import Tally
from services.config import BreakerSettings, ProviderKind, ProviderSettings, WorkerSettings
from services.errors import BodyUnavailable, ProviderError
from services.jetstream.errors import NATS_UNAVAILABLE
from services.jetstream.pull import deliveries
from services.lifecycle.decide import (
    AllClosed,
    BreakerView,
    Call,
    Dead,
    Duplicate,
    Expired,
    FailOver,
    Outcome,
    Park,
    Policy,
    Situation,
    backoff_delay,
    breaker_scope,
    breaker_signal,
    decide,
)
from services.lifecycle.settle import Delivery, Settler, Stats
from services.providers.base import Provider, Reply
from services.providers.classify import message_of
from services.worker.slots import AdaptiveLimit

log = logging.getLogger("ridethrough.worker")

#: The answers that ask for fewer calls at once: a provider's ``AdaptiveLimit`` halves.
PUSHED_BACK = frozenset({"rate_limited", "overloaded"})


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
        evidence: EvidenceView | None = None,
        breaker: BreakerSettings | None = None,
        kinds: dict[str, ProviderKind] | None = None,
        provider_settings: Mapping[str, ProviderSettings] | None = None,
        bodies_timeout_s: float = 60.0,
        tally: Tally | None = None,
        limits: Mapping[str, AdaptiveLimit] | None = None,
    ) -> None:
        self.worker_id = worker_id
        #: Per provider, the calls in flight it accepts: told of each call's answer.
        self.limits = limits or {}
        #: Jobs failed over or expired per outage (None: not counted).
        self.tally = tally
        #: Longest fetch of a large job's body.
        self.bodies_timeout_s = bodies_timeout_s
        self.providers = providers
        self.settings = settings
        #: The last AI_JOBS sequence stored before the trusted-subject layout (0: none).
        self.legacy_seq = legacy_seq
        self.stats = Stats()
        self.settler = Settler(
            js,
            max_payload=max_payload,
            publish_timeout_s=publish_timeout_s,
            store_retry_s=store_retry_s,
            worker_id=worker_id,
            stats=self.stats,
            kinds=dict(kinds or {}),
        )
        self.board = board
        #: What the providers' status pages say: a degraded scope trips sooner.
        self.evidence = evidence
        self.view: BreakerView = board if board is not None else AllClosed()
        self.breaker = breaker or BreakerSettings()
        #: Per provider: its latency budgets (slow is down too).
        self.provider_settings = provider_settings or {}
        self.policy = Policy(
            worker=settings,
            max_payload=max_payload,
            kinds=kinds or {},
            timeouts_count=self.breaker.timeouts_count,
        )
        #: Jobs (tenant, id) whose call or answer this process has under way.
        self._calling: set[tuple[str | None, str]] = set()
        # Per scope key: the local failure window, and the breaker (state, outage) it is of.
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
            log.warning(
                "NATS did not answer while settling %s (%s); released for retry",
                msg.subject,
                type(exc).__name__,
            )
            await _quiet_nak(msg, backoff_delay(_attempts(msg), self.settings, None))
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
        d = Delivery(msg, attempts, _token(msg, 2))
        try:
            await self.settler.settle(d, Dead("internal_error", message, answered=False))
        except Exception as again:  # NATS away too: the next delivery tries again
            log.warning("could not dead-letter %s: %s", msg.subject, message_of(again))
            await _quiet_nak(msg, backoff_delay(attempts, self.settings, None))

    async def _process(self, msg: Msg) -> None:
        d, refused = self._decode(msg)
        job = d.job
        if job is None:  # not a job we can read or believe: its exact bytes are kept
            await self.settler.settle(d, Dead("invalid", refused, answered=False))
            return
        if (t := tracing.active) is None:
            await self._run(d, job, refused, None)
            return
        with t.process(
            job, msg.headers, attempt=d.attempts, replay=d.replay, subject=msg.subject
        ) as span:
            await self._run(d, job, refused, span)

    async def _run(self, d: Delivery, job: Job, refused: str, span: Any) -> None:
        """Decide and settle a decoded delivery (``span``: its trace, when tracing is on)."""
        msg = d.msg
        traced = tracing.active if span is not None else None
        has = False
        if not refused and (d.attempts > 1 or d.replay):
            has = await self.settler.has_result(job, replayed=bool(d.replay))
        s = Situation(job, d.attempts, refused=refused, has_result=has)
        outcome = decide(s, self.policy, self.view)
        full = job
        if job.request_ref is not None and _needs_body(job, outcome):
            # A large job: its body is fetched only when a call or a fail-over needs it
            # (a job parked or ended before the call leaves it where it is).
            resolved = await self._resolve(d, job)
            if resolved is None:
                return  # settled: its body is gone or not the one submitted
            full = resolved
            outcome = self._by_reference(
                job, decide(Situation(full, d.attempts), self.policy, self.view)
            )
        if not isinstance(outcome, Call):
            if traced is not None:
                traced.outcome(span, outcome)
            await self.settler.settle(d, outcome)
            if self.tally is not None and isinstance(outcome, _TALLIED):
                self._tally(job, outcome)
            return
        key = (job.tenant, job.id)
        if key in self._calling:
            # Redelivered while this process still calls for it, or still stores the answer
            # (NATS was away longer than ack_wait): that copy settles it; this one waits.
            self.stats.duplicates_skipped += 1
            await msg.nak(delay=backoff_delay(d.attempts, self.settings, None))
            return
        self._calling.add(key)
        try:
            answer = await self._call(d, full)
            after = decide(Situation(full, d.attempts, outcome=answer), self.policy, self.view)
            del full  # a large job's body: not held while the answer is stored
            outcome = self._by_reference(job, after)
            if traced is not None:
                traced.outcome(span, outcome)
            await self.settler.settle(d, outcome)
            if self.tally is not None and isinstance(outcome, _TALLIED):
                self._tally(job, outcome)
        finally:
            self._calling.discard(key)

    def _tally(self, job: Job, outcome: Outcome) -> None:
        """Count a settled fail-over or expiry against the outage of the job's scope, if
        that scope is open or half-open (an operator pause is no outage)."""
        assert self.tally is not None
        if self.view.state(job.provider, job.model) not in ("open", "half_open"):
            return
        outage = self.view.outage_id(job.provider, job.model)
        if isinstance(outcome, FailOver):
            self.tally.failed_over(job.provider, outage)
        else:
            self.tally.expired(job.provider, outage)

    async def _resolve(self, d: Delivery, job: Job) -> Job | None:
        """``job`` with its body (``services/bodies.py``); None once it is settled because
        its body is gone (a dead letter ``body_missing``, or a duplicate when a copy of the
        job has its result and took the body with it) or not the one submitted."""
        try:
            return await resolve(
                self.settler.js, job, self.policy.kinds, timeout=self.bodies_timeout_s
            )
        except BodyUnavailable as exc:
            if exc.reason == "body_missing" and await self.settler.has_result(
                job, replayed=bool(d.replay)
            ):
                await self.settler.settle(d, Duplicate())
                return None
            await self.settler.settle(d, Dead(exc.reason, exc.message))
            return None

    def _by_reference(self, job: Job, outcome: Outcome) -> Outcome:
        """A fail-over copy of a large job goes by reference, as the job came."""
        if isinstance(outcome, FailOver) and job.request_ref is not None:
            return FailOver(by_reference(outcome.job, job, self.policy.kinds))
        return outcome

    def _decode(self, msg: Msg) -> tuple[Delivery, str]:
        """The delivery, and why its job is refused ("" when it is not). A job that does
        not decode, or that its subject does not let us believe, is left out (None)."""
        origin = job_origin(msg.subject)  # the subject is parsed once per job
        d = Delivery(msg, _attempts(msg), origin.provider if origin else _token(msg, 2))
        try:
            job = decode_job(msg.data)
        except Exception as exc:  # not only ValidationError: a RecursionError, say
            return d, f"malformed job: {exc}"
        trusted, refused = self._check_origin(msg, job, origin)
        if refused:
            # No `failed` result for it: its id may be someone else's job.
            return d, refused
        d.job = job
        d.replay = msg.headers.get(REPLAY_HEADER) if trusted and msg.headers else None
        if job.provider not in self.providers:
            return d, (
                f"unknown provider {job.provider!r}: this worker serves {sorted(self.providers)}"
            )
        if job.provider != d.provider:
            return d, f"job for provider {job.provider!r} arrived on {msg.subject}"
        if job.request_ref is not None and job.request:
            return d, "a job with request_ref must have an empty request"
        return d, ""

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

    async def _call(self, d: Delivery, job: Job) -> Reply | ProviderError:
        """Call the provider; what it answered, counted in the breaker."""
        d.started = time.time()
        if (m := metrics.active) is not None:
            m.call_started(job.provider)
        t = tracing.active
        span = (
            None
            if t is None
            else t.provider_call(job, self.policy.kinds.get(job.provider, job.provider))
        )
        try:
            provider = self.providers[job.provider]
            if span is None:
                answer: Reply | ProviderError = await _call_provider(provider, job)
            else:
                assert t is not None
                with t.tracer_span(span):
                    answer = await _call_provider(provider, job)
        except ProviderError as exc:
            answer = exc
            if exc.reason == "config":  # every job will fail alike until someone fixes it
                log.error("provider %s is misconfigured (config): %s", job.provider, exc.message)
        d.provider_s = time.time() - d.started
        if (limit := self.limits.get(job.provider)) is not None:
            if not isinstance(answer, ProviderError):
                limit.success()
            elif answer.reason in PUSHED_BACK:
                limit.pushed_back(time.monotonic() - d.provider_s)
        if t is not None and span is not None:
            t.call_ended(span, answer)
        if m is not None:
            m.call_ended(job, answer, d.provider_s)
        await self._count(job, answer, d.provider_s)
        return answer

    async def _count(self, job: Job, answer: Reply | ProviderError, took_s: float) -> None:
        """Count the call in its scopes' windows; trip a breaker when it fails.

        Every call counts in its provider's window; a failure of the provider itself
        (``breaker_scope``) is a failure there, any other is a failure of the model's
        window only. A model's trip may open the provider too (enough models open)."""
        if self.board is None:
            return
        provider = job.provider
        model = scope_model(job.model)
        cfg = self.provider_settings.get(provider)
        budget = cfg.latency_budget(job.model) if cfg is not None else None
        slow = budget is not None and took_s > budget
        signal = breaker_signal(
            answer, self.settings, slow=slow, timeouts_count=self.breaker.timeouts_count
        )
        if signal is None:
            return
        wide = self._window(provider, None)
        if signal == "success":
            wide.success()
            if model is not None:
                self._window(provider, model).success()
            return
        if isinstance(answer, ProviderError):
            last_error = f"{answer.reason}: {answer.message}"
        else:
            last_error = f"slow: {took_s:.1f}s over the {budget:g}s budget of {job.model}"
        if model is None or breaker_scope(answer) == "provider":
            if wide.failure(degraded=self._degraded(provider, None)):
                await self._trip(provider, None, wide, last_error)
            return
        wide.neutral()
        window = self._window(provider, model)
        tripped = window.failure(degraded=self._degraded(provider, model))
        if tripped and await self._trip(provider, model, window, last_error):
            await self._open_provider_if_models_are(provider, last_error)

    def _degraded(self, provider: str, model: str | None) -> bool:
        """Whether the provider's status page says this scope is degraded (evidence, never
        proof: it only lowers the trip thresholds)."""
        return self.evidence is not None and self.evidence.degraded(provider, model)

    async def _trip(
        self, provider: str, model: str | None, window: SlidingWindow, last_error: str
    ) -> bool:
        """Open the breaker of a scope whose window tripped; whether this call opened it."""
        calls, failures = window.counts()
        reason = f"{window.consecutive} consecutive / {failures} of {calls} calls failed"
        first = window.first_failure()
        since = None
        if first is not None:  # the window keeps monotonic times; events carry wall-clock
            since = datetime.now(UTC) - timedelta(seconds=max(0.0, time.monotonic() - first))
        return await self._open(provider, model, reason, last_error, calls, failures, since)

    async def _open_provider_if_models_are(self, provider: str, last_error: str) -> None:
        """Open the provider when ``models_to_open_provider`` of its models are open: one
        model's trouble is its own; several models' at once is the provider's."""
        assert self.board is not None
        enough = self.breaker.models_to_open_provider
        if not enough:
            return
        board = self.board
        # Read the board again: two workers tripping two models at once would each count
        # one from a view a poll old; the later of the two trips sees both.
        await board.refresh()
        sick = [m for m in board.models(provider) if board.own_state(provider, m) == "open"]
        if len(sick) >= enough:
            reason = f"{len(sick)} of its models are open: {', '.join(sick)}"
            await self._open(provider, None, reason, last_error)

    async def _open(
        self,
        provider: str,
        model: str | None,
        reason: str,
        last_error: str,
        calls: int = 0,
        failures: int = 0,
        failing_since: datetime | None = None,
    ) -> bool:
        """Move a scope's breaker to open (from closed or half-open); whether this did."""
        assert self.board is not None
        new = await self.board.move(
            provider,
            model,
            to="open",
            allowed_from=("closed", "half_open"),
            by=self.worker_id,
            reason=reason,
            last_error=last_error,
            calls=calls,
            failures=failures,
            failing_since=failing_since,
        )
        return new is not None

    def window_counts(self) -> dict[str, tuple[int, int]]:
        """(calls, transient failures) per scope key in the current breaker window. A
        window with no call within it is dropped (asked once per heartbeat): a worker that
        saw many model names keeps only those it called lately, in memory and in its beat."""
        counts = {}
        for key, (_, window) in list(self._windows.items()):
            if window.idle():
                del self._windows[key]
                continue
            counts[key] = window.counts()
        return counts

    def _window(self, provider: str, model: str | None) -> SlidingWindow:
        """The failure window of a scope, emptied whenever its breaker changes."""
        assert self.board is not None
        key = scope_key(provider, model)
        st = self.board.states.get(key)
        epoch = (st.state, st.outage_id) if st is not None else ("closed", "")
        held = self._windows.get(key)
        if held is None or held[0] != epoch:
            held = (epoch, SlidingWindow(self.breaker))
            self._windows[key] = held
        return held[1]


#: The outcomes the tally counts (every other one costs one isinstance check).
_TALLIED = (FailOver, Expired)


def _needs_body(job: Job, outcome: Outcome) -> bool:
    """Whether deciding on ``job`` by reference gave an outcome that needs its body: a
    call, a fail-over (the body is mapped), or a park that a fail-over might replace
    (the mapping could not be tried without the body)."""
    if isinstance(outcome, Call | FailOver):
        return True
    return isinstance(outcome, Park) and job.on_outage == "failover" and bool(job.fallbacks)


def _seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


def _attempts(msg: Msg) -> int:
    """How many times this message has been delivered, this time included."""
    return deliveries(msg)


def _token(msg: Msg, index: int) -> str:
    """Token ``index`` of the message's subject ("" when it has fewer)."""
    tokens = msg.subject.split(".")
    return tokens[index] if len(tokens) > index else ""


async def _quiet_nak(msg: Msg, delay: float) -> None:
    try:
        await msg.nak(delay=delay or None)
    except Exception as exc:  # the connection may be gone; ack_wait will redeliver
        log.warning("could not release %s: %s", msg.subject, exc)


async def _call_provider(provider: Provider, job: Job) -> Reply:
    """One call of ``job``; a job without betas calls as it always did."""
    if job.betas:
        return await provider.call(job.model, job.request, betas=job.betas)
    return await provider.call(job.model, job.request)
