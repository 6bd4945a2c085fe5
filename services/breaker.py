"""The fleet-wide breaker: local failure windows, the shared board, CAS transitions, leases.

    SlidingWindow   one per provider in each worker: decides *when* to trip
    HealthBoard     every process's view of KV ai_health + ai_control, re-read every
                    ``board_poll_s`` (so a worker stops calling an open provider within it)
    transition()    the only way a breaker changes state: compare-and-set on the KV
                    revision (two workers tripping at once make one transition), then
                    one event on ``ai.events.health.<provider>``
    Lease           one active prober / replayer per provider among replicas

States: ``closed`` → ``open`` (trip) → ``half_open`` (prober: M probe successes) →
``closed`` (replayer: slow start reached its cap or the backlog is empty); any
trip in ``half_open`` re-opens. An operator pause (``paused.<provider>`` in
ai_control) behaves like ``open`` and no probe can end it.

An entry nobody can decode (any role that may write the board can write garbage) is
unknown, never fatal: the board keeps its last known view of it (closed if it has
none), ``transition()`` reads it as ``closed`` (so a trip overwrites it by CAS and
nothing else does), and a lease is free. Each is logged as one warning line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from schemas.codec import encode
from schemas.events import HealthEvent
from schemas.health import BreakerState, Pause, State, try_decode_pause, try_decode_state
from schemas.subjects import CONTROL_BUCKET, HEALTH_BUCKET, MSG_ID_HEADER, health_event_subject
from services.config import BreakerSettings
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


class SlidingWindow:
    """Transient failures of one provider as seen by one process.

    Trips on ``consecutive_failures`` in a row, or on a failure rate at or above
    ``failure_rate`` over at least ``min_calls`` calls in the last ``window_s``.
    Rate-limit answers are not recorded at all: they slow us down, they are no outage.
    """

    __slots__ = ("_buckets", "consecutive", "settings")

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures]
        self.consecutive = 0

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
            horizon = second - self.settings.window_s
            while self._buckets and self._buckets[0][0] <= horizon:
                self._buckets.popleft()
        return self._buckets[-1]

    def success(self, now: float | None = None) -> None:
        """Record a call the provider answered (including permanent errors: it is up)."""
        self._bucket(time.monotonic() if now is None else now)[1] += 1
        self.consecutive = 0

    def failure(self, now: float | None = None) -> bool:
        """Record a transient failure; return whether the breaker should trip."""
        b = self._bucket(time.monotonic() if now is None else now)
        b[1] += 1
        b[2] += 1
        self.consecutive += 1
        if self.consecutive >= self.settings.consecutive_failures:
            return True
        calls, failures = self.counts()
        return calls >= self.settings.min_calls and failures >= self.settings.failure_rate * calls

    def counts(self) -> tuple[int, int]:
        """(calls, failures) in the window."""
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def reset(self) -> None:
        """Forget everything (after a state change)."""
        self._buckets.clear()
        self.consecutive = 0


async def _get(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    try:
        entry = await kv.get(key)
    except (KeyNotFoundError, NotFoundError):
        return None, 0
    if entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None, entry.revision or 0
    return entry.value, entry.revision or 0


def _warn_unreadable(bucket: str, key: str, revision: int, raw: bytes, read_as: str) -> None:
    # The length, not the bytes: a stray value may hold anything, a secret included.
    log.warning(
        "%s/%s revision %d is unreadable (%d bytes): read as %s",
        bucket,
        key,
        revision,
        len(raw),
        read_as,
    )


async def _cas(kv: KeyValue, key: str, value: bytes, revision: int) -> int | None:
    """Write ``value`` if the key is still at ``revision`` (0: absent); new revision or None."""
    try:
        if revision == 0:
            return await kv.create(key, value)
        return await kv.update(key, value, last=revision)
    except (KeyWrongLastSequenceError, msgspec.ValidationError):
        return None
    except Exception as exc:  # nats-py raises a plain APIError for "key exists"
        if "wrong last sequence" in str(exc) or "key exists" in str(exc):
            return None
        raise


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
        raw, revision = await _get(kv, provider)
        current = try_decode_state(raw) if raw else BreakerState()
        if current is None:  # garbage: as if closed, so only a trip repairs it
            assert raw is not None
            _warn_unreadable(HEALTH_BUCKET, provider, revision, raw, "closed")
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
        new_revision = await _cas(kv, provider, encode(new), revision)
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
        _warn_unreadable(bucket, key, revision, raw, "unknown (keeping the last known value)")

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
            raw, revision = await _get(self.health_kv, p)
            state = try_decode_state(raw) if raw else BreakerState()
            if state is None:
                assert raw is not None
                self._unreadable(HEALTH_BUCKET, p, revision, raw)
                state = self.states[p]
            if state.state != self.states[p].state or state.outage_id != self.states[p].outage_id:
                changed = True
            self.states[p] = state
            key = paused_key(p)
            raw, revision = await _get(self.control_kv, key)
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


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """Who holds a role for a provider, until when (epoch seconds), and its progress."""

    owner: str
    until: float
    info: dict[str, object] = msgspec.field(default_factory=dict)


_lease_decoder = msgspec.json.Decoder(Lease)


def decode_lease(data: bytes) -> Lease:
    """Decode a stored lease."""
    return _lease_decoder.decode(data)


def try_decode_lease(data: bytes) -> Lease | None:
    """``decode_lease``, or ``None`` when ``data`` is not a lease (readers: a free one)."""
    try:
        return _lease_decoder.decode(data)
    except msgspec.DecodeError:
        return None


class LeaseKeeper:
    """Holds ``key`` in ai_control for ``owner`` among competing replicas.

    A holder renews well before ``ttl_s`` runs out; a replica that dies (even by
    SIGKILL) loses the lease when it expires, and another takes it over. An unreadable
    lease is a free one (taken over by CAS); ``unreadable`` counts those met.
    """

    def __init__(self, kv: KeyValue, key: str, owner: str, ttl_s: float) -> None:
        self.kv = kv
        self.key = key
        self.owner = owner
        self.ttl_s = ttl_s
        self.info: dict[str, object] = {}
        self.unreadable = 0
        self._held_until = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        """Whether this replica holds the lease now (with a safety margin)."""
        return time.time() < self._held_until - self.ttl_s / 4

    async def try_acquire(self) -> bool:
        """Take or renew the lease if it is free, expired or ours; return whether we hold it."""
        raw, revision = await _get(self.kv, self.key)
        now = time.time()
        current = try_decode_lease(raw) if raw else None
        if raw and current is None:
            self.unreadable += 1
            _warn_unreadable(CONTROL_BUCKET, self.key, revision, raw, "a free lease")
        if current is not None and current.owner != self.owner and current.until > now:
            self._held_until = 0.0
            return False
        until = now + self.ttl_s
        lease = Lease(owner=self.owner, until=until, info=self.info)
        if await _cas(self.kv, self.key, encode(lease), revision):
            self._held_until = until
            return True
        self._held_until = 0.0
        return False

    def start(self) -> LeaseKeeper:
        """Keep trying to take, and then renew, the lease in the background."""
        self._task = asyncio.create_task(self._keep())
        return self

    async def _keep(self) -> None:
        while True:
            try:
                await self.try_acquire()
            except Exception as exc:  # NATS away for a moment: the lease lapses by itself
                log.debug("lease %s: %s", self.key, exc)
                self._held_until = 0.0
            raise_if_cancelling()
            await asyncio.sleep(self.ttl_s / 4)

    async def stop(self) -> None:
        """Stop renewing and give the lease up."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.release()

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown)."""
        raw, revision = await _get(self.kv, self.key)
        current = try_decode_lease(raw) if raw else None
        if current is not None and current.owner == self.owner:
            with contextlib.suppress(Exception):
                await _cas(self.kv, self.key, encode(Lease(owner="", until=0.0)), revision)
        self._held_until = 0.0
