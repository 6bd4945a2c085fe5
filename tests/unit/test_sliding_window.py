"""The breaker's trip arithmetic: consecutive failures, and a failure rate over a minimum
number of calls in a sliding window of whole seconds (a table, with explicit clocks)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.breaker import SlidingWindow
from services.config import BreakerSettings

S = BreakerSettings(window_s=10, min_calls=10, failure_rate=0.5, consecutive_failures=5)


def _run(events: str, *, start: float = 1000.0, step: float = 0.0) -> list[bool]:
    """Feed ``events`` ('s' success, 'f' failure) one ``step`` apart; what each failure said."""
    w = SlidingWindow(S)
    said = []
    for i, e in enumerate(events):
        now = start + i * step
        if e == "s":
            w.success(now)
        else:
            said.append(w.failure(now))
    return said


@pytest.mark.parametrize(
    ("events", "trips"),
    [
        ("ffff", [False] * 4),  # 4 in a row: not yet
        ("fffff", [False] * 4 + [True]),  # the 5th in a row trips
        ("ffffsffff", [False] * 8),  # a success resets the run; 8 of 9 < min_calls
        ("sssssffff" + "f", [False] * 4 + [True]),  # 5 in a row again
        ("sfsfsfsfsf", [False] * 4 + [True]),  # 5 of 10: rate 0.5 at min_calls
        ("ssfsfsfsfsf", [False] * 5),  # 5 of 11 < 0.5
        ("sssssssssf", [False]),  # 1 of 10
    ],
)
def test_trip_table(events: str, trips: list[bool]) -> None:
    """Each failure says whether to trip: a run of consecutive_failures, or a rate at or
    above failure_rate once min_calls calls are in the window."""
    assert _run(events) == trips


def test_calls_older_than_the_window_are_forgotten() -> None:
    """Failures 11 s apart never add up to a rate: the window keeps window_s seconds."""
    w = SlidingWindow(S)
    for i in range(9):
        w.success(1000.0 + i * 11)
        w.failure(1000.0 + i * 11 + 0.5)
    assert w.counts() == (2, 1)  # only the last second's success and failure
    assert w.consecutive == 1


def test_a_success_resets_the_consecutive_count_but_not_the_window() -> None:
    """counts() keeps every call of the window; consecutive restarts at a success."""
    w = SlidingWindow(S)
    for _ in range(3):
        w.failure(1000.0)
    w.success(1000.5)
    assert w.consecutive == 0 and w.counts() == (4, 3)
    w.reset()
    assert w.consecutive == 0 and w.counts() == (0, 0)


@given(st.lists(st.booleans(), max_size=60), st.floats(min_value=0, max_value=3))
def test_a_trip_is_always_explained_by_one_of_the_two_rules(
    outcomes: list[bool], step: float
) -> None:
    """Whenever failure() says trip, either the run or the windowed rate rule holds."""
    w = SlidingWindow(S)
    for i, failed in enumerate(outcomes):
        now = 1000.0 + i * step
        if not failed:
            w.success(now)
            continue
        if w.failure(now):
            calls, failures = w.counts()
            assert w.consecutive >= S.consecutive_failures or (
                calls >= S.min_calls and failures >= S.failure_rate * calls
            )


def _run_degraded(events: str, settings: BreakerSettings = S) -> list[bool]:
    """``_run`` with every failure recorded while the status page says degraded."""
    w = SlidingWindow(settings)
    said = []
    for e in events:
        if e == "s":
            w.success(1000.0)
        else:
            said.append(w.failure(1000.0, degraded=True))
    return said


@pytest.mark.parametrize(
    ("events", "trips"),
    [
        ("ff", [False, False]),  # 2 in a row: not yet
        ("fff", [False, False, True]),  # half of 5, rounded up: the 3rd trips
        ("ffsff", [False] * 4),  # a success resets the run
        ("sssssssfsf", [False, False]),  # 2 of 10 < 0.25
        ("ssssssfsff", [False, False, True]),  # 3 of 10 >= 0.25 at min_calls
    ],
)
def test_a_degraded_scope_trips_on_the_lower_thresholds(events: str, trips: list[bool]) -> None:
    """While the status page says degraded, half the consecutive failures and half the
    failure rate trip the breaker (defaults of the *_degraded settings)."""
    assert _run_degraded(events) == trips


@pytest.mark.parametrize(
    ("fields", "normal", "degraded"),
    [
        ({}, (5, 0.5), (3, 0.25)),
        ({"consecutive_failures": 1, "failure_rate": 0.1}, (1, 0.1), (1, 0.05)),
        ({"consecutive_failures_degraded": 2, "failure_rate_degraded": 0.3}, (5, 0.5), (2, 0.3)),
        # A degraded threshold above the normal one is capped: evidence never raises one.
        (
            {"consecutive_failures": 2, "consecutive_failures_degraded": 4,
             "failure_rate": 0.2, "failure_rate_degraded": 0.9},
            (2, 0.2),
            (2, 0.2),
        ),
    ],
)  # fmt: skip
def test_trip_thresholds_are_lower_or_equal_when_degraded(
    fields: dict[str, float], normal: tuple[int, float], degraded: tuple[int, float]
) -> None:
    """trip_thresholds(): the settings as they are, or the degraded ones capped by them."""
    b = BreakerSettings(**fields)
    assert b.trip_thresholds() == normal
    assert b.trip_thresholds(degraded=True) == degraded


@given(st.lists(st.booleans(), max_size=40))
def test_degraded_never_trips_later_than_normal(outcomes: list[bool]) -> None:
    """Fed the same calls, a degraded window has tripped by the time a normal one trips."""
    normal, degraded = SlidingWindow(S), SlidingWindow(S)
    tripped_degraded = False
    for failed in outcomes:
        if not failed:
            normal.success(1000.0)
            degraded.success(1000.0)
            continue
        tripped_degraded |= degraded.failure(1000.0, degraded=True)
        if normal.failure(1000.0):
            assert tripped_degraded


def test_a_window_with_no_call_within_it_is_idle() -> None:
    """``idle`` holds before any call and once the last call left the window, not before."""
    w = SlidingWindow(BreakerSettings(window_s=10))
    assert w.idle(now=100.0)
    w.failure(now=100.0)
    assert not w.idle(now=109.0)
    assert w.idle(now=110.0)
