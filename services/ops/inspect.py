"""Looking things up: dead letters (and purging them), where a job is, the outage timeline."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext

from schemas import subjects as s
from schemas.events import (
    EvidenceEvent,
    decode_evidence_event,
    decode_health_event,
    decode_ops_event,
)
from schemas.jobs import BodyRef, decode_job
from schemas.parking import DeadLetter, decode_dead_letter
from schemas.results import decode_result
from services.bodies import body_status, drop_body
from services.errors import InvalidJob
from services.jetstream.errors import NOT_FOUND
from services.jetstream.streams import StoredMsg, iter_stream, scan_stream
from services.lifecycle import locator
from services.ops.audit import audit


@dataclass
class HeldLetter:
    """A dead letter and its sequence in AI_DEAD."""

    seq: int
    subject: str
    letter: DeadLetter

    def to_builtins(self) -> dict[str, Any]:
        """The letter's fields with its sequence and subject, for ``--json`` and ``dead show``."""
        return {"seq": self.seq, "subject": self.subject, **msgspec.to_builtins(self.letter)}


async def dead_letters(
    js: JetStreamContext,
    provider: str | None = None,
    reason: str | None = None,
    limit: int | None = None,
) -> list[HeldLetter]:
    """Dead letters, oldest first, optionally of one provider and reason."""
    out: list[HeldLetter] = []
    subject = s.dead_filter(provider, reason)
    async for msg in scan_stream(js, s.DEAD_STREAM, subject):
        try:
            letter = decode_dead_letter(msg.data or b"")
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        out.append(HeldLetter(seq=int(msg.seq or 0), subject=msg.subject or "", letter=letter))
        if limit is not None and len(out) >= limit:
            break
    return out


async def find_dead(js: JetStreamContext, key: str) -> HeldLetter | None:
    """The dead letter of job id ``key`` (or at sequence ``key``): read where the
    ``ai_locator`` index points (any tenant's job of that id; the newest letter wins)."""
    if key.isdigit():
        try:
            msg = await js.get_msg(s.DEAD_STREAM, seq=int(key), direct=True)
        except NOT_FOUND:
            return None
        return HeldLetter(int(key), msg.subject or "", decode_dead_letter(msg.data or b""))
    if not s.is_token(key):
        return None
    letters = [f for f in await locator.find(js, key, any_tenant=True) if f.dead is not None]
    if not letters:
        return None
    newest = max(letters, key=lambda f: f.seq)
    assert newest.dead is not None
    return HeldLetter(newest.seq, newest.subject, newest.dead)


async def count_dead(js: JetStreamContext, provider: str | None, reason: str | None) -> int:
    """How many dead letters there are (all, or of one provider and/or reason)."""
    info = await js.stream_info(s.DEAD_STREAM, subjects_filter=s.dead_filter(provider, reason))
    return sum(int(v) for v in (info.state.subjects or {}).values())


def _ref_of(letter: DeadLetter) -> BodyRef | None:
    """The body reference of a dead letter's job (a large job's), if any."""
    found = (letter.job or {}).get("request_ref")
    try:
        return msgspec.convert(found, BodyRef) if found else None
    except msgspec.ValidationError:
        return None


async def purge_dead(js: JetStreamContext, provider: str | None, reason: str | None) -> int:
    """Delete dead letters (all, or of one provider and/or reason); return how many.
    The bodies of large jobs among them go too (a dead letter kept its job's body so that
    it could be replayed). The purge is written to ``ai.events.ops``."""
    count = await count_dead(js, provider, reason)
    refs = [r for h in await dead_letters(js, provider, reason) if (r := _ref_of(h.letter))]
    if count:
        await js.purge_stream(s.DEAD_STREAM, subject=s.dead_filter(provider, reason))
    for ref in refs:
        await drop_body(js, ref.name)
    await audit(
        js,
        "dead.purge",
        provider=provider or "",
        filters={"reason": reason or ""},
        counts={"purged": count},
    )
    return count


