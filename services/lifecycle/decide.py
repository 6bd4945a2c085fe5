"""``decide()``: what happens to a job next, as a pure function of what is known.

    (job, attempt, provider outcome, breaker view, now)  ->  one Outcome

No I/O here: the worker gathers the facts (a result already stored? the board's view
after counting this call), asks ``decide``, and hands the outcome to
``services.lifecycle.settle``, which performs it. The whole policy reads as one table
(tested as one in ``tests/unit/test_decide.py``):

    before the call (``outcome`` is None)
      refused at decoding (unknown provider) Dead invalid (not retryable)
      a result is stored already            Duplicate (ack, the provider is not paid twice)
      deadline passed                       Expired
      provider or model open or paused      the job's ``on_outage``: Dead provider_outage
                                            (fail) · FailOver to the first closed fallback
                                            that can take it faithfully · Park
      otherwise                             Call
    after the call
      a reply                               Succeeded
      permanent error                       Dead <its reason> (not retryable)
      transient, provider now blocked       as "provider open or paused" above
      transient, attempts used up           Dead retries_exhausted (retryable)
      transient, attempts left              Retry after backoff (at least the retry-after,
                                            at most ``backoff_max_s``)

A 429 has its own attempt budget (``rate_limited_max_attempts``): it asks us to slow
down, not to give up. ``breaker_signal`` says what a call tells the breaker.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal, Protocol

import msgspec

from schemas.codec import encode
from schemas.jobs import Job
from services.breaker.board import PAUSED
from services.config import ProviderKind, WorkerSettings
from services.errors import PermanentError, ProviderError, RateLimited, Unmappable
from services.overflow import fits
from services.providers.base import Reply
from services.providers.doors import check_door, same_shape, split_betas
from services.providers.mapping import convert, shape_of


class BreakerView(Protocol):
    """What ``decide`` reads of the breakers (``services.breaker.HealthBoard`` is one): the
    state of a (provider, model) pair is the worse of the provider's and the model's."""

    def state(self, provider: str, model: str | None = None) -> str:
        """``paused``, ``open``, ``half_open`` or ``closed``."""
        ...

    def blocked(self, provider: str, model: str | None = None) -> bool:
        """Whether calls to ``provider`` (``model``) must stop (open or paused)."""
        ...

    def outage_id(self, provider: str, model: str | None = None) -> str:
        """The current (or last) outage id of what blocks the pair."""
        ...


class AllClosed:
    """The view of a worker run without a board: every provider closed."""

    def state(self, provider: str, model: str | None = None) -> str:
        return "closed"

    def blocked(self, provider: str, model: str | None = None) -> bool:
        return False

    def outage_id(self, provider: str, model: str | None = None) -> str:
        return ""


# -- outcomes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    """Call the provider."""


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The job has its result already: settle the message without a call."""


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The provider answered: store its answer as the job's one result."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Expired:
    """The deadline passed before the call: an ``expired`` result."""

    message: str = "deadline passed before the call"


@dataclass(frozen=True, slots=True)
class Retry:
    """Hand the job back to be delivered again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True, slots=True)
class Park:
    """Hold the job in AI_PARKED until the provider recovers."""

    reason: str  # provider_open, paused
    last_error: str = ""
    outage_id: str = ""


@dataclass(frozen=True, slots=True)
class FailOver:
    """Send ``job`` (already rewritten for its fallback provider) back to AI_JOBS."""

    job: Job


@dataclass(frozen=True, slots=True)
class Dead:
    """End the job as a dead letter with ``reason``.

    ``answered``: the letter names the job and its producer gets a ``failed`` result;
    otherwise (a message that is not a job we may believe) the letter keeps the
    message's exact bytes and no result is written: its id may be someone else's job.
    """

    reason: str
    message: str
    retryable: bool = False
    answered: bool = True


Outcome = Call | Duplicate | Succeeded | Expired | Retry | Park | FailOver | Dead

#: The outcome of most deliveries, made once.
CALL: Final = Call()


# -- the facts ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings ``decide`` reads."""

    worker: WorkerSettings
    #: The server's max_payload (0: unknown): a fail-over copy must fit in one message.
    max_payload: int = 0
    #: The API kind of each provider, for fail-over between kinds.
    kinds: Mapping[str, ProviderKind] = field(default_factory=dict)
    #: Whether a timed-out call counts towards the breaker (``BreakerSettings``).
    timeouts_count: bool = True


