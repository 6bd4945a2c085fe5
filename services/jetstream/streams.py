"""Streams: publishing (plainly, with a msg id, or on a condition), reading without
consuming (a subject's last message, every message, counts per subject), deleting one
message. The server's verdicts come back as values (stored or not, found or not), not as
nats-py exceptions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from nats.js import JetStreamContext

from schemas.subjects import EXPECTED_LAST_SUBJECT_SEQ, MSG_ID_HEADER
from services.jetstream.errors import NOT_FOUND, wrong_last_sequence


async def publish(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    *,
    msg_id: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
) -> None:
    """Store ``data`` on ``subject`` and wait for the PubAck (``msg_id``: the stream's
    dedup window drops a second publish with it)."""
    if msg_id is not None:
        headers = {**(headers or {}), MSG_ID_HEADER: msg_id}
    await js.publish(subject, data, timeout=timeout, headers=headers)


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
    try:
        await js.publish(subject, data, timeout=timeout, headers=headers)
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


async def iter_stream(
    js: JetStreamContext, stream: str, subject: str = ">", *, start_seq: int = 1
) -> AsyncIterator[Any]:
    """Every stored message of ``stream`` matching ``subject``, oldest first (direct get:
    nothing is delivered, acked or consumed)."""
    seq = start_seq
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
        except NOT_FOUND:
            return
        yield msg
        seq = int(msg.seq or seq) + 1


async def subject_counts(js: JetStreamContext, stream: str, subject: str) -> dict[str, int]:
    """Messages per subject of ``stream`` under the filter ``subject``."""
    info = await js.stream_info(stream, subjects_filter=subject)
    return {k: int(v) for k, v in (info.state.subjects or {}).items()}
