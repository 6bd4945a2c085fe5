"""What is happening, per provider and per model: breaker, queues, workers, replay,
status page.

An entry of ai_health or ai_control nobody can decode shows its provider as
``unknown`` (listed under ``unreadable``); an unreadable replay lease is no replay,
an unreadable heartbeat no worker, unreadable evidence no evidence (the breaker's state
stays known: evidence is never proof). Status never fails on what it reads.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext

from schemas import subjects as s
from schemas.health import (
    Evidence,
    try_decode_beat,
    try_decode_evidence,
    try_decode_pause,
    try_decode_state,
)
from services.breaker import paused_key, try_decode_lease
from services.config import Settings
from services.jetstream.errors import NOT_FOUND
from services.jetstream.kv import keys_of
from services.jetstream.streams import subject_counts

log = logging.getLogger("ridethrough.status")


async def _kv_value(kv: Any, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except Exception:
        return None
    return entry.value or None


def _unreadable(where: str, raw: bytes) -> None:
    log.warning("%s is unreadable (%d bytes): shown as unknown", where, len(raw))


async def _breaker_status(
    health: Any, control: Any, beats: list[Any], provider: str, model: str | None = None
) -> dict[str, Any]:
    """The breaker of ``provider`` (or of its ``model``): state, since, reason, outage,
    pause, failure rate over the workers' windows, and the entries nobody can decode."""
    key = s.scope_key(provider, model)
    unreadable: list[str] = []
    raw_state = await _kv_value(health, key)
    state = try_decode_state(raw_state) if raw_state else None
    if raw_state and state is None:
        unreadable.append(f"{s.HEALTH_BUCKET}/{key}")
        _unreadable(unreadable[-1], raw_state)
    raw = await _kv_value(control, paused_key(provider, model))
    pause = try_decode_pause(raw) if raw else None
    if raw and pause is None:
        unreadable.append(f"{s.CONTROL_BUCKET}/{paused_key(provider, model)}")
        _unreadable(unreadable[-1], raw)
    breaker = state.state if state else ("unknown" if raw_state else "closed")
    calls = sum(b.windows.get(key, (0, 0))[0] for b in beats)
    failures = sum(b.windows.get(key, (0, 0))[1] for b in beats)
    return {
        "state": "paused" if pause else ("unknown" if unreadable else breaker),
        "breaker": breaker,
        "since": state.since.isoformat() if state else None,
        "reason": (pause.reason if pause else (state.reason if state else "")),
        "outage_id": state.outage_id if state else "",
        "last_error": state.last_error if state else "",
        "paused_by": pause.by if pause else None,
        "failure_rate": round(failures / calls, 3) if calls else None,
        "calls_in_window": calls,
        "unreadable": unreadable,
    }


def _stamp(value: object) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).isoformat()
    return None


async def _status_page(control: Any, name: str) -> dict[str, Any] | None:
    """What ``name``'s status page says (``evidence.<name>``) and how it reads now (the
    probe lease's ``status_page`` info); ``None`` when no page was ever read."""
    key = s.evidence_key(name)
    stored = await _kv_value(control, key)
    evidence = try_decode_evidence(stored) if stored else None
    if stored and evidence is None:
        _unreadable(f"{s.CONTROL_BUCKET}/{key}", stored)
    raw = await _kv_value(control, f"probe.{name}")
    lease = try_decode_lease(raw) if raw else None
    reading = lease.info.get("status_page") if lease is not None else None
    reading = reading if isinstance(reading, dict) and lease and lease.until > time.time() else {}
    if evidence is None and not reading and not stored:
        return None
    e = evidence or Evidence(provider=name)
    failed = reading.get("failed")
    failed = failed if isinstance(failed, int) and not isinstance(failed, bool) else 0
    return {
        "page": e.page or reading.get("page") or "",
        "summary": e.summary() if evidence is not None else "unknown",
        "indicator": e.indicator,
        "degraded": [msgspec.to_builtins(c) for c in e.degraded],
        "other": [msgspec.to_builtins(c) for c in e.other],
        "incidents": [msgspec.to_builtins(i) for i in e.incidents],
        "changed_at": e.read_at.isoformat() if evidence is not None else None,
        "read_at": _stamp(reading.get("read_at")),
        "failed_reads": failed,
        "problem": str(reading.get("problem") or "")[:200],
        "stale": failed > 0,
        "unreadable_record": bool(stored and evidence is None),
    }


