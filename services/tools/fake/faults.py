"""Which fault answers a request: the ``FaultConfig``, the ``fault:...`` triggers, and the choice.

Fault triggers
--------------
A request chooses its own fault, whatever the configuration, when the header
``x-fake-fault`` or the user field (Anthropic ``metadata.user_id``, OpenAI ``user``) holds
one of these values (the header wins when both are set):

``fault:<status>``
    That HTTP status (400-599) with a wire-format error body (the error types per status
    are in ``anthropic_wire`` and ``openai_wire``). 429 replies carry ``retry-after``
    (whole seconds) and ``retry-after-ms`` headers from ``FaultConfig.retry_after_s``.
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
    A client whose timeout is shorter sees a timeout: the shape of a model that hangs.

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

A scheduled outage is ``[start_s, duration_s, status]`` (every model), or an object
(``Outage``) that can also name ``models`` (only their requests are hit; empty: every
model) and be ``"status": "slow"`` with ``slow_ms`` (a normal reply after ``slow_ms``: a
model that times out). Several windows make a shape: a flapping model is two windows of
one model with a gap between them. The runtime outage (admin) takes ``models`` and
``"slow"`` too. Every window, scheduled or runtime, is kept in ``Faults.windows()`` in
wall-clock time, so a reader of the call log can tell which calls fell inside one.

For each inference request the first match wins: trigger, runtime outage (admin), scheduled
outage, random reset / error / mid-stream, else a normal reply. Only normal replies wait the
configured latency; faults are answered at once (``fault:slow`` waits its own delay).
How each fault is answered on the wire is the server's part (``server.py``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import msgspec

from services.tools.fake.statuspage import check_component_status

OutageStatus: TypeAlias = int | Literal["reset", "midstream"]
"""What an outage answers: an HTTP error status, a connection reset or a mid-stream error."""

WindowStatus: TypeAlias = int | Literal["reset", "midstream", "slow"]
"""What an outage window answers: an ``OutageStatus``, or ``"slow"``: a normal reply after
the window's ``slow_ms`` (a client with a shorter timeout times out)."""

DEFAULT_MODELS: Final[tuple[str, ...]] = ("claude-fake", "gpt-fake")
FAULT_HEADER: Final = "x-fake-fault"
#: At most this many distinct trigger values are remembered parsed.
_TRIGGER_CACHE: Final = 1024


def _default_error_mix() -> dict[int, float]:
    return {500: 1.0, 503: 1.0, 529: 2.0, 429: 1.0}


def _default_models() -> list[str]:
    return list(DEFAULT_MODELS)


