"""Chaos: the outage drills of real shapes (``ridethrough demo --scenario S``), end to end.

Each scenario runs the drill as the command does: embedded nats-server, the fake provider
playing the outage's shape, two worker processes, the prober and the replayer, each in its
own process; jobs for two models at 50 a second. Each drill runs once per module and its
report is checked by the tests below. The per-model numbers are defined in
``services/tools/timeline.py``; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from services.config import load_settings
from services.tools.demo import (
    HEALTHY_MODEL,
    SCENARIOS,
    SICK_MODEL,
    Drill,
    Scenario,
    report_lines,
    run_drill,
)

pytestmark = pytest.mark.chaos

RATE = 50.0
OUTAGE_AT_S = 1.5
#: Seconds of outage per scenario. ``slow`` gets longer: its failures are timeouts a second
#: late, and until the breaker is per model they trip it on the window's failure rate only.
#: ``flapping``'s two outages of 1.5 s have 2 s of recovery between them.
OUTAGE_S = {"provider-outage": 2.5, "model-outage": 2.5, "slow": 5.0, "flapping": 5.0}


def drill_of(scenario: Scenario) -> Drill:
    """A short drill of ``scenario``: load before, during and a little after the outage."""
    outage = OUTAGE_S[scenario]
    return Drill(
        jobs=int(RATE * (OUTAGE_AT_S + outage + 1.5)),
        rate=RATE,
        outage_s=outage,
        outage_at_s=OUTAGE_AT_S,
        scenario=scenario,
        recovery_s=2.0,
    )


@pytest.fixture(scope="module")
def drill() -> Callable[[Scenario], dict[str, Any]]:
    """Runs each scenario's drill once for the module and hands out its report."""
    reports: dict[Scenario, dict[str, Any]] = {}

    def report(scenario: Scenario) -> dict[str, Any]:
        if scenario not in reports:
            run = run_drill(drill_of(scenario), load_settings(), console=None)
            reports[scenario] = asyncio.run(run)
        return reports[scenario]

    return report


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_drill_loses_nothing_and_makes_no_call_beyond_the_trip(
    drill: Callable[[Scenario], dict[str, Any]], scenario: Scenario
) -> None:
    """Every job of both models succeeds exactly once; the sick model's breaker opened and
    its jobs were parked; no model was called during its outage beyond the trip."""
    report = drill(scenario)
    assert report["lost"] == report["duplicates"] == report["dead"] == 0, report
    assert report["succeeded"] == report["submitted"] > 0, report
    models = report["models"]
    assert list(models) == [SICK_MODEL, HEALTHY_MODEL]
    for numbers in models.values():
        assert numbers["succeeded"] == numbers["submitted"] > 0, models
        assert numbers["calls_during_outage_beyond_trip"] == 0, models
    sick = models[SICK_MODEL]
    assert sick["role"] == "sick" and sick["trip_s"] is not None and sick["parked"] > 0, models
    assert report["detect_s"] is not None and report["peak_parked"] > 0


def test_provider_outage_parks_every_model_and_none_while_healthy(
    drill: Callable[[Scenario], dict[str, Any]],
) -> None:
    """A provider-wide storm hits both models: both are parked, no park happened outside
    the outage and its recovery."""
    models = drill("provider-outage")["models"]
    for numbers in models.values():
        assert numbers["role"] == "sick" and numbers["parked"] > 0, models
        assert numbers["parked_while_healthy"] == 0, models


@pytest.mark.parametrize("scenario", ["model-outage", "slow", "flapping"])
def test_one_sick_model_leaves_the_other_served_throughout(
    drill: Callable[[Scenario], dict[str, Any]], scenario: Scenario
) -> None:
    """One model's 529s, timeouts or flapping park its jobs only: the healthy model has no
    job parked (while healthy or at all), the sick one none outside its outage."""
    models = drill(scenario)["models"]
    healthy, sick = models[HEALTHY_MODEL], models[SICK_MODEL]
    assert healthy["role"] == "healthy" and sick["role"] == "sick", models
    assert sick["parked_while_healthy"] == 0, models
    assert healthy["parked"] == healthy["parked_while_healthy"] == 0, models


def test_the_drill_with_notify_prints_a_signed_open_and_summary_per_incident() -> None:
    """`ridethrough demo --notify`: the notifier runs with the fleet, and the local receiver
    gets, for the one sick model, one "opened" and one "closed" (signed: the receiver
    refuses others), the healthy model none; no job is lost."""
    from dataclasses import replace

    drill = replace(drill_of("model-outage"), notify=True)
    report = asyncio.run(run_drill(drill, load_settings(), console=None))
    assert report["lost"] == 0 and report["duplicates"] == 0
    kinds = [(n["subject"], n["type"].rsplit(".", 1)[1]) for n in report["notifications"]]
    sick = f"{drill.provider}/{drill.models[0]}"
    assert sorted(kinds) == [(sick, "closed"), (sick, "opened")]
    lines = report_lines(report)
    assert any("notifications sent    2" in line for line in lines)
