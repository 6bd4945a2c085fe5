"""The outage drill: a whole fleet on this machine, an outage of a real shape, and a report.

``ridethrough demo`` starts embedded NATS, the fake provider, two worker processes, the
prober and the replayer; submits a steady stream of jobs for two models (the first one is
the one that falls sick); has the fake play one scenario's outage; shows live progress; and
ends with an outage report. It exits non-zero if any job was lost or duplicated.

Scenarios (times from the first job; ``outage_at_s`` and ``outage_s`` set them):

``provider-outage``
    Every model answers 529 for ``outage_s`` (the drill of old: the whole provider is down).
``model-outage``
    The sick model answers 529 for ``outage_s``; the other stays healthy.
``slow``
    The sick model answers only after ``slow_ms`` for ``outage_s``; the provider's read
    timeout is ``timeout_s`` (and its latency budget half of it), so its calls time out.
``flapping``
    The sick model answers 529, recovers for ``recovery_s``, and answers 529 again: two
    outages of ``(outage_s - recovery_s) / 2`` each.
``failover``
    The first-party door of the fake answers 529 for ``outage_s``; its Bedrock door stays up.
    Every job carries tools, an image and a cached system prompt, and names the provider
    ``bedrock`` (kind ``anthropic-bedrock``, the real SDK client with dummy AWS keys, a
    ``model_map`` to Bedrock ids) as its fallback: the jobs fail over instead of parking.
    The fake records every request; the report's ``failover`` section says how many
    reached the Bedrock door, how many of those were the job's request byte for byte (the
    body without Bedrock's ``anthropic_version``, keys sorted, against the request the
    drill submitted; the model, in the path, the job's through ``model_map``), and how many
    results name the Bedrock door as a fallback (``served_by``).

The fake plays the whole shape itself (scheduled windows of ``FaultConfig.outages``,
installed when the first job goes out), so the drill's timing does not lean on this loop.

The report
----------
The keys of old (``REPORT_KEYS`` minus ``models``) keep their meaning: ``calls_during_outage``
and ``probes_during_outage`` count the requests the fake answered with its outage fault,
``detect_s`` runs from the first fault to the first breaker opening (any scope),
``drain_s`` from the last fault's end to an empty AI_PARKED with every result in.

``models`` holds, per model: ``role`` (sick: some fault hit it), ``submitted``,
``succeeded``, and the numbers of ``services.tools.timeline`` (its docstring defines
them): ``parked``, ``parked_while_healthy``, ``calls_during_outage``, ``calls_while_open``,
``calls_during_outage_beyond_trip``, ``probes_during_outage``, ``trip_s``. They are worked
out after the run from records nobody in the fleet writes for the drill:

- parks: a plain NATS subscription on ``ai.parked.>`` sees every parked record the workers
  store (job id, model, ``park.parked_at``); a job whose result came from a replay (its
  result's msg id is ``<job_id>:r<n>``) counts as parked too, in case one was missed;
- breaker history: every ``ai.events.health.<provider>[.<model_token>]`` event on AI_EVENTS;
- calls: the fake's call log (``GET /admin/calls``), probes apart, and its fault windows.

The grace after a trip is two board polls (``breaker.board_poll_s``): the bound of a worker's
view of the board when the health event that wakes it is lost (polling alone, measured: calls
0.22 s after the open with polls of 0.2 s). ``calls_while_open`` counts with no grace at all:
with the event, 0 or 1 in each scenario of ``scripts/outage_shapes.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

import aiohttp
import msgspec
from nats.js import JetStreamContext
from pydantic import SecretStr
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from schemas import subjects as s
from schemas.events import decode_health_event
from schemas.jobs import Job, Target
from schemas.parking import decode_parked
from schemas.results import decode_result
from services.breaker import decode_lease
from services.config import NotifySettings, ProviderSettings, Settings
from services.jetstream.errors import NOT_FOUND
from services.jetstream.streams import iter_stream
from services.producer import Producer, make_job
from services.tools.devstack import free_port
from services.tools.fake import FaultConfig, Outage
from services.tools.receiver import Received, Receiver
from services.tools.stack import ServiceProcess, local_stack
from services.tools.timeline import Transition, Window, model_numbers

log = logging.getLogger("ridethrough.demo")

REPORT_KEYS = (
    "submitted",
    "succeeded",
    "dead",
    "lost",
    "duplicates",
    "calls_during_outage",
    "probes_during_outage",
    "detect_s",
    "drain_s",
    "peak_parked",
    "models",
)

Scenario = Literal["provider-outage", "model-outage", "slow", "flapping", "failover"]
#: The scenarios whose jobs park through the outage (``failover`` parks none).
SCENARIOS: Final[tuple[str, ...]] = ("provider-outage", "model-outage", "slow", "flapping")
ALL_SCENARIOS: Final[tuple[str, ...]] = get_args(Scenario)

#: ``failover``: the fallback provider (the fake's Bedrock door) and its model ids.
FALLBACK: Final = "bedrock"
BEDROCK_IDS: Final = {
    "claude-opus-4-1": "anthropic.claude-opus-4-1-20250805-v1:0",
    "claude-haiku-4-5": "anthropic.claude-haiku-4-5-20251001-v1:0",
}
#: A 1x1 PNG: the image every ``failover`` job carries.
_PNG: Final = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJ"
    "RU5ErkJggg=="
)

#: The model that falls sick and the one that stays healthy (the prober's default probe
#: model for an Anthropic provider is the healthy one).
SICK_MODEL: Final = "claude-opus-4-1"
HEALTHY_MODEL: Final = "claude-haiku-4-5"

_EVENTS_FILTER: Final = "ai.events.health.>"
_PARKED_FILTER: Final = "ai.parked.>"


@dataclass(frozen=True)
class Drill:
    """What the drill does: how many jobs, how fast, which outage, when and how long."""

    jobs: int = 600
    rate: float = 50.0
    outage_s: float = 8.0
    outage_at_s: float = 3.0
    seed: int = 1
    provider: str = "anthropic"
    #: The jobs' models, taken in turn; the first is the one that falls sick.
    models: tuple[str, ...] = (SICK_MODEL, HEALTHY_MODEL)
    latency_ms: float = 40.0
    deadline_s: float = 120.0
    scenario: Scenario = "provider-outage"
    #: ``flapping``: the short recovery between its two outages.
    recovery_s: float = 2.0
    #: ``slow``: how late the sick model answers, and the provider's read timeout.
    slow_ms: float = 3000.0
    timeout_s: float = 1.0
    #: Run ``ridethrough notifier`` too, its sinks on a local receiver that prints each
    #: notification it gets (``--notify``).
    notify: bool = False
    #: The notifier's flap window in the drill (short: the drill waits for the summary).
    flap_window_s: float = 3.0
    #: Calls through the HTTP gateway (the official anthropic SDK, only ``base_url``
    #: changed), made as the outage starts (``--gateway N``); 0: no gateway.
    gateway_calls: int = 0

    def __post_init__(self) -> None:
        """Refuse a scenario that does not exist or a drill without a model."""
        if self.scenario not in ALL_SCENARIOS:
            raise ValueError(f"scenario {self.scenario!r} is not one of {', '.join(ALL_SCENARIOS)}")
        if not self.models:
            raise ValueError("a drill needs at least one model")

    @property
    def sick(self) -> str:
        """The model the outage hits (every model, in ``provider-outage``)."""
        return self.models[0]

    def outages(self) -> list[Outage]:
        """The fake's fault windows for this scenario, from the first job."""
        at, length, sick = self.outage_at_s, self.outage_s, [self.sick]
        if self.scenario == "provider-outage":
            return [Outage(start_s=at, duration_s=length)]
        if self.scenario == "failover":  # the first-party door only: Bedrock's stays up
            return [Outage(start_s=at, duration_s=length, doors=["anthropic"])]
        if self.scenario == "model-outage":
            return [Outage(start_s=at, duration_s=length, models=sick)]
        if self.scenario == "slow":
            slow = self.slow_ms
            return [Outage(start_s=at, duration_s=length, status="slow", slow_ms=slow, models=sick)]
        each = max((length - self.recovery_s) / 2, 0.5)
        second = at + each + self.recovery_s
        return [
            Outage(start_s=at, duration_s=each, models=sick),
            Outage(start_s=second, duration_s=each, models=sick),
        ]