class Outage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One scheduled outage window, in object form: ``status`` from ``start_s`` for
    ``duration_s`` seconds (relative to when the config took effect), for the requests of
    ``models`` only (empty: every model). ``status`` ``"slow"`` answers normally after
    ``slow_ms`` milliseconds instead."""

    start_s: float
    duration_s: float
    status: WindowStatus = 529
    slow_ms: float = 0.0
    models: list[str] = msgspec.field(default_factory=list)
    #: The doors it hits (``DOORS``; empty: every door).
    doors: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        """Reject values that cannot work (raises ``ValueError``)."""
        if self.start_s < 0 or self.duration_s < 0:
            raise ValueError("outage start_s and duration_s must be >= 0")
        check_window_status(self.status, self.slow_ms)
        check_doors(self.doors)


class FaultConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Scripted faults of a fake provider; the defaults inject none.

    ``latency_ms`` is the base delay of a reply. ``latency_jitter_ms`` spreads it:
    ``uniform`` draws from ``latency_ms ± jitter`` (never below 0), ``exponential`` adds an
    exponential tail with mean ``jitter``. ``error_rate``, ``reset_rate`` and
    ``midstream_rate`` are probabilities (their sum at most 1) drawn once per request;
    an error takes its status from ``error_mix`` (status -> weight). ``midstream_rate``
    applies to streaming requests only. ``outages`` are ``(start_s, duration_s, status)``
    windows relative to when the config took effect, ``status`` an HTTP status,
    ``"reset"`` or ``"midstream"``, or ``Outage`` objects (per model, or slow).
    ``stream_chunk_delay_ms`` paces SSE events. ``capacity`` (0: none) is the most
    inference requests answered at once: one more gets a 429 ``rate_limit_error`` with
    ``retry-after`` (a provider at its limit).
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
    capacity: int = 0
    outages: list[tuple[float, float, OutageStatus] | Outage] = msgspec.field(default_factory=list)
    models: list[str] = msgspec.field(default_factory=_default_models)
    #: Scheduled incidents of the status page: ``(start_s, duration_s, component, status)``
    #: (``statuspage.py``), relative to when the config took effect, like ``outages``.
    status_incidents: list[tuple[float, float, str, str]] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        """Reject values that cannot work (raises ``ValueError``)."""
        for name in ("latency_ms", "latency_jitter_ms", "retry_after_s", "stream_chunk_delay_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0 (0: no limit)")
        rates = (self.error_rate, self.reset_rate, self.midstream_rate)
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise ValueError("error_rate, reset_rate and midstream_rate must be within [0, 1]")
        if sum(rates) > 1.0 + 1e-9:
            raise ValueError("error_rate + reset_rate + midstream_rate must be <= 1")
        for status, weight in self.error_mix.items():
            check_status(status)
            if weight < 0:
                raise ValueError(f"error_mix weight for {status} must be >= 0")
        if self.error_rate > 0 and sum(self.error_mix.values()) <= 0:
            raise ValueError("error_mix needs a positive weight when error_rate > 0")
        if self.midstream_after_events < 0:
            raise ValueError("midstream_after_events must be >= 0")
        for outage in self.outages:
            if isinstance(outage, Outage):
                continue  # checked when it was built
            start_s, duration_s, outage_status = outage
            if start_s < 0 or duration_s < 0:
                raise ValueError("outage start_s and duration_s must be >= 0")
            if isinstance(outage_status, int):
                check_status(outage_status)
        if not self.models:
            raise ValueError("models must not be empty")
        for start_s, duration_s, _, component_status in self.status_incidents:
            if start_s < 0 or duration_s < 0:
                raise ValueError("status incident start_s and duration_s must be >= 0")
            check_component_status(component_status)


def check_status(status: int) -> None:
    """Raise ``ValueError`` unless ``status`` is an error status (400-599)."""
    if not 400 <= status <= 599:
        raise ValueError(f"error status {status} must be within 400-599")


def check_window_status(status: WindowStatus, slow_ms: float) -> None:
    """Raise ``ValueError`` unless ``status`` (with ``slow_ms``) can answer an outage."""
    if isinstance(status, int):
        check_status(status)
    elif status not in ("reset", "midstream", "slow"):
        raise ValueError(f"unknown outage status {status!r}")
    if slow_ms < 0 or not math.isfinite(slow_ms):
        raise ValueError("slow_ms must be >= 0")
    if (status == "slow") != (slow_ms > 0):
        raise ValueError('status "slow" needs slow_ms > 0, and slow_ms needs status "slow"')


def as_outage(entry: tuple[float, float, OutageStatus] | Outage) -> Outage:
    """An entry of ``FaultConfig.outages`` in object form."""
    if isinstance(entry, Outage):
        return entry
    start_s, duration_s, status = entry
    return Outage(start_s=start_s, duration_s=duration_s, status=status)


_config_decoder: Final = msgspec.json.Decoder(FaultConfig)


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

FaultSource: TypeAlias = Literal["trigger", "outage", "scheduled_outage", "random"]
"""Why a request got its fault (the ``by_fault`` counter it bumps)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: its kind, and the status, delay or detail the kind needs."""

    kind: FaultKind
    status: int = 0
    delay_s: float = 0.0
    detail: str = ""


RESET: Final = Fault("reset")
MIDSTREAM: Final = Fault("midstream")


def outage_fault(status: WindowStatus, slow_ms: float = 0.0) -> Fault:
    """The fault an outage with ``status`` (and ``slow_ms``, for ``"slow"``) answers with."""
    if status == "reset":
        return RESET
    if status == "midstream":
        return MIDSTREAM
    if status == "slow":
        return Fault("slow", delay_s=slow_ms / 1000.0)
    assert isinstance(status, int)
    return Fault("error", status)


def parse_trigger(value: str) -> Fault:
    """The fault a ``fault:...`` trigger asks for (``bad_trigger`` when it is none)."""
    name = value[len("fault:") :]
    if name == "reset":
        return RESET
    if name == "midstream":
        return MIDSTREAM
    if name == "spend_limit":
        return Fault("spend_limit")
    if name == "spend_limit_429":
        return Fault("spend_limit_429")
    if name == "stall":
        return Fault("stall")
    if name == "redirect":
        return Fault("redirect")
    if name == "echo_key":
        return Fault("echo_key")
    head, _, arg = name.partition(":")
    if head == "error_200" and arg:
        return Fault("error_200", detail=arg)
    if head in ("slow", "retry_after", "huge"):
        try:
            number = float(arg)
        except ValueError:
            number = -1.0
        if number >= 0 and math.isfinite(number):
            if head == "slow":
                return Fault("slow", delay_s=number / 1000.0)
            if head == "retry_after":
                return Fault("retry_after", delay_s=number)
            return Fault("huge", status=int(number))
    elif name.isdigit() and 400 <= int(name) <= 599:
        return Fault("error", int(name))
    return Fault("bad_trigger", detail=value)


def padding(fault: Fault | None) -> str:
    """The padding a ``fault:huge:<bytes>`` trigger asks for ("" for any other reply)."""
    if fault is None or fault.kind != "huge":
        return ""
    return " " + "x" * fault.status


#: The fake's doors: the first-party Messages API, Chat Completions, and the Messages API
#: as Amazon Bedrock and Google Vertex AI serve it. An outage may hit some of them only.
DOORS: Final = ("anthropic", "openai", "bedrock", "vertex")


def check_doors(doors: Sequence[str] | None) -> None:
    """Refuse a door the fake does not have (``ValueError``)."""
    for door in doors or ():
        if door not in DOORS:
            raise ValueError(f"unknown door {door!r}; the fake's doors are {', '.join(DOORS)}")


@dataclass(slots=True)
class _Outage:
    status: WindowStatus
    until: float | None
    models: frozenset[str] | None
    started_at: float
    slow_ms: float = 0.0
    doors: frozenset[str] | None = None

    def describe(self, now: float) -> dict[str, Any]:
        described: dict[str, Any] = {
            "active": True,
            "status": self.status,
            "started_at": self.started_at,
            "remaining_s": None if self.until is None else max(0.0, self.until - now),
            "models": None if self.models is None else sorted(self.models),
        }
        if self.doors is not None:
            described["doors"] = sorted(self.doors)
        if self.status == "slow":
            described["slow_ms"] = self.slow_ms
        return described


@dataclass(frozen=True, slots=True)
class _Scheduled:
    start: float
    end: float
    fault: Fault
    models: frozenset[str] | None
    doors: frozenset[str] | None = None


def _window(
    start: float, end: float | None, status: WindowStatus, slow_ms: float, models: Any, kind: str
) -> dict[str, Any]:
    """One entry of ``Faults.windows()``."""
    return {
        "start": start,
        "end": end,
        "status": status,
        "slow_ms": slow_ms,
        "models": sorted(models) if models else [],
        "kind": kind,
    }


# --------------------------------------------------------------------------- the choice


class Faults:
    """The fault (if any) of each inference request, and the latency of a normal reply.

    Holds the ``FaultConfig`` in effect, its random draws and scheduled outages, and the
    runtime outage the admin API starts. Not thread-safe: the server's event loop owns it.
    """

    def __init__(self, config: FaultConfig) -> None:
        """Choose faults by ``config`` (scheduled outages count from now)."""
        self._triggers: dict[str, Fault] = {}
        self._outage: _Outage | None = None
        self.config = config
        self.has_latency = False
        self._rng = random.Random()
        self._scheduled: list[_Scheduled] = []
        self._scheduled_windows: list[dict[str, Any]] = []
        self._runtime_windows: list[dict[str, Any]] = []
        self._error_statuses: list[int] = []
        self._error_cum: list[float] = []
        self._random_faults = False
        self.configure(config)

    def configure(self, config: FaultConfig) -> None:
        """Replace the fault configuration; scheduled outages restart from now."""
        self.config = config
        self._rng = random.Random(config.seed)
        now = time.monotonic()
        wall = time.time()
        outages = [as_outage(entry) for entry in config.outages]
        self._scheduled = [
            _Scheduled(
                now + o.start_s,
                now + o.start_s + o.duration_s,
                outage_fault(o.status, o.slow_ms),
                frozenset(o.models) if o.models else None,
                frozenset(o.doors) if o.doors else None,
            )
            for o in outages
        ]
        self._scheduled_windows = [
            _window(
                wall + o.start_s,
                wall + o.start_s + o.duration_s,
                o.status,
                o.slow_ms,
                o.models,
                "scheduled",
            )
            for o in outages
        ]
        mix = [(s, w) for s, w in sorted(config.error_mix.items()) if w > 0]
        self._error_statuses = [s for s, _ in mix]
        self._error_cum = list(itertools.accumulate(w for _, w in mix))
        self._random_faults = (config.error_rate + config.reset_rate + config.midstream_rate) > 0
        self.has_latency = config.latency_ms > 0 or config.latency_jitter_ms > 0

    # ---- the runtime outage

    def start_outage(
        self,
        status: WindowStatus = 529,
        duration_s: float | None = None,
        models: Sequence[str] | None = None,
        slow_ms: float = 0.0,
        doors: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Answer every inference request (of ``models``, if given) with ``status``
        (``"slow"``: a normal reply after ``slow_ms``).

        Lasts until ``stop_outage()`` or ``duration_s`` seconds; a new one ends the
        previous one. Returns the outage state.
        """
        check_window_status(status, slow_ms)
        check_doors(doors)
        if duration_s is not None and duration_s < 0:
            raise ValueError("duration_s must be >= 0")
        self.stop_outage()
        now = time.monotonic()
        wall = time.time()
        self._outage = _Outage(
            status=status,
            until=None if duration_s is None else now + duration_s,
            models=None if models is None else frozenset(models),
            started_at=wall,
            slow_ms=slow_ms,
            doors=frozenset(doors) if doors else None,
        )
        self._runtime_windows.append(
            _window(
                wall,
                None if duration_s is None else wall + duration_s,
                status,
                slow_ms,
                models,
                "runtime",
            )
        )
        return self._outage.describe(now)

    def stop_outage(self) -> None:
        """End the runtime outage, if any."""
        if self._outage is not None and self._runtime_windows:
            last = self._runtime_windows[-1]
            now = time.time()
            if last["end"] is None or last["end"] > now:
                last["end"] = now
        self._outage = None

    def windows(self) -> list[dict[str, Any]]:
        """Every outage window, oldest first: the scheduled ones of the config in effect and
        the runtime ones since the last ``forget_windows()``.

        Each is ``{"start", "end", "status", "slow_ms", "models", "kind"}``: Unix times
        (``end`` is ``None`` while an open-ended runtime outage lasts), ``models`` empty
        for every model, ``kind`` ``"scheduled"`` or ``"runtime"``.
        """
        self.outage_state()  # an elapsed runtime outage ends here
        windows = [dict(w) for w in self._scheduled_windows + self._runtime_windows]
        return sorted(windows, key=lambda w: float(w["start"]))

    def forget_windows(self) -> None:
        """Forget past runtime outage windows (the running one, if any, is kept)."""
        now = time.time()
        self._runtime_windows = [
            w for w in self._runtime_windows if w["end"] is None or w["end"] > now
        ][-1:]

    def outage_state(self) -> dict[str, Any]:
        """The runtime outage: ``{"active": false}`` or its status, models and time left."""
        now = time.monotonic()
        outage = self._outage
        if outage is None or (outage.until is not None and now >= outage.until):
            self._outage = None
            return {"active": False}
        return outage.describe(now)

    # ---- per request

    def choose(
        self, trigger: str | None, model: str, stream: bool, door: str = "anthropic"
    ) -> tuple[Fault | None, FaultSource | None]:
        """The fault of a request for ``model`` and why, or ``(None, None)`` for a normal reply.

        ``trigger`` is the request's trigger value, if any (see the module docstring).
        """
        if trigger is not None and trigger.startswith("fault:"):
            triggered = self._triggers.get(trigger)
            if triggered is None:
                triggered = parse_trigger(trigger)
                if len(self._triggers) < _TRIGGER_CACHE:
                    self._triggers[trigger] = triggered
            return triggered, "trigger"
        now = time.monotonic()
        outage = self._outage
        if outage is not None:
            if outage.until is not None and now >= outage.until:
                self._outage = None
            elif (outage.models is None or model in outage.models) and (
                outage.doors is None or door in outage.doors
            ):
                return outage_fault(outage.status, outage.slow_ms), "outage"
        for window in self._scheduled:
            if (
                window.start <= now < window.end
                and (window.models is None or model in window.models)
                and (window.doors is None or door in window.doors)
            ):
                return window.fault, "scheduled_outage"
        if self._random_faults:
            drawn = self._random_fault(stream)
            if drawn is not None:
                return drawn, "random"
        return None, None

    def _random_fault(self, stream: bool) -> Fault | None:
        cfg = self.config
        u = self._rng.random()
        if u < cfg.reset_rate:
            return RESET
        if u < cfg.reset_rate + cfg.error_rate:
            pick = self._rng.random() * self._error_cum[-1]
            index = min(bisect.bisect_right(self._error_cum, pick), len(self._error_cum) - 1)
            return Fault("error", self._error_statuses[index])
        if stream and u < cfg.reset_rate + cfg.error_rate + cfg.midstream_rate:
            return MIDSTREAM
        return None

    def latency_s(self) -> float:
        """The delay of a normal reply, drawn from the configured latency and jitter."""
        cfg = self.config
        ms = cfg.latency_ms
        jitter = cfg.latency_jitter_ms
        if jitter > 0:
            if cfg.latency_distribution == "uniform":
                ms += self._rng.uniform(-jitter, jitter)
            else:
                ms += self._rng.expovariate(1.0 / jitter)
        return max(ms, 0.0) / 1000.0


