"""Records of jobs held outside the main queue: parked jobs and dead letters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from schemas.jobs import Job, Timestamp
from schemas.results import ErrorInfo


def _now() -> datetime:
    return datetime.now(UTC)


class ParkRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Why and when a job was parked."""

    reason: str
    outage_id: str = ""
    last_error: str = ""
    attempts: int = 0
    parked_at: Timestamp = msgspec.field(default_factory=_now)


class ParkedJob(msgspec.Struct, frozen=True, kw_only=True):
    """A job held on ``ai.parked.<provider>.<priority>`` until its provider recovers."""

    job: Job
    park: ParkRecord


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job that cannot succeed, kept on ``ai.dead.<provider>.<reason>`` for operators.

    ``job`` is the job as decoded; when the message could not be decoded at all, its
    exact bytes are kept (``job_id`` then is empty) so nothing is dropped: ``raw`` when
    they are UTF-8 text, else ``raw_base64``. A part too large for one message (the
    bytes, or the provider's reply for ``response_too_large``) is kept whole in the
    object store bucket ``ai_overflow`` under the name in ``overflow``.
    """

    reason: str
    error: ErrorInfo
    job_id: str = ""
    job: dict[str, Any] | None = None
    raw: str | None = None
    subject: str = ""
    attempts: int = 0
    dead_at: Timestamp = msgspec.field(default_factory=_now)
    raw_base64: str | None = None
    overflow: str | None = None


class Location(msgspec.Struct, frozen=True, kw_only=True):
    """Where a job was last parked or dead-lettered: message ``seq`` of ``stream``
    (``AI_PARKED`` or ``AI_DEAD``). The value of its key in ``ai_locator``; only a hint
    until the message is read (a replay or a purge leaves it behind)."""

    stream: str
    seq: int


_decoder = msgspec.json.Decoder(DeadLetter)
_parked_decoder = msgspec.json.Decoder(ParkedJob)


def decode_parked(data: bytes) -> ParkedJob:
    """Decode a parked job."""
    return _parked_decoder.decode(data)


def decode_dead_letter(data: bytes) -> DeadLetter:
    """Decode a stored dead letter."""
    return _decoder.decode(data)


_location_decoder = msgspec.json.Decoder(Location)


def decode_location(data: bytes) -> Location:
    """Decode a location."""
    return _location_decoder.decode(data)