async def locate_job(
    js: JetStreamContext,
    job_id: str,
    tenant: str | None = None,
    *,
    history: bool = True,
    body: bool = True,
) -> dict[str, Any]:
    """Where job ``job_id`` (of ``tenant``) is now, its attempts, and (``history``) its
    history from AI_EVENTS; (``body``) where a large job's body is, which reads the bodies'
    bucket (the gateway's NATS user may not: it passes ``body=False``). ``InvalidJob`` for
    an id that is not a token (``>`` would read any job's)."""
    if not s.is_token(job_id):
        raise InvalidJob(f"{job_id!r} is not a valid job id (A-Z a-z 0-9 _ -, 1-128)")
    where: dict[str, Any] = {"job_id": job_id, "where": "unknown", "attempts": None}
    # Parked jobs and dead letters are found through the ``ai_locator`` index (one read
    # each); only AI_JOBS is scanned (of the tenant's subjects when a tenant asks), and
    # there only the messages whose bytes hold the id (a token, never escaped in JSON)
    # are decoded.
    needle = job_id.encode()
    outage_ids: set[str] = set()
    try:
        subject = s.result_subject(job_id, tenant)
        raw = await js.get_last_msg(s.RESULTS_STREAM, subject, direct=True)
        result = decode_result(raw.data or b"")
        where.update(where="done", status=result.status, attempts=result.attempts)
        where["result"] = msgspec.to_builtins(result)
    except NOT_FOUND:
        pass
    ref: BodyRef | None = None
    found = await locator.find(js, job_id, tenant, any_tenant=tenant is None)
    # Without a tenant: the job of no tenant if there is one, else the first tenant's by
    # name (the others are named).
    owners = sorted({f.tenant or "" for f in found})
    owner = tenant if tenant is not None or not owners else (owners[0] or None)
    if owner != tenant:
        where["tenant"] = owner
    if others := [o for o in owners if o and o != owner]:
        where["also_tenants"] = others
    mine = sorted((f for f in found if f.tenant == owner), key=lambda f: -f.seq)
    held = next((f.dead for f in mine if f.dead is not None), None)
    if held is not None:
        ref = _ref_of(held)
        where["dead"] = {"reason": held.reason, "error": held.error.message}
        if where["where"] == "unknown":
            where.update(where="dead", attempts=held.attempts)
    parked_copy = next((f.parked for f in mine if f.parked is not None), None)
    if where["where"] == "unknown" and parked_copy is not None:
        ref = parked_copy.job.request_ref
        park = parked_copy.park
        where.update(where="parked", attempts=park.attempts, parked=msgspec.to_builtins(park))
        outage_ids.add(park.outage_id)
    if where["where"] == "unknown":
        for provider, delivered in (await _delivered(js)).items():
            async for msg in _waiting(js, provider, tenant):
                if needle not in (msg.data or b""):
                    continue
                try:
                    job = decode_job(msg.data or b"")
                except (msgspec.ValidationError, msgspec.DecodeError):
                    continue
                if job.id == job_id:
                    ref = job.request_ref
                    priority = (msg.subject or "").split(".")[3:4]
                    seen = (msg.seq or 0) <= delivered.get(priority[0] if priority else "", 0)
                    where["where"] = "in_flight" if seen else "waiting"
                    where["provider"] = provider
                    break
            if where["where"] != "unknown":
                break
    if body and ref is not None:  # a large job: where its body is (services/bodies.py)
        where["body"] = await body_status(js, ref)
    if history:
        where["history"] = await _history(js, job_id, outage_ids)
    return where


async def _waiting(
    js: JetStreamContext, provider: str, tenant: str | None
) -> AsyncIterator[StoredMsg]:
    """The jobs of ``provider`` on AI_JOBS: all, or only those on ``tenant``'s subjects
    (its own and the ones ridethrough requeued for it)."""
    filters = (
        (s.jobs_filter(provider),) if tenant is None else s.tenant_jobs_filters(provider, tenant)
    )
    for subject in filters:
        async for msg in iter_stream(js, s.JOBS_STREAM, subject):
            yield msg


async def _delivered(js: JetStreamContext) -> dict[str, dict[str, int]]:
    """provider -> priority -> the last AI_JOBS sequence its workers' consumer delivered."""
    info = await js.stream_info(s.JOBS_STREAM)
    out: dict[str, dict[str, int]] = {}
    for provider in sorted({filt.split(".")[2] for filt in info.config.subjects or []}):
        for priority in s.PRIORITIES:
            name = s.worker_consumer(provider, priority)
            try:
                consumer = await js.consumer_info(s.JOBS_STREAM, name)
            except NOT_FOUND:
                continue
            out.setdefault(provider, {})[priority] = int(consumer.delivered.stream_seq or 0)
    return out