@dataclass
class ModelProgress:
    """What the monitor has seen of one model so far."""

    submitted: int = 0
    succeeded: int = 0
    parked: set[str] = field(default_factory=set)


@dataclass
class Progress:
    """What the monitor has seen so far (times are Unix times)."""

    submitted: int = 0
    results: int = 0
    parked: int = 0
    peak_parked: int = 0
    dead: int = 0
    replayed: int = 0
    states: dict[str, str] = field(default_factory=dict)
    models: dict[str, ModelProgress] = field(default_factory=dict)
    load_started: float | None = None
    drained: float | None = None
    first_replayed_result: float | None = None
    phase: str = "starting"
    #: The job ids of every result seen: the drill is done when each of its jobs has one
    #: (AI_RESULTS also holds the gateway's calls).
    result_ids: set[str] = field(default_factory=set)


def drill_settings(base: Settings, drill: Drill | None = None) -> Settings:
    """The drill's settings: quick probes and backoff so a short drill shows a full cycle;
    for ``slow``, the provider's read timeout and latency budget that make the sick model's
    calls fail."""
    settings = base.with_changes(
        breaker=base.breaker.model_copy(
            update={"probe_interval_s": 0.5, "probe_max_interval_s": 2.0, "board_poll_s": 0.2}
        ),
        replay=base.replay.model_copy(
            update={"initial_rate": 10.0, "ramp_interval_s": 0.5, "max_rate": 400.0, "lease_s": 2.0}
        ),
        worker=base.worker.model_copy(update={"backoff_base_s": 0.2, "backoff_max_s": 2.0}),
    )
    if drill is not None and drill.scenario == "failover":
        door = ProviderSettings(
            kind="anthropic-bedrock",
            model_map={m: BEDROCK_IDS.get(m, f"anthropic.{m}-v1:0") for m in drill.models},
        )
        settings = settings.with_changes(providers={**settings.providers, FALLBACK: door})
    if drill is not None and drill.scenario == "slow":
        provider = settings.providers[drill.provider].model_copy(
            update={"timeout_s": drill.timeout_s, "latency_budget_s": drill.timeout_s / 2}
        )
        settings = settings.with_changes(providers={**settings.providers, drill.provider: provider})
    return settings


