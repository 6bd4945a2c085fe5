"""Publishing to a stream: plainly, with a msg id, or on a condition; reading a subject's
last message; deleting one. The server's verdicts come back as values (stored or not,
found or not), not as nats-py exceptions."""

from __future__ import annotations

import contextlib

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


async def last_seq(js: JetStreamContext, stream: str, subject: str) -> tuple[int, bytes] | None:
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
