"""The breaker board: KV ai_health (a state per scope: each provider, and each model of a
provider that has had one) and ai_control (operator pauses) as every process sees them,
and ``transition()``, the one way a breaker changes state.

A job's breaker is the pair (its provider, its model). Its state, as ``state()`` and
``blocked()`` read it, is the worse of the two: a provider open or paused blocks every
model; a model open or paused blocks only itself; half-open if either is.
"""

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
from schemas.subjects import (
    CONTROL_BUCKET,
    HEALTH_BUCKET,
    HEALTH_EVENTS_FILTER,
    MSG_ID_HEADER,
    health_event_subject,
    scope_key,
    scope_label,
    scope_model,
    scope_of_key,
)
from services import metrics
from services.config import BreakerSettings
from services.jetstream.connection import client
from services.jetstream.kv import compare_and_set, keys_of, read_entry
from services.tasks import raise_if_cancelling

log = logging.getLogger("ridethrough.breaker")

PAUSED = "paused"
#: Worst first: the state of a (provider, model) pair is the first of its two in this order.
_SEVERITY = {PAUSED: 0, "open": 1, "half_open": 2, "closed": 3}


def paused_key(provider: str, model: str | None = None) -> str:
    """Key of an operator pause of a provider (or of one of its models) in ai_control."""
    return f"paused.{scope_key(provider, model)}"