def _scope(subject: str) -> tuple[str, str] | None:
    """(provider, model) of a health event's subject; model ``""`` for the provider's scope."""
    tokens = subject.split(".")
    if len(tokens) == 4:
        return tokens[3], ""
    if len(tokens) == 5:
        try:
            return tokens[3], s.model_from_token(tokens[4])
        except ValueError:
            return None
    return None


def _scope_label(provider: str, model: str) -> str:
    return f"{provider}/{model}" if model else provider


def _phase(drill: Drill, started: float, now: float) -> str:
    windows = drill.outages()
    for o in windows:
        if started + o.start_s <= now < started + o.start_s + o.duration_s:
            what = "slow answers" if o.status == "slow" else f"{o.status} storm"
            return f"{what} ({', '.join(o.models) or 'every model'})"
    if now < started + windows[0].start_s:
        return "steady load"
    if now < started + max(o.start_s + o.duration_s for o in windows):
        return "short recovery"
    return "recovering"


def _tables(drill: Drill, p: Progress) -> Group:
    t = Table(title=f"ridethrough drill: {drill.scenario} — {p.phase}", show_header=True)
    for col in ("submitted", "completed", "parked", "replayed", "dead"):
        t.add_column(col, justify="right")
    t.add_column("breakers open")
    opened = [k for k, v in sorted(p.states.items()) if v != "closed"]
    breakers = ", ".join(f"{k}: {p.states[k]}" for k in opened) or "all closed"
    t.add_row(
        f"{p.submitted}/{drill.jobs}",
        str(p.results - p.dead),
        str(p.parked),
        str(p.replayed),
        str(p.dead),
        breakers,
    )
    m = Table(show_header=True)
    m.add_column("model")
    for col in ("submitted", "succeeded", "parked"):
        m.add_column(col, justify="right")
    m.add_column("breaker")
    for model, mp in p.models.items():
        role = (
            "sick" if any(not o.models or model in o.models for o in drill.outages()) else "healthy"
        )
        state = p.states.get(_scope_label(drill.provider, model), "closed")
        m.add_row(
            f"{model} ({role})", str(mp.submitted), str(mp.succeeded), str(len(mp.parked)), state
        )
    return Group(t, m)


async def _count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def _replayed(js: JetStreamContext, provider: str) -> int:
    kv = await js.key_value(s.CONTROL_BUCKET)
    try:
        entry = await kv.get(f"replay.{provider}")
    except Exception:
        return 0
    if not entry.value:
        return 0
    value = decode_lease(entry.value).info.get("replayed", 0)
    return int(value) if isinstance(value, int | float) else 0


@dataclass
class _Final:
    found: int = 0
    succeeded: int = 0
    duplicates: int = 0
    dead: int = 0
    succeeded_by_model: dict[str, int] = field(default_factory=dict)
    replayed_by_model: dict[str, set[str]] = field(default_factory=dict)


async def _final_counts(js: JetStreamContext, jobs: dict[str, str]) -> _Final:
    """Results of ``jobs`` (id -> model): found, succeeded (per model), replayed (per model:
    a result stored under a replay's msg id)."""
    final = _Final()
    for job_id, model in jobs.items():
        try:
            raw = await js.get_last_msg(s.RESULTS_STREAM, s.result_subject(job_id), direct=True)
        except NOT_FOUND:
            continue
        final.found += 1
        if decode_result(raw.data or b"").status == "succeeded":
            final.succeeded += 1
            final.succeeded_by_model[model] = final.succeeded_by_model.get(model, 0) + 1
        msg_id = (raw.headers or {}).get(s.MSG_ID_HEADER, "")
        if msg_id.startswith(f"{job_id}:r"):
            final.replayed_by_model.setdefault(model, set()).add(job_id)
    info = (await js.stream_info(s.RESULTS_STREAM)).state
    final.duplicates = int(info.last_seq) - int(info.messages)
    final.dead = await _count(js, s.DEAD_STREAM)
    return final


