"""The gateway's status page: ``GET /status`` (HTML that reloads itself) and
``GET /status.json``, read-only, behind an operator key.

What it shows is what ``ridethrough status`` and ``ridethrough outages`` read (the same
collectors): per provider and model the breaker and since when, jobs waiting / in flight /
parked per priority, dead letters per reason (a dead letter's subject names its reason,
not its priority), the replay in progress, workers online, and the last outages with
their summaries. Every value is escaped: model names come from producers' jobs.

Operator keys are SHA-256 digests (``gateway.operator_keys``) like the gateway's keys; a
browser sends one as the password of HTTP Basic auth (the page answers 401 with
``WWW-Authenticate: Basic``), a script as ``Authorization: Bearer`` or ``x-api-key``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from datetime import UTC, datetime
from html import escape
from typing import Any

from nats.js import JetStreamContext

from schemas import subjects as s
from services.config import Settings
from services.gateway.keys import key_digest
from services.jetstream.streams import subject_counts

#: Outages listed (the newest).
LAST_OUTAGES = 8


def presented_key(headers: Any) -> str | None:
    """The operator key of a request: Basic auth's password, a bearer token or
    ``x-api-key``."""
    auth = str(headers.get("authorization", ""))
    scheme, _, value = auth.partition(" ")
    value = value.strip()
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    if scheme.lower() == "bearer" and value:
        return value
    key = headers.get("x-api-key")
    return str(key) if key else None


def is_operator(digests: frozenset[str], key: str | None) -> bool:
    """Whether ``key`` is one of the operator keys (compared as digests, in constant time
    per digest)."""
    if not key:
        return False
    digest = key_digest(key)
    return any(hmac.compare_digest(digest, known) for known in digests)


async def snapshot(js: JetStreamContext, settings: Settings) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data."""
    from services.ops.inspect import outage_timeline
    from services.ops.status import collect_status

    status = await collect_status(js, settings)
    parked = await subject_counts(js, s.PARKED_STREAM, s.parked_filter())
    dead = await subject_counts(js, s.DEAD_STREAM, s.dead_filter())
    for name, p in status["providers"].items():
        by_prio: dict[str, int] = dict.fromkeys(s.PRIORITIES, 0)
        for subject, n in parked.items():
            place = s.parked_place(subject)
            if place is not None and place.provider == name and place.priority in by_prio:
                by_prio[place.priority] += n
        p["parked_by_priority"] = by_prio
        p["dead_by_reason"] = {
            subject.split(".", 3)[3]: n
            for subject, n in sorted(dead.items())
            if subject.split(".")[2:3] == [name]
        }
    status["outages"] = await outage_timeline(js, LAST_OUTAGES)
    status["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return status


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.n{text-align:right}
.closed{color:#17692b}.open{color:#fff;background:#c0392b;font-weight:bold}
.half_open{background:#f5c542}.paused{background:#9ab}.unknown{background:#ddd}
small{color:#666}
"""


def _state(state: str) -> str:
    return f'<span class="{escape(state)} state">{escape(state)}</span>'


def _n(value: Any) -> str:
    return f'<td class="n">{escape(str(value))}</td>'


def _cell(value: Any) -> str:
    return f"<td>{escape('' if value is None else str(value))}</td>"


def _when(stamp: Any) -> str:
    """An ISO time as ``YYYY-MM-DD HH:MM:SS`` (UTC), or as it came."""
    if not isinstance(stamp, str) or not stamp:
        return ""
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp


def _replay_text(replay: dict[str, Any] | None) -> str:
    """The replay lease's progress: replayed of backlog at a rate, and per model."""
    if not replay:
        return "idle"
    parts = [
        f"{replay.get('replayed', 0)} replayed, {replay.get('backlog', 0)} left "
        f"({replay.get('state', '?')}, {replay.get('rate') or 0}/s)"
    ]
    models = replay.get("models")
    for model, m in (models if isinstance(models, dict) else {}).items():
        if isinstance(m, dict):
            parts.append(
                f"{model}: {m.get('replayed', 0)} replayed, {m.get('backlog', 0)} left "
                f"({m.get('state', '?')})"
            )
    return "; ".join(parts)


def _breaker_row(label: str, b: dict[str, Any]) -> str:
    rate = b.get("failure_rate")
    return (
        "<tr>"
        + _cell(label)
        + f"<td>{_state(str(b.get('state', 'unknown')))}</td>"
        + _cell(_when(b.get("since")))
        + _cell(b.get("reason") or "")
        + _cell("" if rate is None else f"{rate:.0%} of {b.get('calls_in_window', 0)}")
        + "</tr>"
    )


def render(status: dict[str, Any], refresh_s: float) -> str:
    """The page: a snapshot as HTML that reloads itself every ``refresh_s`` seconds."""
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{max(1, round(refresh_s))}">',
        "<title>ridethrough status</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>ridethrough status</h1>",
        f'<p><small>as of <span id="at">{escape(_when(status.get("at")))} UTC</span>; '
        f"reloads every {max(1, round(refresh_s))} s</small></p>",
        "<h2>Breakers</h2><table id=breakers><tr><th>provider / model</th><th>state</th>"
        "<th>since</th><th>reason</th><th>failures in window</th></tr>",
    ]
    providers: dict[str, Any] = status.get("providers", {})
    for name, p in providers.items():
        out.append(_breaker_row(name, p))
        for model, m in p.get("models", {}).items():
            out.append(_breaker_row(f"{name} / {model}", m))
    out.append("</table>")
    prios = s.PRIORITIES
    out.append(
        "<h2>Queues</h2><table id=queues><tr><th>provider</th>"
        + "".join(f"<th>waiting {escape(p)}</th>" for p in prios)
        + "<th>in flight</th>"
        + "".join(f"<th>parked {escape(p)}</th>" for p in prios)
        + "<th>dead (by reason)</th><th>replay</th></tr>"
    )
    for name, p in providers.items():
        waiting = p.get("waiting_by_priority", {})
        parked = p.get("parked_by_priority", {})
        dead = p.get("dead_by_reason", {})
        replay_text = _replay_text(p.get("replay"))
        out.append(
            "<tr>"
            + _cell(name)
            + "".join(_n(waiting.get(prio, 0)) for prio in prios)
            + _n(p.get("in_flight", 0))
            + "".join(_n(parked.get(prio, 0)) for prio in prios)
            + _cell(", ".join(f"{r}: {n}" for r, n in dead.items()) or "0")
            + _cell(replay_text)
            + "</tr>"
        )
    out.append("</table>")
    workers = status.get("workers", [])
    out.append(f"<h2>Workers online: <span id=workers>{len(workers)}</span></h2><table>")
    out.append("<tr><th>worker</th><th>providers</th><th>in flight</th><th>seen</th></tr>")
    for w in workers:
        out.append(
            "<tr>"
            + _cell(w.get("id"))
            + _cell(", ".join(map(str, w.get("providers", []))))
            + _cell(f"{w.get('in_flight')} / {w.get('concurrency')}")
            + _cell(_when(w.get("seen")))
            + "</tr>"
        )
    out.append("</table><h2>Last outages</h2><table id=outages>")
    out.append(
        "<tr><th>provider / model</th><th>start</th><th>end</th><th>duration</th>"
        "<th>reason</th><th>parked</th><th>replayed</th><th>reopened</th></tr>"
    )
    for o in reversed(status.get("outages", [])):
        scope = o.get("provider", "") + (f" / {o['model']}" if o.get("model") else "")
        duration = o.get("duration_s")
        out.append(
            "<tr>"
            + _cell(scope)
            + _cell(_when(o.get("start")))
            + _cell(_when(o.get("end")) or "ongoing")
            + _cell("" if duration is None else f"{duration:.1f} s")
            + _cell(o.get("reason"))
            + _n(o.get("parked", 0))
            + _n(o.get("replayed", 0))
            + _n(o.get("reopened", 0))
            + "</tr>"
        )
    out.append("</table></body></html>")
    return "\n".join(out)
