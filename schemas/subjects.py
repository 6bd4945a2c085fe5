"""Every stream, subject, consumer and bucket name of DESIGN.md, in one place.

Names are the contract with producers in other languages: change them only
together with DESIGN.md.
"""

from __future__ import annotations

import functools
import re
from typing import Final, NamedTuple

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
#: Object store: parts of records too large for one message (``services/overflow.py``).
OVERFLOW_BUCKET: Final = "ai_overflow"
#: Object store: request bodies of large jobs (``services/bodies.py``); producers may put,
#: only workers, the replayer and operators read or delete.
BODIES_BUCKET: Final = "ai_bodies"
#: Where each job that was parked or dead-lettered was last put: key ``<tenant|_>.<job_id>``,
#: value a ``schemas.parking.Location`` (``services/lifecycle/locator.py``).
LOCATOR_BUCKET: Final = "ai_locator"

# Headers
MSG_ID_HEADER: Final = "Nats-Msg-Id"
REPLAY_HEADER: Final = "Ridethrough-Replay"
#: Conditional publish: store only if the subject's last sequence is this (0: empty).
EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"

#: A token that is safe inside a NATS subject: no dots, wildcards or spaces.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

#: The ``ai_control`` key holding the last AI_JOBS sequence stored before the subject
#: layout above (``ridethrough topology`` writes it once): jobs at or below it were
#: published under the old trust rules and are read by them.
LEGACY_JOBS_KEY: Final = "legacy.jobs_seq"


# Msg ids (``Nats-Msg-Id``): the stream's dedup window drops a second publish with the
# same id, so each write a crash may repeat carries an id that depends only on what it
# came from. ``services/lifecycle/settle.py`` is the one writer that uses them.
#
#   <job_id> / <tenant>:<job_id>   a producer's job; its one result   (job_msg_id)
#   <scoped>:r<tag>                the result of a replayed job        (result_msg_id)
#   <job_id>:r<tag>                a replay of parked/dead message     (replay_msg_id)
#   park:<stream>:<seq>            the parked copy of a stored message (park_msg_id)
#   dead:<stream>:<seq>            the dead letter of a stored message (dead_msg_id)
#   failover:<stream>:<seq>        the fail-over copy of a stored job  (failover_msg_id)
#   tally:<process>:<n>            a process's n-th tally of an outage  (tally_msg_id)
#
# A replay's tag (REPLAY_HEADER) is the parked message's sequence, or ``d<seq>`` for a
# dead letter's: a job replayed from the dead letters may replace its ``failed`` result.


def park_msg_id(stream: str, seq: int) -> str:
    """Msg id of the parked copy of message ``seq`` of ``stream``."""
    return f"park:{stream}:{seq}"


def dead_msg_id(stream: str, seq: int) -> str:
    """Msg id of the dead letter of message ``seq`` of ``stream``."""
    return f"dead:{stream}:{seq}"


def failover_msg_id(stream: str, seq: int) -> str:
    """Msg id of the copy of job ``seq`` of ``stream`` sent to a fallback provider."""
    return f"failover:{stream}:{seq}"


def replay_tag(seq: int, *, from_dead: bool = False) -> str:
    """The REPLAY_HEADER value of a job replayed from AI_PARKED (or AI_DEAD) ``seq``."""
    return f"d{seq}" if from_dead else str(seq)


def replaces_failed(tag: str) -> bool:
    """Whether a replay with ``tag`` came from the dead letters (and may replace ``failed``)."""
    return tag.startswith("d")


def tally_msg_id(by: str, n: int) -> str:
    """Msg id of the ``n``-th tally published by process ``by`` (a retried publish of it
    is dropped by the dedup window, never counted twice)."""
    return f"tally:{by}:{n}"


def replay_msg_id(job_id: str, tag: str) -> str:
    """Msg id of a replayed job."""
    return f"{job_id}:r{tag}"


