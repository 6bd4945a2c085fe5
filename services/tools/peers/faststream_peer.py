"""A peer of ridethrough's worker for ``ridethrough bench -s peers``: a FastStream subscriber.

Written the way FastStream's NATS docs show: a ``NatsBroker``, a ``JStream``, one pull
subscriber (``pull_sub=PullSub(batch_size=...)``, ``max_workers`` = the calls in flight
ours gets, FastStream's default ack policy: acked once the handler returns), run by
``faststream run faststream_peer:app``, its per-message log lines at DEBUG. The handler
makes the anthropic SDK call of the job to the fake provider and publishes the answer to
AI_RESULTS with ``broker.publish``; with ``PEER_FAKE_URL`` empty it publishes a canned
answer instead (the queue-only run).

    python faststream_peer.py load JOBS_FILE    # one job (JSON) a line, published with nats-py

It imports nothing of ridethrough: it runs in the peers' own environment (or any with
FastStream, the SDK and nats-py), configured by ``PEER_*`` environment variables
(``services.tools.peers.child_env``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import anthropic
import nats
from faststream import FastStream
from faststream.nats import JStream, NatsBroker, PullSub

NATS_URL = os.environ.get("PEER_NATS_URL", "nats://127.0.0.1:4222")
FAKE_URL = os.environ.get("PEER_FAKE_URL", "")
API_KEY = os.environ.get("PEER_API_KEY", "")
RESULTS = os.environ.get("PEER_RESULTS", "ai.results.shared")
BATCH = int(os.environ.get("PEER_BATCH", "64"))
IN_FLIGHT = int(os.environ.get("PEER_IN_FLIGHT", "64"))
CANNED = json.loads(os.environ.get("PEER_CANNED", "{}"))
STREAM = "PEERS_FASTSTREAM"
SUBJECT = "peers.faststream"

# Each message's "Received"/"Processed" lines at DEBUG (FastStream's docs' way to quiet
# them): its logger, at INFO, then drops them as cheaply as ours logs nothing per job.
broker = NatsBroker(NATS_URL, log_level=logging.DEBUG)
app = FastStream(broker)
stream = JStream(name=STREAM, subjects=[SUBJECT])

_client: anthropic.AsyncAnthropic | None = None


def client() -> anthropic.AsyncAnthropic:
    """One SDK client for the process, made in its event loop (aiohttp transport)."""
    global _client
    if _client is None:
        _client = anthropic.AsyncAnthropic(
            api_key=API_KEY,
            base_url=FAKE_URL,
            max_retries=0,
            http_client=anthropic.DefaultAioHttpClient(),
        )
    return _client


@broker.subscriber(
    SUBJECT,
    stream=stream,
    durable="peers-faststream",
    pull_sub=PullSub(batch_size=BATCH),
    max_workers=IN_FLIGHT,
)
async def answer(job: dict[str, Any]) -> None:
    """Call the provider for ``job`` and store its answer."""
    if FAKE_URL:
        message = await client().messages.create(model=job["model"], **job["request"])
        response = message.model_dump(mode="json")
    else:
        response = CANNED
    await broker.publish(
        {"job_id": job["id"], "status": "succeeded", "model": job["model"], "response": response},
        f"{RESULTS}.{job['id']}",
        stream="AI_RESULTS",
        headers={"Nats-Msg-Id": job["id"]},
    )


async def load(lines: list[bytes]) -> None:
    """Publish every job to the subscriber's stream (made here if missing)."""
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=[SUBJECT])
        futures = [
            await js.publish_async(
                SUBJECT,
                line,
                headers={"Nats-Msg-Id": json.loads(line)["id"], "content-type": "application/json"},
            )
            for line in lines
        ]
        await asyncio.gather(*futures)
    finally:
        await nc.close()
    print(len(lines))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "load":
        sys.exit("usage: faststream_peer.py load JOBS_FILE")
    with open(sys.argv[2], "rb") as f:
        asyncio.run(load([line.strip() for line in f if line.strip()]))
