"""Submit jobs to ``AI_JOBS`` and wait for their results on ``AI_RESULTS``.

``submit`` returns only after JetStream's PubAck: once it returns, the job is
stored and will end in exactly one result or dead letter. The idempotency key
fixes the job id, and the job id (scoped by the tenant) travels as ``Nats-Msg-Id``,
so a re-submit with the same key returns the same job id and creates no second job.
A job of a tenant is published on its tenant's subject and its result read there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgspec
from nats.aio.client import Client

from schemas.codec import encode
from schemas.jobs import Job, decode_job, new_job_id
from schemas.results import JobResult, decode_result
from schemas.subjects import (
    MSG_ID_HEADER,
    RESULTS_STREAM,
    is_token,
    job_msg_id,
    jobs_subject,
    result_subject,
)
from services import tracing
from services.bodies import body_name, chunk_size, put_body, request_bytes
from services.config import BodySettings, Settings
from services.errors import (
    ConfigError,
    InvalidJob,
    JobRejected,
    NatsUnavailable,
    PayloadTooLarge,
    ResultTimeout,
    RidethroughError,
    UnknownProvider,
)
from services.jetstream.connection import connect
from services.jetstream.errors import (
    NO_RESPONDERS,
    NOT_FOUND,
    TIMEOUT,
    TOO_LARGE,
    APIError,
)
from services.jetstream.pubacks import pubacks
from services.jetstream.streams import last_msg
from services.overflow import HEADROOM

#: First pause before publishing again to a stream without a leader (doubling to 0.5 s).
_LEADERLESS_RETRY_S = 0.05
#: How often result() looks at the stream again while it waits.
_RECHECK_S = 1.0

#: Async publishes awaiting their PubAck before ``submit_many`` waits for room
#: (nats-py's default).
_MAX_PENDING = 4000

_KEY_NAMESPACE = uuid.UUID("6f1d3a52-7c1e-4f0e-9a57-2d6b7f1c9e10")


def job_id_for_key(key: str) -> str:
    """The job id an idempotency key stands for: the key itself when it is a safe
    subject token, else a UUID derived from it (same key, same id, always)."""
    if not key:
        raise InvalidJob("the idempotency key must not be empty")
    return key if is_token(key) else uuid.uuid5(_KEY_NAMESPACE, key).hex


def make_job(
    provider: str,
    model: str,
    *,
    prompt: str | None = None,
    request: Mapping[str, Any] | None = None,
    max_tokens: int = 1024,
    **fields: Any,
) -> Job:
    """Build a job from a prompt (a one-message request) or a provider-native request body.

    Extra ``fields`` (priority, deadline, on_outage, fallbacks, metadata, id) go to ``Job``.
    """
    if (prompt is None) == (request is None):
        raise InvalidJob("give exactly one of `prompt` or `request`")
    body = (
        dict(request)
        if request is not None
        else {
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
    )
    fields.setdefault("id", new_job_id())
    return validate_job({"provider": provider, "model": model, "request": body, **fields})


def prompt_request(
    settings: Settings,
    provider: str,
    prompt: str,
    *,
    max_tokens: int = 1024,
    system: str | None = None,
    stream: bool = False,
) -> dict[str, object]:
    """A one-message request body for ``provider``: ``system`` goes where that provider's
    API wants it (a system message for an OpenAI-kind provider, else the ``system``
    field), and ``stream`` asks the provider to stream (the result holds the whole message).
    """
    messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    request: dict[str, object] = {"max_tokens": max_tokens, "messages": messages}
    if system:
        known = settings.providers.get(provider)
        if known and known.kind == "openai":
            messages.insert(0, {"role": "system", "content": system})
        else:
            request["system"] = system
    if stream:
        request["stream"] = True
    return request


def validate_job(job: Job | Mapping[str, Any]) -> Job:
    """Check a job against the schema; ``InvalidJob`` names the offending field."""
    try:
        if isinstance(job, Job):
            return decode_job(encode(job))  # msgspec checks types on decode, not on __init__
        return msgspec.convert(dict(job), Job, str_keys=True)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise InvalidJob(f"invalid job: {exc}") from exc


class SubmitOutcome(msgspec.Struct, frozen=True):
    """Per-job outcome of ``submit_many``: the job id, and the error if it was not accepted."""

    job_id: str
    error: RidethroughError | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        """Whether JetStream stored (or had already stored) the job."""
        return self.error is None


def _no_responders(exc: BaseException | None) -> bool:
    """JetStream's "no responders": no stream listens on the subject, or the stream that
    does has no leader for a moment (an election in a cluster)."""
    return isinstance(exc, NO_RESPONDERS)


def _translate_publish_error(exc: BaseException, job: Job) -> RidethroughError:
    return _publish_error(exc, job.id, job.provider, _subject(job))


def _subject(job: Job) -> str:
    """A producer's job goes to its tenant's subject (which that tenant's user may publish
    to, and nobody else's), or to the shared one."""
    return jobs_subject(job.provider, job.priority, job.tenant)


def _publish_error(
    exc: BaseException, job_id: str, provider: str, subject: str
) -> RidethroughError:
    if _no_responders(exc):
        return UnknownProvider(
            f"no stream accepts {subject}: provider {provider!r} is not configured "
            "(or the topology was never created: run `ridethrough topology`)"
        )
    if isinstance(exc, TOO_LARGE):
        return JobRejected(f"job refused by the server: {exc}")
    if isinstance(exc, APIError):
        return JobRejected(f"JetStream refused the job on {subject}: {exc}")
    if isinstance(exc, TIMEOUT):
        return NatsUnavailable(f"no PubAck for job {job_id} on {subject}: NATS did not answer")
    return NatsUnavailable(f"cannot publish job {job_id}: {exc or type(exc).__name__}")


class Producer:
    """Submits jobs and reads results over one NATS connection."""

    def __init__(
        self,
        nc: Client,
        *,
        ack_timeout_s: float = 5.0,
        own_connection: bool = False,
        tenant: str | None = None,
        bodies: BodySettings | None = None,
    ):
        if tenant is not None and not is_token(tenant):
            raise ConfigError(f"tenant {tenant!r} is not a subject token (A-Z a-z 0-9 _ -)")
        self.nc = nc
        #: Every job this producer submits is this tenant's, and its results are
        #: looked up on ``ai.results.<tenant>.<job_id>``.
        self.tenant = tenant
        self.js = nc.jetstream(publish_async_max_pending=_MAX_PENDING)
        self.ack_timeout_s = ack_timeout_s
        self._own = own_connection
        #: Large jobs: over ``threshold_bytes`` the body goes to ``ai_bodies`` by reference.
        self.bodies = bodies or BodySettings()
        #: Traces of submits: this process's tracing, or the application's own SDK (None:
        #: off, and free).
        self._tracing = tracing.for_library()

    @classmethod
    async def connect(cls, settings: Settings, **kwargs: Any) -> Producer:
        """Connect to NATS with ``settings`` and return a producer owning that connection
        (for ``settings.tenant`` unless ``tenant=`` says otherwise)."""
        kwargs.setdefault("tenant", settings.tenant)
        kwargs.setdefault("bodies", settings.bodies)
        nc = await connect(settings, name="ridethrough-producer")
        return cls(nc, own_connection=True, **kwargs)

    async def close(self) -> None:
        """Close the connection if this producer opened it."""
        if self._own and not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _prepare(
        self,
        job: Job | Mapping[str, Any],
        key: str | None,
        spans: list[Any] | None = None,
    ) -> tuple[Job, bytes, str]:
        if isinstance(job, Job) and key is None:
            # Checked by decoding its encoding (as validate_job does); send those bytes
            # rather than encoding the decoded copy again, which gives the same bytes.
            try:
                data = encode(job)
                checked = decode_job(data)
            except (msgspec.ValidationError, TypeError, ValueError) as exc:
                raise InvalidJob(f"invalid job: {exc}") from exc
        else:
            checked = validate_job(job)
            if key is not None:
                checked = msgspec.structs.replace(checked, id=job_id_for_key(key))
            data = encode(checked)
        if self.tenant is not None and checked.tenant != self.tenant:
            if checked.tenant is not None:
                raise InvalidJob(
                    f"job {checked.id} is for tenant {checked.tenant!r}; "
                    f"this producer submits for {self.tenant!r}"
                )
            checked = msgspec.structs.replace(checked, tenant=self.tenant)
            data = encode(checked)
        if spans is not None and (t := self._tracing) is not None:
            # The submit's span: its context travels in the job (parking, replay and
            # fail-over keep it) and in the message's headers (``_headers``).
            span = t.submit(checked, _subject(checked))
            spans.append(span)
            checked = msgspec.structs.replace(checked, trace=t.carrier(span))
            data = encode(checked)
        # Room is left under max_payload for what a job becomes: a park record or a dead
        # letter with the job inside must fit in one message too (services/overflow.py).
        # A job over that (or over the threshold) goes by reference (services/bodies.py);
        # one that already does and is still too large is refused.
        if checked.request_ref is not None and checked.request:
            raise InvalidJob(f"job {checked.id}: a job with request_ref has an empty request")
        limit = self.nc.max_payload
        if checked.request_ref is not None and limit and len(data) > limit - HEADROOM:
            raise PayloadTooLarge(len(data), limit - HEADROOM)
        # The key already fixed the job id; the msg id is that id in the tenant's scope, so
        # that every copy of one job carries the same msg id (the worker checks it).
        return checked, data, job_msg_id(checked.id, checked.tenant)

    def _inline_limit(self) -> int:
        """The largest job sent whole: the threshold, and room for a park record under the
        server's max_payload."""
        limit = self.nc.max_payload
        room = limit - HEADROOM if limit else self.bodies.threshold_bytes
        return min(self.bodies.threshold_bytes, room)

    async def _by_reference(self, job: Job, data: bytes) -> tuple[Job, bytes]:
        """A job too large to go whole: its body stored in ``ai_bodies`` first, the job
        (with ``request_ref``, an empty ``request``) after; (job, its bytes)."""
        if len(data) <= self._inline_limit() or job.request_ref is not None:
            return job, data
        body = request_bytes(job)
        if len(body) > self.bodies.max_bytes:
            raise PayloadTooLarge(
                len(body), self.bodies.max_bytes, "(bodies.max_bytes: the Messages API's limit)"
            )
        try:
            ref = await put_body(
                self.js,
                body_name(job.id, job.tenant),
                body,
                chunk=chunk_size(self.nc.max_payload),
                timeout=self.ack_timeout_s,
            )
        except RidethroughError:
            raise
        except TOO_LARGE as exc:
            raise JobRejected(f"job {job.id}: a chunk of its body was refused: {exc}") from exc
        except Exception as exc:
            raise NatsUnavailable(
                f"job {job.id}: its body could not be stored: {exc or type(exc).__name__}"
            ) from exc
        del body
        light = msgspec.structs.replace(job, request={}, request_ref=ref)
        return light, encode(light)

    def _check_connected(self) -> None:
        if not self.nc.is_connected:
            raise NatsUnavailable("not connected to NATS")

    async def submit(
        self, job: Job | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> str:
        """Publish one job and return its id once JetStream has stored it.

        Raises ``InvalidJob``, ``PayloadTooLarge``, ``UnknownProvider`` or ``NatsUnavailable``.
        """
        spans: list[Any] | None = None if self._tracing is None else []
        try:
            checked, data, msg_id = self._prepare(job, idempotency_key, spans)
        except Exception:
            for span in spans or ():
                span.end()
            raise
        if not spans:
            return await self._submit(checked, data, msg_id, {MSG_ID_HEADER: msg_id})
        with _ending(spans[0]):
            return await self._submit(checked, data, msg_id, _headers(checked, msg_id))

    async def _submit(self, checked: Job, data: bytes, msg_id: str, headers: dict[str, str]) -> str:
        self._check_connected()
        checked, data = await self._by_reference(checked, data)
        subject = _subject(checked)
        deadline = time.monotonic() + self.ack_timeout_s
        delay = _LEADERLESS_RETRY_S
        stream_known = False
        while True:
            try:
                await self.js.publish(subject, data, timeout=self.ack_timeout_s, headers=headers)
                return checked.id
            except Exception as exc:
                if not _no_responders(exc):
                    raise _translate_publish_error(exc, checked) from exc
                if not stream_known:
                    if not await self._stream_listens(subject, deadline):
                        raise _translate_publish_error(exc, checked) from exc
                    stream_known = True
                # The stream is there without a leader: wait for the election, publishing
                # again under the same msg id (a copy stored meanwhile is dropped).
                if time.monotonic() + delay > deadline:
                    raise NatsUnavailable(
                        f"the stream for {subject} has had no leader for "
                        f"{self.ack_timeout_s:g}s (a NATS node lost?); job {checked.id} was "
                        "not accepted: submit it again with the same idempotency key"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _stream_listens(self, subject: str, deadline: float) -> bool:
        """Whether a stream listens on ``subject`` (after a "no responders"). When
        JetStream cannot say in time (its own leader being elected too), assume one does:
        the caller then reports NATS unavailable rather than an unknown provider."""
        try:
            left = max(deadline - time.monotonic(), 0.1)
            await asyncio.wait_for(self.js.find_stream_name_by_subject(subject), min(left, 1.0))
        except NOT_FOUND:
            return False
        except Exception:  # timeouts, a refused request: cannot say
            return True
        return True

    async def submit_many(
        self,
        jobs: Iterable[Job | Mapping[str, Any]],
        *,
        idempotency_keys: Iterable[str | None] | None = None,
    ) -> list[SubmitOutcome]:
        """Publish many jobs with pipelined (async) acks; one outcome per job, in order.

        A job that fails validation or publishing gets its error in its outcome;
        the others are still submitted.
        """
        jobs = list(jobs)
        keys: list[str | None] = (
            list(idempotency_keys) if idempotency_keys is not None else [None] * len(jobs)
        )
        if len(keys) != len(jobs):
            raise InvalidJob("idempotency_keys must have one entry per job")
        self._check_connected()
        outcomes: list[SubmitOutcome | None] = [None] * len(jobs)
        spans: list[Any] | None = None if self._tracing is None else []
        try:
            return await self._submit_many(jobs, keys, outcomes, spans)
        finally:
            for span in spans or ():
                span.end()

    async def _submit_many(
        self,
        jobs: list[Job | Mapping[str, Any]],
        keys: list[str | None],
        outcomes: list[SubmitOutcome | None],
        spans: list[Any] | None,
    ) -> list[SubmitOutcome]:
        # Jobs awaiting their PubAck, as parallel lists of plain values: thousands of
        # live Jobs (or tuples) made the garbage collector rescan them over and over
        # (measured: a quarter of the throughput).
        sent: list[int] = []
        futures: list[asyncio.Future[Any]] = []
        # The PubAcks come back on one shared inbox (``services/jetstream/pubacks.py``):
        # nats-py's ``publish_async`` draws random bytes for each message's reply subject
        # and takes a semaphore (measured: a fifth of submit_many's samples).
        acks = pubacks(self.nc)
        ids: list[str] = []
        providers: list[str] = []
        subjects: list[str] = []
        for i, (job, key) in enumerate(zip(jobs, keys, strict=True)):
            try:
                checked, data, msg_id = self._prepare(job, key, spans)
                checked, data = await self._by_reference(checked, data)
            except RidethroughError as exc:
                outcomes[i] = SubmitOutcome(job_id=_job_id_of(job, key), error=exc)
                continue
            headers = _headers(checked, msg_id) if spans else {MSG_ID_HEADER: msg_id}
            subject = _subject(checked)
            try:
                fut = await acks.send(subject, data, headers, self.ack_timeout_s)
            except Exception as exc:
                outcomes[i] = SubmitOutcome(checked.id, _translate_publish_error(exc, checked))
                continue
            sent.append(i)
            futures.append(fut)
            ids.append(checked.id)
            providers.append(checked.provider)
            subjects.append(subject)
        if futures:
            _, late = await asyncio.wait(futures, timeout=self.ack_timeout_s)
            for fut in late:
                fut.cancel()
            if late:
                acks.forget()
        for i, fut, job_id, provider, subject in zip(
            sent, futures, ids, providers, subjects, strict=True
        ):
            if fut.cancelled():
                outcomes[i] = SubmitOutcome(
                    job_id, _publish_error(TimeoutError(), job_id, provider, subject)
                )
            elif (failure := fut.exception()) is not None:
                outcomes[i] = SubmitOutcome(
                    job_id, _publish_error(failure, job_id, provider, subject)
                )
            else:
                outcomes[i] = SubmitOutcome(job_id, duplicate=bool(fut.result().duplicate))
        leaderless = [
            (i, job_id, subject)
            for i, fut, job_id, subject in zip(sent, futures, ids, subjects, strict=True)
            if fut.done() and not fut.cancelled() and _no_responders(fut.exception())
        ]
        if leaderless:
            await self._submit_again(jobs, keys, leaderless, outcomes)
        return [o for o in outcomes if o is not None]

    async def _submit_again(
        self,
        jobs: list[Job | Mapping[str, Any]],
        keys: list[str | None],
        refused: list[tuple[int, str, str]],
        outcomes: list[SubmitOutcome | None],
    ) -> None:
        """Jobs refused with "no responders" (index, id, subject) go one by one through
        ``submit``, which tells an unknown provider from a stream between leaders and
        waits for the latter; once one job of a subject fails, the rest fail alike."""
        failed: dict[str, RidethroughError] = {}
        for i, job_id, subject in refused:
            if subject in failed:
                outcomes[i] = SubmitOutcome(job_id, failed[subject])
                continue
            try:
                outcomes[i] = SubmitOutcome(await self.submit(jobs[i], idempotency_key=keys[i]))
            except RidethroughError as exc:
                failed[subject] = exc
                outcomes[i] = SubmitOutcome(job_id, exc)

    async def result(self, job_id: str, timeout: float | None = 30.0) -> JobResult:
        """The result of ``job_id``: one stored before the call, or the one that arrives
        within ``timeout`` seconds (``None`` waits forever). Raises ``ResultTimeout``."""
        if not is_token(job_id):
            raise InvalidJob(f"`job_id` {job_id!r} is not a valid job id")
        self._check_connected()
        subject = result_subject(job_id, self.tenant)
        # Subscribe before looking, so a result published in between is not missed.
        # The stream stores a message a moment after routing it to subscribers, so a
        # result can slip between the two; looking again now and then closes that gap.
        sub = await self.nc.subscribe(subject)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                stored = await self.peek_result(job_id)
                if stored is not None:
                    return stored
                wait = (
                    _RECHECK_S if deadline is None else min(_RECHECK_S, deadline - time.monotonic())
                )
                if wait <= 0:
                    raise ResultTimeout(f"no result for job {job_id} within {timeout}s")
                try:
                    await sub.next_msg(timeout=wait)
                except TIMEOUT:
                    continue
                # Only the stream's copy counts: a result the stream refused (a second
                # copy's, after the first was stored) still reaches subscribers.
                stored = await self._stored_soon(job_id)
                if stored is not None:
                    return stored
        finally:
            if not self.nc.is_closed:
                await sub.unsubscribe()

    async def _stored_soon(self, job_id: str) -> JobResult | None:
        """The stored result of ``job_id``, looked for a few times over ~0.3 s (a result
        reaches subscribers a moment before the stream has stored it)."""
        for pause in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.1):
            await asyncio.sleep(pause)
            stored = await self.peek_result(job_id)
            if stored is not None:
                return stored
        return None

    async def peek_result(self, job_id: str) -> JobResult | None:
        """The stored result of ``job_id``, or ``None`` if there is none yet."""
        if not is_token(job_id):  # `>` or `*` would read another job's result
            raise InvalidJob(f"`job_id` {job_id!r} is not a valid job id")
        try:
            found = await last_msg(self.js, RESULTS_STREAM, result_subject(job_id, self.tenant))
        except TIMEOUT as exc:
            raise NatsUnavailable("NATS did not answer a result lookup") from exc
        return decode_result(found[1]) if found is not None else None

    async def results(
        self, job_ids: Iterable[str], timeout: float | None = 30.0, *, concurrency: int = 256
    ) -> dict[str, JobResult]:
        """Results of many jobs; raises ``ResultTimeout`` if any is missing after ``timeout``."""
        sem = asyncio.Semaphore(concurrency)

        async def one(jid: str) -> tuple[str, JobResult]:
            async with sem:
                return jid, await self.result(jid, timeout)

        return dict(await asyncio.gather(*(one(j) for j in job_ids)))


def _headers(job: Job, msg_id: str) -> dict[str, str]:
    """A traced job's headers: its msg id and its submit's trace context."""
    return {MSG_ID_HEADER: msg_id, **job.trace}


@contextlib.contextmanager
def _ending(span: Any) -> Iterator[None]:
    """End ``span`` when the block ends, marked as an error if it raised."""
    try:
        yield
    except Exception as exc:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()


def _job_id_of(job: Job | Mapping[str, Any], key: str | None) -> str:
    if key:
        try:
            return job_id_for_key(key)
        except InvalidJob:
            return ""
    value = job.id if isinstance(job, Job) else job.get("id", "")
    return value if isinstance(value, str) else ""
