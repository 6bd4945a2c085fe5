"""Drain a parked backlog against a provider of a given capacity, with each replay pace;
print the numbers as JSON.

    python scripts/replay_drain.py                       # 100,000 parked, both paces
    python scripts/replay_drain.py --parked 10000 --pace adaptive

N jobs are parked at once under an open provider; two worker processes and a replayer
start, and the provider turns half-open. The fake provider answers at most ``capacity``
calls at once, each after ``latency_ms`` (so it serves at most capacity / latency calls
per second) and answers a 429 with ``retry-after`` beyond that. Reported per pace: the
drain time (half-open to every result in), jobs/s, the provider's capacity in calls/s,
the 429s it sent, the breaker's transitions, and lost / duplicated results. Also what the
fake serves to a bare SDK loop keeping exactly ``capacity`` calls in flight (measured
first, in the same run), and the drain's rate as a share of that (``of_served``).

``ramp`` is the pace of the last release (5 jobs/s doubling every second up to a cap of
200 jobs/s); ``adaptive`` is the default pace (the same slow start until the workers'
queue pushes back, then AIMD, up to 2000 jobs/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nats.js.api import DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import subjects as s
from schemas.codec import encode
from schemas.events import decode_health_event
from schemas.parking import ParkedJob, ParkRecord
from services.breaker import transition
from services.config import load_settings
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.tools.demo import drill_settings
from services.tools.fake import FaultConfig
from services.tools.stack import ServiceProcess, local_stack


async def drain(n: int, pace: str, capacity: int, latency_ms: float) -> dict[str, Any]:
    """Park ``n`` jobs, half-open the provider, time the backlog to results."""
    base = drill_settings(load_settings())
    replay = base.replay.model_copy(
        update={"pace": pace, "max_rate": 200.0 if pace == "ramp" else 2000.0}
    )
    settings = base.with_changes(replay=replay)
    logs = Path(tempfile.mkdtemp(prefix="ridethrough-drain-"))
    fake = FaultConfig(capacity=capacity, latency_ms=latency_ms, retry_after_s=1.0)
    with local_stack(settings, fake_config=fake) as stack:
        st = stack.settings
        async with await Producer.connect(st) as producer:
            js = producer.js
            await ensure_topology(js, st)
            kv = await js.key_value(s.HEALTH_BUCKET)
            await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="drain")
            pending = []
            for i in range(n):
                job = make_job("anthropic", "claude-drain", prompt=f"parked {i}", max_tokens=8)
                body = ParkedJob(job=job, park=ParkRecord(reason="provider_open"))
                subject = s.parked_subject("anthropic", "normal", job.model)
                pending.append(await js.publish_async(subject, encode(body)))
                if len(pending) >= 5000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
            assert stack.fake is not None
            served = _served(stack.fake.url, capacity)
            procs = [ServiceProcess(st, "worker", log_path=logs / f"w{i}.log") for i in range(2)]
            procs.append(ServiceProcess(st, "replayer", log_path=logs / "replayer.log"))
            for p in procs:
                p.start()
            try:
                await asyncio.sleep(3)  # the processes connect and pull
                assert stack.fake is not None
                stack.fake.reset_counters()
                started = time.monotonic()
                await transition(
                    js, kv, "anthropic", to="half_open", allowed_from=("open",), by="drain"
                )
                while (await js.stream_info(s.RESULTS_STREAM)).state.messages < n:
                    if time.monotonic() - started > 3600:
                        break
                    await asyncio.sleep(0.5)
                elapsed = time.monotonic() - started
                info = (await js.stream_info(s.RESULTS_STREAM)).state
                counters = stack.fake.counters()
                events = []
                sub = await js.subscribe(
                    s.HEALTH_EVENTS_FILTER, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
                )
                try:
                    while True:
                        msg = await sub.next_msg(timeout=1)
                        events.append(decode_health_event(msg.data).state)
                except Exception:
                    pass
                await sub.unsubscribe()
            finally:
                for p in procs:
                    p.terminate(30)
    return {
        "pace": pace,
        "parked": n,
        "results": int(info.messages),
        "lost": n - int(info.messages),
        "duplicates": int(info.last_seq) - int(info.messages),
        "drain_s": round(elapsed, 1),
        "jobs_per_s": round(n / elapsed, 1),
        "provider_capacity_per_s": round(capacity / (latency_ms / 1000), 1),
        "provider_served_per_s": round(served, 1),
        "of_served": round(n / elapsed / served, 3),
        "provider_429s": counters["by_fault"].get("over_capacity", 0),
        "breaker": events,
    }


_SERVED = """
import asyncio, sys, time, anthropic
url, capacity, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
async def main():
    client = anthropic.AsyncAnthropic(base_url=url, api_key="sk-fake", max_retries=0)
    done = 0
    async def loop():
        nonlocal done
        while time.perf_counter() < end:
            await client.messages.create(
                model="claude-drain", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
            done += 1
    end = time.perf_counter() + seconds
    await asyncio.gather(*[loop() for _ in range(capacity)])
    print(done / seconds)
asyncio.run(main())
"""


def _served(url: str, capacity: int, seconds: float = 10.0) -> float:
    """Calls/s the fake serves to a bare SDK loop (its own process) keeping exactly
    ``capacity`` calls in flight: the most any client gets from it on this machine now,
    HTTP and all (the nominal capacity / latency leaves those out)."""
    out = subprocess.run(
        [sys.executable, "-c", _SERVED, url, str(capacity), str(seconds)],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    return float(out.stdout.strip())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parked", type=int, default=100_000)
    parser.add_argument("--pace", choices=("adaptive", "ramp"), action="append")
    parser.add_argument("--capacity", type=int, default=8, help="calls the fake answers at once")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    out = [
        await drain(args.parked, pace, args.capacity, args.latency_ms)
        for pace in args.pace or ("ramp", "adaptive")
    ]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
