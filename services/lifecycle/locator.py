"""Where a job is: the ``ai_locator`` index, and the lookups it makes cheap.

A job that is parked or dead-lettered is one message among possibly millions; neither
stream's subjects name the job. So each time the settle path parks a job or files its dead
letter, it writes, after the PubAck and before the ack, the stored message's place under
the job's key (``<tenant|_>.<job_id>``, ``schemas.subjects.locator_key``). A crash between
the two leaves the job unacked: it is delivered again, the park or dead letter is dropped by
the dedup window (whose PubAck names the first copy's sequence), and the place is written
then. ``ridethrough topology`` fills the index once, when it creates the bucket, from what
is already parked and dead.

An entry is a hint, never the truth: a replay, a drain back or a purge moves or deletes the
message and leaves the entry behind (writing on every replay would slow the replayer for a
lookup an operator makes once). A lookup reads the message it points at and believes it
only if that message is still this job's. The bucket keeps one entry per key and forgets
entries after the longer of AI_PARKED's and AI_DEAD's max ages.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from schemas import subjects as s
from schemas.codec import encode
from schemas.jobs import Job
from schemas.parking import (
    DeadLetter,
    Location,
    ParkedJob,
    decode_dead_letter,
    decode_location,
    decode_parked,
)
from services.jetstream.errors import NOT_FOUND
from services.jetstream.streams import publish, subject_counts

log = logging.getLogger("ridethrough.locator")


async def record(
    js: JetStreamContext,
    job_id: str,
    tenant: str | None,
    stream: str,
    seq: int,
    *,
    timeout: float | None = None,
) -> bool:
    """Write that job ``job_id`` of ``tenant`` is message ``seq`` of ``stream`` now; False
    (and a warning) when there is no index yet: workers of this release started before
    ``ridethrough topology`` made it. The job is held all the same; only a lookup of it
    is slower (``jobs show`` scans when the index has nothing)."""
    try:
        await publish(
            js,
            s.locator_subject(job_id, tenant),
            encode(Location(stream=stream, seq=seq)),
            timeout=timeout,
        )
    except NoStreamResponseError:
        global _warned
        if not _warned:
            _warned = True
            log.warning(
                "no %s bucket: run `ridethrough topology`; until then parked jobs and dead "
                "letters are not indexed",
                s.LOCATOR_BUCKET,
            )
        return False
    return True


_warned = False


@dataclass(frozen=True, slots=True)
class Found:
    """A job's parked copy or dead letter, read where the index pointed."""

    tenant: str | None
    seq: int
    subject: str
    parked: ParkedJob | None = None
    dead: DeadLetter | None = None


async def _locations(
    js: JetStreamContext, job_id: str, tenant: str | None, any_tenant: bool
) -> list[tuple[str | None, Location]]:
    """The index's entries for the job: its tenant's, or (``any_tenant``) every tenant's."""
    stream = f"KV_{s.LOCATOR_BUCKET}"
    if any_tenant:
        try:
            counts = await subject_counts(js, stream, s.locator_filter(job_id))
        except NOT_FOUND:
            return []
        subjects = sorted(counts)
    else:
        subjects = [s.locator_subject(job_id, tenant)]
    out: list[tuple[str | None, Location]] = []
    for subject in subjects:
        try:
            raw = await js.get_last_msg(stream, subject, direct=True)
        except NOT_FOUND:
            continue
        try:
            where = decode_location(raw.data or b"")
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue  # a deleted key (no body), or not ours
        owner = subject.split(".")[2]
        out.append((None if owner == s.NO_TENANT else owner, where))
    return out


async def find(
    js: JetStreamContext, job_id: str, tenant: str | None = None, *, any_tenant: bool = False
) -> list[Found]:
    """Where job ``job_id`` (of ``tenant``; of any tenant with ``any_tenant``) is parked or
    dead-lettered now, read from the message each entry points at: nothing when the job is
    neither (any more)."""
    found: list[Found] = []
    for owner, where in await _locations(js, job_id, tenant, any_tenant):
        if where.stream not in (s.PARKED_STREAM, s.DEAD_STREAM):
            continue
        try:
            msg = await js.get_msg(where.stream, seq=where.seq, direct=True)
        except NOT_FOUND:
            continue  # replayed, moved or purged since
        data = msg.data or b""
        try:
            if where.stream == s.PARKED_STREAM:
                parked = decode_parked(data)
                if parked.job.id == job_id and parked.job.tenant == owner:
                    found.append(Found(owner, where.seq, msg.subject or "", parked=parked))
            else:
                letter = decode_dead_letter(data)
                # A letter whose job was kept aside (too large) names the id alone.
                mine = letter.job is None or _letter_tenant(letter) == owner
                if letter.job_id == job_id and mine:
                    found.append(Found(owner, where.seq, msg.subject or "", dead=letter))
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue  # the sequence holds another message now (the stream was recreated)
    return found


def _letter_tenant(letter: DeadLetter) -> str | None:
    tenant: Any = (letter.job or {}).get("tenant")
    return tenant if isinstance(tenant, str) and tenant else None


def letter_owner(letter: DeadLetter) -> tuple[str, str | None] | None:
    """(job id, tenant) a dead letter is indexed under; None for a message that was not a
    job (it has no id to look it up by)."""
    if not letter.job_id or not s.is_token(letter.job_id):
        return None
    return letter.job_id, _letter_tenant(letter)


async def backfill(js: JetStreamContext) -> int:
    """Index what AI_PARKED and AI_DEAD hold (``ridethrough topology``, when it creates the
    bucket); how many entries were written. Oldest first, so a job's newest copy wins."""
    from services.jetstream.streams import iter_stream, scan_stream

    pending: list[asyncio.Future[Any]] = []
    written = 0

    async def put(job_id: str, tenant: str | None, stream: str, seq: int) -> None:
        nonlocal written
        data = encode(Location(stream=stream, seq=seq))
        pending.append(await js.publish_async(s.locator_subject(job_id, tenant), data))
        written += 1
        if len(pending) >= _BACKFILL_WINDOW:
            await asyncio.gather(*pending)
            pending.clear()

    async for msg in iter_stream(js, s.PARKED_STREAM, s.parked_filter()):
        try:
            job: Job = decode_parked(msg.data).job
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        await put(job.id, job.tenant, s.PARKED_STREAM, msg.seq)
    async for msg in scan_stream(js, s.DEAD_STREAM, s.dead_filter()):
        try:
            owner = letter_owner(decode_dead_letter(msg.data))
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        if owner is not None:
            await put(owner[0], owner[1], s.DEAD_STREAM, msg.seq)
    await asyncio.gather(*pending)
    return written


#: Index writes of a backfill in flight at once.
_BACKFILL_WINDOW = 1000
