"""What is happening, per provider: breaker, queues, workers, replay."""

from __future__ import annotations

import time
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NoKeysError, NotFoundError

from schemas import subjects as s
from schemas.health import decode_beat, decode_pause, decode_state
from services.breaker import decode_lease, paused_key
from services.config import Settings
from services.ops.streams import subject_counts


async def _kv_value(kv: Any, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except Exception:
        return None
    return entry.value or None


async def collect_status(js: JetStreamContext, settings: Settings) -> dict[str, Any]:
    """A snapshot for ``ridethrough status``: providers, workers online."""
    health = await js.key_value(s.HEALTH_BUCKET)
    control = await js.key_value(s.CONTROL_BUCKET)
    workers_kv = await js.key_value(s.WORKERS_BUCKET)
    beats = []
    try:
        keys = await workers_kv.keys()
    except (NotFoundError, NoKeysError):  # no worker has beaten yet
        keys = []
    for key in keys:
        raw = await _kv_value(workers_kv, key)
        if raw:
            beats.append(decode_beat(raw))
    parked = await subject_counts(js, s.PARKED_STREAM, "ai.parked.>")
    dead = await subject_counts(js, s.DEAD_STREAM, "ai.dead.>")
    providers: dict[str, Any] = {}
    for name in sorted(settings.providers):
        raw = await _kv_value(health, name)
        state = decode_state(raw) if raw else None
        raw = await _kv_value(control, paused_key(name))
        pause = decode_pause(raw) if raw else None
        try:
            consumer = await js.consumer_info(s.JOBS_STREAM, s.worker_consumer(name))
            waiting, in_flight = int(consumer.num_pending or 0), int(consumer.num_ack_pending or 0)
        except NotFoundError:
            waiting = in_flight = 0
        calls = sum(b.windows.get(name, (0, 0))[0] for b in beats)
        failures = sum(b.windows.get(name, (0, 0))[1] for b in beats)
        replay: dict[str, Any] | None = None
        raw = await _kv_value(control, f"replay.{name}")
        if raw:
            lease = decode_lease(raw)
            if lease.until > time.time():
                replay = {"by": lease.owner, **lease.info}
        providers[name] = {
            "state": "paused" if pause else (state.state if state else "closed"),
            "breaker": state.state if state else "closed",
            "since": state.since.isoformat() if state else None,
            "reason": (pause.reason if pause else (state.reason if state else "")),
            "outage_id": state.outage_id if state else "",
            "last_error": state.last_error if state else "",
            "paused_by": pause.by if pause else None,
            "failure_rate": round(failures / calls, 3) if calls else None,
            "calls_in_window": calls,
            "waiting": waiting,
            "in_flight": in_flight,
            "parked": sum(v for k, v in parked.items() if k.split(".")[2] == name),
            "dead": sum(v for k, v in dead.items() if k.split(".")[2] == name),
            "replay": replay,
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
