"""The breaker board: KV ai_health (state per provider) and ai_control (operator pauses) as
every process sees them, and ``transition()``, the one way a breaker changes state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from schemas.codec import encode
from schemas.events import HealthEvent
from schemas.health import BreakerState, Pause, State, try_decode_pause, try_decode_state
from schemas.subjects import CONTROL_BUCKET, HEALTH_BUCKET, MSG_ID_HEADER, health_event_subject
from services.config import BreakerSettings
from services.jetstream.kv import compare_and_set, read_entry
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.breaker")

PAUSED = "paused"


def paused_key(provider: str) -> str:
    """Key of an operator pause in ai_control."""
    return f"paused.{provider}"


def new_outage_id(provider: str) -> str:
    """A readable, unique outage id: provider, UTC start time, random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{provider}-{stamp}-{secrets.token_hex(2)}"


def warn_unreadable(bucket: str, key: str, revision: int, raw: bytes, read_as: str) -> None:
    # The length, not the bytes: a stray value may hold anything, a secret included.
    log.warning(
        "%s/%s revision %d is unreadable (%d bytes): read as %s",
        bucket,
        key,
        revision,
        len(raw),
        read_as,
    )


async def _publish_event(js: JetStreamContext, provider: str, body: bytes, msg_id: str) -> None:
    """Publish a health event, retrying through a leader election (the msg id makes a
    retry that did reach the stream a no-op). The transition itself is already stored."""
    for attempt in range(6):
        try:
            await js.publish(health_event_subject(provider), body, headers={MSG_ID_HEADER: msg_id})
            return
        except Exception as exc:
            if attempt == 5:
                log.warning("health event %s not published: %r", msg_id, exc)
                return
            await asyncio.sleep(0.2 * 2**attempt)


async def transition(
    js: JetStreamContext,
    kv: KeyValue,
    provider: str,
    *,
    to: State,
    allowed_from: Iterable[State],
    by: str,
    reason: str = "",
    last_error: str = "",
    calls: int = 0,
    failures: int = 0,
    parked: int = 0,
    replayed: int = 0,
) -> BreakerState | None:
    """Move ``provider``'s breaker to ``to`` if it is in ``allowed_from``; CAS on the revision.

    An unreadable entry counts as ``closed``: a transition allowed from ``closed``
    overwrites it (with a new outage id when it opens), any other leaves it alone.
    Returns the new state when this call made the transition, ``None`` when the
    breaker was elsewhere (someone else moved it first: that is not an error).
    """
    allowed = set(allowed_from)
    for _ in range(10):
        raw, revision = await read_entry(kv, provider)
        current = try_decode_state(raw) if raw else BreakerState()
        if current is None:  # garbage: as if closed, so only a trip repairs it
            assert raw is not None
            warn_unreadable(HEALTH_BUCKET, provider, revision, raw, "closed")
            current = BreakerState()
        if current.state not in allowed:
            return None
        if to == "open" and current.state == "closed":
            outage_id = new_outage_id(provider)
        else:
            outage_id = current.outage_id
        new = BreakerState(
            state=to,
            outage_id=outage_id,
            reason=reason,
            last_error=last_error[:500],
            calls=calls,
            failures=failures,
            updated_by=by,
        )
        new_revision = await compare_and_set(kv, provider, encode(new), revision)
        if new_revision is None:
            continue
        event = HealthEvent(
            provider=provider,
            state=to,
            previous=current.state,
            outage_id=outage_id,
            reason=reason,
            last_error=new.last_error,
            calls=calls,
            failures=failures,
            parked=parked,
            replayed=replayed,
            by=by,
        )
        await _publish_event(js, provider, encode(event), f"health:{provider}:{new_revision}")
        log.info("breaker %s: %s -> %s (%s)", provider, current.state, to, reason)
        return new
    return None


