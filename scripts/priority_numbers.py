"""Measure priority on the live path (issue 12, item 3); print the numbers as JSON.

    python scripts/priority_numbers.py                    # 5,000 low, then 100 high
    python scripts/priority_numbers.py --latency-ms 1000 --concurrency 64 --repeat 3

Stands up the local stack (embedded nats-server, the fake provider answering after
``--latency-ms``, ``--workers`` worker processes), parks nothing, submits ``--low`` low jobs
and, as soon as they are stored, ``--high`` high jobs. Each job's completion time runs from
its submit to its result's arrival; the script reports p50 and p99 of each class, their
ratio (the issue's target: high p50 below 10% of low p50), and how many low jobs were still
waiting (stored, not finished) when the high ones were submitted.

What bounds the ratio: a worker cannot take back a call it has started, so a high job
waits for one freed slot and then its own call. With C slots, latency L and N low jobs
waiting, low p50 is about L x (1 + N / 2C) and high p50 at least L: the ratio cannot go
below 1 / (1 + N / 2C), 9% for N = 5,000 and C = 256. The target needs a backlog that is
deep against the slots, which is when priority matters.

It reads nothing specific to one release (no consumer names), so the same file run in an
older checkout measures the release before priority.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import subjects as s
from services.config import ProviderSettings, load_settings
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.tools.fake import FaultConfig
from services.tools.stack import ServiceProcess, local_stack

PROVIDER = "anthropic"
CHUNK = 500


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def one_run(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """One stack, one backlog: the completion times of each class."""
    base = load_settings()
    base = base.with_changes(
        providers={PROVIDER: ProviderSettings(kind="anthropic")},
        worker=base.worker.model_copy(update={"concurrency": args.concurrency}),
    )
    with local_stack(base, fake_config=FaultConfig(latency_ms=args.latency_ms)) as stack:
        st = stack.settings
        async with await Producer.connect(st) as producer:
            js = producer.js
            await ensure_topology(js, st)
            sent: dict[str, float] = {}
            arrived: dict[str, float] = {}
            total = args.low + args.high + args.workers
            all_in = asyncio.Event()
            prefix = len(s.result_subject(""))

            async def on_result(msg: Any) -> None:
                arrived[msg.subject[prefix:]] = time.perf_counter()
                if len(arrived) >= total:
                    all_in.set()

            await producer.nc.subscribe(s.result_subject("*"), cb=on_result)
            procs = [
                ServiceProcess(st, "worker", "--no-topology", log_path=logs / f"w{i}.log").start()
                for i in range(args.workers)
            ]
            try:
                # Each worker is up once it has answered a job of its own.
                warm = [
                    make_job(PROVIDER, "m", prompt=f"warm {i}", max_tokens=8, priority="normal")
                    for i in range(args.workers)
                ]
                await producer.submit_many(warm)
                await producer.results([j.id for j in warm], timeout=120)

                async def submit(priority: str, n: int) -> list[str]:
                    ids: list[str] = []
                    for start in range(0, n, CHUNK):
                        jobs = [
                            make_job(PROVIDER, "m", prompt=f"{priority} {i}", max_tokens=8,
                                     priority=priority)
                            for i in range(start, min(n, start + CHUNK))
                        ]  # fmt: skip
                        now = time.perf_counter()
                        outcomes = await producer.submit_many(jobs)
                        if not all(o.ok for o in outcomes):
                            raise SystemExit(f"a {priority} job was refused")
                        for o in outcomes:
                            sent[o.job_id] = now
                            ids.append(o.job_id)
                    return ids

                lows = await submit("low", args.low)
                low_subject = f"ai.jobs.{PROVIDER}.low"  # the same in every release
                info = await js.stream_info(s.JOBS_STREAM, subjects_filter=low_subject)
                low_waiting = int(info.state.messages)
                highs = await submit("high", args.high)
                await asyncio.wait_for(all_in.wait(), 600)
            finally:
                for p in procs:
                    p.terminate(timeout=60)

    def times(ids: list[str]) -> list[float]:
        return sorted(arrived[j] - sent[j] for j in ids)

    low_t, high_t = times(lows), times(highs)
    low_p50, high_p50 = _quantile(low_t, 0.5), _quantile(high_t, 0.5)
    last_low = max(arrived[j] for j in lows)
    return {
        "low_waiting_when_high_submitted": low_waiting,
        "low_p50_s": round(low_p50, 3),
        "low_p99_s": round(_quantile(low_t, 0.99), 3),
        "high_p50_s": round(high_p50, 3),
        "high_p99_s": round(_quantile(high_t, 0.99), 3),
        "ratio_high_p50_to_low_p50": round(high_p50 / low_p50, 4),
        "highs_done_before_last_low": sum(1 for j in highs if arrived[j] < last_low),
    }


async def main() -> None:
    """Parse the flags, run ``--repeat`` times, print every run and the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--low", type=int, default=5000)
    ap.add_argument("--high", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="ridethrough-priority-"))
    runs = [await one_run(args, logs) for _ in range(args.repeat)]
    ratio = statistics.median(r["ratio_high_p50_to_low_p50"] for r in runs)
    print(
        json.dumps(
            {
                "low": args.low,
                "high": args.high,
                "latency_ms": args.latency_ms,
                "concurrency": args.concurrency,
                "workers": args.workers,
                "runs": runs,
                "median_ratio": ratio,
                "target": 0.10,
                "met": ratio < 0.10,
                "logs": str(logs),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
