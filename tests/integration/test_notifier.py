"""The notifier against a real nats-server and real HTTP receivers on loopback: signed
CloudEvents, Slack and PagerDuty; exactly one open and one close per outage at the
receiver, even when the notifier is SIGKILLed mid-delivery and between the two; flapping
coalesced; a sink that never accepts given up on after the bound, with the metric."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from schemas import subjects as s
from services import metrics
from services.breaker.board import transition
from services.config import NotifySettings, Settings
from services.jetstream.connection import connect
from services.jetstream.topology import ensure_topology
from services.notifier import Notifier
from services.notifier.notifier import dead_between
from services.notifier.sinks import build_sinks
from services.ops.audit import audit
from services.tools.receiver import Receiver
from tests.conftest import make_settings
from tests.support import ServiceProcess, lease_holder, wait_until

pytestmark = pytest.mark.integration

SECRET = "whsec-notify-0123456789abcdef"
ROUTING_KEY = "pd-routing-key-0123456789"


def notify_settings(receiver: Receiver, **changes: Any) -> NotifySettings:
    """Every sink on ``receiver``; quick retries, a short ack_wait and lease."""
    fields: dict[str, Any] = {
        "webhook_url": SecretStr(f"{receiver.url}/webhook"),
        "webhook_secret": SecretStr(SECRET),
        "slack_webhook_url": SecretStr(f"{receiver.url}/slack"),
        "pagerduty_routing_key": SecretStr(ROUTING_KEY),
        "pagerduty_url": f"{receiver.url}/pagerduty",
        "flap_window_s": 0.0,
        "retry_base_s": 0.05,
        "retry_max_s": 0.5,
        "ack_wait_s": 2.0,
        "lease_s": 1.5,
    }
    fields.update(changes)
    return NotifySettings(**fields)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A loopback receiver of every sink."""
    r = await Receiver(secret=SECRET).start()
    yield r
    await r.stop()


async def _stack(
    nats_server: Any, fake_provider: Any, receiver: Receiver, **notify: Any
) -> tuple[Settings, Any, Any]:
    settings = make_settings(nats_server.url, fake_provider.url).with_changes(
        notify=notify_settings(receiver, **notify)
    )
    nc = await connect(settings, name="test")
    js = nc.jetstream()
    await ensure_topology(js, settings)
    return settings, nc, js


async def _outage(js: Any, *, parked: int = 0, replayed: int = 0, close: bool = True) -> str:
    """Open, half-open and (``close``) close anthropic's breaker the way the services do:
    compare-and-set in ai_health and an event each; the outage id."""
    kv = await js.key_value(s.HEALTH_BUCKET)
    opened = await transition(
        js, kv, "anthropic", to="open", allowed_from=("closed",), by="test",
        reason="5 failures in a row", calls=9, failures=6,
    )  # fmt: skip
    assert opened is not None
    await transition(js, kv, "anthropic", to="half_open", allowed_from=("open",), by="test")
    if close:
        await _close(js, parked=parked, replayed=replayed)
    return opened.outage_id


async def _close(js: Any, *, parked: int = 0, replayed: int = 0) -> None:
    kv = await js.key_value(s.HEALTH_BUCKET)
    closed = await transition(
        js, kv, "anthropic", to="closed", allowed_from=("half_open",), by="test",
        parked=parked, replayed=replayed,
    )  # fmt: skip
    assert closed is not None