class HealthBoard:
    """This process's view of every provider's breaker and pause, refreshed by polling.

    An entry that cannot be decoded leaves the view of it as it was (closed, not paused,
    if there was none); ``unreadable`` counts such entries, one per key and revision,
    each also logged once as a warning.
    """

    def __init__(
        self, js: JetStreamContext, providers: Iterable[str], settings: BreakerSettings
    ) -> None:
        self.js = js
        self.providers = sorted(set(providers))
        self.settings = settings
        self.states: dict[str, BreakerState] = {p: BreakerState() for p in self.providers}
        self.pauses: dict[str, Pause | None] = dict.fromkeys(self.providers)
        self.health_kv: KeyValue | None = None
        self.control_kv: KeyValue | None = None
        self.changed = asyncio.Event()
        self.unreadable = 0
        self._unreadable_seen: dict[tuple[str, str], int] = {}  # (bucket, key) -> revision
        self._task: asyncio.Task[None] | None = None

    def _unreadable(self, bucket: str, key: str, revision: int, raw: bytes) -> None:
        if self._unreadable_seen.get((bucket, key)) == revision:
            return
        self._unreadable_seen[bucket, key] = revision
        self.unreadable += 1
        warn_unreadable(bucket, key, revision, raw, "unknown (keeping the last known value)")

    async def start(self) -> HealthBoard:
        """Bind the buckets, read once, and keep polling in the background."""
        self.health_kv = await self.js.key_value(HEALTH_BUCKET)
        self.control_kv = await self.js.key_value(CONTROL_BUCKET)
        await self.refresh()
        self._task = asyncio.create_task(self._poll())
        return self

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(self.settings.board_poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # NATS down for a moment: keep the last view
                log.debug("health board refresh failed: %s", exc)

    async def refresh(self) -> None:
        """Re-read every provider's breaker and pause."""
        assert self.health_kv is not None and self.control_kv is not None
        changed = False
        for p in self.providers:
            raw, revision = await read_entry(self.health_kv, p)
            state = try_decode_state(raw) if raw else BreakerState()
            if state is None:
                assert raw is not None
                self._unreadable(HEALTH_BUCKET, p, revision, raw)
                state = self.states[p]
            if state.state != self.states[p].state or state.outage_id != self.states[p].outage_id:
                changed = True
            self.states[p] = state
            key = paused_key(p)
            raw, revision = await read_entry(self.control_kv, key)
            pause = try_decode_pause(raw) if raw else None
            if pause is None and raw:
                self._unreadable(CONTROL_BUCKET, key, revision, raw)
                pause = self.pauses[p]
            if (pause is None) != (self.pauses[p] is None):
                changed = True
            self.pauses[p] = pause
        if changed:
            self.changed.set()
            self.changed = asyncio.Event()

    def note(self, provider: str, state: BreakerState) -> None:
        """Record a transition this process just made (no need to wait for the poll)."""
        self.states[provider] = state

    async def move(
        self,
        provider: str,
        *,
        to: State,
        allowed_from: Iterable[State],
        by: str,
        **details: Any,
    ) -> BreakerState | None:
        """``transition()`` on this board's bucket (``details``: reason, last_error and the
        counts of the event), and this process's view follows at once: the new state when
        this call made the move; when someone else moved the breaker first, a fresh read."""
        assert self.health_kv is not None, "start() the board first"
        new = await transition(
            self.js, self.health_kv, provider, to=to, allowed_from=allowed_from, by=by, **details
        )
        if new is not None:
            self.note(provider, new)
        else:
            await self.refresh()
        return new

    def state(self, provider: str) -> str:
        """``paused``, ``open``, ``half_open`` or ``closed``."""
        if self.pauses.get(provider) is not None:
            return PAUSED
        st = self.states.get(provider)
        return st.state if st is not None else "closed"

    def blocked(self, provider: str) -> bool:
        """Whether calls to ``provider`` must stop (open or paused)."""
        return self.pauses.get(provider) is not None or (
            provider in self.states and self.states[provider].state == "open"
        )

    def outage_id(self, provider: str) -> str:
        """The current (or last) outage id of ``provider``."""
        st = self.states.get(provider)
        return st.outage_id if st is not None else ""