async def _transitions(js: JetStreamContext, provider: str) -> list[Transition]:
    """Every breaker transition of ``provider``'s scopes stored on AI_EVENTS."""
    out: list[Transition] = []
    async for msg in iter_stream(js, s.EVENTS_STREAM, _EVENTS_FILTER):
        scope = _scope(msg.subject)
        if scope is None or scope[0] != provider:
            continue
        try:
            event = decode_health_event(msg.data)
        except msgspec.DecodeError:
            continue
        out.append(Transition(at=event.at.timestamp(), model=scope[1], state=event.state))
    return out


async def fake_call_log(url: str) -> dict[str, Any]:
    """The fake provider's call log and fault windows (``GET /admin/calls``)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/admin/calls", timeout=aiohttp.ClientTimeout(total=30)) as reply,
    ):
        reply.raise_for_status()
        body: dict[str, Any] = await reply.json()
        return body


async def run_drill(drill: Drill, base: Settings, *, console: Console | None) -> dict[str, Any]:
    """Run the drill on a private stack; return the report (``REPORT_KEYS``)."""
    settings = drill_settings(base, drill)
    fake_cfg = FaultConfig(
        seed=drill.seed,
        latency_ms=drill.latency_ms,
        latency_jitter_ms=drill.latency_ms / 2,
        models=list(drill.models),
    )
    logs = Path(tempfile.mkdtemp(prefix="ridethrough-drill-"))
    receiver = await _receiver(console) if drill.notify else None
    with local_stack(settings, fake_config=fake_cfg) as stack:
        if drill.provider not in stack.fake_providers:
            raise RuntimeError(f"the drill needs {drill.provider} on the fake provider")
        st = stack.settings
        if receiver is not None:
            st = st.with_changes(notify=_notify_settings(receiver, drill))
        # Each service serves /metrics (the replayer: the fleet's queues and breakers).
        roles = [("worker 1", "worker"), ("worker 2", "worker"), ("prober", "prober")]
        roles.append(("replayer", "replayer"))
        if receiver is not None:
            roles.append(("notifier", "notifier"))
        ports = {name: free_port() for name, _ in roles}
        procs = [
            ServiceProcess(
                st, role, "--http-port", str(ports[name]),
                log_path=logs / f"{name.replace(' ', '')}.log",
            )
            for name, role in roles
        ]  # fmt: skip
        urls = {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
        _say_metrics(urls, console)
        try:
            async with await Producer.connect(st) as producer:
                from services.jetstream.topology import ensure_topology

                await ensure_topology(producer.js, st)
                for proc in procs:
                    proc.start()
                async with _gateway(drill, st) as gateway_url:
                    calls = (
                        asyncio.create_task(gateway_calls(gateway_url, drill, producer.js, console))
                        if gateway_url is not None
                        else None
                    )
                    report = await _drive(drill, st, stack.fake, fake_cfg, producer, console)
                    if calls is not None:
                        report["gateway"] = await _gateway_report(producer.js, await calls)
                if receiver is not None:
                    report["notifications"] = await _notifications(receiver, drill)
                report["metrics"] = urls
                return report
        finally:
            for proc in procs:
                proc.terminate(timeout=30)
            if receiver is not None:
                await receiver.stop()
            log.info("service logs in %s", logs)


#: The drill gateway's key and tenant (a private stack: never a real key).
DRILL_GATEWAY_KEY: Final = "ridethrough-drill-gateway-key"
DRILL_GATEWAY_TENANT: Final = "drill"


@contextlib.asynccontextmanager
async def _gateway(drill: Drill, settings: Settings) -> AsyncIterator[str | None]:
    """The HTTP gateway on a free port of this loop while the drill runs (None: none)."""
    if not drill.gateway_calls:
        yield None
        return
    from services.config import GatewaySettings
    from services.gateway import key_digest, running_gateway

    gw = GatewaySettings(
        keys={key_digest(DRILL_GATEWAY_KEY): DRILL_GATEWAY_TENANT},
        anthropic_provider=drill.provider,
        openai_provider=None,
        retry_after_s=1.0,
    )
    async with running_gateway(settings.with_changes(gateway=gw), "127.0.0.1", 0) as url:
        yield url


async def gateway_calls(
    url: str, drill: Drill, js: JetStreamContext, console: Console | None
) -> list[dict[str, Any]]:
    """``drill.gateway_calls`` calls of the official anthropic SDK through the gateway,
    made together once the outage has parked a job, each with its own Idempotency-Key:
    during the outage each waits 2 s and gets the gateway's 529 naming its job, which the
    SDK itself retries (after retry-after) with the same key, until the answer is in."""
    import anthropic

    deadline = time.monotonic() + drill.outage_at_s + drill.outage_s + 60
    while await _count(js, s.PARKED_STREAM) == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    started = time.monotonic()
    async with anthropic.AsyncAnthropic(
        base_url=url, api_key=DRILL_GATEWAY_KEY, max_retries=1000, timeout=60.0
    ) as client:

        async def one(i: int) -> dict[str, Any]:
            key = f"drill-gateway-{i}"
            try:
                raw = await client.messages.with_raw_response.create(
                    model=drill.sick,
                    max_tokens=16,
                    messages=[{"role": "user", "content": f"Gateway call {i}: summarise."}],
                    extra_headers={"Idempotency-Key": key, "x-ridethrough-wait-s": "2"},
                )
                message = await raw.parse()
            except anthropic.APIError as exc:
                return {"key": key, "ok": False, "error": str(exc)[:200]}
            return {
                "key": key,
                "ok": bool(message.content),
                "job": raw.headers.get("x-ridethrough-job-id"),
                "answered_s": round(time.monotonic() - started, 2),
            }

        calls = await asyncio.gather(*(one(i) for i in range(drill.gateway_calls)))
    if console is not None:
        ok = sum(1 for c in calls if c["ok"])
        console.print(f"gateway: {ok} of {len(calls)} SDK calls answered")
    return list(calls)


async def _gateway_report(js: JetStreamContext, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """What the gateway's calls got: answers, one job each, one result each."""
    jobs = {c.get("job") for c in calls if c.get("job")}
    stored = 0
    attempts: list[int] = []
    for job in sorted(j for j in jobs if j):
        subject = s.result_subject(job, DRILL_GATEWAY_TENANT)
        info = await js.stream_info(s.RESULTS_STREAM, subjects_filter=subject)
        stored += int((info.state.subjects or {}).get(subject, 0))
        with contextlib.suppress(Exception):
            raw = await js.get_last_msg(s.RESULTS_STREAM, subject, direct=True)
            attempts.append(int(decode_result(raw.data or b"").attempts))
    answered = [c for c in calls if c["ok"]]
    return {
        "calls": len(calls),
        "answered": len(answered),
        "jobs": len(jobs),
        "results_stored": stored,
        "last_answer_s": max((c["answered_s"] for c in answered), default=None),
        "max_attempts": max(attempts, default=None),
    }


