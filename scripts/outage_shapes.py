"""Run the outage drill of each shape on this machine; print the reports as JSON.

    python scripts/outage_shapes.py                 # every scenario, 10 s outages at 100 jobs/s
    python scripts/outage_shapes.py --quick         # every scenario, short (the chaos tests' sizes)
    python scripts/outage_shapes.py --scenario model-outage --text

Each scenario is ``ridethrough demo --scenario S`` (services/tools/demo.py): a fleet of two
worker processes, the prober and the replayer on embedded NATS, jobs for two models taken in
turn (the first falls sick), the fake provider playing the outage's shape. At 100 jobs/s the
sick model alone gets 50 jobs/s, the rate the issue's numbers are given at:

- ``model-outage``: 0 jobs of the healthy model parked; the sick model's breaker opens within
  1 s (``models[sick].trip_s``); 0 lost, 0 duplicated.
- every scenario: 0 calls to a sick model during its outage beyond the trip and the probes
  (``calls_during_outage_beyond_trip``); the definitions are in services/tools/timeline.py.

The report is the demo's, with ``first_replay_s`` (recovery to the first replayed result) and
the drill's settings beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.config import load_settings
from services.tools.demo import SCENARIOS, Drill, Scenario, report_lines, run_drill


def drill_of(scenario: Scenario, *, quick: bool, rate: float) -> Drill:
    """The drill of ``scenario``: load before, during and after the outage."""
    if quick:
        at, outage, after = 1.5, (5.0 if scenario in ("slow", "flapping") else 2.5), 1.5
    else:
        at, outage, after = 5.0, 10.0, 5.0
    return Drill(
        jobs=int(rate * (at + outage + after)),
        rate=rate,
        outage_s=outage,
        outage_at_s=at,
        seed=7,
        scenario=scenario,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short drills (about 15 s each)")
    parser.add_argument("--scenario", choices=SCENARIOS, action="append", help="repeatable")
    parser.add_argument("--rate", type=float, default=None, help="jobs/s (default 100; quick 50)")
    parser.add_argument("--text", action="store_true", help="the demo's text report instead")
    args = parser.parse_args()
    rate = args.rate or (50.0 if args.quick else 100.0)
    out: dict[str, Any] = {}
    for scenario in args.scenario or SCENARIOS:
        drill = drill_of(cast(Scenario, scenario), quick=args.quick, rate=rate)
        report = await run_drill(drill, load_settings(), console=None)
        if args.text:
            print("\n".join(report_lines(report)), flush=True)
        report["drill"] = {k: v for k, v in asdict(drill).items() if k != "deadline_s"}
        out[scenario] = report
    if not args.text:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
