"""Streams, consumers and key-value buckets of DESIGN.md: create or update, idempotently.

``ensure_topology`` compares what exists with what the settings ask for and
changes only what differs, so running it twice changes nothing, and a changed
setting (say ``ack_wait``) reaches existing durable consumers too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from schemas import subjects as s
from services.config import Settings
from services.errors import TopologyError


@dataclass
class TopologyReport:
    """What ``ensure_topology`` did: names created, updated and left unchanged."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether anything was created, updated or removed."""
        return bool(self.created or self.updated or self.removed)


def _storage(settings: Settings) -> api.StorageType:
    return api.StorageType.FILE if settings.nats.storage == "file" else api.StorageType.MEMORY


def stream_configs(settings: Settings) -> list[api.StreamConfig]:
    """The five streams, sized by the settings."""
    n = settings.nats
    common: dict[str, Any] = {
        "storage": _storage(settings),
        "num_replicas": n.replicas,
        "duplicate_window": n.dedup_window_s,
        # A full stream refuses new messages rather than silently dropping old ones.
        "discard": api.DiscardPolicy.NEW,
        "allow_direct": True,
    }
    return [
        api.StreamConfig(
            name=s.JOBS_STREAM,
            subjects=[f for p in sorted(settings.providers) for f in s.jobs_stream_subjects(p)],
            retention=api.RetentionPolicy.WORK_QUEUE,
            max_age=n.jobs_max_age_s,
            **common,
        ),
        api.StreamConfig(
            name=s.PARKED_STREAM,
            subjects=list(s.PARKED_SUBJECTS),
            retention=api.RetentionPolicy.WORK_QUEUE,
            max_age=n.parked_max_age_s,
            **common,
        ),
        api.StreamConfig(
            name=s.RESULTS_STREAM,
            subjects=list(s.RESULTS_SUBJECTS),
            retention=api.RetentionPolicy.LIMITS,
            max_msgs_per_subject=1,
            max_age=n.results_max_age_s,
            **common | {"discard": api.DiscardPolicy.OLD},
        ),
        api.StreamConfig(
            name=s.DEAD_STREAM,
            subjects=list(s.DEAD_SUBJECTS),
            retention=api.RetentionPolicy.LIMITS,
            max_age=n.dead_max_age_s,
            **common | {"discard": api.DiscardPolicy.OLD},
        ),
        api.StreamConfig(
            name=s.EVENTS_STREAM,
            subjects=list(s.EVENTS_SUBJECTS),
            retention=api.RetentionPolicy.LIMITS,
            max_age=n.events_max_age_s,
            **common | {"discard": api.DiscardPolicy.OLD},
        ),
    ]


def _durable(
    name: str, filters: tuple[str, ...], ack_wait: float, max_pending: int
) -> api.ConsumerConfig:
    """A durable pull consumer on ``filters``, settled explicitly."""
    one = len(filters) == 1
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=filters[0] if one else None,
        filter_subjects=None if one else list(filters),
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=ack_wait,
        # Unlimited: the worker dead-letters after max_attempts itself. A
        # server-side limit would leave the message stuck in the work queue.
        max_deliver=-1,
        max_ack_pending=max_pending,
        num_replicas=0,  # inherit the stream's
    )


def worker_consumer_config(settings: Settings, provider: str, priority: str) -> api.ConsumerConfig:
    """The workers' durable consumer of ``provider`` for ``priority`` (both job forms)."""
    w = settings.worker
    filters = s.jobs_priority_filters(provider, priority)
    return _durable(s.worker_consumer(provider, priority), filters, w.ack_wait_s, w.max_ack_pending)


def consumer_configs(settings: Settings) -> list[tuple[str, api.ConsumerConfig]]:
    """(stream, config) of every durable consumer made up front: per provider and
    priority, the workers' one; the notifier's on AI_EVENTS. The replayer's, one per
    priority and model, are made when a model has parked jobs (``replayer_consumer_config``)."""
    return [
        (s.JOBS_STREAM, worker_consumer_config(settings, p, prio))
        for p in sorted(settings.providers)
        for prio in s.PRIORITIES
    ] + [(s.EVENTS_STREAM, notifier_consumer_config(settings))]


#: Most events the notifier holds unacknowledged at once (its consumer's max_ack_pending).
NOTIFIER_MAX_PENDING = 256