def result_msg_id(job_id: str, tenant: str | None, tag: str | None = None) -> str:
    """Msg id of a job's result: its scoped id, and the replay's tag (a replay gets its own,
    or the dedup window would swallow a result replacing an earlier ``failed`` one)."""
    scoped = job_msg_id(job_id, tenant)
    return f"{scoped}:r{tag}" if tag else scoped


def is_token(value: str) -> bool:
    """Tell whether ``value`` can stand as one subject token."""
    return isinstance(value, str) and _TOKEN.match(value) is not None


# Jobs. Who published a job is part of its subject, because NATS permissions match
# subjects (never bodies or headers) and the worker believes only what they enforce:
#
#   ai.jobs.<provider>.<priority>                      a producer, no tenant
#   ai.jobs.<provider>.<priority>.<tenant>             a producer of <tenant> (its user may
#                                                      publish ai.jobs.*.*.<tenant> only)
#   ai.jobs.<provider>.<priority>.<tenant|_>.requeued  ridethrough itself: a replay, a
#                                                      fail-over, an operator's move
#
# Only a requeued job may carry the replay mark (REPLAY_HEADER), and only there does the
# worker take the tenant from the body. A producer's job takes it from the subject.

#: Last token of a job subject that only ridethrough's own services may publish on.
REQUEUED: Final = "requeued"
#: Tenant token of a requeued job that names no tenant.
NO_TENANT: Final = "_"


def jobs_subject(provider: str, priority: str, tenant: str | None = None) -> str:
    """Subject a producer publishes a job for ``provider`` at ``priority`` on (with its
    tenant's token when it acts for one)."""
    base = f"ai.jobs.{provider}.{priority}"
    return f"{base}.{tenant}" if tenant else base


def requeue_subject(provider: str, priority: str, tenant: str | None) -> str:
    """Subject ridethrough's own services put a job back on (replay, fail-over, moves)."""
    return f"ai.jobs.{provider}.{priority}.{tenant or NO_TENANT}.{REQUEUED}"


def jobs_filter(provider: str) -> str:
    """Every job of ``provider``, whoever published it (for reading AI_JOBS)."""
    return f"ai.jobs.{provider}.>"


def tenant_jobs_filters(provider: str, tenant: str) -> tuple[str, str]:
    """The jobs of ``provider`` that belong to ``tenant``: those its producers published and
    those ridethrough requeued for it (for reading AI_JOBS)."""
    return f"ai.jobs.{provider}.*.{tenant}", f"ai.jobs.{provider}.*.{tenant}.{REQUEUED}"


def jobs_priority_filters(provider: str, priority: str) -> tuple[str, str]:
    """The jobs of ``provider`` at ``priority``, in all three forms: the filters of its
    workers' consumer, and the subjects AI_JOBS takes for it."""
    return f"ai.jobs.{provider}.{priority}", f"ai.jobs.{provider}.{priority}.>"


def jobs_stream_subjects(provider: str) -> list[str]:
    """What AI_JOBS listens on for ``provider``: its known priorities only, so a job on any
    other (``ai.jobs.<p>.urgent``) is refused at the producer instead of waiting forever for
    a consumer (a work-queue stream's consumers may not overlap, so none can take the rest)."""
    return [f for prio in PRIORITIES for f in jobs_priority_filters(provider, prio)]


def job_msg_id(job_id: str, tenant: str | None = None) -> str:
    """The ``Nats-Msg-Id`` a producer's job must carry: its id, scoped by its tenant, so the
    dedup window makes one job of one id per tenant (and two tenants' ids never collide)."""
    return f"{tenant}:{job_id}" if tenant else job_id


class JobOrigin(NamedTuple):
    """Who a job subject says published the job: ``tenant`` (for a producer's job, the
    tenant its permissions bind it to) and whether ridethrough requeued it."""

    provider: str
    tenant: str | None
    requeued: bool