async def _receiver(console: Console | None) -> Receiver:
    """A local receiver of the notifier's webhook, Slack and PagerDuty requests that
    prints each notification as it arrives (to ``console``; kept for the report anyway)."""

    def show(got: Received) -> None:
        if console is None:
            return
        body = got.body
        if got.sink == "webhook":
            sig = "signature ok" if got.signed else "BAD SIGNATURE"
            console.print(
                f"[bold]notification[/] webhook {body.get('type')} {body.get('subject')} "
                f"({sig}, id {body.get('id')})"
            )
            for line in str((body.get("data") or {}).get("text", "")).splitlines():
                console.print(f"    {escape(line)}")
        elif got.sink == "slack":
            first = str(body.get("text", "")).split("\n", 1)[0]
            console.print(f"[bold]notification[/] slack: {escape(first)}")
        elif got.sink == "pagerduty":
            console.print(
                f"[bold]notification[/] pagerduty: {body.get('event_action')} "
                f"dedup_key {body.get('dedup_key')}"
            )

    return await Receiver(secret=secrets.token_hex(16), on_notice=show).start()


def _notify_settings(receiver: Receiver, drill: Drill) -> NotifySettings:
    """Every sink of the notifier on ``receiver`` (PagerDuty's endpoint included)."""
    return NotifySettings(
        webhook_url=SecretStr(f"{receiver.url}/webhook"),
        webhook_secret=SecretStr(receiver.secret),
        slack_webhook_url=SecretStr(f"{receiver.url}/slack"),
        pagerduty_routing_key=SecretStr("drill-routing-key"),
        pagerduty_url=f"{receiver.url}/pagerduty",
        flap_window_s=drill.flap_window_s,
        retry_base_s=0.2,
        ack_wait_s=5.0,
        lease_s=2.0,
    )


