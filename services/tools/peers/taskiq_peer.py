"""A peer of ridethrough's worker for ``ridethrough bench -s peers``: taskiq with taskiq-nats.

Written the way taskiq-nats's README shows: a ``PullBasedJetStreamBroker``, one task, and
``taskiq worker taskiq_peer:broker`` to run it (the bench passes ``--workers 1``,
``--max-async-tasks`` = the calls in flight ours gets, ``--ack-type when_saved``: acked
after the task, as ours acks after the result is stored). The task makes the anthropic SDK
call of the job to the fake provider and publishes the answer to AI_RESULTS; with
``PEER_FAKE_URL`` empty it publishes a canned answer instead (the queue-only run).

    python taskiq_peer.py load JOBS_FILE      # one job (JSON) a line, each sent with .kiq()

It imports nothing of ridethrough: it runs in the peers' own environment, configured by
``PEER_*`` environment variables (``services.tools.peers.child_env``).
"""

# mypy: ignore-errors
# (taskiq is no dependency of the project: this file is type-checked in no environment)

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import anthropic
from taskiq_nats import PullBasedJetStreamBroker

NATS_URL = os.environ.get("PEER_NATS_URL", "nats://127.0.0.1:4222")
FAKE_URL = os.environ.get("PEER_FAKE_URL", "")
API_KEY = os.environ.get("PEER_API_KEY", "")
RESULTS = os.environ.get("PEER_RESULTS", "ai.results.shared")
BATCH = int(os.environ.get("PEER_BATCH", "64"))
CANNED = json.loads(os.environ.get("PEER_CANNED", "{}"))

broker = PullBasedJetStreamBroker(
    servers=NATS_URL,
    subject="peers.taskiq",
    stream_name="PEERS_TASKIQ",
    durable="peers-taskiq",
    pull_consume_batch=BATCH,  # the worker's batch (taskiq-nats's default pulls one at a time)
)

_client: anthropic.AsyncAnthropic | None = None


def client() -> anthropic.AsyncAnthropic:
    """One SDK client per worker process, made in its event loop (aiohttp transport)."""
    global _client
    if _client is None:
        _client = anthropic.AsyncAnthropic(
            api_key=API_KEY,
            base_url=FAKE_URL,
            max_retries=0,
            http_client=anthropic.DefaultAioHttpClient(),
        )
    return _client


@broker.task(task_name="answer")  # named: the loader runs this file as __main__
async def answer(job: dict[str, Any]) -> None:
    """Call the provider for ``job`` and store its answer."""
    if FAKE_URL:
        message = await client().messages.create(model=job["model"], **job["request"])
        response = message.model_dump(mode="json")
    else:
        response = CANNED
    result = {"job_id": job["id"], "status": "succeeded", "model": job["model"]}
    result["response"] = response
    await broker.js.publish(
        f"{RESULTS}.{job['id']}", json.dumps(result).encode(), headers={"Nats-Msg-Id": job["id"]}
    )


async def load(lines: list[bytes]) -> None:
    """Send every job as a task (500 sends at a time)."""
    jobs = [json.loads(line) for line in lines]
    await broker.startup()
    try:
        for start in range(0, len(jobs), 500):
            await asyncio.gather(*(answer.kiq(job) for job in jobs[start : start + 500]))
    finally:
        await broker.shutdown()
    print(len(jobs))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "load":
        sys.exit("usage: taskiq_peer.py load JOBS_FILE")
    with open(sys.argv[2], "rb") as f:
        asyncio.run(load([line for line in f if line.strip()]))
