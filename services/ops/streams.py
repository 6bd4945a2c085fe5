"""Reading streams without consuming them, and removing one message once it is safe."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.codec import encode
from schemas.events import OpsEvent
from schemas.subjects import OPS_EVENTS_SUBJECT

#: How many job ids one audit event carries at most.
IDS_PER_EVENT = 500


async def iter_stream(
    js: JetStreamContext, stream: str, subject: str = ">", *, start_seq: int = 1
) -> AsyncIterator[Any]:
    """Every stored message of ``stream`` matching ``subject``, oldest first (direct get:
    nothing is delivered, acked or consumed)."""
    seq = start_seq
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
        except NotFoundError:
            return
        yield msg
        seq = int(msg.seq or seq) + 1


async def subject_counts(js: JetStreamContext, stream: str, subject: str) -> dict[str, int]:
    """Messages per subject of ``stream`` under the filter ``subject``."""
    info = await js.stream_info(stream, subjects_filter=subject)
    return {k: int(v) for k, v in (info.state.subjects or {}).items()}


def operator() -> str:
    """Who is acting: ``RIDETHROUGH_OPERATOR``, else user@host."""
    named = os.environ.get("RIDETHROUGH_OPERATOR")
    if named:
        return named
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


async def audit(
    js: JetStreamContext,
    action: str,
    *,
    provider: str = "",
    filters: dict[str, str] | None = None,
    counts: dict[str, int] | None = None,
    job_ids: list[str] | None = None,
    dry_run: bool = False,
) -> None:
    """Write the action to ``ai.events.ops`` (split into several events for many ids)."""
    ids = job_ids or []
    chunks = [ids[i : i + IDS_PER_EVENT] for i in range(0, len(ids), IDS_PER_EVENT)] or [[]]
    who = operator()
    for chunk in chunks:
        event = OpsEvent(
            action=action,
            who=who,
            provider=provider,
            filters={k: v for k, v in (filters or {}).items() if v},
            counts=counts or {},
            job_ids=chunk,
            dry_run=dry_run,
        )
        await js.publish(OPS_EVENTS_SUBJECT, encode(event))