async def _notifications(receiver: Receiver, drill: Drill) -> list[dict[str, Any]]:
    """Once every "opened" the webhook got has its "closed" (or a bound passed): what the
    webhook got, once per id, in order."""

    def complete() -> bool:
        ids = list(receiver.webhook_events)
        opened = [i.removesuffix(":opened") for i in ids if i.endswith(":opened")]
        return bool(opened) and all(f"{o}:closed" in ids for o in opened)

    deadline = time.monotonic() + drill.flap_window_s + 60
    while not complete() and time.monotonic() < deadline:  # noqa: ASYNC110  # a poll of a dict
        await asyncio.sleep(0.2)
    return [
        {"id": e.get("id"), "type": e.get("type"), "subject": e.get("subject"),
         "title": (e.get("data") or {}).get("title")}
        for e in receiver.webhook_events.values()
    ]  # fmt: skip


def _say_metrics(urls: dict[str, str], console: Console | None) -> None:
    """Where the drill's metrics are, before it starts (on stderr under --json)."""
    lines = ["metrics (Prometheus; the replayer's has the queues and breakers):"]
    lines += [f"  {name:<9} {url}" for name, url in urls.items()]
    if console is not None:
        console.print("\n".join(lines), highlight=False)
    else:
        import sys

        print("\n".join(lines), file=sys.stderr)


async def _drive(
    drill: Drill,
    settings: Settings,
    fake: Any,
    fake_cfg: FaultConfig,
    producer: Producer,
    console: Console | None,
) -> dict[str, Any]:
    js = producer.js
    progress = Progress(models={m: ModelProgress() for m in drill.models})
    jobs: dict[str, str] = {}  # job id -> model, in submission order
    sent: list[Job] = []
    parks: dict[str, list[tuple[str, float]]] = {m: [] for m in drill.models}
    outages = drill.outages()
    last_end = max(o.start_s + o.duration_s for o in outages)

    async def workers_ready() -> None:
        consumer = s.worker_consumer(drill.provider, "normal")  # the drill's jobs are normal
        # Each worker keeps a pull request waiting on its consumers once it is up.
        while (await js.consumer_info(s.JOBS_STREAM, consumer)).num_waiting < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    async def submit() -> None:
        start = time.monotonic()
        for i in range(drill.jobs):
            delay = start + i / drill.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            model = drill.models[i % len(drill.models)]
            if drill.scenario == "failover":
                job = failover_job(drill.provider, model, i)
            else:
                job = make_job(
                    drill.provider, model, prompt=f"Incident {i}: summarise.", max_tokens=16
                )
            sent.append(job)
            jobs[await producer.submit(job)] = model
            progress.submitted += 1
            progress.models[model].submitted += 1

    async def monitor(live: Live | None) -> None:
        assert progress.load_started is not None
        while True:
            now = time.time()
            progress.phase = _phase(drill, progress.load_started, now)
            progress.parked = await _count(js, s.PARKED_STREAM)
            progress.peak_parked = max(progress.peak_parked, progress.parked)
            progress.results = await _count(js, s.RESULTS_STREAM)
            progress.dead = await _count(js, s.DEAD_STREAM)
            progress.replayed = await _replayed(js, drill.provider)
            if live is not None:
                live.update(_tables(drill, progress))
            done = (
                progress.submitted == drill.jobs
                and now >= progress.load_started + last_end
                and progress.parked == 0
                and progress.results >= drill.jobs
                and all(job_id in progress.result_ids for job_id in jobs)
            )
            if done:
                progress.drained = time.time()
                progress.phase = "done"
                if live is not None:
                    live.update(_tables(drill, progress))
                return
            await asyncio.sleep(0.2)

    async def on_result(msg: Any) -> None:
        # A replayed job's result carries the replay's dedup id, "<job_id>:r<seq>".
        msg_id = (msg.headers or {}).get(s.MSG_ID_HEADER, "")
        now = time.time()
        recovered = progress.load_started is not None and now >= progress.load_started + last_end
        if progress.first_replayed_result is None and ":r" in msg_id and recovered:
            progress.first_replayed_result = now
        with contextlib.suppress(msgspec.DecodeError):
            result = decode_result(msg.data)
            progress.result_ids.add(result.job_id)
            # By the job's model: a result served through another door names that door's id.
            model = jobs.get(result.job_id, result.model)
            if result.status == "succeeded" and model in progress.models:
                progress.models[model].succeeded += 1

    async def on_park(msg: Any) -> None:
        try:
            parked = decode_parked(msg.data)
        except msgspec.DecodeError:
            return
        model = parked.job.model
        parks.setdefault(model, []).append((parked.job.id, parked.park.parked_at.timestamp()))
        if model in progress.models:
            progress.models[model].parked.add(parked.job.id)

    async def on_health(msg: Any) -> None:
        scope = _scope(msg.subject)
        with contextlib.suppress(msgspec.DecodeError):
            if scope is not None:
                progress.states[_scope_label(*scope)] = decode_health_event(msg.data).state

    nc = producer.nc
    big = 1_000_000  # pending limits: a drill's every result and park, never a slow consumer
    subs = [
        await nc.subscribe(
            s.result_subject("*"), cb=on_result, pending_msgs_limit=big, pending_bytes_limit=big**2
        ),
        await nc.subscribe(
            _PARKED_FILTER, cb=on_park, pending_msgs_limit=big, pending_bytes_limit=big**2
        ),
        await nc.subscribe(_EVENTS_FILTER, cb=on_health),
    ]
    live_ctx: Any = (
        Live(_tables(drill, progress), console=console, refresh_per_second=4)
        if console is not None
        else contextlib.nullcontext()
    )
    try:
        with live_ctx as live:
            await asyncio.wait_for(workers_ready(), 60)
            if drill.scenario == "failover":
                fake.record_requests()
            # The fake plays the outage's shape from here, by its own clock.
            fake.set_config(msgspec.structs.replace(fake_cfg, outages=list(outages)))
            progress.load_started = time.time()
            progress.phase = "steady load"
            mon = asyncio.create_task(monitor(live))
            try:
                await asyncio.wait_for(
                    asyncio.gather(submit(), mon),
                    timeout=drill.jobs / drill.rate + last_end + drill.deadline_s,
                )
            except TimeoutError:
                progress.phase = "gave up waiting"
        await nc.flush()
        for sub in subs:  # let the callbacks catch up with what was delivered
            while sub.pending_msgs:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    report = await _report(drill, settings, js, fake, progress, jobs, parks)
    if drill.scenario == "failover":
        report["failover"] = await _failover_numbers(js, fake, sent, settings)
    return report


