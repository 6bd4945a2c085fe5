"""Where notifications go: a signed CloudEvents webhook, Slack, PagerDuty Events v2.

Each sink turns a ``Notice`` into one HTTP POST; ``send`` returns when the sink accepted it
(a 2xx answer) and raises ``SinkError`` otherwise. Retrying is the notifier's.

Signatures (the generic webhook)
--------------------------------
The body is CloudEvents 1.0 JSON in structured mode (``application/cloudevents+json``).
Each request carries::

    webhook-id: <the CloudEvents id>
    x-ridethrough-timestamp: <Unix seconds when it was sent>
    x-ridethrough-signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body bytes, compares
in constant time, and refuses a timestamp more than a few minutes away from its clock (a
replayed request); it dedupes by the id. ``verify`` does exactly that.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import msgspec

from services.errors import RidethroughError
from services.notifier.notices import CLOSED, OPENED, Notice

SIGNATURE_HEADER = "x-ridethrough-signature"
TIMESTAMP_HEADER = "x-ridethrough-timestamp"
ID_HEADER = "webhook-id"
CLOUDEVENTS_JSON = "application/cloudevents+json; charset=utf-8"
#: How far a signed timestamp may be from the receiver's clock (``verify``'s default).
TOLERANCE_S = 300.0


class SinkError(RidethroughError):
    """A sink did not accept a notification (``status``: its HTTP status, 0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``x-ridethrough-signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(
    secret: str,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    now: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp`` under ``secret``, and the
    timestamp is within ``tolerance_s`` of ``now`` (a receiver's check)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def cloudevent(notice: Notice, source: str) -> dict[str, Any]:
    """``notice`` as a CloudEvents 1.0 event (structured mode)."""
    return {
        "specversion": "1.0",
        "id": notice.id,
        "source": source,
        "type": notice.type,
        "subject": notice.subject,
        "time": notice.time.isoformat(),
        "datacontenttype": "application/json",
        "data": {"title": notice.title, "text": notice.text, **notice.data},
    }


def slack_message(notice: Notice) -> dict[str, Any]:
    """``notice`` as a Slack incoming-webhook message (``text`` for notifications,
    ``blocks`` for the channel)."""
    icon = {OPENED: ":red_circle:", CLOSED: ":large_green_circle:"}.get(notice.type, ":gear:")
    return {
        "text": f"{notice.title}\n{notice.text}",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": notice.title[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": f"{icon} {notice.text}"[:3000]}},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"ridethrough · `{notice.id}`"}],
            },
        ],
    }


def pagerduty_event(notice: Notice, routing_key: str, source: str) -> dict[str, Any] | None:
    """``notice`` as a PagerDuty Events v2 event: trigger on open, resolve on close, the
    incident id as dedup key; None for notices PagerDuty does not take (operator actions)."""
    if notice.type == OPENED:
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": notice.incident,
            "payload": {
                "summary": notice.title[:1024],
                "source": source,
                "severity": "critical",
                "component": notice.data.get("provider", ""),
                "group": notice.subject,
                "class": "provider_outage",
                "timestamp": notice.time.isoformat(),
                "custom_details": notice.data,
            },
        }
    if notice.type == CLOSED:
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": notice.incident}
    return None


class Sink(Protocol):
    """One destination of notifications."""

    name: str

    def wants(self, notice: Notice) -> bool:
        """Whether this sink carries ``notice``."""

    async def send(self, session: aiohttp.ClientSession, notice: Notice) -> None:
        """Deliver ``notice``; ``SinkError`` unless the sink accepted it."""


async def _post(
    session: aiohttp.ClientSession, name: str, url: str, body: bytes, headers: dict[str, str]
) -> None:
    # The URL is a secret (Slack's is its credential): errors name the sink, never the URL.
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                raise SinkError(f"{name} answered HTTP {resp.status}", resp.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SinkError(f"{name} unreachable: {type(exc).__name__}") from None


@dataclass(slots=True)
class WebhookSink:
    """The generic webhook: CloudEvents JSON, signed."""

    url: str
    secret: str
    source: str
    name: str = "webhook"

    def wants(self, notice: Notice) -> bool:
        """Every notice."""
        return True

    async def send(self, session: aiohttp.ClientSession, notice: Notice) -> None:
        """POST the signed CloudEvent."""
        body = msgspec.json.encode(cloudevent(notice, self.source))
        ts = int(time.time())
        headers = {
            "content-type": CLOUDEVENTS_JSON,
            ID_HEADER: notice.id,
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self.secret, ts, body),
        }
        await _post(session, self.name, self.url, body, headers)


@dataclass(slots=True)
class SlackSink:
    """A Slack incoming webhook."""

    url: str
    name: str = "slack"

    def wants(self, notice: Notice) -> bool:
        """Every notice."""
        return True

    async def send(self, session: aiohttp.ClientSession, notice: Notice) -> None:
        """POST the message."""
        body = msgspec.json.encode(slack_message(notice))
        await _post(session, self.name, self.url, body, {"content-type": "application/json"})


@dataclass(slots=True)
class PagerDutySink:
    """PagerDuty Events v2."""

    url: str
    routing_key: str
    source: str
    name: str = "pagerduty"

    def wants(self, notice: Notice) -> bool:
        """Outages only (trigger and resolve)."""
        return notice.type in (OPENED, CLOSED)

    async def send(self, session: aiohttp.ClientSession, notice: Notice) -> None:
        """POST the event."""
        event = pagerduty_event(notice, self.routing_key, self.source)
        if event is None:
            return
        body = msgspec.json.encode(event)
        await _post(session, self.name, self.url, body, {"content-type": "application/json"})


def build_sinks(settings: Any) -> list[Sink]:
    """The sinks ``settings.notify`` configures (files read now: ``ConfigError`` if one
    cannot be). Empty when none is: the notifier then refuses to start."""
    n = settings.notify
    sinks: list[Sink] = []
    if (hook := n.webhook()) is not None:
        sinks.append(WebhookSink(hook[0], hook[1], n.source))
    if (slack := n.slack()) is not None:
        sinks.append(SlackSink(slack))
    if (key := n.pagerduty()) is not None:
        sinks.append(PagerDutySink(n.pagerduty_url, key, n.source))
    return sinks
