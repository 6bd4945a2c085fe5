"""Moving jobs between streams on an operator's word: drain (jobs → parked) and replay
(parked or dead → jobs).

Each job is moved in two steps: publish the new copy and wait for its PubAck,
then delete the old one. The new copy's msg id is stable (it depends only on the
old message's sequence), so a command interrupted between the two steps and run
again publishes nothing twice; and a job that a worker finished meanwhile is not
called again (the worker checks for an existing result before calling).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
from nats.js import JetStreamContext

from schemas import subjects as s
from schemas.jobs import Job, decode_job
from schemas.parking import ParkRecord, decode_dead_letter, decode_parked
from services.bodies import fetch_body
from services.config import Settings
from services.errors import BodyUnavailable, RidethroughError, Unmappable
from services.jetstream.connection import max_payload
from services.jetstream.streams import delete, iter_stream, subject_counts
from services.lifecycle.settle import Settler
from services.ops.audit import audit
from services.providers.doors import check_door, split_betas
from services.providers.mapping import convert, shape_of

Progress = Callable[[int, int], None]


@dataclass
class MoveReport:
    """What a drain or replay did (or, with ``dry_run``, would do)."""

    examined: int = 0
    matched: int = 0
    moved: int = 0
    skipped: int = 0
    job_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The numbers, for the audit log and ``--json``."""
        return {
            "examined": self.examined,
            "matched": self.matched,
            "moved": self.moved,
            "skipped": self.skipped,
        }


async def drain(
    js: JetStreamContext,
    provider: str,
    *,
    priority: str | None = None,
    older_than: timedelta | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    model: str | None = None,
    count_only: bool = False,
) -> MoveReport:
    """Move waiting jobs of ``provider`` (of its ``model`` only, if given) from AI_JOBS to
    AI_PARKED.

    Only jobs no worker has received yet are moved (those past the consumer's
    delivered sequence); in-flight and retrying jobs are counted as skipped.

    ``count_only`` (with ``dry_run``, when only the numbers are wanted, no job ids): with no
    filter but the priority, the answer comes from the stream's per-subject counts and a walk
    of the in-flight jobs alone, not from reading every waiting job (an unreadable message,
    which a drain would skip, is counted as a job then).
    """
    report = MoveReport()
    settler = Settler(js, max_payload=max_payload(js))
    # Each priority has its consumer, which delivers its jobs in order: a job at or
    # below its consumer's delivered sequence has reached a worker.
    delivered: dict[str, int] = {}
    for prio in s.PRIORITIES:
        consumer = await js.consumer_info(s.JOBS_STREAM, s.worker_consumer(provider, prio))
        delivered[prio] = int(consumer.delivered.stream_seq or 0)
    # Every job of the provider, whoever published it; the priority is the 4th token.
    subject = s.jobs_filter(provider)
    total = sum(
        int(v)
        for v in (
            (await js.stream_info(s.JOBS_STREAM, subjects_filter=subject)).state.subjects or {}
        ).values()
    )
    cutoff = datetime.now(UTC) - older_than if older_than else None
    counting = dry_run and count_only and older_than is None and model is None and limit is None
    try:
        if counting:
            await _count_waiting(js, subject, priority, delivered, report)
            if progress:
                progress(report.examined, total)
            return report
        async for msg in iter_stream(js, s.JOBS_STREAM, subject):
            token = (msg.subject or "").split(".")[3:4]
            if priority and token != [priority]:
                continue
            report.examined += 1
            if progress:
                progress(report.examined, total)
            if msg.seq <= delivered.get(token[0] if token else "", 0):
                report.skipped += 1  # a worker has it (in flight, or waiting to retry)
                continue
            try:
                job = decode_job(msg.data or b"")
            except (msgspec.ValidationError, msgspec.DecodeError):
                report.skipped += 1  # malformed: the worker will dead-letter it
                continue
            if cutoff is not None and job.created_at > cutoff:
                continue
            if model is not None and job.model != model:
                continue
            report.matched += 1
            if dry_run:
                report.job_ids.append(job.id)
            else:
                record = ParkRecord(reason="drained")
                if not await settler.park(job, record, stream=s.JOBS_STREAM, seq=msg.seq):
                    report.skipped += 1
                    report.notes.append(f"{job.id}: too large to park; left waiting")
                    continue
                # Already gone (a worker took it meanwhile): the parked copy is then a
                # second one, and its result check keeps it from a second call.
                await delete(js, s.JOBS_STREAM, msg.seq)
                report.moved += 1
                report.job_ids.append(job.id)
            if limit is not None and report.matched >= limit:
                break
    finally:
        filters = {
            "priority": priority or "",
            "older_than": str(older_than or ""),
            "limit": str(limit or ""),
            "model": model or "",
        }
        with contextlib.suppress(Exception):
            await audit(
                js,
                "drain",
                provider=provider,
                filters=filters,
                counts=report.counts(),
                job_ids=report.job_ids,
                dry_run=dry_run,
            )
    return report


