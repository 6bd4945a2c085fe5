"""Records of jobs held outside the main queue: dead letters (and parked jobs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from schemas.jobs import Timestamp
from schemas.results import ErrorInfo


def _now() -> datetime:
    return datetime.now(UTC)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job that cannot succeed, kept on ``ai.dead.<provider>.<reason>`` for operators.

    ``job`` is the job as decoded; when the message could not be decoded at all,
    ``raw`` holds its bytes as text (``job_id`` then is empty) so nothing is dropped.
    """

    reason: str
    error: ErrorInfo
    job_id: str = ""
    job: dict[str, Any] | None = None
    raw: str | None = None
    subject: str = ""
    attempts: int = 0
    dead_at: Timestamp = msgspec.field(default_factory=_now)


_decoder = msgspec.json.Decoder(DeadLetter)


def decode_dead_letter(data: bytes) -> DeadLetter:
    """Decode a stored dead letter."""
    return _decoder.decode(data)
