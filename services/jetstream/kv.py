"""Key-value buckets: reading an entry with its revision, and compare-and-set, the one
way ridethrough changes a shared key (breaker states, leases, pauses)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from services.jetstream.errors import NOT_FOUND, wrong_last_sequence


async def read_entry(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    """(value, revision) of ``key``; the value is None when absent or deleted (the
    revision then is that of the delete, 0 if there never was one)."""
    try:
        entry = await kv.get(key)
    except NOT_FOUND:
        return None, 0
    if entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None, entry.revision or 0
    return entry.value, entry.revision or 0


async def compare_and_set(kv: KeyValue, key: str, value: bytes, revision: int) -> int | None:
    """Write ``value`` if the key is still at ``revision`` (0: absent); new revision or None."""
    try:
        if revision == 0:
            return await kv.create(key, value)
        return await kv.update(key, value, last=revision)
    except Exception as exc:
        if wrong_last_sequence(exc):  # someone else wrote first
            return None
        raise


async def keys_of(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """Keys of ``bucket`` (below ``prefix.`` when given) that have any entry, deletes
    included: one stream-info request, where ``KeyValue.keys()`` creates a consumer."""
    filt = f"$KV.{bucket}.{prefix}.>" if prefix else f"$KV.{bucket}.>"
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=filt)
    head = len(f"$KV.{bucket}.")
    return sorted(subject[head:] for subject in info.state.subjects or {})