async def test_one_outage_is_one_signed_open_and_one_signed_summary(
    nats_server: Any, fake_provider: Any, receiver: Receiver
) -> None:
    """Webhook: a signed CloudEvent "opened" and "closed" (the summary), once each;
    PagerDuty: trigger then resolve with the outage id as dedup key; Slack: text and
    blocks; an operator action reaches the webhook and Slack, not PagerDuty."""
    settings, nc, js = await _stack(nats_server, fake_provider, receiver)
    notifier = await Notifier(js, settings, build_sinks(settings), owner="n1").start()
    try:
        outage = await _outage(js, parked=12, replayed=12)
        await audit(js, "pause", provider="anthropic", filters={"reason": "drill"})
        await audit(js, "replay", provider="anthropic", dry_run=True)  # never notified
        await wait_until(lambda: _count(receiver, "webhook", 3), timeout=30)
        await wait_until(lambda: _count(receiver, "slack", 3), timeout=30)
        await wait_until(lambda: _count(receiver, "pagerduty", 2), timeout=30)
    finally:
        await notifier.stop()
        await nc.close()
    hooks = receiver.of("webhook")
    outages = [h for h in hooks if h.body["type"] != "dev.ridethrough.ops"]  # own lane
    assert [h.body["id"] for h in outages] == [f"{outage}:opened", f"{outage}:closed"]
    ops = [h for h in hooks if h.body["type"] == "dev.ridethrough.ops"]
    assert len(ops) == 1 and ops[0].body["id"].startswith("ops:")
    assert all(h.signed for h in hooks)
    assert all(h.headers["Content-Type"].startswith("application/cloudevents+json") for h in hooks)
    summary = outages[1].body["data"]
    assert summary["incident_id"] == outage and summary["scope"] == "anthropic"
    assert (summary["parked"], summary["replayed"], summary["provider_calls_saved"]) == (12, 12, 12)
    assert summary["dead"] == 0 and summary["duration_s"] >= 0
    assert summary["detected_on"] == {"reason": "5 failures in a row", "failures": 6, "calls": 9}
    pd = [r.body for r in receiver.of("pagerduty")]
    assert [(e["event_action"], e["dedup_key"]) for e in pd] == [
        ("trigger", outage),
        ("resolve", outage),
    ]
    assert {e["routing_key"] for e in pd} == {ROUTING_KEY}
    slack = sorted(r.body["text"] for r in receiver.of("slack"))
    assert [t.split(":")[0] for t in slack] == ["Operator", "Outage", "Resolved"]
    assert slack[1].startswith("Outage: anthropic is down")
    assert slack[2].startswith("Resolved: anthropic is back")
    assert "pause anthropic" in slack[0]
    assert all(r.body["blocks"][0]["type"] == "header" for r in receiver.of("slack"))
    await asyncio.sleep(0)  # nothing more is pending: the dry run sent nothing
    assert len(receiver.of("webhook")) == 3


async def _count(receiver: Receiver, sink: str, n: int) -> bool:
    return len(receiver.of(sink)) >= n


async def test_flapping_is_one_incident(
    nats_server: Any, fake_provider: Any, receiver: Receiver
) -> None:
    """A scope that re-opens within flap_window_s of closing: one "opened" and one
    "closed" for both outages, the summary adding up their jobs."""
    settings, nc, js = await _stack(
        nats_server, fake_provider, receiver, flap_window_s=3.0, slack_webhook_url=None,
        pagerduty_routing_key=None,
    )  # fmt: skip
    notifier = await Notifier(js, settings, build_sinks(settings), owner="n1").start()
    try:
        first = await _outage(js, parked=5, replayed=5)
        second = await _outage(js, parked=2, replayed=2)  # re-opens at once: a flap
        await wait_until(lambda: _has(receiver, f"{first}:closed"), timeout=30)
        # The second close was decided after the first: nothing else may follow.
        await wait_until(_drained(js), timeout=30)
    finally:
        await notifier.stop()
        await nc.close()
    ids = [h.body["id"] for h in receiver.of("webhook")]
    assert ids == [f"{first}:opened", f"{first}:closed"]
    summary = receiver.of("webhook")[1].body["data"]
    assert summary["outage_ids"] == [first, second]
    assert (summary["flaps"], summary["parked"], summary["replayed"]) == (1, 7, 7)


async def _has(receiver: Receiver, event_id: str) -> bool:
    return any(h.body.get("id") == event_id for h in receiver.of("webhook"))


def _drained(js: Any) -> Any:
    async def drained() -> bool:
        info = await js.consumer_info(s.EVENTS_STREAM, s.NOTIFIER_CONSUMER)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    return drained