async def _count_waiting(
    js: JetStreamContext,
    subject: str,
    priority: str | None,
    delivered: dict[str, int],
    report: MoveReport,
) -> None:
    """``report``'s numbers for a dry-run drain without filters but the priority: every job
    on ``subject`` (of ``priority``) is examined; those a worker has (stored at or below its
    consumer's delivered sequence: on a work-queue stream, only the unacked ones) are
    skipped; the rest would move."""
    counts = await subject_counts(js, s.JOBS_STREAM, subject)
    report.examined = sum(
        n for subj, n in counts.items() if not priority or subj.split(".")[3:4] == [priority]
    )
    upto = max(delivered.values(), default=0)
    if upto:
        async for msg in iter_stream(js, s.JOBS_STREAM, subject):
            if msg.seq > upto:
                break
            token = msg.subject.split(".")[3:4]
            if priority and token != [priority]:
                continue
            if msg.seq <= delivered.get(token[0] if token else "", 0):
                report.skipped += 1
    report.matched = report.examined - report.skipped


def _retarget(job: Job, settings: Settings, to_provider: str | None, model: str | None) -> Job:
    """``job`` sent to ``to_provider`` (its request mapped if the API differs) and ``model``."""
    if to_provider is None and model is None:
        return job
    target = to_provider or job.provider
    if target not in settings.providers:
        raise RidethroughError(
            f"unknown provider {target!r}; configured: {sorted(settings.providers)}"
        )
    src = settings.providers.get(job.provider)
    dst = settings.providers[target]
    request = job.request
    ref = job.request_ref
    if ref is not None and src is not None:
        # A large job stays by reference: its body is mapped by the worker that calls
        # (``services/bodies.py``); ``replay`` checked that it can be. ``kind`` names the
        # API shape it is written in, when the target speaks another.
        written = ref.kind or shape_of(src.kind)
        ref = msgspec.structs.replace(ref, kind=None if written == shape_of(dst.kind) else written)
    elif src is not None and shape_of(src.kind) != shape_of(dst.kind):
        request = convert(job.request, src_kind=shape_of(src.kind), dst_kind=shape_of(dst.kind))
    elif src is not None:  # another door of the same API: the request as it is
        check_door(job.request, dst.kind)
    betas, dropped = split_betas(job.betas, dst.kind)
    metadata = job.metadata
    if dropped:  # the door does not take them: the result will say so
        metadata = {**metadata, "betas_dropped": ",".join(dropped)}
    return msgspec.structs.replace(
        job,
        provider=target,
        model=model or job.model,
        request=request,
        request_ref=ref,
        betas=betas,
        metadata=metadata,
    )


async def _check_body_maps(js: JetStreamContext, job: Job, settings: Settings) -> None:
    """Raise ``Unmappable`` if the body of large ``job`` (retargeted) cannot be mapped to
    its provider's API, or ``BodyUnavailable`` if it is gone."""
    ref = job.request_ref
    dst = settings.providers.get(job.provider)
    if ref is None or ref.kind is None or dst is None or shape_of(ref.kind) == shape_of(dst.kind):
        return
    request = msgspec.json.decode(await fetch_body(js, ref, timeout=settings.bodies.timeout_s))
    convert(request, src_kind=shape_of(ref.kind), dst_kind=shape_of(dst.kind))