@dataclass(slots=True)
class Situation:
    """What is known of one delivery of a job."""

    job: Job
    attempts: int  # deliveries so far, this one included
    #: The time to hold the deadline against (None: the current time, read only when the
    #: job has a deadline: the worker asks twice per job, and most jobs have none).
    now: datetime | None = None
    #: The provider's answer to this delivery's call; None: not called yet.
    outcome: Reply | ProviderError | None = None
    #: Why the job cannot be served here at all ("": it can).
    refused: str = ""
    #: A result is already stored for the job (looked up only on a redelivery or replay).
    has_result: bool = False


def decide(
    s: Situation,
    policy: Policy,
    view: BreakerView,
    rng: random.Random | None = None,
) -> Outcome:
    """The one outcome of ``s`` (see the module's table)."""
    job = s.job
    if s.refused:
        return Dead("invalid", s.refused)
    outcome = s.outcome
    if isinstance(outcome, Reply):
        return Succeeded(outcome)
    if isinstance(outcome, PermanentError):
        return Dead(outcome.reason, outcome.message)
    if isinstance(outcome, ProviderError):
        last_error = f"{outcome.reason}: {outcome.message}"
        counts = breaker_signal(outcome, policy.worker, timeouts_count=policy.timeouts_count)
        if counts == "failure" and view.blocked(job.provider, job.model):
            return on_outage(job, view, policy, last_error=last_error)
        limit = (
            policy.worker.rate_limited_max_attempts
            if isinstance(outcome, RateLimited)
            else policy.worker.max_attempts
        )
        if s.attempts >= limit:
            message = f"gave up after {s.attempts} attempts; last error ({last_error})"
            return Dead("retries_exhausted", message, retryable=True)
        return Retry(backoff_delay(s.attempts, policy.worker, outcome.retry_after, rng))
    if s.has_result:
        return Duplicate()
    if job.deadline is not None and job.deadline <= (s.now or datetime.now(UTC)):
        return Expired()
    if view.blocked(job.provider, job.model):
        return on_outage(job, view, policy, last_error="")
    return CALL


def on_outage(job: Job, view: BreakerView, policy: Policy, *, last_error: str) -> Outcome:
    """The provider (or the job's model) is open or paused: what the job asked for an outage."""
    state = view.state(job.provider, job.model)
    if job.on_outage == "fail":
        what = (
            f"provider {job.provider}"
            if view.blocked(job.provider)
            else f"model {job.model} of {job.provider}"
        )
        message = f"{what} is {state}" + (f"; {last_error}" if last_error else "")
        return Dead("provider_outage", message, retryable=True)
    if job.on_outage == "failover":
        moved = failover_copy(job, view, policy)
        if moved is not None:
            return FailOver(moved)
    reason = "paused" if state == PAUSED else "provider_open"
    return Park(reason, last_error, view.outage_id(job.provider, job.model))


def failover_copy(job: Job, view: BreakerView, policy: Policy) -> Job | None:
    """The job rewritten for its first closed fallback that can take it faithfully (the
    request maps to the fallback's API, and the copy fits in a message); None if none.

    Between doors of the same API shape (``services.providers.doors``) the request goes
    as it is, unchanged: only a feature the target door does not serve refuses it. A
    target without a model takes the job's (its ``model_map`` names it when called).
    Betas the target does not take are dropped and listed in ``betas_dropped``."""
    src_kind = policy.kinds.get(job.provider)
    for target in job.fallbacks:
        dst_kind = policy.kinds.get(target.provider)
        model = target.model or job.model
        closed = view.state(target.provider, model) == "closed"
        if src_kind is None or dst_kind is None or not closed:
            continue
        try:
            if same_shape(src_kind, dst_kind):
                check_door(job.request, dst_kind)
                request = job.request  # byte for byte: jobs are never changed in place
            else:
                request = convert(
                    job.request, src_kind=shape_of(src_kind), dst_kind=shape_of(dst_kind)
                )
        except Unmappable:
            continue
        metadata = {**job.metadata, "failover_from": f"{job.provider}/{job.model}"}
        betas, dropped = split_betas(job.betas, dst_kind)
        if dropped:
            metadata["betas_dropped"] = ",".join(dropped)
        moved = msgspec.structs.replace(
            job,
            provider=target.provider,
            model=model,
            request=request,
            fallbacks=[],
            metadata=metadata,
            betas=betas,
        )
        # A job by reference goes on by reference (services/bodies.py): it fits.
        if job.request_ref is not None or fits(encode(moved), policy.max_payload):
            return moved
    return None


