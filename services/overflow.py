"""What is written for a job must fit: sizes against the server's ``max_payload``, and the
overflow bucket for what does not.

A result, dead letter or park record is one NATS message, and NATS refuses a message
larger than the server's ``max_payload`` (1 MB by default). A provider reply of 10 MB
to a small job, or a malformed message near the limit whose bytes grow when they are
quoted into a dead letter, would otherwise fail to publish on every delivery, for ever
(and a reply that cannot be stored would be paid for again on each retry). Instead the
part that does not fit is put aside whole in the JetStream object store bucket
``ai_overflow`` (``schemas.subjects.OVERFLOW_BUCKET``), and the record that does fit
names it: ``ridethrough`` operators (and ``nats object get ai_overflow <name>``) read it
there. Objects expire with the dead letters (``dead_max_age_s``).
"""

from __future__ import annotations

import base64
from typing import Any

from nats.js import JetStreamContext

from schemas.subjects import OVERFLOW_BUCKET
from services.jetstream.errors import NOT_FOUND

#: Bytes kept free under ``max_payload`` for the headers a record is published with
#: (msg id, conditional-publish sequence, replay mark) and for the envelope a parked or
#: dead-lettered job gains: a job this much under the limit can always be parked and
#: dead-lettered whole. The producer refuses jobs that leave less.
HEADROOM = 8 * 1024


def fits(data: bytes, max_payload: int) -> bool:
    """Whether a record of ``data`` bytes can be published (with its headers)."""
    return not max_payload or len(data) + HEADROOM // 4 <= max_payload


def raw_fields(data: bytes) -> dict[str, Any]:
    """The exact bytes of a message as dead-letter fields: ``raw`` when they are UTF-8
    text, else ``raw_base64`` (never decoded with replacement characters)."""
    try:
        return {"raw": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw_base64": base64.b64encode(data).decode("ascii")}


async def put_aside(js: JetStreamContext, name: str, data: bytes) -> str:
    """Store ``data`` whole as object ``name`` of the overflow bucket and return the name.

    The same name stored again (a redelivery of the message that overflowed) is left as
    it is: the bytes of one message do not change.
    """
    store = await js.object_store(OVERFLOW_BUCKET)
    try:
        await store.get_info(name)
    except NOT_FOUND:  # ObjectNotFoundError is one; a deleted object counts as absent
        await store.put(name, data)
    return name


async def take(js: JetStreamContext, name: str) -> bytes:
    """The bytes of overflow object ``name``."""
    store = await js.object_store(OVERFLOW_BUCKET)
    result = await store.get(name)
    return result.data or b""