def job_origin(subject: str) -> JobOrigin | None:
    """Parse a job subject; ``None`` when it is none of the three forms."""
    tokens = subject.split(".")
    n = len(tokens)
    if n < 4 or tokens[0] != "ai" or tokens[1] != "jobs":
        return None
    if n == 4:
        return JobOrigin(tokens[2], None, False)
    if n == 5:
        return JobOrigin(tokens[2], tokens[4], False) if is_token(tokens[4]) else None
    if n == 6 and tokens[5] == REQUEUED:
        return JobOrigin(tokens[2], None if tokens[4] == NO_TENANT else tokens[4], True)
    return None


# Model names hold characters a subject token may not (``claude-3.5-sonnet``,
# ``anthropic.claude-sonnet-4-5-v1:0``, ``org/model@rev``). ``model_token`` writes one as a
# token, reversibly: letters, digits and ``-`` stand as they are; every other byte of its
# UTF-8 (``_`` included) is ``_`` and two hex digits. So ``claude-3.5`` is ``claude-3_2E5``.
_MODEL_KEEP = re.compile(r"[A-Za-z0-9-]")


def model_token(model: str) -> str:
    """``model`` as one subject token; ``ValueError`` if empty or over 128 characters."""
    out = []
    for ch in model:
        if _MODEL_KEEP.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"_{b:02X}" for b in ch.encode("utf-8"))
    token = "".join(out)
    if not is_token(token):
        raise ValueError(f"model {model!r} cannot stand as a subject token ({len(token)} chars)")
    return token


def model_from_token(token: str) -> str:
    """The model name ``model_token`` wrote as ``token``; ``ValueError`` if it wrote none."""
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "_":
            pair = token[i + 1 : i + 3]
            if len(pair) != 2 or not re.fullmatch(r"[0-9A-F]{2}", pair):
                raise ValueError(f"{token!r} is not a model token")
            raw.append(int(pair, 16))
            i += 3
        elif _MODEL_KEEP.fullmatch(ch):
            raw.extend(ch.encode("ascii"))
            i += 1
        else:
            raise ValueError(f"{token!r} is not a model token")
    try:
        model = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{token!r} is not a model token") from None
    if model_token(model) != token:  # one spelling per model (upper-case hex, no escaped keeper)
        raise ValueError(f"{token!r} is not a model token")
    return model


# Breaker scopes. A scope is a provider, or one model of a provider; a model whose name
# cannot stand as a token (over 128 characters once spelled) has no scope of its own and
# follows its provider's. The scope's key in ai_health, ai_control (``paused.<key>``) and
# its events' subject all end in the same tokens:
#
#   <provider>                  the provider
#   <provider>.<model_token>    one of its models


@functools.lru_cache(maxsize=4096)  # asked for every job and every park
def scope_model(model: str | None) -> str | None:
    """``model`` if it can have a breaker scope of its own (its token fits), else None."""
    if not model:
        return None
    try:
        model_token(model)
    except ValueError:
        return None
    return model


@functools.lru_cache(maxsize=4096)  # asked for every job; a fleet serves a few models
def scope_key(provider: str, model: str | None = None) -> str:
    """Key of the breaker of ``provider`` (or of its ``model``) in ai_health."""
    m = scope_model(model)
    return f"{provider}.{model_token(m)}" if m else provider


def scope_of_key(key: str) -> tuple[str, str | None] | None:
    """(provider, model or None) of a scope key; None if ``key`` is none."""
    provider, dot, token = key.partition(".")
    if not is_token(provider):
        return None
    if not dot:
        return provider, None
    try:
        return provider, model_from_token(token)
    except ValueError:
        return None


def scope_label(provider: str, model: str | None = None) -> str:
    """How people read a scope: ``anthropic`` or ``anthropic/claude-opus-4-1``."""
    return f"{provider}/{model}" if model else provider


#: Model token of a parked job whose model has no scope (its name is too long).
NO_MODEL: Final = "_"


