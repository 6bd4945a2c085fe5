"""Measure large jobs on the embedded stack (issue 13, item 4); print the numbers as JSON.

    python scripts/large_job_numbers.py                 # one 20 MB job, 3 times
    python scripts/large_job_numbers.py --mb 30 --repeat 5

Stands up the local stack (embedded nats-server with its 8 MB max_payload, the fake
provider, one worker in this process), then for each run submits one job whose request
holds a base64 document of ``--mb`` MB: ``submit_s`` is the producer's submit (the body put
in ai_bodies, then the job published), ``complete_s`` from the submit's start to the result
(the worker's fetch, the provider call with the whole body, the result, the body deleted).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.config import load_settings
from services.producer import Producer, make_job
from services.tools.stack import local_stack, running_worker


def _request(mb: float, i: int) -> dict[str, Any]:
    raw = hashlib.shake_256(str(i).encode()).digest(int(mb * 1024 * 1024 * 3 / 4))
    document = {
        "type": "document",
        "source": {
            "type": "base64",
            "media_type": "application/pdf",
            "data": base64.b64encode(raw).decode(),
        },
    }
    return {
        "max_tokens": 16,
        "messages": [{"role": "user", "content": [document, {"type": "text", "text": "sum"}]}],
    }


async def _measure(settings: Any, mb: float, repeat: int) -> dict[str, Any]:
    runs = []
    async with running_worker(settings), await Producer.connect(settings) as producer:
        for i in range(repeat):
            job = make_job("anthropic", "claude-fake", request=_request(mb, i))
            t0 = time.perf_counter()
            job_id = await producer.submit(job)
            t1 = time.perf_counter()
            result = await producer.result(job_id, timeout=300)
            t2 = time.perf_counter()
            if result.status != "succeeded":
                raise SystemExit(f"job {job_id} ended {result.status}: {result.error}")
            runs.append({"submit_s": round(t1 - t0, 3), "complete_s": round(t2 - t0, 3)})
            del job
    return {
        "mb": mb,
        "runs": runs,
        "submit_s_median": statistics.median(r["submit_s"] for r in runs),
        "complete_s_median": statistics.median(r["complete_s"] for r in runs),
    }


def main() -> None:
    """Parse the arguments, run, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with local_stack(load_settings()) as stack:
        numbers = asyncio.run(_measure(stack.settings, args.mb, args.repeat))
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
