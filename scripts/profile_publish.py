"""Where a producer's time goes: ``Producer.submit_many`` against raw nats-py
``publish_async`` of the same bytes, each N jobs per round, alternating, and (with
py-spy installed) the share of the producer's samples spent in the functions that
the baseline does not run.

    python scripts/profile_publish.py                # 15 rounds of 20,000 jobs
    python scripts/profile_publish.py --rounds 5 --no-profile

As in ``ridethrough bench -s publish``: inputs built before the clock starts, frozen
out of the garbage collector's way; the baseline's jobs are encoded before its clock
starts, so encoding is part of ``ours`` only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.subjects import JOBS_STREAM
from services.config import load_settings
from services.producer import Producer
from services.tools import bench

#: functions whose inclusive share of the producer's samples is reported
WATCHED = (
    "Producer._prepare",
    "decode_job",
    "encode",
    "JetStreamContext.publish_async",
    "token_hex",
    "wait",
)


async def rounds(mode: str, n_rounds: int, jobs: int) -> list[float]:
    """Jobs/s of ``n_rounds`` rounds; ``mode`` is ``ours``, ``raw`` or ``both`` (alternating)."""
    modes = ["ours", "raw"] if mode == "both" else [mode]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    async with bench.stage(load_settings(), bench.BenchOptions(jobs=jobs), "profile-publish") as st:
        producer = Producer(st.nc)
        for _ in range(n_rounds):
            for m in modes:
                batch = bench.bench_jobs(jobs)
                wire = bench._wire(batch) if m == "raw" else []
                gc.freeze()
                started = time.perf_counter()
                if m == "raw":
                    await bench._publish_raw(st.js, wire)
                else:
                    await producer.submit_many(batch)
                rates[m].append(jobs / (time.perf_counter() - started))
                gc.unfreeze()
                await bench._purge(st.js, JOBS_STREAM)
    return [statistics.median(rates[m]) for m in modes]


def inclusive_shares(raw: Path, within: str) -> dict[str, float]:
    """Share (%) of the samples under ``within`` that also pass through each WATCHED function."""
    total = 0
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        names = {frame.split(" (")[0] for frame in stack.split(";")}
        if within not in names:
            continue
        total += int(n)
        for name in WATCHED:
            if name in names:
                counts[name] += int(n)
    return {name: round(100 * counts[name] / (total or 1), 1) for name in WATCHED}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--inner", choices=["ours", "raw"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:  # one side alone, under py-spy
        asyncio.run(rounds(args.inner, args.rounds, args.jobs))
        return 0
    ours, raw = asyncio.run(rounds("both", args.rounds, args.jobs))
    report: dict[str, object] = {
        "jobs_per_round": args.jobs,
        "rounds": args.rounds,
        "ours": round(ours),
        "baseline": round(raw),
        "ratio": round(ours / raw, 3),
    }
    spy = None if args.no_profile else shutil.which("py-spy")
    if spy:
        out = Path(tempfile.mkdtemp()) / "ours.raw"
        cmd = [sys.executable, __file__, "--inner", "ours", "--rounds", str(args.rounds)]
        subprocess.run(
            [spy, "record", "--format", "raw", "-r", "400", "-o", str(out), "--", *cmd,
             "--jobs", str(args.jobs)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        report["submit_many_samples_pct"] = inclusive_shares(out, "Producer.submit_many")
    elif not args.no_profile:
        report["submit_many_samples_pct"] = "py-spy not installed (pip install py-spy)"
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