async def replay(
    js: JetStreamContext,
    settings: Settings,
    provider: str | None = None,
    *,
    source: str = "parked",
    reason: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
    rate: float | None = None,
    to_provider: str | None = None,
    to_model: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    model: str | None = None,
    count_only: bool = False,
) -> MoveReport:
    """Put parked jobs or dead letters back on AI_JOBS, with filters (``model``: only that
    model's jobs) and a rate cap; ``to_provider`` / ``to_model`` send them elsewhere.

    ``count_only`` (with ``dry_run``, when only the numbers are wanted, no job ids): parked
    jobs with no filter but the provider are counted from the stream's per-subject counts,
    not read (an unreadable message, which a replay would skip, is counted as a job then)."""
    if source not in ("parked", "dead"):
        raise RidethroughError(f"--from must be parked or dead, not {source!r}")
    report = MoveReport()
    settler = Settler(js, max_payload=max_payload(js))
    stream = s.PARKED_STREAM if source == "parked" else s.DEAD_STREAM
    subject = s.parked_filter(provider) if source == "parked" else s.dead_filter(provider, reason)
    info = await js.stream_info(stream, subjects_filter=subject)
    total = sum(int(v) for v in (info.state.subjects or {}).values())
    gap = 1.0 / rate if rate else 0.0
    counting = (
        dry_run
        and count_only
        and source == "parked"
        and (reason, since, limit, model, to_provider, to_model) == (None,) * 6
    )
    try:
        if counting:
            report.examined = report.matched = total
            if progress:
                progress(total, total)
            return report
        async for msg in iter_stream(js, stream, subject):
            report.examined += 1
            if progress:
                progress(report.examined, total)
            job, when, why = _read_held(msg.data or b"", source)
            if job is None:
                report.skipped += 1  # an unreadable message: nothing to replay
                continue
            if reason and why != reason:
                continue
            if since and when < since:
                continue
            if model is not None and job.model != model:
                continue
            try:
                job = _retarget(job, settings, to_provider, to_model)
                await _check_body_maps(js, job, settings)
            except (Unmappable, BodyUnavailable) as exc:
                report.skipped += 1
                report.notes.append(f"{job.id}: cannot be sent to {to_provider}: {exc}")
                continue
            report.matched += 1
            report.job_ids.append(job.id)
            if not dry_run:
                tag = s.replay_tag(msg.seq, from_dead=source == "dead")
                await settler.republish(job, replay=tag)
                await delete(js, stream, msg.seq)  # already gone: a replayer took it
                report.moved += 1
                if gap:
                    await asyncio.sleep(gap)
            if limit is not None and report.matched >= limit:
                break
    finally:
        filters = {
            "from": source,
            "reason": reason or "",
            "since": since.isoformat() if since else "",
            "limit": str(limit or ""),
            "rate": str(rate or ""),
            "to_provider": to_provider or "",
            "to_model": to_model or "",
            "model": model or "",
        }
        with contextlib.suppress(Exception):
            await audit(
                js,
                "replay",
                provider=provider or "",
                filters=filters,
                counts=report.counts(),
                job_ids=report.job_ids,
                dry_run=dry_run,
            )
    return report


def _read_held(data: bytes, source: str) -> tuple[Job | None, datetime, str]:
    """(job, when it was held, why) of a parked job or a dead letter."""
    try:
        if source == "parked":
            parked = decode_parked(data)
            return parked.job, parked.park.parked_at, parked.park.reason
        letter = decode_dead_letter(data)
        if letter.job is None:
            return None, letter.dead_at, letter.reason
        return msgspec.convert(letter.job, Job), letter.dead_at, letter.reason
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None, datetime.now(UTC), ""
