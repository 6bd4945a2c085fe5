"""The job: one LLM request, as a producer publishes it to ``AI_JOBS``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

from schemas.subjects import PRIORITIES, is_token

Priority = Literal["high", "normal", "low"]
OnOutage = Literal["park", "failover", "fail"]


def _now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """A fresh job id: 32 hex characters, safe as a subject token."""
    return uuid.uuid4().hex


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """A provider and model a job may fail over to."""

    provider: str
    model: str


class Job(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One AI job.

    ``request`` is the provider-native request body (Anthropic Messages or
    OpenAI Chat Completions) without ``model``, which travels in ``model``.
    """

    id: str
    provider: str
    model: str
    request: dict[str, Any]
    priority: Priority = "normal"
    deadline: datetime | None = None
    on_outage: OnOutage = "park"
    fallbacks: list[Target] = msgspec.field(default_factory=list)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    created_at: datetime = msgspec.field(default_factory=_now)

    def __post_init__(self) -> None:
        # msgspec checks the types; these are the rules types cannot say.
        # Raising ValueError here surfaces as msgspec.ValidationError naming the field.
        for name in ("id", "provider"):
            value = getattr(self, name)
            if not is_token(value):
                raise ValueError(
                    f"`{name}` must be 1-128 characters of A-Z a-z 0-9 _ - (got {value!r})"
                )
        if not self.model:
            raise ValueError("`model` must not be empty")
        if self.deadline is not None and self.deadline.tzinfo is None:
            raise ValueError("`deadline` must carry a timezone (RFC 3339 with offset)")
        assert self.priority in PRIORITIES  # guaranteed by the Literal type


_decoder = msgspec.json.Decoder(Job)
_encoder = msgspec.json.Encoder()


def decode_job(data: bytes) -> Job:
    """Decode and validate a job; raises ``msgspec.ValidationError`` or ``DecodeError``."""
    return _decoder.decode(data)


def encode(obj: msgspec.Struct) -> bytes:
    """Encode any wire Struct to JSON bytes."""
    return _encoder.encode(obj)
