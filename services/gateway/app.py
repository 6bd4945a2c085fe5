"""The gateway's HTTP app: ``POST /v1/messages`` and ``GET /v1/jobs/{id}`` over one NATS
connection, and the loop that serves it (``ridethrough gateway``).

Each request is authenticated to a tenant (``keys.KeyRing``), becomes that tenant's job
through a ``Producer`` for that tenant (its subject, its msg-id scope, its results), and
waits for its result; the contract is in ``services/gateway/__init__.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client

from schemas.jobs import Job, new_job_id
from schemas.results import JobResult
from schemas.subjects import is_token
from services.config import ANTHROPIC_SHAPE, Settings
from services.errors import (
    ConfigError,
    InvalidJob,
    JobRejected,
    NatsUnavailable,
    PayloadTooLarge,
    ResultTimeout,
    UnknownProvider,
)
from services.gateway import openai_wire, sse
from services.gateway import status as status_page
from services.gateway.anthropic_wire import (
    BadRequest,
    ParsedRequest,
    error_body,
    failure,
    parse_messages_request,
)
from services.gateway.keys import KeyRing
from services.gateway.results import Expected, ResultWaiter
from services.jetstream.errors import NATS_UNAVAILABLE
from services.producer import Producer, job_id_for_key, make_job

log = logging.getLogger("ridethrough.gateway")

#: The job a request became (on every answer of /v1/messages); sent back, it picks that
#: job up again.
JOB_ID_HEADER = "x-ridethrough-job-id"
#: The caller's idempotency key: the same key (per tenant) is the same job.
IDEMPOTENCY_HEADER = "idempotency-key"
#: Seconds the caller lets a request wait for its result (capped by ``max_wait_s``).
WAIT_HEADER = "x-ridethrough-wait-s"
#: The Stainless SDKs' own timeouts (Python's read timeout, TypeScript's whole-request
#: timeout): the gateway answers before the client gives up.
SDK_TIMEOUT_HEADERS = ("x-stainless-read-timeout", "x-stainless-timeout")
#: Seconds kept between the gateway's answer and the client's read timeout.
_TIMEOUT_MARGIN_S = 1.0

_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Door:
    """One provider API the gateway speaks: its requests, its error shape, how a failed
    job answers, the status of a request whose wait ran out, and its stream format."""

    path: str
    parse: Callable[[bytes], ParsedRequest]
    error_body: Callable[[int, str, str | None], bytes]
    failure: Callable[[JobResult], tuple[int, bytes]]
    waiting_status: int
    stream: Callable[[dict[str, Any], ParsedRequest], bytes]

    def error(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        return web.Response(
            status=status,
            body=self.error_body(status, message, error_type),
            content_type=_JSON,
            headers=headers,
        )


ANTHROPIC = Door(
    path="/v1/messages",
    parse=parse_messages_request,
    error_body=error_body,
    failure=failure,
    waiting_status=529,  # overloaded_error: the SDK retries it after retry-after
    stream=lambda message, _parsed: sse.anthropic_stream(message),
)
OPENAI = Door(
    path="/v1/chat/completions",
    parse=openai_wire.parse_chat_request,
    error_body=openai_wire.door_error_body,
    failure=openai_wire.failure,
    waiting_status=503,  # OpenAI has no 529; the SDK retries a 503 after retry-after
    stream=lambda completion, parsed: sse.openai_stream(
        completion, include_usage=parsed.include_usage
    ),
)


def _door_of(request: web.Request) -> Door:
    return OPENAI if request.path.startswith(OPENAI.path) else ANTHROPIC


def _error(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return ANTHROPIC.error(status, message, error_type=error_type, headers=headers)


def _api_key(request: web.Request) -> str | None:
    """The key the official SDKs send: ``x-api-key`` (``api_key=``) or a bearer token
    (``auth_token=``)."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _seconds(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name}: a number of seconds is required, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name}: a number of seconds >= 0 is required, not {text!r}")
    return value