async def collect_status(js: JetStreamContext, settings: Settings) -> dict[str, Any]:
    """A snapshot for ``ridethrough status``: providers, workers online."""
    health = await js.key_value(s.HEALTH_BUCKET)
    control = await js.key_value(s.CONTROL_BUCKET)
    workers_kv = await js.key_value(s.WORKERS_BUCKET)
    beats = []
    # Keys by stream info, not ``KeyValue.keys()``, which creates a consumer (the gateway's
    # NATS user, showing this on /status, may create none there); a deleted or expired
    # heartbeat reads as nothing below.
    for key in await keys_of(js, s.WORKERS_BUCKET):
        raw = await _kv_value(workers_kv, key)
        beat = try_decode_beat(raw) if raw else None
        if beat is not None:
            beats.append(beat)
        elif raw:
            _unreadable(f"{s.WORKERS_BUCKET}/{key}", raw)
    parked = await subject_counts(js, s.PARKED_STREAM, s.parked_filter())
    dead = await subject_counts(js, s.DEAD_STREAM, s.dead_filter())
    # The models with a breaker, a pause, or parked jobs, per provider.
    models: dict[str, set[str]] = {name: set() for name in settings.providers}
    pause_keys = [k.removeprefix("paused.") for k in await keys_of(js, s.CONTROL_BUCKET, "paused")]
    for key in [*await keys_of(js, s.HEALTH_BUCKET), *pause_keys]:
        scope = s.scope_of_key(key)
        if scope is not None and scope[1] is not None and scope[0] in models:
            models[scope[0]].add(scope[1])
    parked_by_model: dict[tuple[str, str], int] = {}
    for subject, n in parked.items():
        place = s.parked_place(subject)
        if place is not None and place.model is not None and place.provider in models:
            models[place.provider].add(place.model)
            key2 = (place.provider, place.model)
            parked_by_model[key2] = parked_by_model.get(key2, 0) + n
    providers: dict[str, Any] = {}
    for name in sorted(settings.providers):
        breaker = await _breaker_status(health, control, beats, name)
        waiting_by_priority: dict[str, int] = {}
        in_flight = 0
        for prio in s.PRIORITIES:
            try:
                consumer = await js.consumer_info(s.JOBS_STREAM, s.worker_consumer(name, prio))
            except NOT_FOUND:
                continue
            waiting_by_priority[prio] = int(consumer.num_pending or 0)
            in_flight += int(consumer.num_ack_pending or 0)
        waiting = sum(waiting_by_priority.values())
        replay: dict[str, Any] | None = None
        raw = await _kv_value(control, f"replay.{name}")
        lease = try_decode_lease(raw) if raw else None
        if raw and lease is None:
            _unreadable(f"{s.CONTROL_BUCKET}/replay.{name}", raw)
        if lease is not None and lease.until > time.time():
            replay = {"by": lease.owner, **lease.info}
        unreadable = breaker.pop("unreadable")
        providers[name] = {
            **breaker,
            "waiting": waiting,
            "waiting_by_priority": waiting_by_priority,
            "in_flight": in_flight,
            "parked": sum(v for k, v in parked.items() if k.split(".")[2] == name),
            "dead": sum(v for k, v in dead.items() if k.split(".")[2] == name),
            "replay": replay,
            "evidence": await _status_page(control, name),
            "unreadable": unreadable,
            "models": {
                model: {
                    **await _breaker_status(health, control, beats, name, model),
                    "parked": parked_by_model.get((name, model), 0),
                }
                for model in sorted(models[name])
            },
        }
    workers = [
        {
            "id": b.worker_id,
            "providers": b.providers,
            "in_flight": b.in_flight,
            "concurrency": b.concurrency,
            "seen": b.at.isoformat(),
        }
        for b in sorted(beats, key=lambda b: b.worker_id)
    ]
    return {"providers": providers, "workers": workers}
