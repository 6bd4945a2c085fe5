"""Every stream, subject, consumer and bucket name of DESIGN.md, in one place.

Names are the contract with producers in other languages: change them only
together with DESIGN.md.
"""

from __future__ import annotations

import re
from typing import Final

PRIORITIES: Final = ("high", "normal", "low")

# Streams
JOBS_STREAM: Final = "AI_JOBS"
PARKED_STREAM: Final = "AI_PARKED"
RESULTS_STREAM: Final = "AI_RESULTS"
DEAD_STREAM: Final = "AI_DEAD"
EVENTS_STREAM: Final = "AI_EVENTS"

# Key-value buckets
HEALTH_BUCKET: Final = "ai_health"
CONTROL_BUCKET: Final = "ai_control"
WORKERS_BUCKET: Final = "ai_workers"

# Headers
MSG_ID_HEADER: Final = "Nats-Msg-Id"
REPLAY_HEADER: Final = "Ridethrough-Replay"
#: Conditional publish: store only if the subject's last sequence is this (0: empty).
EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
#: JetStream's error code when that condition fails.
WRONG_LAST_SEQUENCE: Final = 10071

#: A token that is safe inside a NATS subject: no dots, wildcards or spaces.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def is_token(value: str) -> bool:
    """Tell whether ``value`` can stand as one subject token."""
    return _TOKEN.match(value) is not None


def jobs_subject(provider: str, priority: str) -> str:
    """Subject a job for ``provider`` at ``priority`` is published on."""
    return f"ai.jobs.{provider}.{priority}"


def jobs_filter(provider: str) -> str:
    """Filter of the shared worker consumer of ``provider``."""
    return f"ai.jobs.{provider}.*"


def parked_subject(provider: str, priority: str) -> str:
    """Subject a parked job of ``provider`` at ``priority`` is held on."""
    return f"ai.parked.{provider}.{priority}"


def parked_filter(provider: str) -> str:
    """Every parked job of ``provider``."""
    return f"ai.parked.{provider}.*"


def result_subject(job_id: str, tenant: str | None = None) -> str:
    """Subject the one result of ``job_id`` is stored on: ``ai.results.<job_id>``, or
    ``ai.results.<tenant>.<job_id>`` for a job of a tenant (so that NATS permissions
    on ``ai.results.<tenant>.*`` keep one tenant's results from the others)."""
    return f"ai.results.{tenant}.{job_id}" if tenant else f"ai.results.{job_id}"


def dead_subject(provider: str, reason: str) -> str:
    """Subject a dead letter of ``provider`` for ``reason`` is stored on."""
    return f"ai.dead.{provider}.{reason}"


def health_event_subject(provider: str) -> str:
    """Subject of breaker transitions of ``provider``."""
    return f"ai.events.health.{provider}"


OPS_EVENTS_SUBJECT: Final = "ai.events.ops"

# Subjects each stream listens on. AI_JOBS listens only on the configured
# providers (see ``jobs_filter``), so a job for an unknown provider is refused
# at the producer instead of waiting forever for a consumer.
PARKED_SUBJECTS: Final = ("ai.parked.*.*",)
RESULTS_SUBJECTS: Final = ("ai.results.*", "ai.results.*.*")
DEAD_SUBJECTS: Final = ("ai.dead.*.*",)
EVENTS_SUBJECTS: Final = ("ai.events.health.*", OPS_EVENTS_SUBJECT)


def worker_consumer(provider: str) -> str:
    """Durable pull consumer shared by every worker process of ``provider``."""
    return f"workers-{provider}"


def replayer_consumer(provider: str, priority: str) -> str:
    """Durable pull consumer the replayer of ``provider`` drains one priority of AI_PARKED with.

    One per priority (DESIGN.md names one per provider): JetStream delivers a consumer's
    messages oldest first, so only separate consumers let high go before normal before low.
    """
    return f"replayer-{provider}-{priority}"