def parked_subject(provider: str, priority: str, model: str | None = None) -> str:
    """Subject a parked job of ``provider`` and ``model`` at ``priority`` is held on:
    ``ai.parked.<provider>.<priority>.<model_token>``."""
    m = scope_model(model)
    return f"ai.parked.{provider}.{priority}.{model_token(m) if m else NO_MODEL}"


def legacy_parked_subject(provider: str, priority: str) -> str:
    """Where jobs were parked before the per-model layout (``ridethrough topology`` and the
    replayer move them): ``ai.parked.<provider>.<priority>``."""
    return f"ai.parked.{provider}.{priority}"


def parked_filter(provider: str | None = None) -> str:
    """Every parked job of ``provider`` (of every provider when ``None``), both layouts."""
    return f"ai.parked.{provider or '*'}.>"


class ParkedPlace(NamedTuple):
    """Where a parked subject says a job waits: ``model`` is None for the legacy layout
    and for a model without a scope (token ``_``)."""

    provider: str
    priority: str
    model: str | None
    legacy: bool


def parked_place(subject: str) -> ParkedPlace | None:
    """Parse a parked subject of either layout; None when it is neither."""
    tokens = subject.split(".")
    if len(tokens) not in (4, 5) or tokens[:2] != ["ai", "parked"] or tokens[3] not in PRIORITIES:
        return None
    if len(tokens) == 4:
        return ParkedPlace(tokens[2], tokens[3], None, True)
    if tokens[4] == NO_MODEL:
        return ParkedPlace(tokens[2], tokens[3], None, False)
    try:
        return ParkedPlace(tokens[2], tokens[3], model_from_token(tokens[4]), False)
    except ValueError:
        return None


# Results. Each scope has a literal prefix no other scope shares, because a permission
# ``X.*`` also lets a user subscribe to (or direct-get) ``X.>``, which reaches every
# subject below X: the producers' ``ai.results.shared.*`` reaches no tenant's results.
#
#   ai.results.shared.<job_id>            a job without a tenant
#   ai.results.tenant.<tenant>.<job_id>   a job of <tenant>

SHARED_RESULTS: Final = "ai.results.shared"
TENANT_RESULTS: Final = "ai.results.tenant"


def result_subject(job_id: str, tenant: str | None = None) -> str:
    """Subject the one result of ``job_id`` (of ``tenant``, if any) is stored on."""
    return f"{TENANT_RESULTS}.{tenant}.{job_id}" if tenant else f"{SHARED_RESULTS}.{job_id}"


def legacy_result_subject(job_id: str, tenant: str | None = None) -> str:
    """Where results were stored before the scoped layout (``ridethrough topology`` moves
    them): ``ai.results.<job_id>``, ``ai.results.<tenant>.<job_id>``."""
    return f"ai.results.{tenant}.{job_id}" if tenant else f"ai.results.{job_id}"


def dead_subject(provider: str, reason: str) -> str:
    """Subject a dead letter of ``provider`` for ``reason`` is stored on."""
    return f"ai.dead.{provider}.{reason}"


def dead_filter(provider: str | None = None, reason: str | None = None) -> str:
    """Dead letters of ``provider`` and ``reason`` (``None``: any)."""
    return dead_subject(provider or "*", reason or "*")


def health_event_subject(provider: str, model: str | None = None) -> str:
    """Subject of breaker transitions of ``provider`` (or of its ``model``)."""
    return f"ai.events.health.{scope_key(provider, model)}"


#: Every health event, of every scope (``ai.events.health.<provider>[.<model_token>]``).
HEALTH_EVENTS_FILTER: Final = "ai.events.health.>"


OPS_EVENTS_SUBJECT: Final = "ai.events.ops"


def tally_subject(provider: str) -> str:
    """Subject of the tallies of jobs failed over or expired in ``provider``'s outages (of
    the provider or of one of its models: ``schemas.events.TallyEvent``)."""
    return f"ai.events.tally.{provider}"


#: Every tally, of every provider.
TALLY_FILTER: Final = "ai.events.tally.*"


