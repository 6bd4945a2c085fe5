"""A fake LLM provider: a real HTTP server speaking the Anthropic and OpenAI wire protocols.

Operators run it (``ridethrough fake-provider``) to rehearse outages; the test suite uses
it as the far end of every provider adapter. The official SDKs (``anthropic`` and
``openai``) work against it unchanged through ``base_url``.

Endpoints
---------
``POST /v1/messages``
    Anthropic Messages API, JSON or SSE (``"stream": true``).
``POST /v1/chat/completions``
    OpenAI Chat Completions, JSON or SSE (``chat.completion.chunk`` ... ``data: [DONE]``;
    a final usage chunk when ``stream_options.include_usage`` is true).
``GET /v1/models`` and ``GET /v1/models/{id}``
    The configured model list, in Anthropic shape when the request carries an
    ``anthropic-version`` header and in OpenAI shape otherwise.
``GET /healthz``
    ``{"ok": true}``.
Any other path
    404 in the wire format of the caller.

The reply text is deterministic: ``"echo: " + <text of the last user message>``, split on
single spaces and cut to ``max_tokens`` words (``max_completion_tokens`` or ``max_tokens``
for OpenAI; ``"echo:"`` counts as the first word). A cut reply ends with
``stop_reason="max_tokens"`` (OpenAI ``finish_reason="length"``), otherwise ``"end_turn"``
(``"stop"``). ``output_tokens`` is the number of words in the reply and ``input_tokens`` the
number of whitespace-separated words in all messages and the system prompt (at least 1).

Fault triggers
--------------
A request chooses its own fault, whatever the configuration, when the header
``x-fake-fault`` or the user field (Anthropic ``metadata.user_id``, OpenAI ``user``) holds
one of these values (the header wins when both are set):

``fault:<status>``
    That HTTP status (400-599) with a wire-format error body. Anthropic error types:
    400 ``invalid_request_error``, 401 ``authentication_error``, 402 ``billing_error``,
    403 ``permission_error``, 404 ``not_found_error``, 408 ``timeout_error``,
    409 ``conflict_error``, 413 ``request_too_large``, 429 ``rate_limit_error``,
    500/502/503 ``api_error``, 504 ``timeout_error``, 529 ``overloaded_error``.
    429 replies carry ``retry-after`` (whole seconds) and ``retry-after-ms`` headers
    from ``FaultConfig.retry_after_s``.
``fault:reset``
    The connection is closed with a TCP reset before any response byte.
``fault:midstream``
    Streaming: status 200, the first ``midstream_after_events`` events, then an error
    (Anthropic ``event: error`` with ``overloaded_error``; OpenAI a ``data: {"error": ...}``
    chunk). Non-streaming: status 200 with a ``content-length`` and half the body, then a
    reset, so the client sees a truncated response.
``fault:spend_limit``
    Anthropic: 400 ``billing_error``. OpenAI: 429 with type and code
    ``insufficient_quota`` and no ``retry-after``.
``fault:spend_limit_429``
    Anthropic: 429 ``rate_limit_error`` with ``details.error_code =
    "enforced_spend_limit_reached"`` and no ``retry-after`` (the shape the anthropic SDK
    maps to ``EnforcedSpendLimitReachedError``). OpenAI: as ``fault:spend_limit``.
``fault:slow:<ms>``
    A normal reply after ``<ms>`` milliseconds (instead of the configured latency).

Hostile triggers (a provider misbehaving rather than failing):

``fault:retry_after:<s>``
    A 429 (OpenAI) or 529 (Anthropic) whose ``retry-after`` header asks for ``<s>`` seconds.
``fault:stall``
    Status 200 and then never an end: a stream sends a ping every 100 ms, a JSON body
    one byte per second under a content-length, until the client hangs up.
``fault:error_200:<type>``
    Status 200 whose JSON body is an error object of that ``type`` (Anthropic
    ``{"type": "error", "error": {...}}``; OpenAI ``{"error": {...}}``).
``fault:redirect``
    A 307 to the very same URL, for ever (a wrong base URL behind a redirecting proxy).
``fault:huge:<bytes>``
    A normal reply whose text is padded to about ``<bytes>`` bytes.
``fault:echo_key``
    A 401 whose message quotes the credential the request carried (an upstream that echoes
    headers back).

Any other value starting with ``fault:`` is answered with a 400 naming the bad trigger.

Scripted faults
---------------
``FaultConfig`` (all defaults mean no faults) sets latency (base plus uniform or
exponential jitter), a random error rate with a status mix, a reset rate, a mid-stream
error rate (streaming requests only) and scheduled outages relative to the moment the
config took effect (server start, or the ``PUT /admin/config`` that installed it). Random
draws use one ``random.Random(seed)``.

For each inference request the first match wins: trigger, runtime outage (admin), scheduled
outage, random reset / error / mid-stream, else a normal reply. Only normal replies wait the
configured latency; faults are answered at once (``fault:slow`` waits its own delay).

Admin API (JSON)
----------------
``POST /admin/outage``
    ``{"status": 529 | "reset" | "midstream", "duration_s": float?, "models": [str]?}``
    starts a runtime outage: every inference request (for the listed models only, when
    given) gets that fault until ``DELETE /admin/outage`` or until ``duration_s`` elapses.
``GET /admin/outage`` / ``DELETE /admin/outage``
    The runtime outage state / end it.
``GET /admin/counters`` / ``POST /admin/counters/reset``
    Request counters (see ``FakeProvider.counters``) / zero them.
``GET /admin/config`` / ``PUT /admin/config``
    The ``FaultConfig`` / replace it (unknown fields are a 400).

Counters cover every request except ``/admin/*`` and ``/healthz``. A request with the
header ``x-ridethrough-probe: 1`` is counted as a probe, any other as normal.

Run it with ``ridethrough fake-provider --port 8787 [--latency-ms X] ...``, with
``serve()``, with ``FakeProvider`` inside an event loop, or with ``run_in_thread()`` from
synchronous code such as tests.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import os
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypeVar

import msgspec
from aiohttp import web

__all__ = [
    "DEFAULT_MODELS",
    "PROVIDER_KEY",
    "FakeProvider",
    "FakeProviderThread",
    "FaultConfig",
    "OutageStatus",
    "build_app",
    "config_from_options",
    "parse_error_mix",
    "parse_outage",
    "run_in_thread",
    "serve",
]

OutageStatus: TypeAlias = int | Literal["reset", "midstream"]
"""What an outage answers: an HTTP error status, a connection reset or a mid-stream error."""

DEFAULT_MODELS: Final[tuple[str, ...]] = ("claude-fake", "gpt-fake")
DEFAULT_PORT: Final = 8787
PROBE_HEADER: Final = "x-ridethrough-probe"
FAULT_HEADER: Final = "x-fake-fault"
_SHUTDOWN_TIMEOUT_S: Final = 0.5
_MAX_BODY: Final = 32 * 1024 * 1024


def _default_error_mix() -> dict[int, float]:
    return {500: 1.0, 503: 1.0, 529: 2.0, 429: 1.0}


def _default_models() -> list[str]:
    return list(DEFAULT_MODELS)


class FaultConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Scripted faults of a fake provider; the defaults inject none.

    ``latency_ms`` is the base delay of a reply. ``latency_jitter_ms`` spreads it:
    ``uniform`` draws from ``latency_ms ± jitter`` (never below 0), ``exponential`` adds an
    exponential tail with mean ``jitter``. ``error_rate``, ``reset_rate`` and
    ``midstream_rate`` are probabilities (their sum at most 1) drawn once per request;
    an error takes its status from ``error_mix`` (status -> weight). ``midstream_rate``
    applies to streaming requests only. ``outages`` are ``(start_s, duration_s, status)``
    windows relative to when the config took effect, ``status`` an HTTP status,
    ``"reset"`` or ``"midstream"``. ``stream_chunk_delay_ms`` paces SSE events.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    latency_distribution: Literal["uniform", "exponential"] = "uniform"
    seed: int | None = None
    error_rate: float = 0.0
    error_mix: dict[int, float] = msgspec.field(default_factory=_default_error_mix)
    retry_after_s: float = 1.0
    reset_rate: float = 0.0
    midstream_rate: float = 0.0
    midstream_after_events: int = 4
    stream_chunk_delay_ms: float = 0.0
    outages: list[tuple[float, float, OutageStatus]] = msgspec.field(default_factory=list)
    models: list[str] = msgspec.field(default_factory=_default_models)

    def __post_init__(self) -> None:
        """Reject values that cannot work (raises ``ValueError``)."""
        for name in ("latency_ms", "latency_jitter_ms", "retry_after_s", "stream_chunk_delay_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        rates = (self.error_rate, self.reset_rate, self.midstream_rate)
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise ValueError("error_rate, reset_rate and midstream_rate must be within [0, 1]")
        if sum(rates) > 1.0 + 1e-9:
            raise ValueError("error_rate + reset_rate + midstream_rate must be <= 1")
        for status, weight in self.error_mix.items():
            _check_status(status)
            if weight < 0:
                raise ValueError(f"error_mix weight for {status} must be >= 0")
        if self.error_rate > 0 and sum(self.error_mix.values()) <= 0:
            raise ValueError("error_mix needs a positive weight when error_rate > 0")
        if self.midstream_after_events < 0:
            raise ValueError("midstream_after_events must be >= 0")
        for start_s, duration_s, outage_status in self.outages:
            if start_s < 0 or duration_s < 0:
                raise ValueError("outage start_s and duration_s must be >= 0")
            if isinstance(outage_status, int):
                _check_status(outage_status)
        if not self.models:
            raise ValueError("models must not be empty")


def _check_status(status: int) -> None:
    if not 400 <= status <= 599:
        raise ValueError(f"error status {status} must be within 400-599")


# --------------------------------------------------------------------------- request shapes


class _Block(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class _AnthropicMessage(msgspec.Struct):
    role: str
    content: str | list[_Block]


class _Metadata(msgspec.Struct):
    user_id: str | None = None


class _AnthropicRequest(msgspec.Struct):
    model: str
    messages: list[_AnthropicMessage]
    max_tokens: int | None = None
    stream: bool = False
    metadata: _Metadata | None = None
    system: str | list[_Block] | None = None


class _OpenAIMessage(msgspec.Struct):
    role: str
    content: str | list[_Block] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _OpenAIRequest(msgspec.Struct):
    model: str
    messages: list[_OpenAIMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = None


class _OutageRequest(msgspec.Struct, forbid_unknown_fields=True):
    status: OutageStatus = 529
    duration_s: float | None = None
    models: list[str] | None = None


_anthropic_decoder: Final = msgspec.json.Decoder(_AnthropicRequest)
_openai_decoder: Final = msgspec.json.Decoder(_OpenAIRequest)
_config_decoder: Final = msgspec.json.Decoder(FaultConfig)
_outage_decoder: Final = msgspec.json.Decoder(_OutageRequest)
_encoder: Final = msgspec.json.Encoder()
_encode = _encoder.encode


def _text_of(content: str | list[_Block] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(b.text for b in content if b.type == "text" and b.text is not None)


def _count_words(parts: Sequence[str | list[_Block] | None]) -> int:
    return max(1, sum(len(_text_of(p).split()) for p in parts))


def _echo(user_text: str, max_tokens: int | None) -> tuple[str, int, bool]:
    """The reply text, its word count and whether it was cut at ``max_tokens``."""
    words = ("echo: " + user_text).split(" ")
    if max_tokens is not None and len(words) > max_tokens:
        kept = words[: max(max_tokens, 0)]
        return " ".join(kept), len(kept), True
    return " ".join(words), len(words), False


def _padding(fault: _Fault | None) -> str:
    """The padding a ``fault:huge:<bytes>`` trigger asks for ("" for any other reply)."""
    if fault is None or fault.kind != "huge":
        return ""
    return " " + "x" * fault.status


def _pieces(text: str) -> list[str]:
    """Split ``text`` into word-sized stream deltas whose concatenation is ``text``."""
    if not text:
        return []
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def _last_user_text(messages: Sequence[_AnthropicMessage | _OpenAIMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return _text_of(message.content)
    return ""


# --------------------------------------------------------------------------- faults


FaultKind: TypeAlias = Literal[
    "error",
    "reset",
    "midstream",
    "spend_limit",
    "spend_limit_429",
    "slow",
    "bad_trigger",
    "retry_after",
    "stall",
    "error_200",
    "redirect",
    "huge",
    "echo_key",
]


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: FaultKind
    status: int = 0
    delay_s: float = 0.0
    detail: str = ""


_RESET: Final = _Fault("reset")
_MIDSTREAM: Final = _Fault("midstream")


def _outage_fault(status: OutageStatus) -> _Fault:
    if status == "reset":
        return _RESET
    if status == "midstream":
        return _MIDSTREAM
    assert isinstance(status, int)
    return _Fault("error", status)


def _parse_trigger(value: str) -> _Fault:
    name = value[len("fault:") :]
    if name == "reset":
        return _RESET
    if name == "midstream":
        return _MIDSTREAM
    if name == "spend_limit":
        return _Fault("spend_limit")
    if name == "spend_limit_429":
        return _Fault("spend_limit_429")
    if name == "stall":
        return _Fault("stall")
    if name == "redirect":
        return _Fault("redirect")
    if name == "echo_key":
        return _Fault("echo_key")
    head, _, arg = name.partition(":")
    if head == "error_200" and arg:
        return _Fault("error_200", detail=arg)
    if head in ("slow", "retry_after", "huge"):
        try:
            number = float(arg)
        except ValueError:
            number = -1.0
        if number >= 0 and math.isfinite(number):
            if head == "slow":
                return _Fault("slow", delay_s=number / 1000.0)
            if head == "retry_after":
                return _Fault("retry_after", delay_s=number)
            return _Fault("huge", status=int(number))
    elif name.isdigit() and 400 <= int(name) <= 599:
        return _Fault("error", int(name))
    return _Fault("bad_trigger", detail=value)


@dataclass(slots=True)
class _Outage:
    status: OutageStatus
    until: float | None
    models: frozenset[str] | None
    started_at: float

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "active": True,
            "status": self.status,
            "started_at": self.started_at,
            "remaining_s": None if self.until is None else max(0.0, self.until - now),
            "models": None if self.models is None else sorted(self.models),
        }


_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Payment required."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    408: ("timeout_error", "Request timed out."),
    409: ("conflict_error", "Conflict."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}

_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to use this resource."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    413: ("invalid_request_error", "request_too_large", "Request too large."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
    504: ("timeout", None, "Request timed out."),
    529: ("server_error", "overloaded", "The server is overloaded."),
}


def _anthropic_error_body(status: int, message: str | None = None) -> bytes:
    kind, default = _ANTHROPIC_ERRORS.get(
        status,
        ("api_error", "Internal server error")
        if status >= 500
        else ("invalid_request_error", "Request failed."),
    )
    return _encode({"type": "error", "error": {"type": kind, "message": message or default}})


def _openai_error_body(status: int, message: str | None = None) -> bytes:
    kind, code, default = _OPENAI_ERRORS.get(
        status,
        ("server_error", None, "Server error.")
        if status >= 500
        else ("invalid_request_error", None, "Request failed."),
    )
    return _encode(
        {"error": {"message": message or default, "type": kind, "param": None, "code": code}}
    )


_ANTHROPIC_MIDSTREAM_ERROR: Final = (
    b"event: error\ndata: "
    + _encode({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    + b"\n\n"
)
_OPENAI_MIDSTREAM_ERROR: Final = (
    b"data: "
    + _encode(
        {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    )
    + b"\n\n"
)
_SSE_DONE: Final = b"data: [DONE]\n\n"
_PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'
_BLOCK_START: Final = (
    b"event: content_block_start\ndata: "
    b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)
_BLOCK_STOP: Final = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_HEALTHZ: Final = b'{"ok":true}'
_SO_LINGER_RESET: Final = struct.pack("ii", 1, 0)

_JSON: Final = "application/json"


def _sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encode(data) + b"\n\n"


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
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._outage: _Outage | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._triggers: dict[str, _Fault] = {}
        self._waiters: list[_Waiter] = []
        self._config = FaultConfig()
        self._rng = random.Random()
        self._scheduled: list[tuple[float, float, _Fault]] = []
        self._error_statuses: list[int] = []
        self._error_cum: list[float] = []
        self._random_faults = False
        self._has_latency = False
        self._error_cache: dict[tuple[bool, int], bytes] = {}
        self.set_config(config or FaultConfig())
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
        return self._config

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
        """Zero every counter."""
        self._counters = _Counters()

    def set_config(self, config: FaultConfig) -> None:
        """Replace the fault configuration; scheduled outages restart from now."""
        self._config = config
        self._rng = random.Random(config.seed)
        now = time.monotonic()
        self._scheduled = [
            (now + start_s, now + start_s + duration_s, _outage_fault(status))
            for start_s, duration_s, status in config.outages
        ]
        mix = [(s, w) for s, w in sorted(config.error_mix.items()) if w > 0]
        self._error_statuses = [s for s, _ in mix]
        self._error_cum = list(itertools.accumulate(w for _, w in mix))
        self._random_faults = (config.error_rate + config.reset_rate + config.midstream_rate) > 0
        self._has_latency = config.latency_ms > 0 or config.latency_jitter_ms > 0
        self._error_cache = {}

    def start_outage(
        self,
        status: OutageStatus = 529,
        duration_s: float | None = None,
        models: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Answer every inference request (of ``models``, if given) with ``status``.

        Lasts until ``stop_outage()`` or ``duration_s`` seconds. Returns the outage state.
        """
        if isinstance(status, int):
            _check_status(status)
        elif status not in ("reset", "midstream"):
            raise ValueError(f"unknown outage status {status!r}")
        if duration_s is not None and duration_s < 0:
            raise ValueError("duration_s must be >= 0")
        now = time.monotonic()
        self._outage = _Outage(
            status=status,
            until=None if duration_s is None else now + duration_s,
            models=None if models is None else frozenset(models),
            started_at=time.time(),
        )
        return self._outage.describe(now)

    def stop_outage(self) -> None:
        """End the runtime outage, if any."""
        self._outage = None

    def outage_state(self) -> dict[str, Any]:
        """The runtime outage: ``{"active": false}`` or its status, models and time left."""
        now = time.monotonic()
        outage = self._outage
        if outage is None or (outage.until is not None and now >= outage.until):
            self._outage = None
            return {"active": False}
        return outage.describe(now)

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
        self.set_config(self._config)  # scheduled outages count from server start
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

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app[PROVIDER_KEY] = self
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{model_id}", self._handle_model)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_post("/admin/outage", self._admin_start_outage)
        app.router.add_get("/admin/outage", self._admin_get_outage)
        app.router.add_delete("/admin/outage", self._admin_stop_outage)
        app.router.add_get("/admin/counters", self._admin_counters)
        app.router.add_post("/admin/counters/reset", self._admin_reset_counters)
        app.router.add_get("/admin/config", self._admin_get_config)
        app.router.add_put("/admin/config", self._admin_put_config)
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

    # ---- fault choice

    def _choose_fault(
        self, trigger: str | None, model: str, stream: bool, probe: bool
    ) -> _Fault | None:
        c = self._counters
        if trigger is not None and trigger.startswith("fault:"):
            fault = self._triggers.get(trigger)
            if fault is None:
                fault = _parse_trigger(trigger)
                if len(self._triggers) < 1024:
                    self._triggers[trigger] = fault
            _bump(c.by_fault, "trigger")
            return fault
        now = time.monotonic()
        outage = self._outage
        if outage is not None:
            if outage.until is not None and now >= outage.until:
                self._outage = None
            elif outage.models is None or model in outage.models:
                self._count_outage(probe, "outage")
                return _outage_fault(outage.status)
        for start, end, fault in self._scheduled:
            if start <= now < end:
                self._count_outage(probe, "scheduled_outage")
                return fault
        if self._random_faults:
            return self._random_fault(stream)
        return None

    def _count_outage(self, probe: bool, source: str) -> None:
        c = self._counters
        _bump(c.by_fault, source)
        c.outage_requests += 1
        if probe:
            c.outage_probes += 1
        ts = time.time()
        if c.outage_first_ts is None:
            c.outage_first_ts = ts
        c.outage_last_ts = ts

    def _random_fault(self, stream: bool) -> _Fault | None:
        cfg = self._config
        u = self._rng.random()
        if u < cfg.reset_rate:
            fault: _Fault | None = _RESET
        elif u < cfg.reset_rate + cfg.error_rate:
            pick = self._rng.random() * self._error_cum[-1]
            index = min(bisect.bisect_right(self._error_cum, pick), len(self._error_cum) - 1)
            fault = _Fault("error", self._error_statuses[index])
        elif stream and u < cfg.reset_rate + cfg.error_rate + cfg.midstream_rate:
            fault = _MIDSTREAM
        else:
            fault = None
        if fault is not None:
            _bump(self._counters.by_fault, "random")
        return fault

    def _latency_s(self) -> float:
        cfg = self._config
        ms = cfg.latency_ms
        jitter = cfg.latency_jitter_ms
        if jitter > 0:
            if cfg.latency_distribution == "uniform":
                ms += self._rng.uniform(-jitter, jitter)
            else:
                ms += self._rng.expovariate(1.0 / jitter)
        return max(ms, 0.0) / 1000.0

    # ---- responses

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):012x}"

    def _error(self, anthropic: bool, status: int, message: str | None = None) -> web.Response:
        """An error reply in the caller's wire format, counted."""
        self._count_status(str(status))
        headers: dict[str, str] = {"request-id": self._next_id("req_")}
        if status == 429:
            retry = self._config.retry_after_s
            headers["retry-after"] = str(math.ceil(retry))
            headers["retry-after-ms"] = str(round(retry * 1000))
        if message is None:
            cached = self._error_cache.get((anthropic, status))
            if cached is None:
                cached = _anthropic_error_body(status) if anthropic else _openai_error_body(status)
                self._error_cache[(anthropic, status)] = cached
            body = cached
        elif anthropic:
            body = _anthropic_error_body(status, message)
        else:
            body = _openai_error_body(status, message)
        return _json_response(body, status, headers)

    def _spend_limit(self, anthropic: bool, fault: _Fault) -> web.Response:
        if not anthropic:
            self._count_status("429")
            body = _encode(
                {
                    "error": {
                        "message": "You exceeded your current quota, please check your plan "
                        "and billing details.",
                        "type": "insufficient_quota",
                        "param": None,
                        "code": "insufficient_quota",
                    }
                }
            )
            return _json_response(body, 429, {"x-request-id": self._next_id("req_")})
        if fault.kind == "spend_limit":
            self._count_status("400")
            error: dict[str, Any] = {
                "type": "billing_error",
                "message": "Your credit balance is too low to access the Anthropic API.",
            }
            status = 400
        else:
            self._count_status("429")
            error = {
                "type": "rate_limit_error",
                "message": "You have reached your organization's spend limit.",
                "details": {"error_code": "enforced_spend_limit_reached"},
            }
            status = 429
        body = _encode({"type": "error", "error": error})
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

    async def _stream(
        self, request: web.Request, events: list[bytes], request_id: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "request-id": request_id,
            },
        )
        delay = self._config.stream_chunk_delay_ms / 1000.0
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
        self, request: web.Request, anthropic: bool, fault: _Fault
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
        self, request: web.Request, anthropic: bool, fault: _Fault
    ) -> web.StreamResponse:
        """A provider misbehaving: see the hostile triggers in the module docstring."""
        kind = fault.kind
        _bump(self._counters.by_fault, kind)
        if kind == "retry_after":
            status = 529 if anthropic else 429
            self._count_status(str(status))
            body = _anthropic_error_body(status) if anthropic else _openai_error_body(status)
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
            error = {"type": fault.detail, "message": "an error with a success status"}
            payload = {"type": "error", "error": error} if anthropic else {"error": error}
            return _json_response(_encode(payload))
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
                    await response.write(_PING if anthropic else b": keepalive\n\n")
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
        probe = self._count_request(request)
        body = await self._read_body(request, True)
        if isinstance(body, web.Response):
            return body
        try:
            req = _anthropic_decoder.decode(body)
        except msgspec.DecodeError as exc:
            return self._error(True, 400, str(exc))
        _bump(self._counters.by_model, req.model)
        trigger = request.headers.get(FAULT_HEADER)
        if (trigger is None or not trigger.startswith("fault:")) and req.metadata is not None:
            trigger = req.metadata.user_id
        fault = self._choose_fault(trigger, req.model, req.stream, probe)
        midstream = False
        if fault is not None:
            if fault.kind == "midstream":
                midstream = True
            else:
                answer = await self._apply_fault(request, True, fault)
                if answer is not None:
                    return answer
        elif self._has_latency:
            await asyncio.sleep(self._latency_s())

        text, out_tokens, cut = _echo(_last_user_text(req.messages), req.max_tokens)
        text += _padding(fault)
        in_tokens = _count_words([m.content for m in req.messages] + [req.system])
        stop_reason = "max_tokens" if cut else "end_turn"
        message_id = self._next_id("msg_")
        if not req.stream:
            payload = _encode(
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": req.model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens},
                }
            )
            if midstream:
                return await self._truncated(request, payload)
            self._count_status("200")
            return _json_response(payload, headers={"request-id": self._next_id("req_")})

        start = {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": req.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": in_tokens, "output_tokens": 1},
            },
        }
        events = [_sse("message_start", start), _PING, _BLOCK_START]
        events.extend(
            _sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in _pieces(text)
        )
        events.append(_BLOCK_STOP)
        events.append(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": out_tokens},
                },
            )
        )
        events.append(_MESSAGE_STOP)
        if midstream:
            _bump(self._counters.by_fault, "midstream")
            # At the latest just before message_stop, so the client is still listening.
            events = events[: min(self._config.midstream_after_events, len(events) - 1)]
            events.append(_ANTHROPIC_MIDSTREAM_ERROR)
        self._count_status("200")
        return await self._stream(request, events, self._next_id("req_"))

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        probe = self._count_request(request)
        body = await self._read_body(request, False)
        if isinstance(body, web.Response):
            return body
        try:
            req = _openai_decoder.decode(body)
        except msgspec.DecodeError as exc:
            return self._error(False, 400, str(exc))
        _bump(self._counters.by_model, req.model)
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
        elif self._has_latency:
            await asyncio.sleep(self._latency_s())

        limit = req.max_completion_tokens
        if limit is None:
            limit = req.max_tokens
        text, out_tokens, cut = _echo(_last_user_text(req.messages), limit)
        text += _padding(fault)
        in_tokens = _count_words([m.content for m in req.messages])
        finish_reason = "length" if cut else "stop"
        completion_id = self._next_id("chatcmpl-")
        created = int(time.time())
        usage = {
            "prompt_tokens": in_tokens,
            "completion_tokens": out_tokens,
            "total_tokens": in_tokens + out_tokens,
        }
        if not req.stream:
            payload = _encode(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": req.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": usage,
                }
            )
            if midstream:
                return await self._truncated(request, payload)
            self._count_status("200")
            return _json_response(payload, headers={"x-request-id": self._next_id("req_")})

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            return (
                b"data: "
                + _encode(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": req.model,
                        "choices": [
                            {
                                "index": 0,
                                "delta": delta,
                                "logprobs": None,
                                "finish_reason": finish,
                            }
                        ],
                    }
                )
                + b"\n\n"
            )

        events = [chunk({"role": "assistant", "content": ""}, None)]
        events.extend(chunk({"content": piece}, None) for piece in _pieces(text))
        events.append(chunk({}, finish_reason))
        if req.stream_options is not None and req.stream_options.include_usage:
            usage_chunk = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "choices": [],
                "usage": usage,
            }
            events.append(b"data: " + _encode(usage_chunk) + b"\n\n")
        events.append(_SSE_DONE)
        if midstream:
            _bump(self._counters.by_fault, "midstream")
            # At the latest just before [DONE], after which the SDK stops reading.
            events = events[: min(self._config.midstream_after_events, len(events) - 1)]
            events.append(_OPENAI_MIDSTREAM_ERROR)
        self._count_status("200")
        return await self._stream(request, events, self._next_id("req_"))

    # ---- models, health, unknown paths

    def _model_entry(self, model_id: str, anthropic: bool) -> dict[str, Any]:
        if anthropic:
            return {
                "type": "model",
                "id": model_id,
                "display_name": f"Fake {model_id}",
                "created_at": "2025-01-01T00:00:00Z",
                "lifecycle": "active",
            }
        return {"id": model_id, "object": "model", "created": 1735689600, "owned_by": "fake"}

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request)
        models = self._config.models
        self._count_status("200")
        if "anthropic-version" not in request.headers:
            data = [self._model_entry(m, False) for m in models]
            return _json_response(_encode({"object": "list", "data": data}))
        query = request.query
        after, before = query.get("after_id"), query.get("before_id")
        try:
            limit = max(1, min(int(query.get("limit", "20")), 1000))
        except ValueError:
            limit = 20
        if after in models:
            window = models[models.index(after) + 1 :]
            page, more = window[:limit], len(window) > limit
        elif before in models:
            window = models[: models.index(before)]
            page, more = window[-limit:], len(window) > limit
        else:
            page, more = models[:limit], len(models) > limit
        body = {
            "data": [self._model_entry(m, True) for m in page],
            "has_more": more,
            "first_id": page[0] if page else None,
            "last_id": page[-1] if page else None,
        }
        return _json_response(_encode(body))

    async def _handle_model(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request)
        anthropic = "anthropic-version" in request.headers
        model_id = request.match_info["model_id"]
        if model_id not in self._config.models:
            return self._error(anthropic, 404, f"model: {model_id}")
        self._count_status("200")
        return _json_response(_encode(self._model_entry(model_id, anthropic)))

    async def _handle_healthz(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_HEALTHZ)

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        self._count_request(request)
        anthropic = "anthropic-version" in request.headers
        return self._error(anthropic, 404, f"Not found: {request.method} {request.path}")

    # ---- admin

    async def _admin_start_outage(self, request: web.Request) -> web.StreamResponse:
        try:
            spec = _outage_decoder.decode(await request.read() or b"{}")
            state = self.start_outage(spec.status, spec.duration_s, spec.models)
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

    async def _admin_get_config(self, request: web.Request) -> web.StreamResponse:
        return _json_response(_encode(self._config))

    async def _admin_put_config(self, request: web.Request) -> web.StreamResponse:
        try:
            config = _config_decoder.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _admin_error(str(exc))
        self.set_config(config)
        return _json_response(_encode(config))


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