def notifier_consumer_config(settings: Settings) -> api.ConsumerConfig:
    """The notifier's durable consumer: health events and the audit log (the notifier
    keeps each subject's in order), from its creation on (not the 30 days of events already
    stored: a first start would page for old outages)."""
    n = settings.notify
    cfg = _durable(s.NOTIFIER_CONSUMER, s.NOTIFIER_FILTERS, n.ack_wait_s, NOTIFIER_MAX_PENDING)
    cfg.deliver_policy = api.DeliverPolicy.NEW
    return cfg


async def _retire_legacy_consumers(
    js: JetStreamContext, settings: Settings, report: TopologyReport
) -> None:
    """Delete each provider's one workers' consumer of the previous release
    (``workers-<provider>``): a work-queue stream refuses the per-priority ones while a
    consumer with an overlapping filter exists. The jobs it held, delivered or not, stay in
    AI_JOBS (a work queue deletes a message when it is acked, not when its consumer goes)
    and reach the new consumers from the start; a job an old worker was still running is
    delivered again, and its result check keeps it from a second result."""
    for p in sorted(settings.providers):
        name = s.legacy_worker_consumer(p)
        try:
            await js.delete_consumer(s.JOBS_STREAM, name)
        except NotFoundError:
            continue
        report.removed.append(f"{s.JOBS_STREAM}/{name}")


def replayer_consumer_config(
    settings: Settings, provider: str, priority: str, model: str | None
) -> api.ConsumerConfig:
    """The replayer's consumer of one priority of one model's parked jobs. It removes
    itself after ``parked_max_age_s`` unused: by then every job it held has aged out."""
    cfg = _durable(
        s.replayer_consumer(provider, priority, model),
        (s.parked_subject(provider, priority, model),),
        settings.replay.ack_wait_s,
        settings.worker.max_ack_pending,
    )
    cfg.inactive_threshold = settings.nats.parked_max_age_s
    return cfg


def bucket_configs(settings: Settings) -> list[tuple[str, int, float | None]]:
    """(bucket, history, TTL) of every key-value bucket. Worker heartbeats expire
    ``worker_ttl_s`` after their last write, so a dead worker drops off by itself."""
    return [
        (s.HEALTH_BUCKET, 16, None),
        (s.CONTROL_BUCKET, 8, None),
        (s.WORKERS_BUCKET, 1, settings.nats.worker_ttl_s),
        # A location outlives neither what it points at.
        (s.LOCATOR_BUCKET, 1, max(settings.nats.parked_max_age_s, settings.nats.dead_max_age_s)),
    ]


def _differs(wanted: dict[str, Any], have: dict[str, Any]) -> bool:
    return any(have.get(k) != v for k, v in wanted.items())


async def _ensure_stream(
    js: JetStreamContext, cfg: api.StreamConfig, report: TopologyReport
) -> None:
    assert cfg.name is not None
    try:
        info = await js.stream_info(cfg.name)
    except NotFoundError:
        await js.add_stream(cfg)
        report.created.append(cfg.name)
        return
    wanted = cfg.as_dict()
    if _differs(wanted, info.config.as_dict()):
        await js.update_stream(cfg)
        report.updated.append(cfg.name)
    else:
        report.unchanged.append(cfg.name)


async def _ensure_consumer(
    js: JetStreamContext, stream: str, cfg: api.ConsumerConfig, report: TopologyReport
) -> None:
    assert cfg.durable_name is not None
    label = f"{stream}/{cfg.durable_name}"
    try:
        info = await js.consumer_info(stream, cfg.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, cfg)
        report.created.append(label)
        return
    wanted = cfg.as_dict()
    wanted.pop("num_replicas", None)  # 0 means "the stream's"; the server reports the number
    if _differs(wanted, info.config.as_dict()):
        await js.add_consumer(stream, cfg)  # create-or-update
        report.updated.append(label)
    else:
        report.unchanged.append(label)


async def _ensure_bucket(
    js: JetStreamContext,
    bucket: str,
    history: int,
    ttl: float | None,
    settings: Settings,
    report: TopologyReport,
) -> None:
    stream = f"KV_{bucket}"
    # The index is read by direct get (``services/lifecycle/locator.py``).
    direct = bucket == s.LOCATOR_BUCKET
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await js.create_key_value(
            bucket=bucket,
            history=history,
            ttl=ttl,
            replicas=settings.nats.replicas,
            storage=_storage(settings),
            direct=direct,
        )
        report.created.append(bucket)
        return
    wanted: dict[str, Any] = {
        "max_msgs_per_subject": history,
        "num_replicas": settings.nats.replicas,
        "max_age": ttl or 0.0,
    }
    if direct:
        wanted["allow_direct"] = True
    await _update_backing_stream(js, info.config, wanted, bucket, report)


