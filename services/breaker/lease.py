"""Leases: one active prober and one active replayer per provider among replicas, held in
ai_control by compare-and-set and renewed well before they expire."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from nats.js.kv import KeyValue

from schemas.codec import encode
from schemas.subjects import CONTROL_BUCKET
from services.breaker.board import log, warn_unreadable
from services.jetstream.kv import compare_and_set, read_entry
from services.tasks import raise_if_cancelling


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
        raw, revision = await read_entry(self.kv, self.key)
        now = time.time()
        current = try_decode_lease(raw) if raw else None
        if raw and current is None:
            self.unreadable += 1
            warn_unreadable(CONTROL_BUCKET, self.key, revision, raw, "a free lease")
        if current is not None and current.owner != self.owner and current.until > now:
            self._held_until = 0.0
            return False
        until = now + self.ttl_s
        lease = Lease(owner=self.owner, until=until, info=self.info)
        if await compare_and_set(self.kv, self.key, encode(lease), revision):
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
        raw, revision = await read_entry(self.kv, self.key)
        current = try_decode_lease(raw) if raw else None
        if current is not None and current.owner == self.owner:
            with contextlib.suppress(Exception):
                freed = encode(Lease(owner="", until=0.0))
                await compare_and_set(self.kv, self.key, freed, revision)
        self._held_until = 0.0