def failover_job(provider: str, model: str, i: int) -> Job:
    """A ``failover`` job: tools, an image and a cached system prompt (all of which the
    mapping to OpenAI would refuse), falling over to the Bedrock door, no model named."""
    request = {
        "system": [
            {"type": "text", "text": "You triage incidents.",
             "cache_control": {"type": "ephemeral"}}
        ],
        "max_tokens": 16,
        "tools": [
            {
                "name": "page_oncall",
                "description": "Page the on-call engineer.",
                "input_schema": {"type": "object", "properties": {"team": {"type": "string"}}},
            }
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": _PNG}},
                    {"type": "text", "text": f"Incident {i}: summarise the graph."},
                ],
            }
        ],
    }  # fmt: skip
    return make_job(
        provider,
        model,
        request=request,
        on_outage="failover",
        fallbacks=[Target(provider=FALLBACK)],
    )


def _canonical(body: Any) -> bytes:
    return msgspec.json.encode(body, order="sorted")


async def _failover_numbers(
    js: JetStreamContext, fake: Any, sent: list[Job], settings: Settings
) -> dict[str, Any]:
    """What reached the fake's Bedrock door, checked on the fake's side against what the
    drill submitted; and what the results say of the door that served them."""
    model_map = settings.providers[FALLBACK].model_map
    wanted = {(model_map.get(j.model, j.model), _canonical(j.request)) for j in sent}
    tools_and_images = 0
    identical = 0
    arrived = fake.recorded("bedrock")
    for r in arrived:
        body = msgspec.json.decode(base64.b64decode(r["body"]))
        body.pop("anthropic_version", None)
        if (r["model"], _canonical(body)) in wanted:
            identical += 1
        content = body.get("messages", [{}])[0].get("content", [])
        if body.get("tools") and any(b.get("type") == "image" for b in content):
            tools_and_images += 1
    served: dict[str, int] = {}
    by_fallback = 0
    for job in sent:
        try:
            raw = await js.get_last_msg(
                s.RESULTS_STREAM, s.result_subject(job.id, job.tenant), direct=True
            )
        except NOT_FOUND:
            continue
        result = decode_result(raw.data or b"")
        door = result.served_by.provider if result.served_by is not None else "?"
        served[door] = served.get(door, 0) + 1
        if result.served_by is not None and result.served_by.fallback:
            by_fallback += 1
    return {
        "fallback": FALLBACK,
        "requests_at_fallback": len(arrived),
        "identical_apart_from_model": identical,
        "with_tools_and_images": tools_and_images,
        "results_by_door": served,
        "results_from_fallback": by_fallback,
        "first_party_requests": len(fake.recorded("anthropic")),
    }


