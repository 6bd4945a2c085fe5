"""The drill's per-model numbers (services/tools/timeline.py), as tables of small timelines."""

from __future__ import annotations

import math
from typing import Any

import pytest

from services.tools.timeline import (
    Transition,
    Window,
    inside,
    merge,
    model_numbers,
    periods,
)

SICK = "claude-opus-4-1"
WELL = "claude-haiku-4-5"


def tr(at: float, state: str, model: str = "") -> Transition:
    return Transition(at=at, model=model, state=state)


def test_merge_joins_overlapping_and_touching_intervals() -> None:
    """Overlapping and touching intervals become one; the rest stay apart, sorted."""
    assert merge([(5, 6), (1, 2), (2, 3), (2.5, 4)]) == [(1, 4), (5, 6)]
    assert merge([]) == []


@pytest.mark.parametrize(
    ("t", "found"), [(0.5, None), (1, (1, 2)), (1.99, (1, 2)), (2, None), (7, (5, math.inf))]
)
def test_inside_finds_the_interval_holding_a_moment(t: float, found: Any) -> None:
    """An interval holds its start, not its end; an open-ended one holds everything after."""
    assert inside(t, [(1, 2), (5, math.inf)]) == found


def test_periods_per_scope_are_merged_and_may_stay_open() -> None:
    """A period runs from entering the states to leaving them; scopes not asked about are
    ignored; one still open at the end runs to infinity."""
    transitions = [
        tr(1, "open"),
        tr(3, "half_open"),
        tr(4, "open"),
        tr(6, "closed"),
        tr(2, "open", SICK),
        tr(5, "closed", SICK),
        tr(7, "open", WELL),
        tr(9, "open"),
    ]
    assert periods(transitions, {""}, {"open"}) == [(1, 3), (4, 6), (9, math.inf)]
    assert periods(transitions, {"", SICK}, {"open"}) == [(1, 6), (9, math.inf)]
    assert periods(transitions, {"", SICK}, {"open", "half_open"}) == [(1, 6), (9, math.inf)]
    assert periods(transitions, {SICK}, {"open"}) == [(2, 5)]


# One sick model: fault window [10, 20). Its breaker opens at 10.3, half-opens at 21, closes at 23.
MODEL_OUTAGE = {
    "windows": [Window(10, 20, frozenset({SICK}))],
    "transitions": [tr(10.3, "open", SICK), tr(21, "half_open", SICK), tr(23, "closed", SICK)],
}
# The same outage as it goes today: the provider's breaker opens for everyone.
PROVIDER_WIDE = {
    "windows": [Window(10, 20, frozenset({SICK}))],
    "transitions": [tr(10.3, "open"), tr(21, "half_open"), tr(23, "closed")],
}


@pytest.mark.parametrize(
    ("case", "model", "parks", "calls", "expected"),
    [
        pytest.param(
            MODEL_OUTAGE, SICK,
            [("a", 10.4), ("b", 15), ("b", 22), ("c", 20.5)],
            [9, 10.1, 10.2, 10.35, 10.6, 12, 21.5],
            {"parked": 3, "parked_while_healthy": 0, "calls_during_outage": 5,
             "calls_while_open": 3, "calls_during_outage_beyond_trip": 2, "trip_s": 0.3},
            id="sick model: parks inside window and recovery, two calls past the grace",
        ),
        pytest.param(
            MODEL_OUTAGE, WELL, [], [5, 11, 15, 19],
            {"parked": 0, "parked_while_healthy": 0, "calls_during_outage": 0,
             "calls_while_open": 0, "calls_during_outage_beyond_trip": 0, "trip_s": None},
            id="healthy model served throughout",
        ),
        pytest.param(
            PROVIDER_WIDE, WELL, [("x", 11), ("y", 22), ("y", 22.5)], [5, 11],
            {"parked": 2, "parked_while_healthy": 2, "calls_during_outage": 0,
             "calls_while_open": 0, "calls_during_outage_beyond_trip": 0, "trip_s": None},
            id="healthy model parked by the provider's breaker: parked while healthy",
        ),
        pytest.param(
            PROVIDER_WIDE, SICK, [("a", 12)], [10.1, 12],
            {"parked": 1, "parked_while_healthy": 0, "calls_during_outage": 2,
             "calls_while_open": 1, "calls_during_outage_beyond_trip": 1, "trip_s": 0.3},
            id="the provider's breaker covers the sick model too",
        ),
        pytest.param(
            {"windows": [Window(10, 20)], "transitions": [tr(10.3, "open"), tr(23, "closed")]},
            WELL, [("a", 12), ("b", 22.9), ("c", 23.5)], [],
            {"parked": 3, "parked_while_healthy": 1, "calls_during_outage": 0,
             "calls_while_open": 0, "calls_during_outage_beyond_trip": 0, "trip_s": 0.3},
            id="provider outage: a park after the close counts",
        ),
    ],
)  # fmt: skip
def test_model_numbers(
    case: dict[str, Any],
    model: str,
    parks: list[tuple[str, float]],
    calls: list[float],
    expected: dict[str, Any],
) -> None:
    """Each number of the module docstring, on a sick and a healthy model, per-model and
    provider-wide breakers, with a grace of 0.2 s."""
    numbers = model_numbers(
        model,
        windows=case["windows"],
        transitions=case["transitions"],
        parks=parks,
        calls=calls,
        grace_s=0.2,
    )
    numbers.pop("probes_during_outage")
    assert numbers == expected


def test_flapping_counts_each_trip_and_keeps_one_sick_stretch() -> None:
    """Two windows with a gap; the breaker half-opens in the gap and re-opens in the second
    window: calls in the half-open gap and in each trip's first board poll are not beyond
    the trip; the trip is timed from the first window; probes are counted apart."""
    windows = [Window(10, 13, frozenset({SICK})), Window(15, 18, frozenset({SICK}))]
    transitions = [
        tr(10.2, "open", SICK),
        tr(14, "half_open", SICK),
        tr(15.1, "open", SICK),
        tr(19, "half_open", SICK),
        tr(20, "closed", SICK),
    ]
    numbers = model_numbers(
        SICK,
        windows=windows,
        transitions=transitions,
        parks=[("a", 11), ("b", 14.5), ("c", 15.5), ("d", 19.5), ("e", 20.5)],
        calls=[10.1, 10.3, 11, 14.2, 15.05, 15.2, 16],
        probes=[11, 12, 14.5, 16, 18.5],
        grace_s=0.2,
    )
    assert numbers == {
        "parked": 5,
        "parked_while_healthy": 1,
        "calls_during_outage": 6,
        "calls_while_open": 4,
        "calls_during_outage_beyond_trip": 2,
        "probes_during_outage": 3,
        "trip_s": 0.2,
    }


@pytest.mark.parametrize(("tail_s", "healthy_parks"), [(0.0, 1), (1.0, 0)])
def test_a_breaker_tripped_by_calls_that_outlived_the_window_is_part_of_it(
    tail_s: float, healthy_parks: int
) -> None:
    """Slow calls started before a window's end time out after it and can trip the breaker
    then: with ``tail_s`` as long as a call, that open period still belongs to the outage."""
    numbers = model_numbers(
        SICK,
        windows=[Window(10, 12, frozenset({SICK}))],
        transitions=[tr(12.5, "open", SICK), tr(14, "closed", SICK)],
        parks=[("a", 13)],
        calls=[],
        tail_s=tail_s,
    )
    assert numbers["parked_while_healthy"] == healthy_parks
    assert numbers["trip_s"] == 2.5
