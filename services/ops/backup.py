"""Back up AI-generated results to JSON Lines, and restore them idempotently."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from schemas import subjects as s
from schemas.results import JobResult, decode_result
from services.jetstream.connection import max_payload
from services.jetstream.streams import iter_stream
from services.lifecycle.settle import Settler
from services.ops.audit import audit

Progress = Callable[[int, int], None]


async def export_results(
    js: JetStreamContext,
    out: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
) -> int:
    """Write every stored result finished in [since, until) to ``out``, one JSON per line."""
    total = int((await js.stream_info(s.RESULTS_STREAM)).state.messages)
    written = seen = 0
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as fh:
        async for msg in iter_stream(js, s.RESULTS_STREAM):
            seen += 1
            if progress:
                progress(seen, total)
            result = decode_result(msg.data or b"")
            if since and result.finished_at < since:
                continue
            if until and result.finished_at >= until:
                continue
            fh.write(msg.data or b"")
            fh.write(b"\n")
            written += 1
    tmp.replace(out)  # a half-written file never takes the name
    await audit(
        js,
        "export",
        filters={
            "since": since.isoformat() if since else "",
            "until": until.isoformat() if until else "",
            "out": str(out),
        },
        counts={"results": written},
    )
    return written


async def import_results(
    js: JetStreamContext, path: Path, *, progress: Progress | None = None
) -> dict[str, int]:
    """Restore results from a JSON Lines file; a job that already has a result keeps it."""
    lines = (await asyncio.to_thread(path.read_bytes)).splitlines()
    decoder = msgspec.json.Decoder(JobResult)
    counts = {"imported": 0, "already_present": 0, "invalid": 0}
    settler = Settler(js, max_payload=max_payload(js))
    for i, line in enumerate(lines, 1):
        if progress:
            progress(i, len(lines))
        if not line.strip():
            continue
        try:
            result = decoder.decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError):
            counts["invalid"] += 1
            continue
        if not s.is_token(result.job_id):  # it would land on another job's subject
            counts["invalid"] += 1
            continue
        # Only if the job has no result yet: an import never overwrites.
        if await settler.store_result(result, dedup=False):
            counts["imported"] += 1
        else:
            counts["already_present"] += 1
    await audit(js, "import", filters={"file": str(path)}, counts=counts)
    return counts