async def test_a_sink_that_never_accepts_is_given_up_after_the_bound(
    nats_server: Any, fake_provider: Any, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook that always answers 500 gets max_attempts tries, then a warning (without
    its URL) and ridethrough_notifications_given_up_total; the other sinks get theirs
    once, and the event is acked: the notifier moves on."""
    settings, nc, js = await _stack(
        nats_server, fake_provider, receiver, webhook_url=SecretStr(f"{receiver.url}/fail"),
        max_attempts=3, pagerduty_routing_key=None,
    )  # fmt: skip
    m = metrics.enable()
    notifier = await Notifier(js, settings, build_sinks(settings), owner="n1").start()
    try:
        with caplog.at_level(logging.INFO, logger="ridethrough.notifier"):
            await _outage(js)
            await wait_until(_drained(js), timeout=30)
            await wait_until(lambda: _count(receiver, "slack", 2), timeout=30)
    finally:
        await notifier.stop()
        await nc.close()
        metrics.disable()
    assert len(receiver.of("fail")) == 3 * 2  # opened and closed, three attempts each
    assert len(receiver.of("slack")) == 2
    given_up = m.notifications_given_up
    assert given_up.labels("webhook", "opened")._value.get() == 1
    assert given_up.labels("webhook", "closed")._value.get() == 1
    assert m.notifications_sent.labels("slack", "closed")._value.get() == 1
    assert m.notification_failures.labels("webhook", "opened")._value.get() == 3
    lines = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert len(lines) == 2 and all("after 3 attempts" in line for line in lines)
    assert not any(receiver.url in r.getMessage() for r in caplog.records)
    assert notifier.given_up == 2


async def test_dead_letters_of_the_outage_are_counted_by_time(js: Any) -> None:
    """The summary's dead letters: those of the provider stored between open and close,
    found from the open by time (letters before or after, or of another provider, are not)."""
    from datetime import UTC, datetime

    from schemas.codec import encode
    from schemas.parking import DeadLetter
    from schemas.results import ErrorInfo

    def letter(provider: str, reason: str) -> bytes:
        err = ErrorInfo(type=reason, message="x")
        job = {"model": "claude-x", "provider": provider}
        return encode(DeadLetter(reason=reason, error=err, job_id="j", job=job))

    await js.publish(s.dead_subject("anthropic", "invalid"), letter("anthropic", "invalid"))
    await asyncio.sleep(0.05)
    start = datetime.now(UTC)
    for reason in ("provider_outage", "provider_outage", "retries_exhausted"):
        await js.publish(s.dead_subject("anthropic", reason), letter("anthropic", reason))
    await js.publish(s.dead_subject("openai", "provider_outage"), letter("openai", "x"))
    end = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await js.publish(s.dead_subject("anthropic", "invalid"), letter("anthropic", "invalid"))
    counts = await dead_between(js, "anthropic", None, start, end)
    assert counts == {"provider_outage": 2, "retries_exhausted": 1}
    assert await dead_between(js, "anthropic", "other-model", start, end) == {}
    assert await dead_between(js, "anthropic", None, end, end) == {}


@pytest.mark.chaos
async def test_exactly_once_at_the_receiver_through_sigkills(
    nats_server: Any, fake_provider: Any, receiver: Receiver, tmp_path: Path
) -> None:
    """`ridethrough notifier` SIGKILLed while the webhook holds its "opened" request, and
    the next one SIGKILLed between open and close: a third delivers the close. The
    receiver, deduping by CloudEvents id, has each notification exactly once, every copy
    signed; PagerDuty got one trigger and one resolve of the same dedup key."""
    settings, nc, js = await _stack(nats_server, fake_provider, receiver, slack_webhook_url=None)
    receiver.hold = asyncio.Event()
    procs: list[ServiceProcess] = []

    def notifier(n: int) -> ServiceProcess:
        p = ServiceProcess(settings, "notifier", "-v", log_path=tmp_path / f"notifier{n}.log")
        procs.append(p.start())
        return p

    try:
        first = notifier(1)
        await wait_until(lambda: _held(js), timeout=60)
        outage = await _outage(js, close=False)
        await wait_until(lambda: _count(receiver, "webhook", 1), timeout=60)
        first.kill()  # mid-delivery: the receiver has the request, the notifier no answer
        receiver.hold.set()
        second = notifier(2)
        await wait_until(lambda: _count(receiver, "pagerduty", 1), timeout=60)
        await wait_until(_drained(js), timeout=60)  # the open is acked
        second.kill()  # between open and close
        await _close(js, parked=3, replayed=3)
        notifier(3)
        await wait_until(lambda: _count(receiver, "pagerduty", 2), timeout=60)
        await wait_until(_drained(js), timeout=60)
    finally:
        for p in procs:
            p.stop()
        await nc.close()
    assert list(receiver.webhook_events) == [f"{outage}:opened", f"{outage}:closed"]
    opened = [h for h in receiver.of("webhook") if h.body["id"] == f"{outage}:opened"]
    assert len(opened) >= 2  # the first copy's answer was lost with its notifier: resent
    assert all(h.signed for h in receiver.of("webhook"))
    pd = [(r.body["event_action"], r.body["dedup_key"]) for r in receiver.of("pagerduty")]
    assert pd == [("trigger", outage), ("resolve", outage)]


async def _held(js: Any) -> bool:
    return await lease_holder(js, s.NOTIFIER_LEASE) != ""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no notification sink configured"),
        ({"RIDETHROUGH_NOTIFY__WEBHOOK_URL": "http://127.0.0.1:9/x"}, "needs webhook_secret"),
        ({"RIDETHROUGH_NOTIFY__PAGERDUTY_ROUTING_KEY_FILE": "/nonexistent/key"}, "cannot read"),
    ],
)
def test_the_notifier_refuses_bad_settings_with_one_clear_line(
    nats_server: Any, env: dict[str, str], message: str
) -> None:
    """`ridethrough notifier` without a sink, with a webhook but no secret, or with an
    unreadable key file: exit code 2 and one line naming the problem, no traceback."""
    import os
    import subprocess
    import sys

    from services.config import Settings
    from services.tools.stack import child_env
    from tests.support import ROOT

    child = child_env(Settings(nats_url=nats_server.url))
    child.pop("RIDETHROUGH_NOTIFY")
    child |= env | {"PYTHONPATH": os.pathsep.join([str(ROOT), child.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "services", "notifier"],
        env=child, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


async def test_a_close_waiting_out_the_flap_window_holds_only_its_scope(
    nats_server: Any, fake_provider: Any, receiver: Receiver
) -> None:
    """While anthropic's close waits out a long flap window, a model's outage and an
    operator action (other lanes) are notified; the close is not (yet)."""
    settings, nc, js = await _stack(
        nats_server, fake_provider, receiver, flap_window_s=600.0, slack_webhook_url=None,
        pagerduty_routing_key=None,
    )  # fmt: skip
    notifier = await Notifier(js, settings, build_sinks(settings), owner="n1").start()
    try:
        first = await _outage(js)  # opened, then closed: held for 600 s
        await wait_until(lambda: _has(receiver, f"{first}:opened"), timeout=30)
        kv = await js.key_value(s.HEALTH_BUCKET)
        model = await transition(
            js, kv, "anthropic", "claude-x", to="open", allowed_from=("closed",), by="test"
        )
        assert model is not None
        await audit(js, "drain", provider="openai")
        await wait_until(lambda: _has(receiver, f"{model.outage_id}:opened"), timeout=60)
        await wait_until(lambda: _count(receiver, "webhook", 3), timeout=60)
        info = await js.consumer_info(s.EVENTS_STREAM, s.NOTIFIER_CONSUMER)
    finally:
        await notifier.stop()
        await nc.close()
    ids = [h.body["id"] for h in receiver.of("webhook")]
    assert f"{first}:closed" not in ids
    assert len(ids) == 3 and ids[0] == f"{first}:opened"
    assert info.num_ack_pending == 1  # the close, held (in progress), not acked


async def _parked(js: Any, n: int) -> bool:
    return bool((await js.stream_info(s.PARKED_STREAM)).state.messages == n)


async def _summary(receiver: Receiver, outage: str) -> dict[str, Any]:
    hooks = [h for h in receiver.of("webhook") if h.body["id"] == f"{outage}:closed"]
    assert len(hooks) == 1, [h.body["id"] for h in receiver.of("webhook")]
    return dict(hooks[0].body["data"])


async def test_the_summary_counts_jobs_failed_over_and_expired_in_the_outage(
    nats_server: Any, fake_provider: Any, receiver: Receiver
) -> None:
    """Two real outages (the fake answering 529 for model ``m``: its breaker opens) through
    a worker, the prober, the replayer and the notifier. In the first, 10 fail-over jobs go
    to OpenAI while the breaker is open; in the second, 10 jobs parked with a deadline expire before
    the replay. Each closed summary counts its own (failed_over 10 / expired 10, the other
    0); every job ends once: a result each, none dead, none twice."""
    from datetime import UTC, datetime, timedelta

    from schemas.jobs import Target
    from services.producer import Producer, make_job
    from services.tools.stack import running_recovery, running_worker
    from tests.support import count_outcomes, read_stream

    settings, nc, js = await _stack(
        nats_server, fake_provider, receiver, slack_webhook_url=None, pagerduty_routing_key=None
    )
    notifier = await Notifier(js, settings, build_sinks(settings), owner="n1").start()
    fallback = [Target(provider="openai", model="gpt-fallback")]
    ids: list[str] = []
    try:
        async with (
            running_worker(settings),
            running_recovery(settings),
            await Producer.connect(settings) as producer,
        ):

            async def trip(tag: str) -> None:
                jobs = [
                    make_job("anthropic", "m", prompt=f"{tag} {i}", max_tokens=8) for i in range(20)
                ]
                ids.extend([await producer.submit(j) for j in jobs])
                await wait_until(lambda: _parked(js, 20), timeout=60)

            # 1. fail-over while open
            fake_provider.start_outage(529, models=["m"])
            await trip("first")
            moved = [
                make_job("anthropic", "m", prompt=f"move {i}", max_tokens=8,
                         on_outage="failover", fallbacks=fallback)
                for i in range(10)
            ]  # fmt: skip
            moved_ids = [await producer.submit(j) for j in moved]
            ids += moved_ids
            served = await producer.results(moved_ids, timeout=60)
            fake_provider.stop_outage()
            await producer.results(ids, timeout=90)
            events = await _health_events(js)
            first = events[0].outage_id
            await wait_until(lambda: _has(receiver, f"{first}:closed"), timeout=60)

            # 2. parked jobs expire before the replay
            fake_provider.start_outage(529, models=["m"])
            await trip("second")
            deadline = datetime.now(UTC) + timedelta(seconds=3)
            late = [
                make_job("anthropic", "m", prompt=f"late {i}", max_tokens=8, deadline=deadline)
                for i in range(10)
            ]
            late_ids = [await producer.submit(j) for j in late]
            ids += late_ids
            await wait_until(lambda: _parked(js, 30), timeout=60)

            async def past_deadline() -> bool:
                return datetime.now(UTC) > deadline

            await wait_until(past_deadline, timeout=30)
            fake_provider.stop_outage()
            results = await producer.results(ids, timeout=90)
            second = next(e.outage_id for e in await _health_events(js) if e.outage_id != first)
            await wait_until(lambda: _has(receiver, f"{second}:closed"), timeout=60)
        counts = await count_outcomes(js)
        tallies = await read_stream(js, s.EVENTS_STREAM, s.TALLY_FILTER)
    finally:
        await notifier.stop()
        await nc.close()
    a, b = await _summary(receiver, first), await _summary(receiver, second)
    assert (a["failed_over"], a["expired"]) == (10, 0), a
    assert (b["failed_over"], b["expired"]) == (0, 10), b
    assert a["parked"] == 20 and b["replayed"] == 20
    assert {r.provider for r in served.values()} == {"openai"}
    assert len(ids) == len(set(ids)) == 60
    assert {i for i, r in results.items() if r.status == "expired"} == set(late_ids)
    assert sum(r.status == "succeeded" for r in results.values()) == 50
    assert counts["results"] == counts["result_writes"] == 60
    assert counts["succeeded"] == 50 and counts["expired"] == 10 and counts["dead"] == 0
    # Coalesced: far fewer tallies than counted jobs.
    assert 2 <= len(tallies) < 20, len(tallies)


async def _health_events(js: Any) -> list[Any]:
    from schemas.events import decode_health_event
    from tests.support import read_stream

    msgs = await read_stream(js, s.EVENTS_STREAM, s.HEALTH_EVENTS_FILTER)
    return [decode_health_event(m.data) for m in msgs]
