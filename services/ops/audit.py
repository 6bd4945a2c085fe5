"""The operators' audit trail: who did what, in AI_EVENTS."""

from __future__ import annotations

import getpass
import os
import socket

from nats.js import JetStreamContext

from schemas.codec import encode
from schemas.events import OpsEvent
from schemas.subjects import OPS_EVENTS_SUBJECT

#: How many job ids one audit event carries at most.
IDS_PER_EVENT = 500


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
