"""Where a replayer's time goes: park N jobs, drain them with one replayer process, and
report its rate, the CPU each process used, and (with py-spy installed) the functions
with the most samples in the replayer.

    python scripts/profile_replay.py                 # 150,000 jobs
    python scripts/profile_replay.py --jobs 50000 --no-profile

The replayer runs uncapped (no slow start), as in ``ridethrough bench -s replay``.
CPU shares are of one core over the drain, read from /proc (Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.codec import encode
from schemas.parking import ParkedJob, ParkRecord
from schemas.subjects import JOBS_STREAM, MSG_ID_HEADER, parked_subject
from services.config import load_settings
from services.tools import bench


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def top_functions(raw: Path, most: int) -> list[str]:
    """Share of samples per innermost function in a py-spy ``--format raw`` file."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frame = re.sub(r":\d+\)$", ")", stack.split(";")[-1]) or "(native code, no Python frame)"
        counts[frame] += int(n)
    total = sum(counts.values()) or 1
    return [f"{100 * n / total:4.1f}% {f}" for f, n in counts.most_common(most)]


async def main(jobs: int, profile: bool, most: int) -> dict[str, object]:
    base = load_settings()
    opts = bench.BenchOptions(jobs=jobs, repeat=1)
    spy_bin = shutil.which("py-spy") if profile else None
    async with bench.stage(base, opts, "profile-replay") as st:
        settings = st.settings.with_changes(
            replay=st.settings.replay.model_copy(update={"max_rate": 0.0, "initial_rate": 1e9})
        )
        parked = [
            (
                parked_subject(j.provider, j.priority, j.model),
                encode(ParkedJob(job=j, park=ParkRecord(reason="provider_open", attempts=1))),
                {MSG_ID_HEADER: f"park:profile:{j.id}"},
            )
            for j in bench.bench_jobs(jobs)
        ]
        await bench._publish_raw(st.js, parked)
        server = next(
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit()
            and str(st.workdir) in Path(f"/proc/{p}/cmdline").read_text(errors="replace")  # noqa: ASYNC240
        )
        raw = Path(tempfile.mkdtemp()) / "replayer.raw"
        with st.running(settings, "replayer") as child:
            spy = None
            if spy_bin:
                spy = subprocess.Popen(  # noqa: ASYNC220 - started once, before the clock
                    [spy_bin, "record", "--pid", str(child.pid), "--format", "raw",
                     "-o", str(raw), "-r", "250", "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            await asyncio.sleep(1.0)  # past the replayer's start-up
            s0, c0, t0 = cpu_seconds(server), cpu_seconds(child.pid), time.monotonic()
            rate = await bench._drained(st.js, JOBS_STREAM, jobs, alive=child.check, timeout=600)
            s1, c1, t1 = cpu_seconds(server), cpu_seconds(child.pid), time.monotonic()
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
    report: dict[str, object] = {
        "jobs": jobs,
        "rate": round(rate),
        "replayer_cpu": round((c1 - c0) / (t1 - t0), 2),
        "server_cpu": round((s1 - s0) / (t1 - t0), 2),
        "replayer_cpu_us_per_job": round(1e6 * (c1 - c0) / jobs, 1),
    }
    if spy_bin and raw.exists():
        report["top_self_samples_pct"] = top_functions(raw, most)
    elif profile:
        report["top_self_samples_pct"] = "py-spy not installed (pip install py-spy)"
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=150_000)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--most", type=int, default=20, help="functions to list")
    args = parser.parse_args()
    report = asyncio.run(main(args.jobs, not args.no_profile, args.most))
    top = report.pop("top_self_samples_pct", None)
    print(json.dumps(report))
    if isinstance(top, list):
        print("replayer, share of py-spy samples by innermost function:")
        print("\n".join(f"  {line}" for line in top))
    elif top:
        print(top)