async def _report(
    drill: Drill,
    settings: Settings,
    js: JetStreamContext,
    fake: Any,
    progress: Progress,
    jobs: dict[str, str],
    parks: dict[str, list[tuple[str, float]]],
) -> dict[str, Any]:
    final = await _final_counts(js, jobs)
    transitions = await _transitions(js, drill.provider)
    calls = await fake_call_log(fake.url)
    windows = [
        Window(float(w["start"]), float(w["end"] or time.time()), frozenset(w["models"]))
        for w in calls["windows"]
    ]
    first_start = min((w.start for w in windows), default=None)
    last_end = max((w.end for w in windows), default=None)
    opens = sorted(
        t.at for t in transitions if t.state == "open" and first_start is not None
        and t.at >= first_start
    )  # fmt: skip
    tail_s = drill.timeout_s if drill.scenario == "slow" else 0.0
    models: dict[str, dict[str, Any]] = {}
    for model in drill.models:
        log_of = calls["models"].get(model, {})
        numbers = model_numbers(
            model,
            windows=windows,
            transitions=transitions,
            parks=parks.get(model, []),
            calls=log_of.get("calls", []),
            probes=log_of.get("probes", []),
            grace_s=2 * settings.breaker.board_poll_s,
            tail_s=tail_s,
        )
        seen = {job for job, _ in parks.get(model, [])}
        numbers["parked"] = len(seen | final.replayed_by_model.get(model, set()))
        models[model] = {
            "role": "sick" if any(w.hits(model) for w in windows) else "healthy",
            "submitted": sum(1 for m in jobs.values() if m == model),
            "succeeded": final.succeeded_by_model.get(model, 0),
            **numbers,
        }
    counters = fake.counters()["outage"]
    return {
        "submitted": len(jobs),
        "succeeded": final.succeeded,
        "dead": final.dead,
        "lost": len(jobs) - final.found,
        "duplicates": final.duplicates,
        "calls_during_outage": int(counters["requests"]) - int(counters["probes"]),
        "probes_during_outage": int(counters["probes"]),
        "detect_s": _delta(first_start, opens[0] if opens else None),
        "drain_s": _delta(last_end, progress.drained),
        "peak_parked": progress.peak_parked,
        "models": models,
        # Not part of the --json report (its keys are fixed); the numbers scripts read them.
        "first_replay_s": _delta(last_end, progress.first_replayed_result),
        "scenario": drill.scenario,
    }


def _delta(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(end - start, 3)


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report as lines of text for a person."""
    lines = [
        f"outage report: {report.get('scenario', 'provider-outage')}",
        f"  jobs submitted        {report['submitted']}",
        f"  succeeded             {report['succeeded']}",
        f"  dead                  {report['dead']}",
        f"  lost                  {report['lost']}",
        f"  duplicated            {report['duplicates']}",
        f"  provider calls during the outage: {report['calls_during_outage']} real, "
        f"{report['probes_during_outage']} probes",
        f"  time to detect        {report['detect_s']} s",
        f"  recovery to drained   {report['drain_s']} s",
        f"  peak parked           {report['peak_parked']}",
        "  per model:",
        f"    {'model':<28}{'submitted':>10}{'succeeded':>10}{'parked':>8}"
        f"{'parked while healthy':>22}{'calls while open':>18}{'beyond trip':>13}{'trip':>9}",
    ]
    for model, m in report["models"].items():
        trip = "-" if m["trip_s"] is None else f"{m['trip_s']} s"
        lines.append(
            f"    {model + ' (' + m['role'] + ')':<28}{m['submitted']:>10}{m['succeeded']:>10}"
            f"{m['parked']:>8}{m['parked_while_healthy']:>22}{m['calls_while_open']:>18}"
            f"{m['calls_during_outage_beyond_trip']:>13}{trip:>9}"
        )
    f = report.get("failover")
    if f is not None:
        parked = sum(m["parked"] for m in report["models"].values())
        doors = ", ".join(f"{k} {v}" for k, v in sorted(f["results_by_door"].items()))
        lines += [
            f"  failover to {f['fallback']} (the fake's Bedrock door):",
            f"    parked                            {parked}",
            f"    requests at the fallback          {f['requests_at_fallback']}",
            f"    identical apart from the model    {f['identical_apart_from_model']}"
            f" of {f['requests_at_fallback']} (checked on the fake's side)",
            f"    with their tools and image        {f['with_tools_and_images']}",
            f"    results served by                 {doors}"
            f" ({f['results_from_fallback']} as a fallback)",
        ]
    if "notifications" in report:
        lines.append(f"  notifications sent    {len(report['notifications'])} (webhook, deduped)")
        lines += [f"    {n['id']}: {n['title']}" for n in report["notifications"]]
    g = report.get("gateway")
    if g is not None:
        lines += [
            "  through the gateway (the anthropic SDK, only base_url changed; calls made in"
            " the outage):",
            f"    calls answered        {g['answered']} of {g['calls']}"
            f" (the last {g['last_answer_s']} s after they started)",
            f"    jobs                  {g['jobs']}, results stored {g['results_stored']},"
            f" most deliveries of one {g['max_attempts']}",
        ]
    return lines
