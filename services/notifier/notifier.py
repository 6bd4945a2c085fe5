"""The notifier: breaker events and operator actions from AI_EVENTS, to the sinks.

One notifier is active among replicas (a lease in ai_control, ``notify``). It reads the
durable consumer ``notifier`` (``ai.events.health.>`` and ``ai.events.ops``) and handles
each subject's events in order, in a lane of its own (a scope's close waiting out the flap
window holds that scope only; the audit log is one lane), and acknowledges an event only
once every sink that carries its notification accepted it (2xx) or was given up on: at
least once. Every event it holds unacknowledged is kept ``in progress``. A sink that refuses is
retried with exponential backoff and jitter, ``notify.max_attempts`` times, then given up
on with a warning and ``ridethrough_notifications_given_up_total``. Meanwhile the event is
kept ``in progress``, so it is not redelivered; a notifier that dies (even by SIGKILL)
leaves it unacked, and the next one, once it holds the lease, gets it after ``ack_wait``
and sends the same notification again with the same id (receivers dedupe by it).

A close is held until ``notify.flap_window_s`` has passed, so a re-open within it makes
one incident (``incidents.py``); the decision reads the scope's stored history, the same
for every notifier. The summary then reads what other streams know of the incident: its
scope's dead letters stored between open and close (AI_DEAD), and the tallies of its
outages (``ai.events.tally.<provider>``: jobs failed over and expired, published by the
workers and the replayer about once a second; the summary waits ``TALLY_GRACE_S`` after
the close for the last of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import subjects as s
from schemas.events import decode_health_event, decode_ops_event, decode_tally_event
from schemas.parking import decode_dead_letter
from services import metrics
from services.breaker.lease import LeaseKeeper
from services.breaker.tally import FLUSH_S
from services.config import Settings
from services.jetstream.connection import client
from services.jetstream.pull import ack_position
from services.jetstream.streams import StoredMsg, iter_stream
from services.jetstream.topology import NOTIFIER_MAX_PENDING
from services.notifier import incidents, notices
from services.notifier.notices import Notice
from services.notifier.sinks import Sink, SinkError
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.notifier")

#: Most dead letters read for one summary (a bound on the work of one close).
MAX_DEAD_READ = 100_000
#: Most tallies read for one summary (each is one process's second of one outage).
MAX_TALLY_READ = 100_000
#: How long after a close its summary waits for the tallies still in flight (the workers
#: flush every ``FLUSH_S``; the replayer flushes before it closes).
TALLY_GRACE_S = 2 * FLUSH_S
#: Most events held unacknowledged at once (the consumer's max_ack_pending).
MAX_HELD = NOTIFIER_MAX_PENDING


class Notifier:
    """Delivers the notifications of AI_EVENTS to ``sinks`` while it holds the lease."""

    def __init__(
        self, js: JetStreamContext, settings: Settings, sinks: list[Sink], *, owner: str
    ) -> None:
        self.js = js
        self.settings = settings
        self.sinks = sinks
        self.owner = owner
        self.lease: LeaseKeeper | None = None
        self.sent: dict[str, int] = {}  # notice id -> sinks that accepted it (this process)
        self.given_up = 0
        self.fetching = False
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # Per subject, its events in order (a lane); by stream sequence, the latest
        # delivery of every event held (queued or under way), kept in progress.
        self._lanes: dict[str, asyncio.Queue[int]] = {}
        self._lane_tasks: dict[str, asyncio.Task[None]] = {}
        self._held: dict[int, Msg] = {}

    async def start(self) -> Notifier:
        """Take part in the lease and start delivering."""
        control = await self.js.key_value(s.CONTROL_BUCKET)
        n = self.settings.notify
        self.lease = LeaseKeeper(control, s.NOTIFIER_LEASE, self.owner, n.lease_s).start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=n.timeout_s))
        self._task = asyncio.create_task(self._supervise())
        return self

    async def stop(self) -> None:
        """Stop delivering (an event under way stays unacked: redelivered), give the lease up."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()
        if self.lease is not None:
            await self.lease.stop()

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run()
            except Exception as exc:
                raise_if_cancelling()
                log.warning("notifier interrupted, resuming: %r", exc)
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        assert self.lease is not None
        sub = await self.js.pull_subscribe_bind(s.NOTIFIER_CONSUMER, s.EVENTS_STREAM)
        beat = asyncio.create_task(self._beat())
        try:
            while True:
                raise_if_cancelling()
                room = MAX_HELD - len(self._held)
                if not self.lease.held or room <= 0:
                    self.fetching = False
                    await asyncio.sleep(self.settings.notify.lease_s / 4)
                    continue
                self.fetching = True
                try:
                    msgs = await sub.fetch(min(room, 64), timeout=1.0)
                except TimeoutError:
                    continue
                for msg in msgs:
                    self._take(msg)
        finally:
            beat.cancel()
            for task in self._lane_tasks.values():
                task.cancel()
            for task in [beat, *self._lane_tasks.values()]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._lanes.clear()
            self._lane_tasks.clear()
            self._held.clear()  # unacked: redelivered after ack_wait
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _take(self, msg: Msg) -> None:
        """Queue an event in its subject's lane (a redelivery of one already held only
        replaces the delivery it will be acked through)."""
        seq, _ = ack_position(msg)
        known = seq in self._held
        self._held[seq] = msg
        if known:
            return
        lane = msg.subject
        if lane not in self._lanes:
            self._lanes[lane] = asyncio.Queue()
            self._lane_tasks[lane] = asyncio.create_task(self._lane(self._lanes[lane]))
        self._lanes[lane].put_nowait(seq)

    async def _lane(self, queue: asyncio.Queue[int]) -> None:
        while True:
            seq = await queue.get()
            try:
                await self.handle(self._held[seq], seq)
            except Exception as exc:  # NATS away: the event stays unacked, redelivered
                raise_if_cancelling()
                log.warning("event %d not notified, left for redelivery: %r", seq, exc)
            finally:
                self._held.pop(seq, None)

    async def _beat(self) -> None:
        """Keep every held event in progress (so none is redelivered while it waits)."""
        while True:
            await asyncio.sleep(self.settings.notify.ack_wait_s / 3)
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    async def handle(self, msg: Msg, seq: int | None = None) -> None:
        """Notify for one event of the consumer, then ack it (through its latest delivery)."""
        if seq is None:
            seq, _ = ack_position(msg)
        notice = await self._notice(msg, seq)
        if notice is not None:
            await self.deliver(notice)
        await self._held.get(seq, msg).ack()

    async def _notice(self, msg: Msg, seq: int) -> Notice | None:
        data = msg.data or b""
        if msg.subject == s.OPS_EVENTS_SUBJECT:
            try:
                op = decode_ops_event(data)
            except msgspec.DecodeError:
                log.warning("AI_EVENTS %d on %s is no operator event: skipped", seq, msg.subject)
                return None
            if op.dry_run or not self.settings.notify.ops_events:
                return None
            return notices.ops(seq, op)
        try:
            event = decode_health_event(data)
        except msgspec.DecodeError:
            log.warning("AI_EVENTS %d on %s is no health event: skipped", seq, msg.subject)
            return None
        flap = self.settings.notify.flap_window_s
        while True:
            history = await self._history(msg.subject)
            decision = incidents.decide(history, seq, flap_s=flap, now=datetime.now(UTC))
            if not isinstance(decision, incidents.Wait):
                break
            await asyncio.sleep(max(0.0, (decision.until - datetime.now(UTC)).total_seconds()))
        if isinstance(decision, incidents.Opened):
            return notices.opened(decision.incident)
        if isinstance(decision, incidents.Closed):
            dead = await self._dead(decision.incident)
            tallied = await self._tallied(decision.incident)
            return notices.closed(decision.incident, dead, tallied)
        log.debug("no notification for %s %s: %s", msg.subject, event.state, decision.why)
        return None

    async def _history(self, subject: str) -> list[incidents.Seen]:
        """Every stored health event of the scope of ``subject``, oldest first."""
        out: list[incidents.Seen] = []
        async for raw in iter_stream(self.js, s.EVENTS_STREAM, subject):
            try:
                out.append(incidents.Seen(int(raw.seq or 0), decode_health_event(raw.data or b"")))
            except msgspec.DecodeError:
                continue
        return out

    async def _dead(self, inc: incidents.Incident) -> dict[str, int] | None:
        """Dead letters of the incident's scope stored between its open and close, by
        reason; None when they cannot be read (the summary says so)."""
        if inc.opened_at is None or inc.closed_at is None:
            return None
        try:
            return await dead_between(
                self.js, inc.provider, inc.model or None, inc.opened_at, inc.closed_at
            )
        except Exception as exc:
            log.warning("dead letters of %s not read for its summary: %r", inc.scope, exc)
            return None

    async def _tallied(self, inc: incidents.Incident) -> dict[str, int] | None:
        """Jobs the incident's outages failed over and expired (their tallies, read once
        the last flush before the close has had time to land); None when they cannot be
        read (the summary says so)."""
        if inc.opened_at is None:
            return None
        if inc.closed_at is not None:
            wait = (
                inc.closed_at + timedelta(seconds=TALLY_GRACE_S) - datetime.now(UTC)
            ).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, TALLY_GRACE_S))
        try:
            return await tallied(self.js, inc.provider, set(inc.outage_ids), inc.opened_at)
        except Exception as exc:
            log.warning("tallies of %s not read for its summary: %r", inc.scope, exc)
            return None

    async def deliver(self, notice: Notice) -> None:
        """Send ``notice`` to every sink that carries it until each accepted it or was
        given up on (``notify.max_attempts``)."""
        n = self.settings.notify
        pending = [sink for sink in self.sinks if sink.wants(notice)]
        attempts = dict.fromkeys((sink.name for sink in pending), 0)
        m = metrics.active
        while pending:
            for sink in list(pending):
                attempts[sink.name] += 1
                try:
                    await sink.send(self._http(), notice)
                except SinkError as exc:
                    if m is not None:
                        m.notification_failures.labels(sink.name, notice.kind).inc()
                    if attempts[sink.name] < n.max_attempts:
                        log.info("notification %s to %s: %s; retrying", notice.id, sink.name, exc)
                        continue
                    log.warning(
                        "notification %s to %s given up after %d attempts: %s",
                        notice.id,
                        sink.name,
                        attempts[sink.name],
                        exc,
                    )
                    self.given_up += 1
                    if m is not None:
                        m.notifications_given_up.labels(sink.name, notice.kind).inc()
                else:
                    self.sent[notice.id] = self.sent.get(notice.id, 0) + 1
                    if m is not None:
                        m.notifications_sent.labels(sink.name, notice.kind).inc()
                    log.info("notification %s sent to %s", notice.id, sink.name)
                pending.remove(sink)
            if pending:
                tries = min(attempts[sink.name] for sink in pending)
                delay = min(n.retry_max_s, n.retry_base_s * 2 ** (tries - 1))
                # Full jitter on the upper half: not in step with other notifications.
                await asyncio.sleep(random.uniform(delay / 2, delay))

    def _http(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session


async def _stored_since(
    js: JetStreamContext, stream: str, subject: str, since: datetime, limit: int
) -> AsyncIterator[StoredMsg]:
    """The messages of ``stream`` on ``subject`` stored from ``since`` on, oldest first, at
    most ``limit``. The first is found by time (a direct get with ``start_time``), so only
    those of the period are read."""
    request = {"start_time": since.isoformat(), "next_by_subj": subject}
    reply = await client(js).request(
        f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), timeout=5.0
    )
    headers = reply.headers or {}
    if "Nats-Sequence" not in headers:  # 404: none stored since
        return
    read = 0
    first = int(headers["Nats-Sequence"])
    async for raw in iter_stream(js, stream, subject, start_seq=first):
        read += 1
        if read > limit:
            return
        yield raw