async def _update_backing_stream(
    js: JetStreamContext,
    have: api.StreamConfig,
    wanted: dict[str, Any],
    name: str,
    report: TopologyReport,
) -> None:
    """Bring a bucket's stream to ``wanted`` (field: value) where it differs."""
    if any((getattr(have, k) or 0) != (v or 0) for k, v in wanted.items()):
        for k, v in wanted.items():
            setattr(have, k, v)
        await js.update_stream(have)
        report.updated.append(name)
    else:
        report.unchanged.append(name)


async def _ensure_object_store(
    js: JetStreamContext, settings: Settings, report: TopologyReport
) -> None:
    bucket = s.OVERFLOW_BUCKET
    stream = f"OBJ_{bucket}"
    max_age = settings.nats.dead_max_age_s
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        await js.create_object_store(
            bucket,
            api.ObjectStoreConfig(
                ttl=max_age, replicas=settings.nats.replicas, storage=_storage(settings)
            ),
        )
        report.created.append(bucket)
        return
    wanted = {"num_replicas": settings.nats.replicas, "max_age": max_age}
    await _update_backing_stream(js, info.config, wanted, bucket, report)


def bodies_config(settings: Settings) -> api.StreamConfig:
    """The stream of the ``ai_bodies`` object store (``services/bodies.py``): the object
    store's layout, with rollups refused (a producer's ``Nats-Rollup: all`` on a chunk
    would purge every body) and bodies left behind removed after ``bodies.max_age_s``."""
    bucket = s.BODIES_BUCKET
    return api.StreamConfig(
        name=f"OBJ_{bucket}",
        description="request bodies of large jobs",
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        max_age=settings.bodies.max_age_s,
        max_bytes=settings.bodies.bucket_max_bytes,
        storage=_storage(settings),
        num_replicas=settings.nats.replicas,
        discard=api.DiscardPolicy.NEW,
        allow_rollup_hdrs=False,
        allow_direct=True,
        duplicate_window=120.0,  # the server's default, said so that a rerun changes nothing
    )


async def legacy_jobs_seq(js: JetStreamContext) -> int:
    """The last AI_JOBS sequence stored under the old trust rules (0: none, or unknown)."""
    kv = await js.key_value(s.CONTROL_BUCKET)
    try:
        entry = await kv.get(s.LEGACY_JOBS_KEY)
    except NotFoundError:  # KeyNotFoundError is one
        return 0
    try:
        return int(entry.value or b"0")
    except ValueError:
        return 0


async def _record_legacy_jobs(js: JetStreamContext, report: TopologyReport) -> None:
    """Once: remember the last job stored before the trusted-subject layout (see
    ``schemas.subjects``). Jobs up to it keep the old rules (the tenant and the replay mark
    read from the job), so an upgrade loses none of them."""
    kv = await js.key_value(s.CONTROL_BUCKET)
    last = (await js.stream_info(s.JOBS_STREAM)).state.last_seq or 0
    try:
        await kv.create(s.LEGACY_JOBS_KEY, str(last).encode())
    except APIError:  # written by an earlier run: keep the first watermark
        return
    report.updated.append(f"{s.CONTROL_BUCKET}/{s.LEGACY_JOBS_KEY}={last}")


async def migrate_results(js: JetStreamContext) -> int:
    """Move results stored under the old layout (``ai.results.<job_id>``,
    ``ai.results.<tenant>.<job_id>``) to their scoped subjects; how many moved.

    Each is written to its new subject only if none is there (a conditional publish, so a
    rerun after an interruption writes nothing twice), then deleted from the old one.
    """
    from schemas.results import decode_result
    from services.jetstream.streams import delete, iter_stream, publish_if_last

    moved = 0
    for pattern in (s.legacy_result_subject("*"), s.legacy_result_subject("*", "*")):
        async for msg in iter_stream(js, s.RESULTS_STREAM, pattern):
            subject = msg.subject or ""
            tokens = subject.split(".")
            try:
                tenant = decode_result(msg.data or b"").tenant or None
            except Exception:  # not a result at all: leave it where it is
                continue
            if len(tokens) == 4 and tokens[2] == "shared" and tenant is None:
                continue  # already the new layout
            job_id = tokens[-1]
            target = s.result_subject(job_id, tenant)
            if target == subject:
                continue
            # A result already there wins (the conditional write is refused): the old
            # copy goes either way.
            await publish_if_last(js, target, msg.data or b"", 0)
            await delete(js, s.RESULTS_STREAM, msg.seq)
            moved += 1
    return moved


