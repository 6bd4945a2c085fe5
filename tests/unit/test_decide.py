"""``decide()`` as a table: every row one situation and the one outcome it must give.

No NATS, no provider: the facts go in, an outcome comes out. The rows follow the table
in ``services/lifecycle/decide.py``.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.jobs import Job, Target
from schemas.results import Usage
from services.config import WorkerSettings
from services.errors import PermanentError, ProviderError, RateLimited, TransientError
from services.lifecycle.decide import (
    AllClosed,
    Call,
    Dead,
    Duplicate,
    Expired,
    FailOver,
    Park,
    Policy,
    Retry,
    Situation,
    Succeeded,
    breaker_signal,
    decide,
    probe_says_up,
)
from services.providers.base import Reply

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
WORKER = WorkerSettings(
    max_attempts=3, rate_limited_max_attempts=5, backoff_base_s=1.0, backoff_max_s=60.0
)
POLICY = Policy(worker=WORKER, max_payload=0, kinds={"a": "anthropic", "b": "anthropic"})
REQUEST = {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
REPLY = Reply(response={"id": "msg_1"}, usage=Usage(input_tokens=1, output_tokens=1), model="m")


class View:
    """A breaker view from a dict: scope -> state (``a``, or ``a_m`` for model m of a;
    missing: closed). A pair's state is the worse of its two, as the board reads it."""

    ORDER = ("paused", "open", "half_open", "closed")

    def __init__(self, **states: str) -> None:
        self.states = states

    def _own(self, provider: str, model: str | None) -> str:
        return self.states.get(f"{provider}_{model}" if model else provider, "closed")

    def state(self, provider: str, model: str | None = None) -> str:
        both = (self._own(provider, None), self._own(provider, model))
        return min(both, key=self.ORDER.index)

    def blocked(self, provider: str, model: str | None = None) -> bool:
        return self.state(provider, model) in ("open", "paused")

    def outage_id(self, provider: str, model: str | None = None) -> str:
        if self.blocked(provider):
            return f"{provider}-outage"
        return f"{provider}/{model}-outage" if self.blocked(provider, model) else ""


def job(**kw: Any) -> Job:
    fields: dict[str, Any] = {"id": "j1", "provider": "a", "model": "m", "request": REQUEST}
    fields.update(kw)
    return Job(**fields)


def transient(retry_after: float | None = None) -> ProviderError:
    return TransientError("overloaded", reason="overloaded", status=529, retry_after=retry_after)


def limited(retry_after: float) -> ProviderError:
    return RateLimited("slow down", reason="rate_limited", status=429, retry_after=retry_after)


def permanent(reason: str = "invalid_request") -> ProviderError:
    return PermanentError("bad request", reason=reason, status=400)


LATE = NOW - timedelta(seconds=1)
SOON = NOW + timedelta(hours=1)
FAILOVER = {"on_outage": "failover", "fallbacks": [Target(provider="b", model="m2")]}

