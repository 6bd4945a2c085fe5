"""Large jobs: request bodies kept in the JetStream object store bucket ``ai_bodies``.

A job whose encoding is over ``bodies.threshold_bytes`` (1 MiB by default, never more than
the server's ``max_payload`` allows) travels by reference: the producer stores its request
body (the JSON of ``request``) here as one object, and publishes the job with an empty
``request`` and a ``request_ref`` (name, size, SHA-256). Jobs up to the Messages API's
32 MB are accepted whatever the server's ``max_payload``.

    producer    put_body     the chunks on ``$O.ai_bodies.C.<random>``, then the object's
                             meta on ``$O.ai_bodies.M.<name in base64>``
    worker      resolve      before the provider call (or a fail-over, which maps it): the
                             meta, then each chunk, checked against the ref (size, SHA-256)
    settle      drop_body    once the job has its result (succeeded, expired, or found to
                             have one already); a parked job keeps its body
    operators   body_status, fetch_body   (``jobs show``, ``replay --to-provider``)

The layout is JetStream's object store, so ``nats object get ai_bodies <name>`` reads a
body; but it is written without the rollup header (the bucket refuses rollups: a
producer's ``Nats-Rollup: all`` on a chunk would otherwise purge everyone's bodies) and
read with plain stream lookups (the meta from the leader, the chunks by direct get; no
consumer), so a producer needs publish rights and nothing more. Producers may not read,
list, look up or purge anything in the bucket (``deploy/nats/auth.conf``), and a name
holds 128 random bits: a tenant can neither guess nor learn another's. The worker also
checks that a body's name starts with its job's tenant, so a name that leaked cannot be
used from another tenant's job.

A dead letter keeps its job's body (``ridethrough dead replay`` needs it) until the letter
is purged or the bucket's max age (``bodies.max_age_s``, 30 days, as the dead letters)
removes it. A delete that fails is logged and counted (``bodies_left`` in the worker's
stats), never retried in the job's path: the result is stored, and the max age takes
the body. Bodies of a submit that failed half way, or of a re-submit the dedup window
dropped, go the same way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext, api

from schemas.jobs import BodyRef, Job
from schemas.subjects import BODIES_BUCKET, NO_TENANT
from services.errors import BodyUnavailable, JobRejected, Unmappable
from services.jetstream.errors import NO_RESPONDERS, NOT_FOUND
from services.providers.mapping import shape_of

#: The stream behind the bucket.
BODIES_STREAM = f"OBJ_{BODIES_BUCKET}"
#: Chunks are at most this large (and at most half the server's max_payload).
CHUNK_BYTES = 1024 * 1024


def chunk_subject(nuid: str) -> str:
    """Where the chunks of one stored object are (``$O.<bucket>.C.<nuid>``)."""
    return f"$O.{BODIES_BUCKET}.C.{nuid}"


def meta_subject(name: str) -> str:
    """Where the meta of object ``name`` is (``$O.<bucket>.M.<name, base64url>``)."""
    return f"$O.{BODIES_BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def body_name(job_id: str, tenant: str | None) -> str:
    """A fresh object name for the body of job ``job_id`` of ``tenant``: its scope, its
    id, and 128 random bits (no one can guess it)."""
    return f"{tenant or NO_TENANT}.{job_id}.{secrets.token_hex(16)}"


def chunk_size(max_payload: int) -> int:
    """The chunk size for a server with ``max_payload`` (0: unknown)."""
    if not max_payload:
        return 128 * 1024
    return max(min(CHUNK_BYTES, max_payload // 2), 1024)


async def put_body(
    js: JetStreamContext, name: str, data: bytes, *, chunk: int, timeout: float = 10.0
) -> BodyRef:
    """Store ``data`` as object ``name`` and return its reference. Raises ``JobRejected``
    when the bucket is missing, or NATS errors as they come."""
    nuid = uuid.uuid4().hex
    subject = chunk_subject(nuid)
    view = memoryview(data)
    chunks = 0
    try:
        for off in range(0, len(data), chunk):
            await js.publish(subject, bytes(view[off : off + chunk]), timeout=timeout)
            chunks += 1
        digest = hashlib.sha256(data).digest()
        info = api.ObjectInfo(
            name=name,
            bucket=BODIES_BUCKET,
            nuid=nuid,
            size=len(data),
            chunks=chunks,
            digest="SHA-256=" + base64.urlsafe_b64encode(digest).decode(),
            mtime=datetime.now(UTC).isoformat(),
            options=api.ObjectMetaOptions(max_chunk_size=chunk),
        )
        await js.publish(meta_subject(name), json.dumps(info.as_dict()).encode(), timeout=timeout)
    except NO_RESPONDERS as exc:
        raise JobRejected(
            f"no object store bucket {BODIES_BUCKET} for large jobs (run `ridethrough topology`)"
        ) from exc
    return BodyRef(name=name, size=len(data), sha256=digest.hex())


async def _info(js: JetStreamContext, name: str) -> api.ObjectInfo | None:
    """The meta of object ``name``; None when it is not there (or was deleted)."""
    try:
        raw = await js.get_msg(BODIES_STREAM, subject=meta_subject(name))
    except NOT_FOUND:  # the object, or the whole bucket
        return None
    try:
        info = api.ObjectInfo.from_response(json.loads(raw.data or b""))
    except (ValueError, TypeError, KeyError):
        return None
    return None if info.deleted else info


async def fetch_body(js: JetStreamContext, ref: BodyRef, *, timeout: float = 60.0) -> bytes:
    """The bytes of body ``ref``, checked against it. Raises ``BodyUnavailable``
    (``body_missing`` when it is gone, ``invalid`` when it is not the body submitted)."""
    return await asyncio.wait_for(_fetch(js, ref), timeout)


async def _fetch(js: JetStreamContext, ref: BodyRef) -> bytes:
    info = await _info(js, ref.name)
    if info is None or not info.nuid:
        raise BodyUnavailable(
            "body_missing", f"the request body {ref.name} is not in {BODIES_BUCKET} (gone)"
        )
    if info.size != ref.size:
        raise BodyUnavailable(
            "invalid", f"the request body {ref.name} has {info.size} bytes, not {ref.size}"
        )
    subject = chunk_subject(info.nuid)
    parts: list[bytes] = []
    got = 0
    seq = 1
    while got < ref.size:
        try:
            msg = await _chunk(js, subject, seq)
        except NOT_FOUND:
            raise BodyUnavailable(
                "body_missing", f"the request body {ref.name} lost its chunks after {got} bytes"
            ) from None
        part = msg.data or b""
        parts.append(part)
        got += len(part)
        seq = int(msg.seq or seq) + 1
    data = b"".join(parts)
    del parts
    if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BodyUnavailable(
            "invalid", f"the request body {ref.name} is not the one submitted (SHA-256 differs)"
        )
    return data


async def _chunk(js: JetStreamContext, subject: str, seq: int) -> Any:
    """The first chunk on ``subject`` at or after ``seq``: by direct get (raw bytes, eight
    times faster than the leader's base64 answer), from the leader when a replica that
    answered has not stored it yet (a replica lags only at the tail of the log)."""
    try:
        return await js.get_msg(BODIES_STREAM, seq=seq, subject=subject, next=True, direct=True)
    except NOT_FOUND:
        return await js.get_msg(BODIES_STREAM, seq=seq, subject=subject, next=True)


def _belongs(job: Job, ref: BodyRef) -> bool:
    return ref.name.startswith(f"{job.tenant or NO_TENANT}.")


async def resolve(
    js: JetStreamContext,
    job: Job,
    kinds: Mapping[str, str],
    *,
    timeout: float = 60.0,
) -> Job:
    """``job`` with its body in ``request`` (``request_ref`` kept, so that nothing encodes
    the whole body again), mapped to its provider's API when the body was written for
    another (a fail-over copy). Raises ``BodyUnavailable``."""
    ref = job.request_ref
    if ref is None:
        return job
    if not _belongs(job, ref):
        raise BodyUnavailable(
            "invalid", f"job {job.id} names body {ref.name}, which is not its tenant's"
        )
    data = await fetch_body(js, ref, timeout=timeout)
    try:
        request = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise BodyUnavailable("invalid", f"the request body {ref.name} is not JSON: {exc}") from exc
    del data
    if not isinstance(request, dict):
        raise BodyUnavailable("invalid", f"the request body {ref.name} is not a JSON object")
    dst = kinds.get(job.provider)
    if ref.kind is not None and dst is not None and shape_of(ref.kind) != shape_of(dst):
        from services.providers.mapping import convert

        try:
            request = convert(request, src_kind=shape_of(ref.kind), dst_kind=shape_of(dst))
        except Unmappable as exc:
            raise BodyUnavailable(
                "invalid", f"the request body cannot be sent to {job.provider}: {exc}"
            ) from exc
    return msgspec.structs.replace(job, request=request)


def by_reference(moved: Job, original: Job, kinds: Mapping[str, str]) -> Job:
    """The fail-over copy ``moved`` (made from ``original`` with its body resolved) as a
    job by reference again: the same body, marked with the API shape it is written in
    (``anthropic`` or ``openai``) when the fallback speaks another."""
    ref = original.request_ref
    if ref is None:
        return moved
    src, dst = kinds.get(original.provider), kinds.get(moved.provider)
    written = ref.kind or (shape_of(src) if src is not None else None)
    kind = None if dst is None or written is None or written == shape_of(dst) else written
    return msgspec.structs.replace(
        moved, request={}, request_ref=msgspec.structs.replace(ref, kind=kind)
    )


async def drop_body(js: JetStreamContext, name: str) -> bool:
    """Delete object ``name`` (its chunks, then its meta); False if it was not there."""
    info = await _info(js, name)
    if info is not None and info.nuid:
        await js.purge_stream(BODIES_STREAM, subject=chunk_subject(info.nuid))
    await js.purge_stream(BODIES_STREAM, subject=meta_subject(name))
    return info is not None


async def body_status(js: JetStreamContext, ref: BodyRef) -> dict[str, Any]:
    """What ``jobs show`` says of a job's body: its name, size, and whether it is there."""
    info = await _info(js, ref.name)
    present = info is not None
    return {"bucket": BODIES_BUCKET, "name": ref.name, "size": ref.size, "present": present}


def request_bytes(job: Job) -> bytes:
    """The body a job by reference stores: the JSON of its ``request``."""
    return msgspec.json.encode(job.request)