# Status pages: evidence, never proof. The prober holding ``probe.<provider>`` writes what
# the provider's page says to ai_control and announces each change as an event.


def evidence_key(provider: str) -> str:
    """Key in ai_control of what ``provider``'s status page says (``schemas.health.Evidence``)."""
    return f"evidence.{provider}"


def evidence_event_subject(provider: str) -> str:
    """Subject of the changes of ``provider``'s status page (``schemas.events.EvidenceEvent``)."""
    return f"ai.events.evidence.{provider}"


# Subjects each stream listens on. AI_JOBS listens only on the configured
# providers and the known priorities (see ``jobs_stream_subjects``), so a job for an
# unknown provider or priority is refused at the producer instead of waiting forever for
# a consumer.
#: The per-model layout, and the legacy one (workers of the last release, mid-upgrade).
PARKED_SUBJECTS: Final = ("ai.parked.*.*.*", "ai.parked.*.*")
#: One subject for both scopes and the legacy layout (subjects of one stream may not overlap).
RESULTS_SUBJECTS: Final = ("ai.results.>",)
DEAD_SUBJECTS: Final = ("ai.dead.*.*",)
EVENTS_SUBJECTS: Final = (
    "ai.events.health.*",
    "ai.events.health.*.*",
    OPS_EVENTS_SUBJECT,
    "ai.events.evidence.*",
    TALLY_FILTER,
)


#: Durable consumer of ``ridethrough notifier`` on AI_EVENTS (health events and the
#: operators' audit log), and its lease key in ai_control (one active notifier).
NOTIFIER_CONSUMER: Final = "notifier"
NOTIFIER_LEASE: Final = "notify"
NOTIFIER_FILTERS: Final = (HEALTH_EVENTS_FILTER, OPS_EVENTS_SUBJECT)


def worker_consumer(provider: str, priority: str) -> str:
    """Durable pull consumer shared by every worker process of ``provider`` for one priority.

    One per priority (DESIGN.md names one per provider), for the replayer's reason: a
    consumer delivers oldest first, so a high job behind 5,000 low ones would wait for them.
    """
    return f"workers-{provider}-{priority}"


def legacy_worker_consumer(provider: str) -> str:
    """The one workers' consumer of ``provider`` before there was one per priority
    (``ridethrough topology`` deletes it; the jobs it held stay in AI_JOBS)."""
    return f"workers-{provider}"


def replayer_consumer(provider: str, priority: str, model: str | None = None) -> str:
    """Durable pull consumer the replayer drains one priority of one model of ``provider``
    from AI_PARKED with (``replayer-<provider>-<priority>-<model_token>``).

    One per priority: JetStream delivers a consumer's messages oldest first, so only
    separate consumers let high go before normal before low. One per model: a model
    still open keeps its jobs parked while the others replay. The replayer creates them
    when a model has parked jobs; idle ones expire (``inactive_threshold``).
    """
    m = scope_model(model)
    return f"replayer-{provider}-{priority}-{model_token(m) if m else NO_MODEL}"


def legacy_replayer_consumer(provider: str, priority: str) -> str:
    """The replayer's consumer of the legacy parked layout (``ridethrough topology``
    deletes it once the jobs under it are moved)."""
    return f"replayer-{provider}-{priority}"


def locator_key(job_id: str, tenant: str | None = None) -> str:
    """The ``ai_locator`` key of job ``job_id`` of ``tenant``: ``<tenant|_>.<job_id>``."""
    return f"{tenant or NO_TENANT}.{job_id}"


def locator_subject(job_id: str, tenant: str | None = None) -> str:
    """The subject a location of job ``job_id`` of ``tenant`` is written on."""
    return f"$KV.{LOCATOR_BUCKET}.{locator_key(job_id, tenant)}"


def locator_filter(job_id: str) -> str:
    """The locations of every tenant's job ``job_id`` (an operator's ``jobs show``)."""
    return f"$KV.{LOCATOR_BUCKET}.*.{job_id}"