# (name, situation, view, expected). ``Retry`` rows are compared by type and delay bounds.
ROWS: list[tuple[str, Situation, Any, object]] = [
    # before the call
    ("a fresh job is called", Situation(job(), 1, NOW), View(), Call()),
    (
        "a job refused at decoding is dead, not retryable",
        Situation(job(), 1, NOW, refused="unknown provider 'x'"),
        View(),
        Dead("invalid", "unknown provider 'x'"),
    ),
    (
        "a refusal wins over everything else",
        Situation(job(deadline=LATE), 2, NOW, refused="no", has_result=True),
        View(a="open"),
        Dead("invalid", "no"),
    ),
    (
        "a job with a stored result is a duplicate",
        Situation(job(deadline=LATE), 2, NOW, has_result=True),
        View(a="open"),
        Duplicate(),
    ),
    (
        "a passed deadline expires, before any breaker",
        Situation(job(deadline=LATE), 1, NOW),
        View(a="open"),
        Expired(),
    ),
    ("a deadline still ahead is called", Situation(job(deadline=SOON), 1, NOW), View(), Call()),
    (
        "an open provider parks the job",
        Situation(job(), 1, NOW),
        View(a="open"),
        Park("provider_open", "", "a-outage"),
    ),
    (
        "a paused provider parks it as paused",
        Situation(job(), 1, NOW),
        View(a="paused"),
        Park("paused", "", "a-outage"),
    ),
    ("half-open lets calls through", Situation(job(), 1, NOW), View(a="half_open"), Call()),
    (
        "an open model parks its job, under the model's outage",
        Situation(job(), 1, NOW),
        View(a_m="open"),
        Park("provider_open", "", "a/m-outage"),
    ),
    (
        "another model open is none of this job's business",
        Situation(job(), 1, NOW),
        View(a_other="open"),
        Call(),
    ),
    (
        "a paused model parks its job as paused",
        Situation(job(), 1, NOW),
        View(a="half_open", a_m="paused"),
        Park("paused", "", "a/m-outage"),
    ),
    (
        "an open provider wins over its closed model",
        Situation(job(), 1, NOW),
        View(a="open", a_m="closed"),
        Park("provider_open", "", "a-outage"),
    ),
    (
        "on_outage=fail names the model that is open",
        Situation(job(on_outage="fail"), 1, NOW),
        View(a_m="open"),
        Dead("provider_outage", "model m of a is open", retryable=True),
    ),
    (
        "a fallback whose model is open is no way out: park",
        Situation(job(**FAILOVER), 1, NOW),
        View(a="open", b_m2="open"),
        Park("provider_open", "", "a-outage"),
    ),
    (
        "a sick model fails over to its fallback on the same provider's other model",
        Situation(job(on_outage="failover", fallbacks=[Target(provider="a", model="m2")]), 1, NOW),
        View(a_m="open"),
        FailOver,
    ),
    (
        "on_outage=fail ends the job, retryable",
        Situation(job(on_outage="fail"), 1, NOW),
        View(a="open"),
        Dead("provider_outage", "provider a is open", retryable=True),
    ),
    (
        "on_outage=failover sends it to a closed fallback",
        Situation(job(**FAILOVER), 1, NOW),
        View(a="open"),
        FailOver,
    ),
    (
        "a fallback that is not closed is no way out: park",
        Situation(job(**FAILOVER), 1, NOW),
        View(a="open", b="half_open"),
        Park("provider_open", "", "a-outage"),
    ),
    (
        "a fallback of an unknown kind is no way out: park",
        Situation(job(on_outage="failover", fallbacks=[Target(provider="z", model="m")]), 1, NOW),
        View(a="open"),
        Park("provider_open", "", "a-outage"),
    ),
    # after the call
    ("a reply succeeds", Situation(job(), 1, NOW, outcome=REPLY), View(), Succeeded(REPLY)),
    (
        "a reply succeeds even if the breaker opened meanwhile",
        Situation(job(), 1, NOW, outcome=REPLY),
        View(a="open"),
        Succeeded(REPLY),
    ),
    (
        "a permanent error is dead with its reason",
        Situation(job(), 1, NOW, outcome=permanent("auth")),
        View(),
        Dead("auth", "bad request"),
    ),
    (
        "a transient error with attempts left retries",
        Situation(job(), 1, NOW, outcome=transient()),
        View(),
        Retry,
    ),
    (
        "a transient error on the last attempt is dead, retryable",
        Situation(job(), 3, NOW, outcome=transient()),
        View(),
        Dead(
            "retries_exhausted",
            "gave up after 3 attempts; last error (overloaded: overloaded)",
            retryable=True,
        ),
    ),
    (
        "a transient error that tripped the breaker parks, with the error",
        Situation(job(), 1, NOW, outcome=transient()),
        View(a="open"),
        Park("provider_open", "overloaded: overloaded", "a-outage"),
    ),
    (
        "a tripped breaker parks even on the last attempt",
        Situation(job(), 3, NOW, outcome=transient()),
        View(a="open"),
        Park("provider_open", "overloaded: overloaded", "a-outage"),
    ),
    (
        "a 429 has a larger budget: attempt 3 of 5 retries",
        Situation(job(), 3, NOW, outcome=limited(1.0)),
        View(),
        Retry,
    ),
    (
        "a 429 on attempt 5 is dead",
        Situation(job(), 5, NOW, outcome=limited(1.0)),
        View(),
        Dead(
            "retries_exhausted",
            "gave up after 5 attempts; last error (rate_limited: slow down)",
            retryable=True,
        ),
    ),
    (
        "a short 429 does not park while the breaker is open: it only asks to slow down",
        Situation(job(), 1, NOW, outcome=limited(1.0)),
        View(a="open"),
        Retry,
    ),
    (
        "a 429 asking for longer than backoff_max_s is an outage sign: park",
        Situation(job(), 1, NOW, outcome=limited(1e9)),
        View(a="open"),
        Park("provider_open", "rate_limited: slow down", "a-outage"),
    ),
    (
        "after a failed call, on_outage=fail ends it",
        Situation(job(on_outage="fail"), 1, NOW, outcome=transient()),
        View(a="open"),
        Dead("provider_outage", "provider a is open; overloaded: overloaded", retryable=True),
    ),
]