async def _history(js: JetStreamContext, job_id: str, outage_ids: set[str]) -> list[dict[str, Any]]:
    """The operator actions that named ``job_id`` and the health events of its outages:
    only those subjects of AI_EVENTS are read, and only events naming the job decoded."""
    events: list[dict[str, Any]] = []
    needle = job_id.encode()
    filters = [s.OPS_EVENTS_SUBJECT] + ([s.HEALTH_EVENTS_FILTER] if outage_ids else [])
    async for msg in scan_stream(js, s.EVENTS_STREAM, filters):
        subject = msg.subject or ""
        if subject == s.OPS_EVENTS_SUBJECT:
            if needle not in (msg.data or b""):
                continue
            ops = decode_ops_event(msg.data or b"")
            if job_id in ops.job_ids:
                events.append(
                    {
                        "at": ops.at.isoformat(),
                        "event": ops.action,
                        "by": ops.who,
                        "dry_run": ops.dry_run,
                    }
                )
        elif outage_ids and subject.startswith("ai.events.health."):
            health = decode_health_event(msg.data or b"")
            if health.outage_id in outage_ids:
                scope = s.scope_label(health.provider, health.model or None)
                events.append(
                    {
                        "at": health.at.isoformat(),
                        "event": f"{scope} {health.previous} -> {health.state}",
                        "outage_id": health.outage_id,
                    }
                )
    return events


async def _page_events(js: JetStreamContext) -> dict[str, list[EvidenceEvent]]:
    """Every status page change on AI_EVENTS, per provider, oldest first."""
    pages: dict[str, list[EvidenceEvent]] = {}
    async for msg in iter_stream(js, s.EVENTS_STREAM, s.evidence_event_subject("*")):
        try:
            event = decode_evidence_event(msg.data or b"")
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        pages.setdefault(event.provider, []).append(event)
    return pages


def _page_said(
    events: list[EvidenceEvent], start: datetime | None, end: datetime | None
) -> list[dict[str, Any]]:
    """What the status page said during an outage: the evidence in force when it began,
    then every change until it ended (evidence, never proof: it moved no breaker)."""
    before = [e for e in events if start is not None and e.at <= start]
    during = [e for e in events if (start is None or e.at > start) and (end is None or e.at <= end)]
    return [
        {
            "at": e.at.isoformat(),
            "summary": e.summary,
            "incidents": [
                {"name": i.name, "status": i.status, "shortlink": i.shortlink}
                for i in e.evidence.incidents
            ],
        }
        for e in before[-1:] + during
    ]


async def outage_timeline(
    js: JetStreamContext,
    last: int | None = None,
    *,
    provider: str | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Outages from the health events, one per scope and outage id: provider, model ("" for
    the provider's own), start, end, duration, parked, replayed. ``model`` keeps only that
    model's outages (and its provider's, which held its jobs too); and what the provider's
    status page said meanwhile (``status_page``)."""
    outages: dict[str, dict[str, Any]] = {}
    async for msg in iter_stream(js, s.EVENTS_STREAM, s.HEALTH_EVENTS_FILTER):
        try:
            e = decode_health_event(msg.data or b"")
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue  # not a health event (anyone who may publish one may publish garbage)
        if not e.outage_id:
            continue
        if provider is not None and e.provider != provider:
            continue
        if model is not None and e.model not in ("", model):
            continue
        o = outages.setdefault(
            e.outage_id,
            {
                "outage_id": e.outage_id,
                "provider": e.provider,
                "model": e.model,
                "start": None,
                "end": None,
                "duration_s": None,
                "reopened": 0,
                "parked": 0,
                "replayed": 0,
                "calls_saved": 0,
                "reason": e.reason,
            },
        )
        if e.state == "open" and e.previous == "closed":
            o["start"] = e.at
        elif e.state == "open":
            o["reopened"] += 1
        elif e.state == "closed":
            o["end"] = e.at
            o["parked"], o["replayed"] = e.parked, e.replayed
            # Each parked job would have cost at least one failing call: a lower bound.
            o["calls_saved"] = e.parked
    rows = list(outages.values())
    pages = await _page_events(js)
    for o in rows:
        start, end = o["start"], o["end"]
        o["status_page"] = _page_said(
            pages.get(o["provider"], []),
            start if isinstance(start, datetime) else None,
            end if isinstance(end, datetime) else None,
        )
        if isinstance(start, datetime) and isinstance(end, datetime):
            o["duration_s"] = round((end - start).total_seconds(), 3)
        o["start"] = start.isoformat() if isinstance(start, datetime) else None
        o["end"] = end.isoformat() if isinstance(end, datetime) else None
    rows.sort(key=lambda o: o["start"] or "")
    return rows[-last:] if last else rows