@web.middleware
async def _anthropic_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every answer in its door's error shape (OpenAI's under /v1/chat/completions, else
    Anthropic's): aiohttp's own (404, 405, 413) and any bug (a 500, logged with its
    traceback, never the traceback in the body)."""
    door = _door_of(request)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return door.error(exc.status, exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("gateway: internal error on %s %s", request.method, request.path)
        return door.error(500, "internal error in the ridethrough gateway")


class Gateway:
    """The gateway's handlers over one NATS connection."""

    def __init__(self, nc: Client, settings: Settings, keys: KeyRing | None = None) -> None:
        self.nc = nc
        self.settings = settings
        self.config = settings.gateway
        self.keys = keys if keys is not None else KeyRing.from_settings(settings.gateway)
        provider = settings.providers.get(self.config.anthropic_provider)
        if provider is None or provider.kind not in ANTHROPIC_SHAPE:
            raise ConfigError(
                f"gateway.anthropic_provider {self.config.anthropic_provider!r} must name a "
                f"configured provider of an Anthropic kind ({', '.join(ANTHROPIC_SHAPE)})"
            )
        self.openai_provider = self.config.openai_provider
        if self.openai_provider is not None:
            found = settings.providers.get(self.openai_provider)
            if found is None or found.kind != "openai":
                raise ConfigError(
                    f"gateway.openai_provider {self.openai_provider!r} must name a configured "
                    "provider of kind openai (or be null: no /v1/chat/completions)"
                )
        self._producers: dict[str, Producer] = {}
        #: Every request's wait for its result: one consumer per tenant (``results``).
        self.results = ResultWaiter(nc)
        self._operator_keys = frozenset(self.config.operator_keys)

    def producer(self, tenant: str) -> Producer:
        """The producer of ``tenant``: its jobs go to its subjects, its results are read
        from its scope, and it can claim no other tenant's job."""
        found = self._producers.get(tenant)
        if found is None:
            found = self._producers[tenant] = Producer(
                self.nc, tenant=tenant, bodies=self.settings.bodies
            )
        return found

    def app(self) -> web.Application:
        """The aiohttp application (bodies limited to ``max_body_bytes``)."""
        app = web.Application(
            client_max_size=self.config.max_body_bytes, middlewares=[_anthropic_errors]
        )
        app.router.add_post(ANTHROPIC.path, self.messages)
        if self.openai_provider is not None:
            app.router.add_post(OPENAI.path, self.chat_completions)
        app.router.add_get("/v1/jobs/{job_id}", self.job)
        app.router.add_get("/status", self.status_page)
        app.router.add_get("/status.json", self.status_json)
        return app

    def _operator(self, request: web.Request) -> web.Response | None:
        """``None`` for an operator; else the 401 that makes a browser ask for the key."""
        if status_page.is_operator(self._operator_keys, status_page.presented_key(request.headers)):
            return None
        return web.Response(
            status=401,
            text="an operator key is required (gateway.operator_keys): send it as the "
            "password of Basic auth, or as a bearer token\n",
            headers={"www-authenticate": 'Basic realm="ridethrough status", charset="UTF-8"'},
        )

    async def _snapshot(self) -> dict[str, Any]:
        return await status_page.snapshot(self.nc.jetstream(), self.settings)

    async def status_page(self, request: web.Request) -> web.StreamResponse:
        """``GET /status``: the status page (HTML, reloads itself)."""
        if (denied := self._operator(request)) is not None:
            return denied
        html = status_page.render(await self._snapshot(), self.config.status_refresh_s)
        return web.Response(
            text=html, content_type="text/html", headers={"cache-control": "no-store"}
        )

    async def status_json(self, request: web.Request) -> web.StreamResponse:
        """``GET /status.json``: what the page shows, as JSON."""
        if (denied := self._operator(request)) is not None:
            return denied
        return web.Response(
            body=msgspec.json.encode(await self._snapshot()),
            content_type=_JSON,
            headers={"cache-control": "no-store"},
        )

    def _tenant(self, request: web.Request, door: Door = ANTHROPIC) -> str | web.Response:
        tenant = self.keys.tenant(_api_key(request))
        if tenant is None:
            return door.error(401, "invalid API key: not a key of this ridethrough gateway")
        return tenant

    def _wait_s(self, request: web.Request) -> float:
        """How long this request may wait: the caller's header or the setting, capped, and
        ended before the SDK's own read timeout."""
        asked = request.headers.get(WAIT_HEADER)
        wait = _seconds(asked, WAIT_HEADER) if asked is not None else self.config.wait_s
        wait = min(wait, self.config.max_wait_s)
        for header in SDK_TIMEOUT_HEADERS:
            sdk = request.headers.get(header)
            if sdk is not None:
                with contextlib.suppress(BadRequest):
                    wait = min(wait, max(_seconds(sdk, header) - _TIMEOUT_MARGIN_S, 0))
        return wait

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages``: the body becomes a job on the Anthropic provider."""
        return await self._serve(request, ANTHROPIC, self.config.anthropic_provider)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: the body becomes a job on the OpenAI provider."""
        assert self.openai_provider is not None  # the route exists only then
        return await self._serve(request, OPENAI, self.openai_provider)

    async def _serve(self, request: web.Request, door: Door, provider: str) -> web.StreamResponse:
        """A request becomes a job; answer its result (streamed when asked), or the door's
        overloaded error naming the job when the wait runs out."""
        tenant = self._tenant(request, door)
        if isinstance(tenant, web.Response):
            return tenant
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return door.error(413, f"request body larger than {self.config.max_body_bytes} bytes")
        key = request.headers.get(IDEMPOTENCY_HEADER) or request.headers.get(JOB_ID_HEADER)
        try:
            parsed = door.parse(body)
            wait = self._wait_s(request)
            job_id = job_id_for_key(key) if key else new_job_id()
            job = make_job(
                provider,
                parsed.model,
                request=parsed.request,
                id=job_id,
                tenant=tenant,
                metadata={"via": "gateway"},
            )
        except (BadRequest, InvalidJob) as exc:
            return door.error(400, str(exc))
        producer = self.producer(tenant)
        # A request that waits starts waiting before its job is published: the result
        # cannot slip past.
        expected = None if _prefers_async(request) else await self.results.expect(tenant, job_id)
        try:
            return await self._submit_and_wait(
                request, door, parsed, job, producer, key, wait, expected
            )
        finally:
            if expected is not None:
                expected.close()

    async def _submit_and_wait(
        self,
        request: web.Request,
        door: Door,
        parsed: ParsedRequest,
        job: Job,
        producer: Producer,
        key: str | None,
        wait: float,
        expected: Expected | None,
    ) -> web.StreamResponse:
        """Store the job (or find its result, for a key) and answer; ``expected`` is where
        its result arrives (``None``: answer 202 once stored)."""
        job_id = job.id
        try:
            if key and (done := await producer.peek_result(job_id)) is not None:
                # A retry after the dedup window: still one job.
                return await self._answer(request, door, parsed, done)
            await producer.submit(job)
        except PayloadTooLarge as exc:
            return door.error(413, str(exc))
        except InvalidJob as exc:
            return door.error(400, str(exc))
        except UnknownProvider as exc:
            log.error("gateway: %s", exc)
            return door.error(500, "the gateway's provider is not set up in NATS (see its logs)")
        except (NatsUnavailable, JobRejected) as exc:
            log.warning("gateway: job %s not stored: %s", job_id, exc)
            return door.error(
                503,
                f"ridethrough could not store the request: {exc}",
                headers={"retry-after": _retry_after(self.config.retry_after_s)},
            )
        if expected is None:
            return self._accepted(job_id)
        try:
            result = await expected.result(wait, producer)
        except ResultTimeout:
            return self._still_waiting(door, job_id, idempotent=bool(key))
        except NatsUnavailable as exc:
            log.warning("gateway: waiting for job %s: %s", job_id, exc)
            return self._still_waiting(door, job_id, idempotent=bool(key))
        return await self._answer(request, door, parsed, result)

    async def _answer(
        self, request: web.Request, door: Door, parsed: ParsedRequest, result: JobResult
    ) -> web.StreamResponse:
        headers = {JOB_ID_HEADER: result.job_id, "request-id": result.job_id}
        if result.status == "succeeded" and result.response is not None:
            if not (parsed.stream and isinstance(result.response, dict)):
                return web.Response(
                    body=msgspec.json.encode(result.response), content_type=_JSON, headers=headers
                )
            # The whole answer is in: sent as the provider's events, in one write.
            headers.update({"content-type": "text/event-stream", "cache-control": "no-cache"})
            stream = web.StreamResponse(headers=headers)
            await stream.prepare(request)
            await stream.write(door.stream(result.response, parsed))
            await stream.write_eof()
            return stream
        status, body = door.failure(result)
        # The job has ended: the same request would get the same answer.
        headers["x-should-retry"] = "false"
        return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

    def _still_waiting(self, door: Door, job_id: str, *, idempotent: bool) -> web.Response:
        """The overloaded answer of a request whose wait ran out (Anthropic's 529, OpenAI's
        503): the job stays queued (or parked) and will be answered once; the caller picks
        it up by sending the same key again."""
        how = (
            "retry with the same Idempotency-Key"
            if idempotent
            else f"retry with header {JOB_ID_HEADER}: {job_id} (or send an Idempotency-Key)"
        )
        return door.error(
            door.waiting_status,
            f"the provider is unavailable; job {job_id} is stored and will be answered: {how}",
            error_type="overloaded_error",
            headers={
                JOB_ID_HEADER: job_id,
                "retry-after": _retry_after(self.config.retry_after_s),
                # Without a key, an SDK's own retry would carry nothing naming the job and
                # become a second job: only a request that names it may be retried blindly.
                "x-should-retry": "true" if idempotent else "false",
            },
        )

    def _accepted(self, job_id: str) -> web.Response:
        location = f"/v1/jobs/{job_id}"
        body = msgspec.json.encode({"type": "job", "id": job_id, "state": "pending"})
        return web.Response(
            status=202,
            body=body,
            content_type=_JSON,
            headers={JOB_ID_HEADER: job_id, "location": location},
        )

    async def job(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/jobs/{id}``: where the caller's job is (``waiting``, ``in_flight``,
        ``parked``), or ``done`` with its result; 404 for a job the caller has not (another
        tenant's job is indistinguishable from none)."""
        tenant = self._tenant(request)
        if isinstance(tenant, web.Response):
            return tenant
        job_id = request.match_info["job_id"]
        if not is_token(job_id):
            return _error(404, f"no job {job_id!r}", error_type="not_found_error")
        try:
            state = await self._job_state(tenant, job_id)
        except NatsUnavailable as exc:
            return _error(503, str(exc), headers={"retry-after": "1"})
        except NATS_UNAVAILABLE as exc:
            return _error(
                503, f"NATS is unavailable ({type(exc).__name__})", headers={"retry-after": "1"}
            )
        if state is None:
            return _error(404, f"no job {job_id!r}", error_type="not_found_error")
        return web.Response(
            body=msgspec.json.encode(state), content_type=_JSON, headers={JOB_ID_HEADER: job_id}
        )

    async def _job_state(self, tenant: str, job_id: str) -> dict[str, Any] | None:
        """The state ``GET /v1/jobs/{id}`` answers; None when the tenant has no such job."""
        from services.ops.inspect import locate_job

        state: dict[str, Any] = {"type": "job", "id": job_id}
        # A job moving between two places while it is looked for (parked and acked, or
        # answered and acked, between two reads) is looked for once more.
        for _ in range(2):
            result = await self.producer(tenant).peek_result(job_id)
            if result is not None:
                state.update(state="done", status=result.status)
                if result.status == "succeeded":
                    state["result"] = result.response
                else:
                    state["error"] = msgspec.json.decode(failure(result)[1])["error"]
                return state
            # Not where a large job's body is: the gateway's NATS user may not read the
            # bodies' bucket (deploy/nats/auth.conf), and the answer does not say.
            where = await locate_job(self.nc.jetstream(), job_id, tenant, history=False, body=False)
            place = where["where"]
            if place in ("waiting", "in_flight"):
                return state | {"state": place}
            if place == "parked":
                park = where["parked"]
                return state | {
                    "state": "parked",
                    "parked": {
                        "reason": park["reason"],
                        "since": park["parked_at"],
                        "outage_id": park.get("outage_id", ""),
                    },
                }
            if place == "dead":  # a dead letter with no result: the job never got an answer
                error = {"type": where["dead"]["reason"], "message": where["dead"]["error"]}
                return state | {"state": "done", "status": "dead", "error": error}
        return None


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def _prefers_async(request: web.Request) -> bool:
    prefer = request.headers.get("prefer")
    if not prefer:
        return False
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, host: str | None = None, port: int | None = None
) -> AsyncIterator[str]:
    """The gateway serving in this event loop; yields its base URL (port 0: a free one)."""
    from services.jetstream.connection import connect

    gateway_keys = KeyRing.from_settings(settings.gateway)
    nc = await connect(settings, name="ridethrough-gateway")
    runner: web.AppRunner | None = None
    gateway: Gateway | None = None
    try:
        gateway = Gateway(nc, settings, gateway_keys)
        runner = web.AppRunner(gateway.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(
            runner,
            host if host is not None else settings.gateway.host,
            port if port is not None else settings.gateway.port,
        )
        await site.start()
        bound = runner.addresses[0]  # (host, port) of the listening socket
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        if runner is not None:
            await runner.cleanup()
        if gateway is not None:
            await gateway.results.close()
        if not nc.is_closed:
            await nc.drain()


async def serve_gateway(
    settings: Settings, host: str | None = None, port: int | None = None
) -> None:
    """``ridethrough gateway``: serve until SIGINT or SIGTERM."""
    from services.runner import signalled

    stop = signalled()
    async with running_gateway(settings, host, port) as url:
        keys = len(KeyRing.from_settings(settings.gateway))
        if not keys:
            log.warning(
                "gateway: no keys configured (gateway.keys / gateway.keys_file): "
                "every request will get a 401"
            )
        log.info("gateway listening on %s (%d keys)", url, keys)
        print(f"gateway listening on {url}", flush=True)
        await stop.wait()
