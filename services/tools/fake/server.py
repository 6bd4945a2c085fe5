"""The fake provider's HTTP server: routes, normal and faulty answers, counters, admin API.

``FakeProvider`` serves the endpoints listed in the package docstring on an aiohttp
application, in the wire format of each path (``anthropic_wire``, ``openai_wire``), with
the fault ``faults.Faults`` chooses for each inference request. ``serve()`` runs one until
SIGINT or SIGTERM (``ridethrough fake-provider``).

Admin API (JSON)
----------------
``POST /admin/outage``
    ``{"status": 529 | "reset" | "midstream" | "slow", "duration_s": float?,
    "models": [str]?, "slow_ms": float?}`` starts a runtime outage: every inference request
    (for the listed models only, when given) gets that fault (``"slow"``: a normal reply
    after ``slow_ms``) until ``DELETE /admin/outage`` or until ``duration_s`` elapses.
    With ``"doors": [...]`` (``anthropic``, ``openai``, ``bedrock``, ``vertex``) only those
    doors have the outage: ``{"status": 529, "doors": ["anthropic"]}`` takes the first party
    down and leaves Bedrock and Vertex up. A cloud door answers in its cloud's error shape.
``POST /admin/requests`` / ``GET /admin/requests[?door=D]``
    ``{"record": true}`` starts keeping every inference request's exact bytes (the newest
    ``MAX_RECORDED``), ``false`` stops; GET lists them (``FakeProvider.recorded``).
``GET /admin/outage`` / ``DELETE /admin/outage``
    The runtime outage state / end it.
``GET /admin/counters`` / ``POST /admin/counters/reset``
    Request counters (see ``FakeProvider.counters``) / zero them.
``GET /admin/calls[?model=M][&since=T]``
    The call log (see ``calls``): ``{"since": T0, "models": {model: {"calls": [t, ...],
    "probes": [t, ...], "dropped": n}}, "windows": [...]}``, times in Unix seconds, probes
    apart; ``windows`` are the outage windows (``Faults.windows``). Reset with the counters.
``GET /admin/config`` / ``PUT /admin/config``
    The ``FaultConfig`` / replace it (unknown fields are a 400).
``GET /api/v2/summary.json`` and ``/admin/statuspage``
    The status page and its scripted incident (see ``statuspage``).

Counters cover every request except ``/admin/*`` and ``/healthz``. A request with the
header ``x-ridethrough-probe: 1`` is counted as a probe, any other as normal.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import math
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeAlias

import msgspec
from aiohttp import web

from services.tools.fake import anthropic_wire, cloud_wire, openai_wire
from services.tools.fake.calls import CallLog
from services.tools.fake.echo import echo, last_user_text
from services.tools.fake.faults import (
    FAULT_HEADER,
    Fault,
    FaultConfig,
    Faults,
    FaultSource,
    WindowStatus,
    padding,
)
from services.tools.fake.received import LargeRequests
from services.tools.fake.statuspage import PAGE_PATH, StatusPage, decode_patch

DEFAULT_PORT: Final = 8787
PROBE_HEADER: Final = "x-ridethrough-probe"
_SHUTDOWN_TIMEOUT_S: Final = 0.5
_MAX_BODY: Final = 32 * 1024 * 1024
_HEALTHZ: Final = b'{"ok":true}'
_SO_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_JSON: Final = "application/json"


class _OutageRequest(msgspec.Struct, forbid_unknown_fields=True):
    status: WindowStatus = 529
    duration_s: float | None = None
    models: list[str] | None = None
    slow_ms: float = 0.0
    doors: list[str] | None = None


class _RecordRequest(msgspec.Struct, forbid_unknown_fields=True):
    record: bool = True


#: Requests kept while recording (``POST /admin/requests``): the newest this many.
MAX_RECORDED: Final = 10_000

_config_decoder: Final = msgspec.json.Decoder(FaultConfig)
_outage_decoder: Final = msgspec.json.Decoder(_OutageRequest)
_record_decoder: Final = msgspec.json.Decoder(_RecordRequest)
_encoder: Final = msgspec.json.Encoder()
_encode = _encoder.encode


def _json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    reason = "Overloaded" if status == 529 else None  # aiohttp knows no phrase for 529
    return web.Response(
        body=body, status=status, reason=reason, content_type=_JSON, headers=headers
    )


# --------------------------------------------------------------------------- counters


class _Counters:
    """Mutable counters; touched only on the server's event loop."""

    __slots__ = (
        "by_fault",
        "by_model",
        "by_path",
        "by_status",
        "normal",
        "outage_first_ts",
        "outage_last_ts",
        "outage_probes",
        "outage_requests",
        "probes",
        "since",
        "total",
    )

    def __init__(self) -> None:
        self.total = 0
        self.probes = 0
        self.normal = 0
        self.by_path: dict[str, int] = {}
        self.by_status: dict[str, int] = {}
        self.by_model: dict[str, int] = {}
        self.by_fault: dict[str, int] = {}
        self.outage_requests = 0
        self.outage_probes = 0
        self.outage_first_ts: float | None = None
        self.outage_last_ts: float | None = None
        self.since = time.time()

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "probes": self.probes,
            "normal": self.normal,
            "by_path": dict(self.by_path),
            "by_status": dict(self.by_status),
            "by_model": dict(self.by_model),
            "by_fault": dict(self.by_fault),
            "outage": {
                "requests": self.outage_requests,
                "probes": self.outage_probes,
                "first_ts": self.outage_first_ts,
                "last_ts": self.outage_last_ts,
            },
            "since": self.since,
        }