def misplaced_parked(subject: str) -> bool:
    """Whether ``subject`` of AI_PARKED is one the replayer does not read: the legacy layout
    (``ai.parked.<provider>.<priority>``), or a model token ``model_token`` never writes
    (published by hand or by a buggy client). ``migrate_parked`` moves such jobs."""
    place = s.parked_place(subject)
    return place is None or place.legacy


async def migrate_parked(js: JetStreamContext, provider: str | None = None) -> int:
    """Move jobs parked where the replayer does not read (``misplaced_parked``: the legacy
    layout, or a token no model has) to the per-model layout; how many moved.
    ``ridethrough topology`` runs it (run it again once the last worker of the last release
    is gone: the replayer warns of what is misplaced).

    Each is published as it is (its bytes unchanged) on the subject of its job's priority
    and model, under a msg id of its old sequence, then deleted: a rerun after an
    interruption stores nothing twice. A message that is not a parked job moves under the
    ``_`` model token of its subject's priority (``normal`` if that is none), where the
    replayer dead-letters it. Only the misplaced subjects are read, not the whole stream.
    """
    from schemas.parking import decode_parked
    from services.jetstream.streams import delete, iter_stream, publish, subject_counts
    from services.lifecycle.locator import record

    moved = 0
    counts = await subject_counts(js, s.PARKED_STREAM, s.parked_filter(provider))
    for subject in sorted(k for k in counts if misplaced_parked(k)):
        tokens = subject.split(".")
        async for msg in iter_stream(js, s.PARKED_STREAM, subject):
            priority = tokens[3] if tokens[3] in s.PRIORITIES else "normal"
            model: str | None = None
            job = None
            try:
                job = decode_parked(msg.data or b"").job
                priority, model = job.priority, job.model
            except Exception:  # not a parked job: the replayer dead-letters it
                pass
            target = s.parked_subject(tokens[2], priority, model)
            seq = int(msg.seq or 0)
            data = msg.data or b""
            stored = await publish(js, target, data, msg_id=s.park_msg_id(s.PARKED_STREAM, seq))
            if job is not None:
                await record(js, job.id, job.tenant, s.PARKED_STREAM, stored)
            await delete(js, s.PARKED_STREAM, seq)
            moved += 1
    return moved


async def _drop_legacy_replayers(
    js: JetStreamContext, settings: Settings, report: TopologyReport
) -> None:
    """Delete the replayer consumers of the legacy parked layout (their jobs have moved)."""
    for p in sorted(settings.providers):
        for prio in s.PRIORITIES:
            name = s.legacy_replayer_consumer(p, prio)
            try:
                await js.delete_consumer(s.PARKED_STREAM, name)
            except NotFoundError:
                continue
            report.updated.append(f"{s.PARKED_STREAM}/{name}: deleted (legacy layout)")


async def ensure_topology(js: JetStreamContext, settings: Settings) -> TopologyReport:
    """Create or update every stream, consumer and bucket; report what changed."""
    report = TopologyReport()
    try:
        for cfg in stream_configs(settings):
            await _ensure_stream(js, cfg, report)
        await _retire_legacy_consumers(js, settings, report)
        for stream, ccfg in consumer_configs(settings):
            await _ensure_consumer(js, stream, ccfg, report)
        for bucket, history, ttl in bucket_configs(settings):
            await _ensure_bucket(js, bucket, history, ttl, settings, report)
        indexing = s.LOCATOR_BUCKET in report.created
        await _ensure_object_store(js, settings, report)
        await _ensure_stream(js, bodies_config(settings), report)
        await _record_legacy_jobs(js, report)
        if moved := await migrate_results(js):
            report.updated.append(f"{s.RESULTS_STREAM}: {moved} results moved to scoped subjects")
        if moved := await migrate_parked(js):
            report.updated.append(
                f"{s.PARKED_STREAM}: {moved} parked jobs moved to per-model subjects"
            )
        await _drop_legacy_replayers(js, settings, report)
        if indexing:  # a new index learns what is already parked and dead
            from services.lifecycle.locator import backfill

            if written := await backfill(js):
                report.updated.append(f"{s.LOCATOR_BUCKET}: {written} jobs indexed")
    except APIError as exc:
        raise TopologyError(f"cannot apply the JetStream topology: {exc}") from exc
    return report
