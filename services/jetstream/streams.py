"""Streams: publishing (plainly, with a msg id, or on a condition), reading without
consuming (a subject's last message, every message, counts per subject), deleting one
message. The server's verdicts come back as values (stored or not, found or not), not as
nats-py exceptions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas.subjects import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID_HEADER
from services.errors import RidethroughError
from services.jetstream.connection import client
from services.jetstream.errors import NOT_FOUND, wrong_last_sequence
from services.jetstream.pubacks import pubacks

# The headers of a direct get's answer (ADR-31).
NUM_PENDING = "Nats-Num-Pending"
SEQUENCE = "Nats-Sequence"
SUBJECT = "Nats-Subject"
STATUS = "Status"
DESCRIPTION = "Description"


async def publish(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    *,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
) -> int:
    """Store ``data`` on ``subject`` and wait for the PubAck; return its sequence (``msg_id``:
    the stream's dedup window drops a second publish with it, and the PubAck of the second
    names the first's sequence)."""
    if msg_id is not None:
        headers = {**(headers or {}), MSG_ID_HEADER: msg_id}
    ack = await js.publish(subject, data, timeout=timeout, headers=headers)
    return int(ack.seq)


async def publish_if_last(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    expect: int,
    *,
    msg_id: str | None = None,
    timeout: float | None = None,
) -> bool:
    """Store ``data`` only if ``subject``'s last sequence is ``expect`` (0: the subject is
    empty); False if the server refused it for that reason."""
    headers = {EXPECTED_LAST_SUBJECT_SEQ: str(expect)}
    if msg_id is not None:
        headers[MSG_ID_HEADER] = msg_id
    nc = client(js)
    try:
        # Through the connection's shared PubAck inbox: a worker stores hundreds of
        # results at once (``services/jetstream/pubacks.py``).
        await pubacks(nc).publish(
            subject, data, headers, js._timeout if timeout is None else timeout
        )
    except Exception as exc:
        if wrong_last_sequence(exc):
            return False
        raise
    return True


async def last_msg(js: JetStreamContext, stream: str, subject: str) -> tuple[int, bytes] | None:
    """(sequence, data) of the last message on ``subject`` of ``stream``; None if none."""
    try:
        raw = await js.get_last_msg(stream, subject, direct=True)
    except NOT_FOUND:
        return None
    return int(raw.seq or 0), raw.data or b""


async def delete(js: JetStreamContext, stream: str, seq: int) -> bool:
    """Delete message ``seq`` of ``stream``; False if it was already gone."""
    with contextlib.suppress(*NOT_FOUND):
        await js.delete_msg(stream, seq)
        return True
    return False


@dataclass(frozen=True, slots=True)
class StoredMsg:
    """One stored message as a walk reads it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None = None


#: Messages asked for in one batched direct get, and the bytes a batch may carry.
WALK_BATCH = 2000
WALK_MAX_BYTES = 8 * 1024 * 1024


def _batched_direct_get(js: JetStreamContext) -> bool:
    """Whether the server answers batched direct gets (nats-server 2.11+)."""
    version = client(js).connected_server_version
    return (version.major, version.minor) >= (2, 11)


async def iter_stream(
    js: JetStreamContext, stream: str, subject: str = ">", *, start_seq: int = 1
) -> AsyncIterator[StoredMsg]:
    """Every stored message of ``stream`` matching ``subject``, oldest first (direct get:
    nothing is delivered, acked or consumed). Read in batches (a batched direct get, one
    request per ``WALK_BATCH`` messages, the next batch asked for while this one is read);
    one message per request on a server older than 2.11."""
    if not _batched_direct_get(js):
        async for msg in iter_stream_naive(js, stream, subject, start_seq=start_seq):
            yield msg
        return
    nc = client(js)
    api = f"{js._prefix}.DIRECT.GET.{stream}"
    inbox = nc.new_inbox()
    batch: list[StoredMsg] = []
    done = asyncio.Event()
    state: dict[str, Any] = {"pending": 0, "error": None}

    async def collect(msg: Msg) -> None:
        hdr = msg.headers or {}
        status = hdr.get(STATUS)
        if status:
            if status == "404":
                state["pending"] = 0  # nothing (more) matches
            elif status == "204":  # end of batch
                state["pending"] = int(hdr.get(NUM_PENDING, "0") or 0)
            else:
                state["error"] = f"{status} {hdr.get(DESCRIPTION, '')}"
            done.set()
            return
        batch.append(
            StoredMsg(
                seq=int(hdr.get(SEQUENCE, "0")),
                subject=hdr.get(SUBJECT, ""),
                data=msg.data,
                headers=hdr,
            )
        )

    async def ask(seq: int) -> None:
        done.clear()
        request = {
            "seq": seq,
            "next_by_subj": subject,
            "batch": WALK_BATCH,
            "max_bytes": WALK_MAX_BYTES,
        }
        await nc.publish(api, json.dumps(request).encode(), reply=inbox)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await ask(start_seq)
        while True:
            await asyncio.wait_for(done.wait(), timeout=js._timeout * 2)
            if state["error"]:
                raise RidethroughError(f"reading {stream}: {state['error']}")
            got, batch = batch, []
            if not got:
                return
            more = state["pending"] > 0
            if more:  # the next batch travels while this one is read
                await ask(got[-1].seq + 1)
            for msg in got:
                yield msg
            if not more:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def iter_stream_naive(
    js: JetStreamContext, stream: str, subject: str = ">", *, start_seq: int = 1
) -> AsyncIterator[StoredMsg]:
    """``iter_stream`` one direct get per message (servers before 2.11; the reference the
    batched walk is tested against)."""
    seq = start_seq
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
        except NOT_FOUND:
            return
        seq = int(msg.seq or seq)
        yield StoredMsg(
            seq=seq, subject=msg.subject or "", data=msg.data or b"", headers=msg.headers
        )
        seq += 1


async def subject_counts(js: JetStreamContext, stream: str, subject: str) -> dict[str, int]:
    """Messages per subject of ``stream`` under the filter ``subject``."""
    info = await js.stream_info(stream, subjects_filter=subject)
    return {k: int(v) for k, v in (info.state.subjects or {}).items()}


async def scan_stream(
    js: JetStreamContext, stream: str, subjects: str | list[str] = ">"
) -> AsyncIterator[StoredMsg]:
    """Every stored message of ``stream`` on ``subjects`` (one filter or several), oldest
    first, for a read-only scan of a limits stream: read through an ephemeral pull consumer
    (no acks, in memory, deleted afterwards), about twice as fast as ``iter_stream`` (a
    consumer's messages carry only their own headers). Where no such consumer may be made
    (a work-queue stream, a user without the right), the same walk as ``iter_stream``."""
    filters = [subjects] if isinstance(subjects, str) else list(subjects)
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=60.0,
        **({"filter_subject": filters[0]} if len(filters) == 1 else {"filter_subjects": filters}),
    )
    try:
        info = await js.add_consumer(stream, config)
    except Exception:
        for filt in filters if len(filters) == 1 else [">"]:
            async for msg in iter_stream(js, stream, filt):
                if len(filters) == 1 or any(_matches(msg.subject, f) for f in filters):
                    yield msg
        return
    try:
        if info.num_pending:
            async for msg in _pull(js, stream, info.name):
                yield msg
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)


def _matches(subject: str, pattern: str) -> bool:
    """Whether ``subject`` matches the NATS filter ``pattern`` (``*`` and ``>``)."""
    toks, pats = subject.split("."), pattern.split(".")
    for i, pat in enumerate(pats):
        if pat == ">":
            return len(toks) > i
        if i >= len(toks) or (pat != "*" and pat != toks[i]):
            return False
    return len(toks) == len(pats)


async def _pull(js: JetStreamContext, stream: str, consumer: str) -> AsyncIterator[StoredMsg]:
    """The messages consumer ``consumer`` has pending, in batches of ``WALK_BATCH``."""
    nc = client(js)
    api = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
    # A request ends when it is full or the stream has no more (no byte limit: the server
    # does not always say when a batch is full by bytes; AI_PARKED, AI_DEAD and AI_EVENTS
    # hold small messages, a large job's body is in the object store).
    request = json.dumps({"batch": WALK_BATCH, "no_wait": True}).encode()
    inbox = nc.new_inbox()
    batch: list[StoredMsg] = []
    done = asyncio.Event()
    # Each request has its own reply subject: a late status of an earlier one is ignored.
    state: dict[str, Any] = {"last": False, "error": None, "reply": "", "n": 0}

    async def collect(msg: Msg) -> None:
        if not msg.reply:  # a status: this request is over (or an earlier one: ignored)
            if msg.subject != state["reply"]:
                return
            hdr = msg.headers or {}
            status, why = hdr.get(STATUS, ""), hdr.get(DESCRIPTION, "")
            if status in ("404", "408"):
                state["last"] = True  # nothing more
            elif status != "409" or "Deleted" in why or "Leadership" in why:
                state["error"] = f"{status} {why}"
            # (other 409s: the batch was full by count or bytes: ask again)
            done.set()
            return
        toks = msg.reply.split(".")
        seq_at, pending_at = (5, 8) if len(toks) == 9 else (7, 10)
        batch.append(StoredMsg(int(toks[seq_at]), msg.subject, msg.data, msg.headers))
        if toks[pending_at] == "0":
            state["last"] = True
            done.set()
        elif len(batch) >= WALK_BATCH:
            done.set()

    async def ask() -> None:
        state["n"] += 1
        state["reply"] = f"{inbox}.{state['n']}"
        await nc.publish(api, request, reply=state["reply"])

    sub = await nc.subscribe(f"{inbox}.*", cb=collect)
    try:
        await ask()
        while True:
            await asyncio.wait_for(done.wait(), timeout=js._timeout * 2)
            done.clear()
            if state["error"]:
                raise RidethroughError(f"reading {stream}: {state['error']}")
            got, batch = batch, []
            if not state["last"]:  # the next batch travels while this one is read
                await ask()
            for msg in got:
                yield msg
            if state["last"]:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