async def dead_between(
    js: JetStreamContext, provider: str, model: str | None, start: datetime, end: datetime
) -> dict[str, int]:
    """Dead letters of ``provider`` (of its ``model`` only, when given) stored from ``start``
    to ``end``, by reason (at most ``MAX_DEAD_READ`` read)."""
    counts: dict[str, int] = {}
    subject = s.dead_filter(provider)
    async for raw in _stored_since(js, s.DEAD_STREAM, subject, start, MAX_DEAD_READ):
        try:
            letter = decode_dead_letter(raw.data or b"")
        except msgspec.DecodeError:
            continue
        if letter.dead_at > end:
            break
        if model and (letter.job or {}).get("model") != model:
            continue
        counts[letter.reason] = counts.get(letter.reason, 0) + 1
    return counts


async def tallied(
    js: JetStreamContext, provider: str, outage_ids: set[str], since: datetime
) -> dict[str, int]:
    """``failed_over`` and ``expired``: the sums of the tallies of ``outage_ids`` (of
    ``provider``) stored since ``since`` (at most ``MAX_TALLY_READ`` read). A tally that
    does not decode is skipped."""
    sums = {"failed_over": 0, "expired": 0}
    subject = s.tally_subject(provider)
    async for raw in _stored_since(js, s.EVENTS_STREAM, subject, since, MAX_TALLY_READ):
        try:
            tally = decode_tally_event(raw.data or b"")
        except msgspec.DecodeError:
            continue
        if tally.outage_id in outage_ids and tally.provider == provider:
            sums["failed_over"] += max(0, tally.failed_over)
            sums["expired"] += max(0, tally.expired)
    return sums