def backoff_delay(
    attempt: int,
    settings: WorkerSettings,
    retry_after: float | None,
    rng: random.Random | None = None,
) -> float:
    """Seconds before the next delivery: exponential with full jitter, at least the
    provider's retry-after, and never more than ``backoff_max_s`` (a provider asking for
    longer is having an outage, not giving a schedule: see ``breaker_signal``)."""
    cap = min(settings.backoff_max_s, settings.backoff_base_s * (2 ** min(max(attempt - 1, 0), 64)))
    delay = (rng or random).uniform(cap / 2, cap)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, settings.backoff_max_s)


def breaker_signal(
    outcome: Reply | ProviderError,
    settings: WorkerSettings,
    *,
    slow: bool = False,
    timeouts_count: bool = True,
) -> Literal["success", "failure"] | None:
    """What a call tells the provider's breaker: it answered (``success``), it is failing
    (``failure``), or nothing (a misconfiguration, or a 429 that only asks us to slow
    down; a 429 asking for longer than we ever back off is an outage sign).

    Slow is down too: an answer that took longer than its latency budget (``slow``) is a
    failure for the breaker, though the job has its answer; a timeout is a failure unless
    ``timeouts_count`` is off."""
    if isinstance(outcome, PermanentError) and outcome.reason == "config":
        return None
    if isinstance(outcome, Reply | PermanentError):
        return "failure" if slow else "success"
    if isinstance(outcome, RateLimited) and not long_retry_after(outcome, settings):
        return None
    if outcome.reason == "timeout" and not timeouts_count:
        return None
    return "failure"


#: Failures that say the provider itself is unreachable (connection, DNS, TLS: the
#: adapters classify them all as ``connection``): they count against the provider's
#: breaker. Every other failure (overloaded, 529, 5xx, timeouts, slow answers, bad
#: bodies) counts against the model that was called; the provider opens on those only
#: when ``models_to_open_provider`` of its models are open.
PROVIDER_WIDE: Final = frozenset({"connection"})


def breaker_scope(outcome: Reply | ProviderError) -> Literal["provider", "model"]:
    """Which breaker a failed (or slow) call counts against."""
    if isinstance(outcome, ProviderError) and outcome.reason in PROVIDER_WIDE:
        return "provider"
    return "model"


def probe_says_up(
    outcome: ProviderError | None,
    settings: WorkerSettings,
    *,
    slow: bool = False,
    provider_scope: bool = False,
    model_known_sick: bool = False,
) -> bool:
    """Whether one probe says its scope is up (a success in the prober's run).

    As ``breaker_signal`` reads a call: an answer within its latency budget, or a permanent
    error other than ``config`` (the provider answered; a retired model or a request the
    model refuses ends its jobs as dead letters with that reason once they replay, instead
    of holding them parked until they age out). A timeout, a slow answer, a connection
    failure, a 429 are not up. For the provider's own scope, probed with its probe model, a
    failure that counts against that model is the provider answering too when the model's
    own breaker is open already (``model_known_sick``): its trouble is its own."""
    if outcome is None:
        return not slow
    signal = breaker_signal(outcome, settings, slow=slow)
    if signal == "success":
        return True
    if signal is None or outcome.reason == "timeout" or slow:
        return False
    return provider_scope and model_known_sick and breaker_scope(outcome) == "model"


def long_retry_after(exc: ProviderError, settings: WorkerSettings) -> bool:
    """Whether the provider asked to wait longer than we ever back off: a sign of an outage."""
    return exc.retry_after is not None and exc.retry_after > settings.backoff_max_s
