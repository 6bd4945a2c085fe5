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


class Target(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A provider (and model) a job may fail over to.

    Without ``model`` the job's own model follows it; the provider's ``model_map`` turns it
    into that door's model id when it is called (``claude-sonnet-4-5`` -> a Bedrock id).
    """

    provider: Token
    model: Annotated[str, msgspec.Meta(min_length=1)] | None = None


#: The name of a large job's body in the object store bucket ``ai_bodies``:
#: ``<tenant or _>.<job id>.<128 random bits in hex>`` (nobody can guess another's).
BodyName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9_-]{1,128}\.[A-Za-z0-9_-]{1,128}\.[0-9a-f]{32}$",
        description="<tenant or _>.<job id>.<32 random hex digits>",
    ),
]


class BodyRef(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where the request body of a large job waits: object ``name`` of the JetStream
    object store bucket ``ai_bodies`` (``services/bodies.py``), ``size`` bytes of JSON
    whose SHA-256 is ``sha256``. ``kind`` is the API the body is written for when it is
    not the job's provider's (a fail-over copy to another API: the worker maps it)."""

    name: BodyName
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    kind: str | None = None


class Job(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One AI job.

    ``request`` is the provider-native request body (Anthropic Messages or
    OpenAI Chat Completions) without ``model``, which travels in ``model``. A job
    too large for one message carries ``request_ref`` instead, and an empty ``request``:
    the body waits in the object store until the job ends.
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
    #: Beta flags the call sends (``anthropic-beta``; Bedrock carries them in the body as
    #: ``anthropic_beta``): kept through park, replay and failover, dropped (with a note on
    #: the result) only by a failover to a door that does not take them.
    betas: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,128}$")]] = msgspec.field(
        default_factory=list
    )
    #: Where the body of a large job waits (``request`` is then empty); absent for every
    #: job that fits in one message, so those are byte for byte what they always were.
    request_ref: BodyRef | None = None
    #: The trace context of the job's submit (W3C ``traceparent`` / ``tracestate``, or what
    #: the producer's OpenTelemetry propagator writes), kept in the job because parking,
    #: replay and fail-over publish it again: a replayed attempt links to it. Empty when
    #: the producer traces nothing. Never prompts: trace ids only.
    trace: TraceCarrier = msgspec.field(default_factory=dict)


_decoder = msgspec.json.Decoder(Job)


def decode_job(data: bytes) -> Job:
    """Decode and validate a job; raises ``msgspec.ValidationError`` or ``DecodeError``."""
    return _decoder.decode(data)