def _bump(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


_Waiter: TypeAlias = tuple[Callable[[dict[str, Any]], bool], "asyncio.Future[dict[str, Any]]"]


# --------------------------------------------------------------------------- the server


class FakeProvider:
    """The fake provider server; every method must run on the event loop that started it."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        """Prepare a server with ``config`` (no faults when ``None``); ``start()`` serves it."""
        self._counters = _Counters()
        self._calls = CallLog()
        self._large = LargeRequests()
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._waiters: list[_Waiter] = []
        self._in_flight = 0  # inference requests being answered (FaultConfig.capacity)
        self._faults = Faults(config or FaultConfig())
        # The runtime outage (see ``Faults.start_outage``): admin endpoints, tests and the
        # demo drill start and end it here.
        self.start_outage = self._faults.start_outage
        self.stop_outage = self._faults.stop_outage
        self.outage_state = self._faults.outage_state
        self._error_cache: dict[tuple[bool, int], bytes] = {}
        #: Inference requests as they arrived (door, model, body), while recording.
        self._recorded: collections.deque[tuple[str, str, bytes, str, str, str]] = (
            collections.deque(maxlen=MAX_RECORDED)
        )
        self.recording = False
        cfg = self._faults.config
        self.status_page = StatusPage(cfg.models, cfg.status_incidents)
        self.app = self._build_app()

    # ---- public API

    @property
    def url(self) -> str:
        """Base URL (``http://HOST:PORT``) once started."""
        if self._url is None:
            raise RuntimeError("fake provider is not started")
        return self._url

    @property
    def config(self) -> FaultConfig:
        """The fault configuration in effect."""
        return self._faults.config

    @property
    def counters(self) -> dict[str, Any]:
        """A snapshot of the request counters.

        Keys: ``total``, ``probes``, ``normal``, ``by_path``, ``by_status`` (status as a
        string, ``"reset"`` for dropped connections), ``by_model``, ``by_fault`` (``trigger``,
        ``outage``, ``scheduled_outage``, ``random``, ``reset``, ``midstream``, ``slow``),
        ``outage`` (``requests``, ``probes``, ``first_ts``, ``last_ts`` as Unix times of
        requests answered by an outage) and ``since`` (Unix time of the last reset).
        """
        return self._counters.snapshot()

    def reset_counters(self) -> None:
        """Zero every counter, empty the call log and forget past runtime outage windows."""
        self._counters = _Counters()
        self._calls = CallLog()
        self._large = LargeRequests()
        self._faults.forget_windows()

    def calls(self, model: str | None = None, since: float | None = None) -> dict[str, Any]:
        """The call log: ``since`` (Unix time it starts), ``models`` (per model, ``calls``
        and ``probes`` as Unix arrival times and ``dropped``; see ``calls.CallLog``), and
        ``windows``, the outage windows (``faults.Faults.windows``)."""
        return {
            "since": self._calls.since,
            "models": self._calls.snapshot(model, since),
            "windows": self._faults.windows(),
        }

    def large_requests(self) -> list[dict[str, Any]]:
        """Large request bodies received: path, size, digest (``received.content_digest``)."""
        return self._large.snapshot()

    def set_config(self, config: FaultConfig) -> None:
        """Replace the fault configuration; scheduled outages restart from now."""
        self._faults.configure(config)
        self._error_cache = {}
        self.status_page.configure(config.models, config.status_incidents)

    async def wait_for_counters(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Wait until ``predicate(counters)`` holds, then return that snapshot.

        The predicate is checked now and after every answered request.
        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        snapshot = self.counters
        if predicate(snapshot):
            return snapshot
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiter: _Waiter = (predicate, future)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("fake provider already started")
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = info[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            await web.SockSite(runner, sock, backlog=1024).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner
        bound_port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self._url = f"http://{shown}:{bound_port}"
        self.set_config(self.config)  # scheduled outages count from server start
        return self._url

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        for _, future in self._waiters:
            if not future.done():
                future.cancel()
        self._waiters.clear()

    # ---- routing

    @web.middleware
    async def _capacity_gate(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """``FaultConfig.capacity``: an inference request over it is a 429 at once."""
        limit = self.config.capacity
        if not limit or request.method != "POST" or request.path.startswith("/admin"):
            return await handler(request)
        if self._in_flight >= limit:
            _bump(self._counters.by_fault, "over_capacity")
            return self._error(request.path != "/v1/chat/completions", 429)
        self._in_flight += 1
        try:
            return await handler(request)
        finally:
            self._in_flight -= 1

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY, middlewares=[self._capacity_gate])
        app[PROVIDER_KEY] = self
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_post("/model/{model_id}/invoke", self._handle_bedrock)
        app.router.add_post("/model/{model_id}/invoke-with-response-stream", self._handle_bedrock)
        app.router.add_post(
            "/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{spec}",
            self._handle_vertex,
        )
        app.router.add_get("/admin/requests", self._admin_requests)
        app.router.add_post("/admin/requests", self._admin_record)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{model_id}", self._handle_model)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_post("/admin/outage", self._admin_start_outage)
        app.router.add_get("/admin/outage", self._admin_get_outage)
        app.router.add_delete("/admin/outage", self._admin_stop_outage)
        app.router.add_get("/admin/counters", self._admin_counters)
        app.router.add_post("/admin/counters/reset", self._admin_reset_counters)
        app.router.add_get("/admin/calls", self._admin_calls)
        app.router.add_get("/admin/config", self._admin_get_config)
        app.router.add_put("/admin/config", self._admin_put_config)
        app.router.add_get(PAGE_PATH, self._handle_status_page)
        app.router.add_get("/admin/statuspage", self._admin_status_page)
        app.router.add_post("/admin/statuspage", self._admin_status_page)
        app.router.add_delete("/admin/statuspage", self._admin_status_page)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        return app

    # ---- accounting

    def _count_request(self, request: web.Request) -> bool:
        c = self._counters
        c.total += 1
        _bump(c.by_path, request.path)
        if request.headers.get(PROBE_HEADER) == "1":
            c.probes += 1
            return True
        c.normal += 1
        return False

    def _count_status(self, key: str) -> None:
        _bump(self._counters.by_status, key)
        if self._waiters:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        snapshot = self._counters.snapshot()
        for predicate, future in list(self._waiters):
            if future.done():
                continue
            try:
                if predicate(snapshot):
                    future.set_result(snapshot)
            except Exception as exc:  # a broken predicate fails its waiter, not the request
                future.set_exception(exc)

    def _choose_fault(
        self, trigger: str | None, model: str, stream: bool, probe: bool, door: str = "anthropic"
    ) -> Fault | None:
        fault, source = self._faults.choose(trigger, model, stream, door)
        if source is not None:
            self._count_fault(source, probe)
        return fault

    def _count_fault(self, source: FaultSource, probe: bool) -> None:
        c = self._counters
        _bump(c.by_fault, source)
        if source not in ("outage", "scheduled_outage"):
            return
        c.outage_requests += 1
        if probe:
            c.outage_probes += 1
        ts = time.time()
        if c.outage_first_ts is None:
            c.outage_first_ts = ts
        c.outage_last_ts = ts

    # ---- responses

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):012x}"

    def _error(self, anthropic: bool, status: int, message: str | None = None) -> web.Response:
        """An error reply in the caller's wire format, counted."""
        self._count_status(str(status))
        headers: dict[str, str] = {"request-id": self._next_id("req_")}
        if status == 429:
            retry = self.config.retry_after_s
            headers["retry-after"] = str(math.ceil(retry))
            headers["retry-after-ms"] = str(round(retry * 1000))
        if message is None:
            cached = self._error_cache.get((anthropic, status))
            if cached is None:
                cached = _error_body(anthropic, status)
                self._error_cache[(anthropic, status)] = cached
            body = cached
        else:
            body = _error_body(anthropic, status, message)
        return _json_response(body, status, headers)

    def _spend_limit(self, anthropic: bool, fault: Fault) -> web.Response:
        if not anthropic:
            status, body = openai_wire.spend_limit()
            self._count_status(str(status))
            return _json_response(body, status, {"x-request-id": self._next_id("req_")})
        status, body = anthropic_wire.spend_limit(with_429=fault.kind == "spend_limit_429")
        self._count_status(str(status))
        return _json_response(body, status, {"request-id": self._next_id("req_")})

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        """Drop the connection with a TCP reset; aiohttp then discards the reply quietly."""
        self._count_status("reset")
        _bump(self._counters.by_fault, "reset")
        _abort(request)
        return web.Response(status=204)

    async def _truncated(self, request: web.Request, body: bytes) -> web.StreamResponse:
        """Status 200 and half of ``body`` under a full content-length, then a reset."""
        self._count_status("200")
        _bump(self._counters.by_fault, "midstream")
        response = web.StreamResponse(status=200, headers={"Content-Type": _JSON})
        response.content_length = len(body)
        try:
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
        except ConnectionError:
            return response
        _abort(request)
        return response

    def _broken_off(self, events: list[bytes], error: bytes) -> list[bytes]:
        """The first ``midstream_after_events`` of ``events`` (at most all but the last,
        so the client is still listening), then ``error``; counted as a mid-stream fault."""
        _bump(self._counters.by_fault, "midstream")
        kept = events[: min(self.config.midstream_after_events, len(events) - 1)]
        kept.append(error)
        return kept

    async def _stream(
        self,
        request: web.Request,
        events: list[bytes],
        request_id: str,
        content_type: str = "text/event-stream",
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": content_type,
                "Cache-Control": "no-cache",
                "request-id": request_id,
            },
        )
        delay = self.config.stream_chunk_delay_ms / 1000.0
        try:
            await response.prepare(request)
            if delay > 0:
                for event in events:
                    await response.write(event)
                    await asyncio.sleep(delay)
            else:
                await response.write(b"".join(events))
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing to tell it
        return response

    async def _apply_fault(
        self, request: web.Request, anthropic: bool, fault: Fault
    ) -> web.StreamResponse | None:
        """Answer with ``fault``; ``None`` means go on with a normal (slow or mid-stream) reply."""
        kind = fault.kind
        if kind == "error":
            return self._error(anthropic, fault.status)
        if kind == "reset":
            return await self._reset(request)
        if kind in ("spend_limit", "spend_limit_429"):
            return self._spend_limit(anthropic, fault)
        if kind == "bad_trigger":
            return self._error(anthropic, 400, f"unknown fake fault trigger {fault.detail!r}")
        if kind == "slow":
            _bump(self._counters.by_fault, "slow")
            await asyncio.sleep(fault.delay_s)
        if kind in ("retry_after", "stall", "error_200", "redirect", "echo_key"):
            return await self._hostile(request, anthropic, fault)
        return None

    async def _hostile(
        self, request: web.Request, anthropic: bool, fault: Fault
    ) -> web.StreamResponse:
        """A provider misbehaving: see the hostile triggers in ``faults``."""
        kind = fault.kind
        _bump(self._counters.by_fault, kind)
        if kind == "retry_after":
            status = 529 if anthropic else 429
            self._count_status(str(status))
            body = _error_body(anthropic, status)
            return _json_response(body, status, {"retry-after": f"{fault.delay_s:g}"})
        if kind == "redirect":
            self._count_status("307")
            return web.Response(status=307, headers={"Location": str(request.url)})
        if kind == "echo_key":
            key = request.headers.get("x-api-key") or request.headers.get("authorization") or ""
            key = key.removeprefix("Bearer ")  # the bare key: no "Bearer" label to give it away
            return self._error(anthropic, 401, f"invalid credential {key!r} for this endpoint")
        if kind == "error_200":
            self._count_status("200")
            wire = anthropic_wire if anthropic else openai_wire
            return _json_response(wire.error_with_success(fault.detail))
        return await self._stall(request, anthropic)

    async def _stall(self, request: web.Request, anthropic: bool) -> web.StreamResponse:
        """Status 200, then never the end of the body, until the client goes away."""
        self._count_status("200")
        stream = request.headers.get("accept", "") == "text/event-stream" or (
            b'"stream":true' in (await request.read()).replace(b" ", b"")
        )
        response = web.StreamResponse(status=200)
        if stream:
            response.content_type = "text/event-stream"
        else:
            response.content_type = _JSON
            response.content_length = 1 << 20
        try:
            await response.prepare(request)
            while True:
                if stream:  # Anthropic's ping event; an SSE comment for OpenAI
                    await response.write(
                        anthropic_wire.PING if anthropic else openai_wire.KEEPALIVE
                    )
                    await asyncio.sleep(0.1)
                else:
                    await response.write(b" ")
                    await asyncio.sleep(1.0)
        except ConnectionError:
            pass  # the client hung up: that is the point
        return response

    # ---- inference handlers

    async def _read_body(self, request: web.Request, anthropic: bool) -> bytes | web.Response:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(anthropic, 413)

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._messages(request, "anthropic")

    async def _handle_bedrock(self, request: web.Request) -> web.StreamResponse:
        stream = request.path.endswith("/invoke-with-response-stream")
        return await self._messages(request, "bedrock", request.match_info["model_id"], stream)

    async def _handle_vertex(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["spec"].rpartition(":")
        if not model or action not in ("rawPredict", "streamRawPredict"):
            return await self._handle_unknown(request)
        return await self._messages(request, "vertex", model, action == "streamRawPredict")

    def _door_error(self, door: str, answer: web.StreamResponse) -> web.StreamResponse:
        """A first-party error reply in the shape of ``door`` (others pass unchanged)."""
        if door == "anthropic" or not isinstance(answer, web.Response) or answer.status < 400:
            return answer
        first_party = answer.body if isinstance(answer.body, bytes) else b""
        message = cloud_wire.error_message(first_party)
        kept = {k: v for k, v in answer.headers.items() if k.lower().startswith("retry-after")}
        if door == "bedrock":
            status, headers, body = cloud_wire.bedrock_error(answer.status, message)
            return _json_response(body, status, {**kept, **headers})
        body = cloud_wire.vertex_error(answer.status, message, first_party)
        return _json_response(body, answer.status, kept)

    def _decode_messages(
        self, body: bytes, door: str, model: str | None, stream: bool
    ) -> anthropic_wire.Request:
        if model is None:
            return anthropic_wire.decode_request(body)
        # A cloud door: the model is in the path, the body carries anthropic_version.
        req = anthropic_wire.decode_cloud_request(body)
        return anthropic_wire.Request(
            model=model,
            messages=req.messages,
            max_tokens=req.max_tokens,
            stream=stream,
            metadata=req.metadata,
            system=req.system,
        )

    async def _messages(
        self,
        request: web.Request,
        door: str,
        path_model: str | None = None,
        path_stream: bool = False,
    ) -> web.StreamResponse:
        probe = self._count_request(request)
        body = await self._read_body(request, True)
        if isinstance(body, web.Response):
            return self._door_error(door, body)
        self._large.record(request.path, body)
        try:
            req = self._decode_messages(body, door, path_model, path_stream)
        except msgspec.DecodeError as exc:
            return self._door_error(door, self._error(True, 400, str(exc)))
        if self.recording:
            h = request.headers
            credential = h.get("x-api-key") or h.get("authorization") or ""
            self._recorded.append(
                (
                    door,
                    req.model,
                    body,
                    h.get("anthropic-beta", ""),
                    credential,
                    h.get("anthropic-version", ""),
                )
            )
        _bump(self._counters.by_model, req.model)
        self._calls.record(req.model, probe)
        trigger = request.headers.get(FAULT_HEADER)
        if (trigger is None or not trigger.startswith("fault:")) and req.metadata is not None:
            trigger = req.metadata.user_id
        fault = self._choose_fault(trigger, req.model, req.stream, probe, door)
        midstream = False
        if fault is not None:
            if fault.kind == "midstream":
                midstream = True
            else:
                answer = await self._apply_fault(request, True, fault)
                if answer is not None:
                    return self._door_error(door, answer)
        elif self._faults.has_latency:
            await asyncio.sleep(self._faults.latency_s())

        text, out_tokens, cut = echo(last_user_text(req.messages), req.max_tokens)
        text += padding(fault)
        in_tokens = anthropic_wire.input_tokens(req)
        reason = anthropic_wire.stop_reason(cut)
        message_id = self._next_id("msg_")
        if not req.stream:
            payload = anthropic_wire.message(req, message_id, text, reason, in_tokens, out_tokens)
            if midstream:
                return await self._truncated(request, payload)
            self._count_status("200")
            return _json_response(payload, headers={"request-id": self._next_id("req_")})

        events = anthropic_wire.message_events(req, message_id, text, reason, in_tokens, out_tokens)
        if midstream:
            events = self._broken_off(events, anthropic_wire.MIDSTREAM_ERROR)
        self._count_status("200")
        if door == "bedrock":
            frames = cloud_wire.bedrock_frames(events)
            return await self._stream(
                request, frames, self._next_id("req_"), cloud_wire.EVENTSTREAM
            )
        return await self._stream(request, events, self._next_id("req_"))

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        probe = self._count_request(request)
        body = await self._read_body(request, False)
        if isinstance(body, web.Response):
            return body
        self._large.record(request.path, body)
        try:
            req = openai_wire.decode_request(body)
        except msgspec.DecodeError as exc:
            return self._error(False, 400, str(exc))
        _bump(self._counters.by_model, req.model)
        self._calls.record(req.model, probe)
        trigger = request.headers.get(FAULT_HEADER)
        if trigger is None or not trigger.startswith("fault:"):
            trigger = req.user
        fault = self._choose_fault(trigger, req.model, req.stream, probe)
        midstream = False
        if fault is not None:
            if fault.kind == "midstream":
                midstream = True
            else:
                answer = await self._apply_fault(request, False, fault)
                if answer is not None:
                    return answer
        elif self._faults.has_latency:
            await asyncio.sleep(self._faults.latency_s())

        text, out_tokens, cut = echo(last_user_text(req.messages), openai_wire.token_limit(req))
        text += padding(fault)
        in_tokens = openai_wire.input_tokens(req)
        reason = openai_wire.finish_reason(cut)
        completion_id = self._next_id("chatcmpl-")
        created = int(time.time())
        usage = openai_wire.token_usage(in_tokens, out_tokens)
        if not req.stream:
            payload = openai_wire.completion(req, completion_id, created, text, reason, usage)
            if midstream:
                return await self._truncated(request, payload)
            self._count_status("200")
            return _json_response(payload, headers={"x-request-id": self._next_id("req_")})

        events = openai_wire.completion_events(req, completion_id, created, text, reason, usage)
        if midstream:  # [DONE] is the last event: after it the SDK stops reading
            events = self._broken_off(events, openai_wire.MIDSTREAM_ERROR)
        self._count_status("200")
        return await self._stream(request, events, self._next_id("req_"))

    # ---- models, health, unknown paths

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request)
        models = self.config.models
        self._count_status("200")
        if "anthropic-version" not in request.headers:
            return _json_response(_encode(openai_wire.models_list(models)))
        return _json_response(_encode(anthropic_wire.models_page(models, request.query)))

    async def _handle_model(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request)
        anthropic = "anthropic-version" in request.headers
        model_id = request.match_info["model_id"]
        if model_id not in self.config.models:
            return self._error(anthropic, 404, f"model: {model_id}")
        self._count_status("200")
        wire = anthropic_wire if anthropic else openai_wire
        return _json_response(_encode(wire.model_entry(model_id)))

    async def _handle_healthz(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_HEALTHZ)

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request)
        anthropic = "anthropic-version" in request.headers
        return self._error(anthropic, 404, f"Not found: {request.method} {request.path}")

    # ---- the status page

    async def _handle_status_page(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request)
        serve = self.status_page.serve
        if serve == "error":
            self._count_status("503")
            return web.Response(status=503, text="<html>Service Unavailable</html>")
        if serve == "stall":
            return await self._stall(request, anthropic=False)
        self._count_status("200")
        if serve == "garbage":
            return web.Response(body=b"<html>\x00\xffnot a status page", content_type=_JSON)
        body = self.status_page.summary(self._url or "")
        if serve == "huge":  # a valid page, over any sane size limit
            body = body[:-1] + b',"padding":"' + b"x" * (4 << 20) + b'"}'
        return _json_response(body)

    async def _admin_status_page(self, request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            self.status_page.reset()
        elif request.method == "POST":
            try:
                self.status_page.patch(decode_patch(await request.read()))
            except (msgspec.DecodeError, ValueError) as exc:
                return _admin_error(str(exc))
        return _json_response(_encode(self.status_page.state()))

    # ---- admin

    async def _admin_start_outage(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = _outage_decoder.decode(await request.read() or b"{}")
            state = self.start_outage(
                spec.status, spec.duration_s, spec.models, spec.slow_ms, spec.doors
            )
        except (msgspec.DecodeError, ValueError) as exc:
            return _admin_error(str(exc))
        return _json_response(_encode(state))

    async def _admin_get_outage(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_encode(self.outage_state()))

    async def _admin_stop_outage(self, request: web.Request) -> web.StreamResponse:
        self.stop_outage()
        return _json_response(_encode({"active": False}))

    async def _admin_counters(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_encode(self.counters))

    async def _admin_reset_counters(self, request: web.Request) -> web.StreamResponse:
        self.reset_counters()
        return _json_response(_encode(self.counters))

    async def _admin_calls(self, request: web.Request) -> web.StreamResponse:
        since_text = request.query.get("since")
        try:
            since = None if since_text is None else float(since_text)
        except ValueError:
            return _admin_error(f"since={since_text!r} is not a Unix time")
        return _json_response(_encode(self.calls(request.query.get("model"), since)))

    def recorded(self, door: str | None = None) -> list[dict[str, Any]]:
        """The inference requests recorded (``record_requests``), oldest first: ``door``,
        ``model`` (the path's, on a cloud door), ``body`` (base64 of the exact bytes),
        ``anthropic_beta`` (the header, "" when none), ``credential`` (the ``x-api-key`` or
        ``authorization`` header) and ``anthropic_version``."""
        return [
            {
                "door": d,
                "model": m,
                "body": base64.b64encode(b).decode(),
                "anthropic_beta": h,
                "credential": c,
                "anthropic_version": v,
            }
            for d, m, b, h, c, v in self._recorded
            if door is None or d == door
        ]

    def record_requests(self, on: bool = True) -> None:
        """Start (or stop) keeping every inference request's exact bytes; starting empties
        what was kept."""
        if on:
            self._recorded.clear()
        self.recording = on

    async def _admin_requests(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_encode({"requests": self.recorded(request.query.get("door"))}))

    async def _admin_record(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = _record_decoder.decode(await request.read() or b"{}")
        except msgspec.DecodeError as exc:
            return _admin_error(str(exc))
        self.record_requests(spec.record)
        return _json_response(_encode({"recording": self.recording}))

    async def _admin_get_config(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_encode(self.config))

    async def _admin_put_config(self, request: web.Request) -> web.StreamResponse:
        try:
            config = _config_decoder.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _admin_error(str(exc))
        self.set_config(config)
        return _json_response(_encode(config))


def _error_body(anthropic: bool, status: int, message: str | None = None) -> bytes:
    if anthropic:
        return anthropic_wire.error_body(status, message)
    return openai_wire.error_body(status, message)


def _admin_error(message: str) -> web.Response:
    return _json_response(_encode({"error": message}), 400)


def _abort(request: web.Request) -> None:
    """Close the request's connection at once with a TCP reset (SO_LINGER 0)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _SO_LINGER_RESET)
    transport.abort()


def build_app(config: FaultConfig | None = None) -> web.Application:
    """An aiohttp application serving a new ``FakeProvider`` with ``config``.

    The provider (for counters and outages) is ``app[PROVIDER_KEY]``. Serve the app with
    ``access_log=None`` to keep per-request overhead low.
    """
    return FakeProvider(config).app


PROVIDER_KEY: Final = web.AppKey("fake_provider", FakeProvider)
"""The key of the ``FakeProvider`` in the application returned by ``build_app``."""


# --------------------------------------------------------------------------- serving


async def _serve(host: str, port: int, config: FaultConfig | None) -> None:
    provider = FakeProvider(config)
    url = await provider.start(host, port)
    print(f"fake provider listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await provider.stop()


def serve(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, config: FaultConfig | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, after printing ``fake provider listening on URL``."""
    asyncio.run(_serve(host, port, config))
