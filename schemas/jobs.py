"""The job: one LLM request, as a producer publishes it to ``AI_JOBS``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

Priority = Literal["high", "normal", "low"]
OnOutage = Literal["park", "failover", "fail"]

#: A job id or provider name: it stands as one token in NATS subjects.
Token = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9_-]{1,128}$",
        description="1-128 characters of A-Z a-z 0-9 _ - (a NATS subject token)",
    ),
]
#: An RFC 3339 timestamp with a UTC offset.
Timestamp = Annotated[datetime, msgspec.Meta(tz=True, extra_json_schema={"format": "date-time"})]


#: A propagator's carrier: a few short header-like entries (W3C ``tracestate`` is at most
#: 512 characters).
TraceCarrier = Annotated[
    dict[
        Annotated[str, msgspec.Meta(min_length=1, max_length=64)],
        Annotated[str, msgspec.Meta(max_length=1024)],
    ],
    msgspec.Meta(max_length=8, description="OpenTelemetry trace context (traceparent...)"),
]


def _now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    """A fresh job id: 32 hex characters, safe as a subject token."""
    return uuid.uuid4().hex


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """A provider and model a job may fail over to."""

    provider: Token
    model: Annotated[str, msgspec.Meta(min_length=1)]


class Job(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One AI job.

    ``request`` is the provider-native request body (Anthropic Messages or
    OpenAI Chat Completions) without ``model``, which travels in ``model``.
    """

    id: Token
    provider: Token
    model: Annotated[str, msgspec.Meta(min_length=1)]
    request: dict[str, Any]
    priority: Priority = "normal"
    deadline: Timestamp | None = None
    on_outage: OnOutage = "park"
    fallbacks: list[Target] = msgspec.field(default_factory=list)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    created_at: Timestamp = msgspec.field(default_factory=_now)
    #: Whose job this is. A job with a tenant has its result on
    #: ``ai.results.tenant.<tenant>.<job_id>``, which NATS permissions can give to that
    #: tenant's producers alone; without one, on ``ai.results.shared.<job_id>``. A
    #: producer's job must be published on its tenant's subject (``schemas.subjects``).
    tenant: Token | None = None
    #: The trace context of the job's submit (W3C ``traceparent`` / ``tracestate``, or what
    #: the producer's OpenTelemetry propagator writes), kept in the job because parking,
    #: replay and fail-over publish it again: a replayed attempt links to it. Empty when
    #: the producer traces nothing. Never prompts: trace ids only.
    trace: TraceCarrier = msgspec.field(default_factory=dict)


_decoder = msgspec.json.Decoder(Job)


def decode_job(data: bytes) -> Job:
    """Decode and validate a job; raises ``msgspec.ValidationError`` or ``DecodeError``."""
    return _decoder.decode(data)
