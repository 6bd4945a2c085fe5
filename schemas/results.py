"""The result of a job, stored once per job on ``ai.results.shared.<job_id>``
(``ai.results.tenant.<tenant>.<job_id>`` for a job of a tenant)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from schemas.jobs import Timestamp

Status = Literal["succeeded", "failed", "expired"]


def _now() -> datetime:
    return datetime.now(UTC)


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens the provider billed for the call."""

    input_tokens: int = 0
    output_tokens: int = 0


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Why a job failed: a stable ``type``, a human message, and whether a retry may help."""

    type: str
    message: str
    retryable: bool = False


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    """Milliseconds spent waiting in the queue, calling the provider, and in all."""

    queued_ms: float = 0.0
    provider_ms: float = 0.0
    total_ms: float = 0.0


class ServedBy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The door that answered a job: the provider's name, its kind, and whether the job
    came to it by failing over (``fallback_from``: the provider/model it left)."""

    provider: str
    kind: str = ""
    fallback: bool = False
    fallback_from: str = ""


class JobResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The terminal outcome of a job.

    ``response`` is the provider-native response body (for a streamed request,
    the assembled message).
    """

    job_id: str
    status: Status
    provider: str
    model: str
    response: dict[str, Any] | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    attempts: int = 1
    timings: Timings = msgspec.field(default_factory=Timings)
    finished_at: Timestamp = msgspec.field(default_factory=_now)
    worker: str = ""
    #: The job's tenant ("" for none): the result is stored on ``result_subject(job_id, tenant)``.
    tenant: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{0,128}$")] = ""
    #: Which door answered (absent in results stored before it existed).
    served_by: ServedBy | None = None
    #: The provider's whole usage object as it sent it (prompt-cache token counts
    #: included); ``usage`` keeps the two counts every provider has.
    provider_usage: dict[str, Any] | None = None
    #: What the worker changed on the way, for the producer to know (a beta flag the
    #: fallback door does not take, dropped).
    notes: list[str] = msgspec.field(default_factory=list)


_decoder = msgspec.json.Decoder(JobResult)


def decode_result(data: bytes) -> JobResult:
    """Decode a stored result."""
    return _decoder.decode(data)


def response_text(response: dict[str, Any] | None) -> str:
    """The generated text of an Anthropic or OpenAI response body ("" if none)."""
    if not response:
        return ""
    if isinstance(content := response.get("content"), list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        return str(message.get("content") or "")
    return ""
