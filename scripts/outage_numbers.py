"""Measure the outage numbers of the issue on this machine; print them as JSON.

    python scripts/outage_numbers.py            # 60 s outage at 50 jobs/s + 10,000 parked jobs
    python scripts/outage_numbers.py --quick    # a 10 s outage and 2,000 parked jobs

1. A 529 storm starts while jobs arrive at 50/s: time until the breaker opens
   (``detect_s``), provider calls during the outage (real ones and probes), and the
   time from recovery to the first replayed job's result (``first_replay_s``),
   against the bound "one probe interval + 1 s".
2. N jobs parked at once drain to results once the provider is half-open:
   drain time, lost, duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import subjects as s
from schemas.codec import encode
from schemas.parking import ParkedJob, ParkRecord
from services.breaker import transition
from services.config import load_settings
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.tools.demo import Drill, drill_settings, run_drill
from services.tools.stack import ServiceProcess, local_stack


async def storm(outage_s: float) -> dict[str, object]:
    """The drill at 50 jobs/s with an outage of ``outage_s`` seconds."""
    jobs = int(50 * (5 + outage_s + 5))
    drill = Drill(jobs=jobs, rate=50.0, outage_s=outage_s, outage_at_s=5.0, seed=7)
    settings = drill_settings(load_settings())
    report = await run_drill(drill, load_settings(), console=None)
    b = settings.breaker
    report["consecutive_failures_to_trip"] = b.consecutive_failures
    report["first_replay_bound_s"] = b.probe_max_interval_s + 1.0
    return report


async def drain(n: int) -> dict[str, object]:
    """Park ``n`` jobs, half-open the provider, and time the backlog to results."""
    settings = drill_settings(load_settings())
    logs = Path(tempfile.mkdtemp(prefix="ridethrough-numbers-"))
    with local_stack(settings) as stack:
        st = stack.settings
        async with await Producer.connect(st) as producer:
            js = producer.js
            await ensure_topology(js, st)
            kv = await js.key_value(s.HEALTH_BUCKET)
            await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="numbers")
            futures = []
            for i in range(n):
                job = make_job("anthropic", "claude-drain", prompt=f"parked {i}", max_tokens=8)
                body = ParkedJob(job=job, park=ParkRecord(reason="provider_open"))
                futures.append(
                    await js.publish_async(
                        s.parked_subject("anthropic", "normal", job.model), encode(body)
                    )
                )
            await asyncio.gather(*futures)
            procs = [ServiceProcess(st, "worker", log_path=logs / f"w{i}.log") for i in range(2)]
            procs.append(ServiceProcess(st, "replayer", log_path=logs / "replayer.log"))
            for p in procs:
                p.start()
            try:
                started = time.monotonic()
                await transition(
                    js, kv, "anthropic", to="half_open", allowed_from=("open",), by="numbers"
                )
                while (await js.stream_info(s.RESULTS_STREAM)).state.messages < n:
                    if time.monotonic() - started > 600:
                        break
                    await asyncio.sleep(0.2)
                elapsed = time.monotonic() - started
                info = (await js.stream_info(s.RESULTS_STREAM)).state
                parked_left = (await js.stream_info(s.PARKED_STREAM)).state.messages
            finally:
                for p in procs:
                    p.terminate(30)
    return {
        "parked": n,
        "results": int(info.messages),
        "lost": n - int(info.messages),
        "duplicates": int(info.last_seq) - int(info.messages),
        "parked_left": int(parked_left),
        "drain_s": round(elapsed, 2),
        "jobs_per_s": round(n / elapsed, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("storm", "drain", "both"), default="both")
    args = parser.parse_args()
    outage_s, parked = (10.0, 2000) if args.quick else (60.0, 10_000)
    out: dict[str, object] = {}
    if args.part in ("storm", "both"):
        out["storm"] = await storm(outage_s)
    if args.part in ("drain", "both"):
        out["drain"] = await drain(parked)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