def config_summary(settings: Settings, sinks: list[Sink]) -> dict[str, Any]:
    """What the notifier runs with, for its start line (sink names only: never URLs)."""
    n = settings.notify
    return {
        "sinks": [sink.name for sink in sinks],
        "flap_window_s": n.flap_window_s,
        "max_attempts": n.max_attempts,
    }


async def serve_notifier(settings: Settings, alive_path: Any = None) -> None:
    """``ridethrough notifier``: until signalled, with the alive file and the HTTP port
    (``/metrics``, ``/livez``, ``/readyz``) like the other services."""
    from services.breaker.recovery import service_owner
    from services.jetstream.connection import connect
    from services.liveness import alive_file, nats_connected
    from services.monitor import http_port
    from services.notifier.sinks import build_sinks
    from services.runner import signalled

    sinks = build_sinks(settings)
    if not sinks:
        from services.errors import ConfigError

        raise ConfigError(
            "no notification sink configured: set RIDETHROUGH_NOTIFY__WEBHOOK_URL (with "
            "..._WEBHOOK_SECRET), ..._SLACK_WEBHOOK_URL or ..._PAGERDUTY_ROUTING_KEY "
            "(or their *_FILE forms, or files of those names in "
            "RIDETHROUGH_NOTIFY__SECRETS_DIR)"
        )
    if settings.http.port is not None:
        metrics.enable(settings.http)
    nc = await connect(settings, name="ridethrough-notifier")
    notifier = Notifier(nc.jetstream(), settings, sinks, owner=service_owner("notifier"))
    stop = signalled()
    await notifier.start()
    log.info("notifier running: %s", config_summary(settings, sinks))

    async def readiness() -> str:
        return "" if nats_connected(nc) else "not connected to NATS"

    try:
        async with (
            alive_file(alive_path, lambda: nats_connected(nc)),
            http_port(settings.http, readiness),
        ):
            await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(notifier.stop(), 10.0)
        with contextlib.suppress(Exception):
            await nc.drain()