# --------------------------------------------------------------------------- threads & CLI

_T = TypeVar("_T")


class FakeProviderThread:
    """A ``FakeProvider`` running on its own event loop in a daemon thread.

    Every method is safe to call from any other thread. Use as a context manager or call
    ``stop()``.
    """

    def __init__(
        self,
        provider: FakeProvider,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        url: str,
    ) -> None:
        """Wrap a started ``provider`` served by ``loop`` in ``thread``; see ``run_in_thread``."""
        self.provider = provider
        self.url = url
        self._loop = loop
        self._thread = thread

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = 30.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._run(call())

    def counters(self) -> dict[str, Any]:
        """A snapshot of the request counters (see ``FakeProvider.counters``)."""
        return self._call(lambda: self.provider.counters)

    def reset_counters(self) -> None:
        """Zero every counter."""
        self._call(self.provider.reset_counters)

    def start_outage(
        self,
        status: OutageStatus = 529,
        duration_s: float | None = None,
        models: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Start a runtime outage (see ``FakeProvider.start_outage``)."""
        return self._call(lambda: self.provider.start_outage(status, duration_s, models))

    def stop_outage(self) -> None:
        """End the runtime outage, if any."""
        self._call(self.provider.stop_outage)

    def set_config(self, config: FaultConfig) -> None:
        """Replace the fault configuration."""
        self._call(lambda: self.provider.set_config(config))

    def wait_for_counters(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Block until ``predicate(counters)`` holds; ``TimeoutError`` after ``timeout``."""
        return self._run(self.provider.wait_for_counters(predicate, timeout), None)

    def stop(self) -> None:
        """Stop the server, its loop and its thread (idempotent)."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self.provider.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeProviderThread:
        """Return the handle itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server."""
        self.stop()


def _loop_main(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def run_in_thread(
    config: FaultConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> FakeProviderThread:
    """Start a fake provider on its own loop in a daemon thread and return its handle."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_loop_main, args=(loop,), name="fake-provider", daemon=True)
    thread.start()
    provider: FakeProvider | None = None

    async def create_and_start() -> tuple[FakeProvider, str]:
        created = FakeProvider(config)
        return created, await created.start(host, port)

    try:
        provider, url = asyncio.run_coroutine_threadsafe(create_and_start(), loop).result(30)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        raise
    return FakeProviderThread(provider, loop, thread, url)


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


def parse_outage(text: str) -> tuple[float, float, OutageStatus]:
    """``START_S:DURATION_S:STATUS`` (STATUS a code, ``reset`` or ``midstream``) as an
    entry of ``FaultConfig.outages``; ``ValueError`` if it is not that."""
    try:
        start, duration, status_text = text.split(":")
        status: OutageStatus
        if status_text == "reset":
            status = "reset"
        elif status_text == "midstream":
            status = "midstream"
        else:
            status = int(status_text)
        return float(start), float(duration), status
    except ValueError:
        raise ValueError(f"outage {text!r} is not START_S:DURATION_S:STATUS") from None


def parse_error_mix(text: str) -> dict[int, float]:
    """``STATUS:WEIGHT,...`` as a ``FaultConfig.error_mix``; ``ValueError`` if it is not that."""
    try:
        return {
            int(status): float(weight)
            for status, weight in (item.split(":") for item in text.split(",") if item)
        }
    except ValueError:
        raise ValueError(f"error mix {text!r} is not STATUS:WEIGHT,...") from None


def config_from_options(
    config_file: str | os.PathLike[str] | None = None, **options: Any
) -> FaultConfig:
    """The ``FaultConfig`` of ``ridethrough fake-provider``: the JSON ``config_file`` (if
    any) with every option that is not ``None`` laid over it (options are its fields).

    Raises ``ValueError`` for a value or file that is not a valid config, ``OSError`` for
    a file that cannot be read.
    """
    unknown = options.keys() - set(FaultConfig.__struct_fields__)
    if unknown:
        raise TypeError(f"not FaultConfig fields: {', '.join(sorted(unknown))}")
    fields: dict[str, Any] = {}
    try:
        if config_file is not None:
            with open(config_file, "rb") as handle:
                fields = msgspec.structs.asdict(_config_decoder.decode(handle.read()))
        fields.update((name, value) for name, value in options.items() if value is not None)
        return msgspec.convert(fields, FaultConfig)
    except msgspec.DecodeError as exc:  # a ValidationError too
        raise ValueError(str(exc)) from None