@pytest.mark.parametrize(
    ("situation", "view", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_decide(situation: Situation, view: Any, expected: object) -> None:
    got = decide(situation, POLICY, view, random.Random(7))
    if isinstance(expected, type):
        assert isinstance(got, expected)
    else:
        assert got == expected


def test_failover_rewrites_the_job_for_its_fallback() -> None:
    got = decide(Situation(job(**FAILOVER), 1, NOW), POLICY, View(a="open"))
    assert isinstance(got, FailOver)
    moved = got.job
    assert (moved.provider, moved.model, moved.fallbacks) == ("b", "m2", [])
    assert moved.metadata["failover_from"] == "a/m" and moved.id == "j1"


def test_failover_skips_a_fallback_whose_copy_would_not_fit() -> None:
    """A copy larger than the server's max_payload cannot be published: park instead."""
    small = Policy(worker=WORKER, max_payload=600, kinds=POLICY.kinds)
    big = job(**FAILOVER, metadata={"pad": "x" * 2000})
    assert isinstance(decide(Situation(big, 1, NOW), small, View(a="open")), Park)
    assert isinstance(decide(Situation(big, 1, NOW), POLICY, View(a="open")), FailOver)


def test_failover_to_another_api_kind_maps_the_request_or_parks() -> None:
    kinds = Policy(worker=WORKER, kinds={"a": "anthropic", "b": "openai"})
    mappable = decide(Situation(job(**FAILOVER), 1, NOW), kinds, View(a="open"))
    assert isinstance(mappable, FailOver) and "messages" in mappable.job.request
    tools = job(**FAILOVER, request={**REQUEST, "cache_control": {"type": "ephemeral"}})
    assert isinstance(decide(Situation(tools, 1, NOW), kinds, View(a="open")), Park)


def test_no_board_means_every_provider_is_closed() -> None:
    assert decide(Situation(job(), 1, NOW), POLICY, AllClosed()) == Call()


@given(
    attempt=st.integers(1, 2),
    retry_after=st.one_of(st.none(), st.floats(0, 1e12, allow_nan=False)),
    seed=st.integers(0, 2**32),
)
def test_a_retry_waits_at_least_the_retry_after_and_at_most_the_cap(
    attempt: int, retry_after: float | None, seed: int
) -> None:
    got = decide(
        Situation(job(), attempt, NOW, outcome=transient(retry_after)),
        POLICY,
        View(),
        random.Random(seed),
    )
    assert isinstance(got, Retry)
    assert 0 <= got.delay <= WORKER.backoff_max_s
    if retry_after is not None:
        assert got.delay >= min(retry_after, WORKER.backoff_max_s)


@pytest.mark.parametrize(
    ("answer", "signal"),
    [
        (REPLY, "success"),
        (permanent(), "success"),  # it answered: no outage
        (permanent("config"), None),  # our misconfiguration says nothing of its health
        (transient(), "failure"),
        (limited(1.0), None),  # slow down, not an outage
        (limited(1e9), "failure"),  # asks for longer than we ever wait: an outage sign
    ],
)
def test_breaker_signal(answer: Reply | ProviderError, signal: str | None) -> None:
    assert breaker_signal(answer, WORKER) == signal


def timeout() -> ProviderError:
    return TransientError("read timed out", reason="timeout")


@pytest.mark.parametrize(
    ("answer", "kw", "signal"),
    [
        (REPLY, {"slow": True}, "failure"),  # answered, but over its latency budget
        (permanent(), {"slow": True}, "failure"),
        (permanent("config"), {"slow": True}, None),
        (timeout(), {}, "failure"),  # timeouts count by default
        (timeout(), {"timeouts_count": False}, None),
        (transient(), {"timeouts_count": False}, "failure"),  # only timeouts are exempt
    ],
)
def test_slow_is_down_too(answer: Reply | ProviderError, kw: dict[str, Any], signal: str) -> None:
    assert breaker_signal(answer, WORKER, **kw) == signal


def test_a_timeout_that_does_not_count_retries_though_the_breaker_is_open() -> None:
    """With timeouts exempt, a timed-out call says nothing of the breaker: it retries
    rather than parking on a breaker other calls opened (a 529 would park)."""
    exempt = Policy(worker=WORKER, timeouts_count=False)
    assert isinstance(
        decide(Situation(job(), 1, NOW, outcome=timeout()), exempt, View(a="open")), Retry
    )
    assert isinstance(
        decide(Situation(job(), 1, NOW, outcome=timeout()), POLICY, View(a="open")), Park
    )


def test_a_model_budget_overrides_the_providers() -> None:
    from services.config import ProviderSettings

    cfg = ProviderSettings(kind="anthropic", latency_budget_s=2.0, model_latency_budget_s={"o": 9})
    assert (cfg.latency_budget("o"), cfg.latency_budget("s")) == (9, 2.0)
    assert ProviderSettings(kind="anthropic").latency_budget("s") is None


TIMEOUT = TransientError("read timed out", reason="timeout")
RESET = TransientError("connection reset", reason="connection")


@pytest.mark.parametrize(
    ("outcome", "kw", "up"),
    [
        (None, {}, True),
        (None, {"slow": True}, False),
        (permanent("not_found"), {}, True),  # a retired model answers: its jobs go dead
        (PermanentError("no key", reason="config"), {}, False),
        (limited(1.0), {}, False),
        (transient(), {}, False),
        (TIMEOUT, {}, False),
        (RESET, {"provider_scope": True, "model_known_sick": True}, False),
        (transient(), {"provider_scope": True}, False),
        # the provider's probe model is open on its own: its 529 is the provider answering
        (transient(), {"provider_scope": True, "model_known_sick": True}, True),
        (TIMEOUT, {"provider_scope": True, "model_known_sick": True}, False),
    ],
    ids=[
        "answered", "slow", "permanent", "config", "429", "529", "timeout",
        "provider unreachable", "provider probe model 529", "probe model known sick",
        "provider probe timeout",
    ],
)  # fmt: skip
def test_probe_says_up(outcome: ProviderError | None, kw: dict[str, bool], up: bool) -> None:
    """What one probe says of its scope, row by row (see ``probe_says_up``)."""
    assert probe_says_up(outcome, WORKER, **kw) is up