# --------------------------------------------------------------------------- from options


def parse_outage(text: str) -> tuple[float, float, OutageStatus] | Outage:
    """``START_S:DURATION_S:STATUS[:MODEL,...]`` as an entry of ``FaultConfig.outages``;
    ``ValueError`` if it is not that.

    STATUS is a code, ``reset``, ``midstream`` or ``slow=<ms>``. Everything after the third
    colon is a comma-separated list of the models it hits (model names may hold colons).
    Without models and slowness it is the tuple form, else an ``Outage``.
    """
    shape = "START_S:DURATION_S:STATUS[:MODEL,...]"
    try:
        start, duration, status_text, *rest = text.split(":", 3)
        models = [m for m in rest[0].split(",") if m] if rest else []
        if rest and not models:
            raise ValueError("no models after the third colon")
        status: OutageStatus
        slow_ms = 0.0
        if status_text == "reset":
            status = "reset"
        elif status_text == "midstream":
            status = "midstream"
        elif status_text.startswith("slow="):
            slow_ms = float(status_text.removeprefix("slow="))
            return Outage(
                start_s=float(start),
                duration_s=float(duration),
                status="slow",
                slow_ms=slow_ms,
                models=models,
            )
        else:
            status = int(status_text)
        if models:
            return Outage(
                start_s=float(start), duration_s=float(duration), status=status, models=models
            )
        return float(start), float(duration), status
    except ValueError:
        raise ValueError(f"outage {text!r} is not {shape}") from None


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