def new_outage_id(provider: str, model: str | None = None) -> str:
    """A readable, unique outage id: scope, UTC start time, random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{scope_label(provider, scope_model(model))}-{stamp}-{secrets.token_hex(2)}"


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


async def _publish_event(js: JetStreamContext, subject: str, body: bytes, msg_id: str) -> None:
    """Publish a health event, retrying through a leader election (the msg id makes a
    retry that did reach the stream a no-op). The transition itself is already stored."""
    for attempt in range(6):
        try:
            await js.publish(subject, body, headers={MSG_ID_HEADER: msg_id})
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
    model: str | None = None,
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
    failing_since: datetime | None = None,
) -> BreakerState | None:
    """Move the breaker of ``provider`` (or of its ``model``) to ``to`` if it is in
    ``allowed_from``; CAS on the revision.

    An unreadable entry counts as ``closed``: a transition allowed from ``closed``
    overwrites it (with a new outage id when it opens), any other leaves it alone.
    Returns the new state when this call made the transition, ``None`` when the
    breaker was elsewhere (someone else moved it first: that is not an error).
    """
    allowed = set(allowed_from)
    model = scope_model(model)
    key = scope_key(provider, model)
    label = scope_label(provider, model)
    for _ in range(10):
        raw, revision = await read_entry(kv, key)
        current = try_decode_state(raw) if raw else BreakerState()
        if current is None:  # garbage: as if closed, so only a trip repairs it
            assert raw is not None
            warn_unreadable(HEALTH_BUCKET, key, revision, raw, "closed")
            current = BreakerState()
        if current.state not in allowed:
            return None
        if to == "open" and current.state == "closed":
            outage_id = new_outage_id(provider, model)
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
        new_revision = await compare_and_set(kv, key, encode(new), revision)
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
            model=model or "",
            failing_since=failing_since,
        )
        subject = health_event_subject(provider, model)
        await _publish_event(js, subject, encode(event), f"health:{key}:{new_revision}")
        log.info("breaker %s: %s -> %s (%s)", label, current.state, to, reason)
        if (m := metrics.active) is not None:
            m.transition(provider, model, current.state, to)
        return new
    return None


class HealthBoard:
    """This process's view of every breaker and pause, refreshed by polling.

    Keys are scope keys (``scope_key``): a provider's name, or ``<provider>.<model_token>``.
    Each poll lists the keys of both buckets (one request each) and reads the scopes of
    the providers it serves. A health event (every transition publishes one) wakes the
    poll at once: the fleet stops calling a scope a moment after one process trips it,
    not a poll later. Without the event (a subscription refused), polling alone works.

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
        #: Per provider, the models that have a breaker or a pause on the board.
        self._models: dict[str, set[str]] = {p: set() for p in self.providers}
        self.health_kv: KeyValue | None = None
        self.control_kv: KeyValue | None = None
        self.changed = asyncio.Event()
        self.unreadable = 0
        self._unreadable_seen: dict[tuple[str, str], int] = {}  # (bucket, key) -> revision
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._sub: Any = None

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
        try:
            self._sub = await client(self.js).subscribe(HEALTH_EVENTS_FILTER, cb=self._on_event)
        except Exception as exc:  # polling alone still sees every transition
            log.warning("health events not subscribed (%s): polling only", exc)
        return self

    async def stop(self) -> None:
        """Stop polling."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _on_event(self, msg: Any) -> None:
        self._wake.set()

    async def _poll(self) -> None:
        while True:
            raise_if_cancelling()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.board_poll_s)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception as exc:  # NATS down for a moment: keep the last view
                log.debug("health board refresh failed: %s", exc)

    def _ours(self, keys: Iterable[str]) -> list[str]:
        """The scope keys among ``keys`` that belong to a provider this board serves."""
        out = []
        for key in keys:
            scope = scope_of_key(key)
            if scope is not None and scope[0] in self._models:
                out.append(key)
                if scope[1] is not None:
                    self._models[scope[0]].add(scope[1])
        return out

    async def refresh(self) -> None:
        """Re-read every breaker and pause of the providers this board serves."""
        assert self.health_kv is not None and self.control_kv is not None
        changed = False
        health = set(self.providers) | set(self._ours(await keys_of(self.js, HEALTH_BUCKET)))
        for key in sorted(health):
            raw, revision = await read_entry(self.health_kv, key)
            old = self.states.get(key, _CLOSED)
            state = try_decode_state(raw) if raw else BreakerState()
            if state is None:
                assert raw is not None
                self._unreadable(HEALTH_BUCKET, key, revision, raw)
                state = old
            if state.state != old.state or state.outage_id != old.outage_id:
                changed = True
            self.states[key] = state
        paused = [
            k.removeprefix("paused.") for k in await keys_of(self.js, CONTROL_BUCKET, "paused")
        ]
        for key in sorted(set(self.providers) | set(self._ours(paused))):
            pkey = f"paused.{key}"
            raw, revision = await read_entry(self.control_kv, pkey)
            old_pause = self.pauses.get(key)
            pause = try_decode_pause(raw) if raw else None
            if pause is None and raw:
                self._unreadable(CONTROL_BUCKET, pkey, revision, raw)
                pause = old_pause
            if (pause is None) != (old_pause is None):
                changed = True
            self.pauses[key] = pause
        if changed:
            self.changed.set()
            self.changed = asyncio.Event()

    def note(self, provider: str, state: BreakerState, model: str | None = None) -> None:
        """Record a transition this process just made (no need to wait for the poll)."""
        self.states[scope_key(provider, model)] = state
        m = scope_model(model)
        if m is not None and provider in self._models:
            self._models[provider].add(m)

    async def move(
        self,
        provider: str,
        model: str | None = None,
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
            self.js,
            self.health_kv,
            provider,
            model,
            to=to,
            allowed_from=allowed_from,
            by=by,
            **details,
        )
        if new is not None:
            self.note(provider, new, model)
        else:
            await self.refresh()
        return new

    # -- reading the view: the scope alone, and a job's pair ----------------------------

    def models(self, provider: str) -> list[str]:
        """The models of ``provider`` that have a breaker or a pause on the board."""
        return sorted(self._models.get(provider, ()))

    def own_state(self, provider: str, model: str | None = None) -> str:
        """The state of one scope alone: ``paused``, ``open``, ``half_open`` or ``closed``."""
        key = scope_key(provider, model)
        if self.pauses.get(key) is not None:
            return PAUSED
        st = self.states.get(key)
        return st.state if st is not None else "closed"

    def own_outage_id(self, provider: str, model: str | None = None) -> str:
        """The current (or last) outage id of one scope alone."""
        st = self.states.get(scope_key(provider, model))
        return st.outage_id if st is not None else ""

    def state(self, provider: str, model: str | None = None) -> str:
        """The state of ``provider`` (with ``model``: of the pair, the worse of the two)."""
        own = self.own_state(provider)
        if model is None or own in (PAUSED, "open"):
            return own
        return min(own, self.own_state(provider, model), key=_SEVERITY.__getitem__)

    def blocked(self, provider: str, model: str | None = None) -> bool:
        """Whether calls to ``provider`` (with ``model``: to that model) must stop."""
        return self._blocked(provider) or (
            model is not None and self._blocked(scope_key(provider, model))
        )

    def _blocked(self, key: str) -> bool:
        if self.pauses.get(key) is not None:
            return True
        st = self.states.get(key)
        return st is not None and st.state == "open"

    def outage_id(self, provider: str, model: str | None = None) -> str:
        """The outage id of what blocks (or last blocked) the pair: the provider's while it
        is not closed, else the model's, else the provider's last."""
        if model is not None and self.own_state(provider) == "closed":
            own = self.own_outage_id(provider, model)
            if own and self.own_state(provider, model) != "closed":
                return own
        return self.own_outage_id(provider)


_CLOSED = BreakerState()
