"""NATS authentication and least privilege on a real nats-server, and secrets that never leak.

The server runs ``deploy/nats/auth.conf`` itself (the file operators deploy): one
user per role. Each role runs its part of the pipeline under its own user, and each
is refused what belongs to the others. Every credential kind (user/password, token,
nkey seed, TLS with a CA and a client certificate) reaches the CLI, the worker's
FastStream broker and nats-py clients through ``Settings``. Provider API keys and
NATS passwords never appear in logs, results, dead letters, events or KV values.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import api
from pydantic import SecretStr, ValidationError

from schemas import subjects as s
from schemas.codec import encode
from schemas.parking import decode_dead_letter
from schemas.results import decode_result, response_text
from services.config import NatsSettings, NotifySettings, ProviderSettings, Settings
from services.errors import InvalidJob
from services.jetstream.connection import connect
from services.jetstream.topology import ensure_topology
from services.producer import Producer, make_job
from services.tools.devstack import NatsServer
from services.tools.receiver import Receiver
from services.tools.stack import ServiceProcess
from tests.conftest import make_settings
from tests.support import count_outcomes, fault_request, read_stream, wait_until
from tests.unit.test_deploy_files import auth_users, password_variable

ROOT = Path(__file__).resolve().parents[2]
AUTH_CONF = ROOT / "deploy" / "nats" / "auth.conf"
ROLES = (
    "producer", "tenant-acme", "worker", "prober", "replayer", "notifier", "gateway",
    "operator", "sys",
)  # fmt: skip


def inbox_prefix(role: str) -> str:
    """The reply-subject prefix a role's processes use (deploy/ sets the same)."""
    return "_INBOX" if role == "operator" else f"_INBOX.{role}"


@dataclass
class SecuredNats:
    """A nats-server running deploy/nats/auth.conf, with the role passwords it was given."""

    server: NatsServer
    passwords: dict[str, str]
    log: Path

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return self.server.url

    def settings(self, base: Settings, role: str) -> Settings:
        """``base`` connecting as ``role`` (its user, password and inbox prefix)."""
        nats_settings = base.nats.model_copy(
            update={
                "user": role,
                "password": SecretStr(self.passwords[role]),
                "inbox_prefix": inbox_prefix(role),
            }
        )
        return base.with_changes(nats=nats_settings)

    def violations(self) -> list[str]:
        """Every ``Permissions Violation`` the server logged."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if "Violation" in line]


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecuredNats]:
    """nats-server with the deployed accounts; passwords come from its environment."""
    passwords = {role: f"pw-{role}-{secrets.token_hex(8)}" for role in ROLES}
    for role, password in passwords.items():
        # nats-server reads $RIDETHROUGH_<ROLE>_PASSWORD; our child processes do not see
        # these (child_env drops every RIDETHROUGH_* variable and sets its own).
        monkeypatch.setenv(password_variable(role), password)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    shutil.copy(AUTH_CONF, conf_dir / "auth.conf")
    (conf_dir / "server.conf").write_text('include "auth.conf"\n')
    log = tmp_path / "nats.log"
    server = NatsServer(
        data_dir=tmp_path / "nats", extra_args=["-c", str(conf_dir / "server.conf")], log_file=log
    ).start()
    yield SecuredNats(server, passwords, log)
    server.cleanup()


async def _stack_with_a_worker(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> tuple[dict[str, Settings], Any, Any, list[Any]]:
    """Settings per role, the operator's connection and JetStream context (topology
    applied), and a worker process running as `worker`."""
    base = make_settings(secured.url, fake_provider.url)
    by_role = {role: secured.settings(base, role) for role in ROLES}
    nc = await connect(by_role["operator"], name="operator")
    js = nc.jetstream()
    await ensure_topology(js, by_role["operator"])
    return by_role, nc, js, _services(by_role, tmp_path, ("worker", "--no-topology"))


def _services(by_role: dict[str, Settings], tmp_path: Path, *specs: tuple[str, ...]) -> list[Any]:
    """``ridethrough <role> ...`` processes, each connecting as its own user."""
    return [
        ServiceProcess(by_role[role], role, *args, log_path=tmp_path / f"{role}.log").start()
        for role, *args in specs
    ]


async def _run_outage_cycle(
    producer: Producer,
    operator_js: Any,
    fake_provider: Any,
    *,
    clean: int,
    parked: int,
    expired: int = 0,
) -> list[str]:
    """Submit ``clean`` jobs, then ``parked`` more during a 529 outage, end the outage,
    and wait for every result: the whole pipeline (park, probe, replay) runs. With
    ``expired``, once jobs park, that many more past their deadline (the worker expires
    them while the breaker is open) and that many due in a second (parked, then expired by
    the replayer: the outage ends after their deadline)."""
    from datetime import UTC, datetime, timedelta

    ids = [
        await producer.submit(make_job("anthropic", "m", prompt=f"clean {i}", max_tokens=8))
        for i in range(clean)
    ]
    await producer.results(ids, timeout=60)
    fake_provider.start_outage(529)
    more = [
        await producer.submit(make_job("anthropic", "m", prompt=f"outage {i}", max_tokens=8))
        for i in range(parked)
    ]

    async def some_parked() -> bool:
        return bool((await operator_js.stream_info(s.PARKED_STREAM)).state.messages > 0)

    await wait_until(some_parked, timeout=30)
    now = datetime.now(UTC)
    soon = now + timedelta(seconds=1)
    for i in range(expired):
        for when in (now - timedelta(seconds=1), soon):
            job = make_job("anthropic", "m", prompt=f"late {i}", max_tokens=8, deadline=when)
            more.append(await producer.submit(job))
    if expired:

        async def all_expired_or_parked() -> bool:
            waiting = (await operator_js.stream_info(s.PARKED_STREAM)).state.messages
            ended = (await operator_js.stream_info(s.RESULTS_STREAM)).state.messages - clean
            return datetime.now(UTC) > soon and waiting + ended >= parked + 2 * expired

        await wait_until(all_expired_or_parked, timeout=30)
    fake_provider.stop_outage()
    await producer.results(more, timeout=60)
    return ids + more


@pytest.mark.integration
async def test_each_role_does_its_job_with_least_privilege(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """Operator applies the topology; worker, prober, replayer and notifier run as their
    own users; a producer submits and reads results through an outage: every job succeeds
    (or expires: its deadline passed), the webhook gets the outage's signed open and close
    (its summary counting the expired jobs from the worker's and the replayer's tallies),
    and the server logs no permission violation at all."""
    receiver = await Receiver(secret="whsec-security-0123456789").start()
    notify = NotifySettings(
        webhook_url=SecretStr(f"{receiver.url}/webhook"),
        webhook_secret=SecretStr(receiver.secret),
        flap_window_s=0.0,
    )
    base = make_settings(secured.url, fake_provider.url).with_changes(notify=notify)
    by_role = {role: secured.settings(base, role) for role in ROLES}
    nc = await connect(by_role["operator"], name="operator")
    js = nc.jetstream()
    await ensure_topology(js, by_role["operator"])
    procs = _services(
        by_role, tmp_path, ("worker", "--no-topology"), ("prober",), ("replayer",), ("notifier",)
    )
    try:
        async with await Producer.connect(by_role["producer"]) as producer:
            ids = await _run_outage_cycle(
                producer, js, fake_provider, clean=10, parked=20, expired=2
            )
            assert (await producer.peek_result(ids[0])) is not None

        async def closed() -> bool:  # the replayer closes the breaker once the backlog is gone
            events = await _health_events(js)
            return bool(events) and events[-1].state == "closed"

        await wait_until(closed, timeout=30)
        events = [e.state for e in await _health_events(js)]
        counts = await count_outcomes(js)

        async def notified() -> bool:
            return len(receiver.webhook_events) >= 2

        await wait_until(notified, timeout=60)
    finally:
        codes = {p.role: p.terminate(timeout=30) for p in procs}
        await nc.close()
        await receiver.stop()
    assert counts["results"] == counts["result_writes"] == 34
    assert (counts["succeeded"], counts["expired"], counts["dead"]) == (30, 4, 0)
    assert events == ["open", "half_open", "closed"]
    assert [e["type"].rsplit(".", 1)[1] for e in receiver.webhook_events.values()] == [
        "opened",
        "closed",
    ]
    assert all(r.signed for r in receiver.of("webhook"))
    summary = list(receiver.webhook_events.values())[1]["data"]
    assert summary["parked"] == 20
    assert (summary["expired"], summary["failed_over"]) == (4, 0)
    assert summary["time_to_detect_s"] is not None and summary["time_to_detect_s"] >= 0
    assert secured.violations() == []
    assert set(codes.values()) == {0}, codes


async def _health_events(js: Any) -> list[Any]:
    from schemas.events import decode_health_event

    msgs = await read_stream(js, s.EVENTS_STREAM, s.HEALTH_EVENTS_FILTER)
    return [decode_health_event(m.data) for m in msgs]


class RoleClient:
    """A raw nats-py connection as one role, recording what the server refused."""

    def __init__(self, nc: Any, refusals: list[str]) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=1.0)
        self.refusals = refusals

    @classmethod
    async def connect(cls, secured: SecuredNats, role: str) -> RoleClient:
        refusals: list[str] = []

        async def on_error(exc: Exception) -> None:
            refusals.append(str(exc).lower())

        nc = await nats.connect(
            secured.url,
            user=role,
            password=secured.passwords[role],
            inbox_prefix=inbox_prefix(role),
            error_cb=on_error,
            max_reconnect_attempts=0,
        )
        return cls(nc, refusals)

    async def refused(self, subject: str, attempt: Callable[[], Awaitable[Any]]) -> None:
        """Run ``attempt`` and check that the server refused it: a permissions violation
        naming ``subject`` (a refused request gets no answer, so the call itself fails)."""
        before = len(self.refusals)
        with contextlib.suppress(Exception):
            await attempt()
        want = f'"{subject.lower()}"'

        async def seen() -> bool:
            return any("permissions violation" in r and want in r for r in self.refusals[before:])

        await wait_until(seen, timeout=5)

    async def close(self) -> None:
        """Close the connection."""
        await self.nc.close()


async def _publish_every_form(
    client: RoleClient, scopes: list[str], payload: bytes
) -> tuple[int, list[str]]:
    """Publish ``payload`` through JetStream on every wildcard form of each scope (each as
    a literal subject), then close ``client``: how many were tried, and which were stored."""
    stored: list[str] = []
    tried = 0
    try:
        for allowed in scopes:
            for form in wildcard_forms(allowed):
                tried += 1
                try:
                    await client.js.publish(form, payload)
                except Exception:  # refused (no ack), or no stream listens there
                    continue
                stored.append(form)
    finally:
        await client.close()
    return tried, stored


async def _fetch(client: RoleClient, stream: str, consumer: str) -> Any:
    sub = await client.js.pull_subscribe_bind(durable=consumer, stream=stream)
    return await sub.fetch(1, timeout=1)


def _attempts(role: str) -> list[tuple[str, str, Callable[[RoleClient], Awaitable[Any]]]]:
    """(what, refused subject, attempt) that ``role`` must not be able to do."""
    jobs_consumer = s.worker_consumer("anthropic", "normal")
    parked_consumer = s.replayer_consumer("anthropic", "normal")
    purge_jobs = (
        "purge AI_JOBS",
        f"$JS.API.STREAM.PURGE.{s.JOBS_STREAM}",
        lambda c: c.js.purge_stream(s.JOBS_STREAM),
    )
    consume_jobs = (
        "consume AI_JOBS",
        f"$JS.API.CONSUMER.MSG.NEXT.{s.JOBS_STREAM}.{jobs_consumer}",
        lambda c: _fetch(c, s.JOBS_STREAM, jobs_consumer),
    )
    pause = (
        "pause a provider (operator's key)",
        "$KV.ai_control.paused.anthropic",
        lambda c: c.js.publish("$KV.ai_control.paused.anthropic", b"{}"),
    )
    evidence = (
        "write status page evidence (the prober's)",
        f"$KV.ai_control.{s.evidence_key('anthropic')}",
        lambda c: c.js.publish(f"$KV.ai_control.{s.evidence_key('anthropic')}", b"{}"),
    )
    page_event = (
        "forge a status page event (the prober's)",
        s.evidence_event_subject("anthropic"),
        lambda c: c.js.publish(s.evidence_event_subject("anthropic"), b"{}"),
    )
    where = s.locator_subject("someone-elses-job", "acme")
    forge_location = (
        "point the job locator elsewhere (the settle path's)",
        where,
        lambda c: c.js.publish(where, b'{"stream": "AI_PARKED", "seq": 1}'),
    )
    read_location = (
        "read where another's job is",
        f"$JS.API.DIRECT.GET.KV_{s.LOCATOR_BUCKET}.{where}",
        lambda c: c.js.get_last_msg(f"KV_{s.LOCATOR_BUCKET}", where, direct=True),
    )
    forge_tally = (
        "forge an outage's tally of jobs failed over and expired (workers' and replayer's)",
        s.tally_subject("anthropic"),
        lambda c: c.js.publish(s.tally_subject("anthropic"), b'{"failed_over": 1000}'),
    )
    bodies_stream = f"OBJ_{s.BODIES_BUCKET}"
    read_body = (
        "read a large job's body",
        f"$JS.API.STREAM.MSG.GET.{bodies_stream}",
        lambda c: c.js.get_msg(bodies_stream, seq=1),
    )
    overwrite_body = (
        "overwrite a large job's body (the producers' put)",
        f"$O.{s.BODIES_BUCKET}.M.bmFtZQ==",
        lambda c: c.js.publish(f"$O.{s.BODIES_BUCKET}.M.bmFtZQ==", b"{}"),
    )
    # A producer may put bodies, nothing more: no read, lookup, listing, purge, consumer.
    body_snooping = [
        read_body,
        (
            "direct-get a large job's body",
            f"$JS.API.DIRECT.GET.{bodies_stream}",
            lambda c: c.js.get_msg(bodies_stream, seq=1, direct=True),
        ),
        (
            "look a body up by its name",
            f"$JS.API.DIRECT.GET.{bodies_stream}.$O.{s.BODIES_BUCKET}.M.bmFtZQ==",
            lambda c: c.js.get_last_msg(
                bodies_stream, f"$O.{s.BODIES_BUCKET}.M.bmFtZQ==", direct=True
            ),
        ),
        (
            "list the bodies' names (stream info with subjects)",
            f"$JS.API.STREAM.INFO.{bodies_stream}",
            lambda c: c.js.stream_info(bodies_stream, subjects_filter=">"),
        ),
        (
            "delete the bodies",
            f"$JS.API.STREAM.PURGE.{bodies_stream}",
            lambda c: c.js.purge_stream(bodies_stream),
        ),
        (
            "consume the bodies",
            f"$JS.API.CONSUMER.CREATE.{bodies_stream}.sneaky",
            lambda c: c.js.add_consumer(
                bodies_stream, api.ConsumerConfig(name="sneaky", durable_name="sneaky")
            ),
        ),
        (
            "watch the bodies as they are put",
            f"$O.{s.BODIES_BUCKET}.>",
            lambda c: c.nc.subscribe(f"$O.{s.BODIES_BUCKET}.>"),
        ),
    ]
    table: dict[str, list[Any]] = {
        "producer": [
            *body_snooping,
            purge_jobs,
            (
                "delete AI_RESULTS",
                f"$JS.API.STREAM.DELETE.{s.RESULTS_STREAM}",
                lambda c: c.js.delete_stream(s.RESULTS_STREAM),
            ),
            consume_jobs,
            (
                "write ai_health",
                "$KV.ai_health.anthropic",
                lambda c: c.js.publish("$KV.ai_health.anthropic", b'{"state":"open"}'),
            ),
            (
                "forge a result",
                s.result_subject("someone-elses-job"),
                lambda c: c.js.publish(s.result_subject("someone-elses-job"), b"{}"),
            ),
            (
                "mark a replay (a requeued job)",
                s.requeue_subject("anthropic", "normal", None),
                lambda c: c.js.publish(s.requeue_subject("anthropic", "normal", None), b"{}"),
            ),
            (
                "submit as tenant acme",
                s.jobs_subject("anthropic", "normal", "acme"),
                lambda c: c.js.publish(s.jobs_subject("anthropic", "normal", "acme"), b"{}"),
            ),
            (
                "read the replies delivered to workers",
                "_INBOX.>",
                lambda c: c.nc.subscribe("_INBOX.>"),
            ),
            (
                "read dead letters",
                f"$JS.API.DIRECT.GET.{s.DEAD_STREAM}",
                lambda c: c.js.get_msg(s.DEAD_STREAM, seq=1, direct=True),
            ),
            evidence,
            page_event,
            forge_location,
            read_location,
            forge_tally,
        ],
        "worker": [
            overwrite_body,
            purge_jobs,
            (
                "delete AI_PARKED",
                f"$JS.API.STREAM.DELETE.{s.PARKED_STREAM}",
                lambda c: c.js.delete_stream(s.PARKED_STREAM),
            ),
            (
                "create a stream",
                "$JS.API.STREAM.CREATE.EVIL",
                lambda c: c.js.add_stream(name="EVIL", subjects=["evil.>"]),
            ),
            (
                "consume AI_PARKED (the replayer's)",
                f"$JS.API.CONSUMER.MSG.NEXT.{s.PARKED_STREAM}.{parked_consumer}",
                lambda c: _fetch(c, s.PARKED_STREAM, parked_consumer),
            ),
            pause,
            evidence,
            page_event,
        ],
        "prober": [
            forge_tally,
            read_body,
            forge_location,
            consume_jobs,
            (
                "submit a job",
                "ai.jobs.anthropic.normal",
                lambda c: c.js.publish("ai.jobs.anthropic.normal", b"{}"),
            ),
            (
                "write a result",
                s.result_subject("x"),
                lambda c: c.js.publish(s.result_subject("x"), b"{}"),
            ),
            pause,
            (
                "take the replayer's lease",
                "$KV.ai_control.replay.anthropic",
                lambda c: c.js.publish("$KV.ai_control.replay.anthropic", b"{}"),
            ),
            (
                "write below its evidence keys (one token: the provider)",
                "$KV.ai_control.evidence.anthropic.x",
                lambda c: c.js.publish("$KV.ai_control.evidence.anthropic.x", b"{}"),
            ),
            (
                "forge an operator audit event",
                s.OPS_EVENTS_SUBJECT,
                lambda c: c.js.publish(s.OPS_EVENTS_SUBJECT, b"{}"),
            ),
        ],
        "replayer": [
            overwrite_body,
            consume_jobs,
            pause,
            (
                "take the prober's lease",
                "$KV.ai_control.probe.anthropic",
                lambda c: c.js.publish("$KV.ai_control.probe.anthropic", b"{}"),
            ),
            evidence,
            page_event,
            (
                "purge AI_PARKED",
                f"$JS.API.STREAM.PURGE.{s.PARKED_STREAM}",
                lambda c: c.js.purge_stream(s.PARKED_STREAM),
            ),
            (
                "delete its own consumer",
                f"$JS.API.CONSUMER.DELETE.{s.PARKED_STREAM}.{parked_consumer}",
                lambda c: c.js.delete_consumer(s.PARKED_STREAM, parked_consumer),
            ),
            (
                "create an unfiltered consumer of AI_PARKED (it may make filtered ones only)",
                f"$JS.API.CONSUMER.CREATE.{s.PARKED_STREAM}.sneaky",
                lambda c: c.js.add_consumer(
                    s.PARKED_STREAM, api.ConsumerConfig(name="sneaky", durable_name="sneaky")
                ),
            ),
            (
                "create a consumer of AI_JOBS",
                f"$JS.API.CONSUMER.CREATE.{s.JOBS_STREAM}.sneaky.ai.jobs.anthropic.>",
                lambda c: c.js.add_consumer(
                    s.JOBS_STREAM,
                    api.ConsumerConfig(
                        name="sneaky", durable_name="sneaky", filter_subject="ai.jobs.anthropic.>"
                    ),
                ),
            ),
            (
                "delete a waiting job from AI_JOBS",
                f"$JS.API.STREAM.MSG.DELETE.{s.JOBS_STREAM}",
                lambda c: c.js.delete_msg(s.JOBS_STREAM, 1),
            ),
            (
                "park a job with no model token, outside the layout",
                "ai.parked.anthropic.normal",
                lambda c: c.js.publish("ai.parked.anthropic.normal", b"{}"),
            ),
        ],
        "notifier": [
            consume_jobs,
            forge_location,
            pause,
            forge_tally,
            (
                "forge a breaker transition",
                s.health_event_subject("anthropic"),
                lambda c: c.js.publish(s.health_event_subject("anthropic"), b"{}"),
            ),
            (
                "forge an operator audit event",
                s.OPS_EVENTS_SUBJECT,
                lambda c: c.js.publish(s.OPS_EVENTS_SUBJECT, b"{}"),
            ),
            (
                "write ai_health",
                "$KV.ai_health.anthropic",
                lambda c: c.js.publish("$KV.ai_health.anthropic", b'{"state":"closed"}'),
            ),
            (
                "take the prober's lease",
                "$KV.ai_control.probe.anthropic",
                lambda c: c.js.publish("$KV.ai_control.probe.anthropic", b"{}"),
            ),
            (
                "read results",
                f"$JS.API.DIRECT.GET.{s.RESULTS_STREAM}",
                lambda c: c.js.get_msg(s.RESULTS_STREAM, seq=1, direct=True),
            ),
            (
                "purge AI_EVENTS (the audit log)",
                f"$JS.API.STREAM.PURGE.{s.EVENTS_STREAM}",
                lambda c: c.js.purge_stream(s.EVENTS_STREAM),
            ),
            (
                "delete its own consumer",
                f"$JS.API.CONSUMER.DELETE.{s.EVENTS_STREAM}.{s.NOTIFIER_CONSUMER}",
                lambda c: c.js.delete_consumer(s.EVENTS_STREAM, s.NOTIFIER_CONSUMER),
            ),
            (
                "read the replies delivered to workers",
                "_INBOX.worker.>",
                lambda c: c.nc.subscribe("_INBOX.worker.>"),
            ),
        ],
        "gateway": [
            *body_snooping,
            purge_jobs,
            (
                "delete AI_RESULTS",
                f"$JS.API.STREAM.DELETE.{s.RESULTS_STREAM}",
                lambda c: c.js.delete_stream(s.RESULTS_STREAM),
            ),
            (
                "create a stream",
                "$JS.API.STREAM.CREATE.EVIL",
                lambda c: c.js.add_stream(name="EVIL", subjects=["evil.>"]),
            ),
            (
                "delete a waiting job from AI_JOBS",
                f"$JS.API.STREAM.MSG.DELETE.{s.JOBS_STREAM}",
                lambda c: c.js.delete_msg(s.JOBS_STREAM, 1),
            ),
            consume_jobs,
            (
                "consume AI_PARKED (the replayer's)",
                f"$JS.API.CONSUMER.MSG.NEXT.{s.PARKED_STREAM}.{parked_consumer}",
                lambda c: _fetch(c, s.PARKED_STREAM, parked_consumer),
            ),
            (
                "create a durable consumer of AI_RESULTS",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{s.RESULTS_STREAM}.sneaky",
                lambda c: c.js.add_consumer(
                    s.RESULTS_STREAM, api.ConsumerConfig(durable_name="sneaky")
                ),
            ),
            (
                "create a named consumer of AI_RESULTS",
                f"$JS.API.CONSUMER.CREATE.{s.RESULTS_STREAM}.sneaky.ai.results.>",
                lambda c: c.js.add_consumer(
                    s.RESULTS_STREAM,
                    api.ConsumerConfig(name="sneaky", filter_subject="ai.results.>"),
                ),
            ),
            (
                "create a consumer of AI_JOBS",
                f"$JS.API.CONSUMER.CREATE.{s.JOBS_STREAM}",
                lambda c: c.js.add_consumer(s.JOBS_STREAM, api.ConsumerConfig()),
            ),
            (
                "mark a replay (a requeued job)",
                s.requeue_subject("anthropic", "normal", "acme"),
                lambda c: c.js.publish(s.requeue_subject("anthropic", "normal", "acme"), b"{}"),
            ),
            (
                "forge a tenant's result",
                s.result_subject("someone-elses-job", "acme"),
                lambda c: c.js.publish(s.result_subject("someone-elses-job", "acme"), b"{}"),
            ),
            (
                "forge a result of no tenant",
                s.result_subject("someone-elses-job"),
                lambda c: c.js.publish(s.result_subject("someone-elses-job"), b"{}"),
            ),
            (
                "read results of no tenant (the gateway's jobs all have one)",
                f"$JS.API.DIRECT.GET.{s.RESULTS_STREAM}.{s.result_subject('x')}",
                lambda c: c.js.get_last_msg(s.RESULTS_STREAM, s.result_subject("x"), direct=True),
            ),
            (
                "file a dead letter",
                s.dead_subject("anthropic", "invalid"),
                lambda c: c.js.publish(s.dead_subject("anthropic", "invalid"), b"{}"),
            ),
            (
                "park a job",
                s.parked_subject("anthropic", "normal", "m"),
                lambda c: c.js.publish(s.parked_subject("anthropic", "normal", "m"), b"{}"),
            ),
            (
                "write ai_health",
                "$KV.ai_health.anthropic",
                lambda c: c.js.publish("$KV.ai_health.anthropic", b'{"state":"open"}'),
            ),
            (
                "write a heartbeat",
                f"$KV.{s.WORKERS_BUCKET}.ghost",
                lambda c: c.js.publish(f"$KV.{s.WORKERS_BUCKET}.ghost", b"{}"),
            ),
            pause,
            forge_location,
            evidence,
            page_event,
            forge_tally,
            (
                "forge a breaker transition",
                s.health_event_subject("anthropic"),
                lambda c: c.js.publish(s.health_event_subject("anthropic"), b"{}"),
            ),
            (
                "read the replies delivered to workers",
                "_INBOX.worker.>",
                lambda c: c.nc.subscribe("_INBOX.worker.>"),
            ),
        ],
    }
    return table[role]


@pytest.mark.integration
@pytest.mark.parametrize(
    "role", ["producer", "worker", "prober", "replayer", "notifier", "gateway"]
)
async def test_a_role_cannot_do_the_work_of_others(secured: SecuredNats, role: str) -> None:
    """Each role is refused what belongs to another (purge, delete, consume, pause,
    forge, snoop), and nothing it tried changed the streams."""
    base = make_settings(secured.url, "http://127.0.0.1:9")
    operator = await connect(secured.settings(base, "operator"), name="operator")
    js = operator.jetstream()
    await ensure_topology(js, base)
    async with await Producer.connect(secured.settings(base, "producer")) as producer:
        job_id = await producer.submit(make_job("anthropic", "m", prompt="keep me", max_tokens=8))
    client = await RoleClient.connect(secured, role)
    try:
        for what, subject, attempt in _attempts(role):
            try:
                await client.refused(subject, lambda a=attempt: a(client))
            except AssertionError:
                pytest.fail(f"{role} was not refused: {what} ({subject})")
    finally:
        await client.close()
    try:
        # Nothing changed: the job still waits, every stream is there, no pause, no forgery.
        assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 1
        for stream in (s.JOBS_STREAM, s.PARKED_STREAM, s.RESULTS_STREAM, s.DEAD_STREAM):
            await js.stream_info(stream)
        control = await js.key_value(s.CONTROL_BUCKET)
        assert await _keys(control) == [s.LEGACY_JOBS_KEY]  # written by the topology step
        assert (await js.stream_info(s.RESULTS_STREAM)).state.messages == 0
        events = await js.stream_info(s.EVENTS_STREAM, subjects_filter=s.TALLY_FILTER)
        assert not events.state.subjects  # no tally forged
        assert job_id
    finally:
        await operator.close()


@pytest.mark.integration
async def test_a_tenant_reads_its_own_results_and_no_one_elses(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """acme's producers (user tenant-acme, RIDETHROUGH_TENANT=acme) submit jobs and read
    their results, stored on ai.results.tenant.acme.<job_id>; they are refused the results of
    tenant globex and of jobs without a tenant, to look up and to wait on, and the
    `producer` user is refused acme's. Every job ends in one result."""
    by_role, nc, js, procs = await _stack_with_a_worker(secured, fake_provider, tmp_path)

    def job(text: str, **fields: Any) -> Any:
        return make_job("anthropic", "m", prompt=text, max_tokens=8, **fields)

    try:
        acme_settings = by_role["tenant-acme"].with_changes(tenant="acme")
        async with (
            await Producer.connect(acme_settings) as acme,
            await Producer.connect(by_role["producer"]) as plain,
        ):
            globex = Producer(nc, tenant="globex")  # the operator, submitting for globex
            mine = [await acme.submit(job(f"acme {i}")) for i in range(3)]
            got = await acme.results(mine, timeout=60)
            theirs = await globex.submit(job("globex"))
            assert (await globex.result(theirs, timeout=60)).tenant == "globex"
            untenanted = await plain.submit(job("nobody's"))
            assert (await plain.result(untenanted, timeout=60)).tenant == ""
            with pytest.raises(InvalidJob, match="tenant 'globex'"):
                await acme.submit(job("sneaky", tenant="globex"))
        assert {r.status for r in got.values()} == {"succeeded"}
        assert {r.tenant for r in got.values()} == {"acme"}
        stored = await js.get_last_msg(s.RESULTS_STREAM, s.result_subject(mine[0], "acme"))
        assert stored.data and b'"tenant":"acme"' in stored.data

        acme_client = await RoleClient.connect(secured, "tenant-acme")
        plain_client = await RoleClient.connect(secured, "producer")
        lookup = f"$JS.API.DIRECT.GET.{s.RESULTS_STREAM}."
        refusals = [
            (acme_client, s.result_subject(theirs, "globex")),
            (acme_client, s.result_subject(untenanted)),
            (plain_client, s.result_subject(mine[0], "acme")),
        ]
        try:
            for client, subject in refusals:
                await client.refused(
                    lookup + subject,
                    lambda c=client, subj=subject: c.js.get_last_msg(  # type: ignore[misc]
                        s.RESULTS_STREAM, subj, direct=True
                    ),
                )
            for wait_on in (
                s.result_subject("*", "globex"),
                s.result_subject("*"),
                "ai.results.>",
                "ai.results.tenant.>",
                "ai.results.tenant.*.*",
            ):
                await acme_client.refused(wait_on, lambda w=wait_on: acme_client.nc.subscribe(w))  # type: ignore[misc]
            acme_results = s.result_subject("*", "acme")
            await plain_client.refused(
                acme_results, lambda: plain_client.nc.subscribe(acme_results)
            )
            await acme_client.refused(
                f"$JS.API.STREAM.MSG.GET.{s.RESULTS_STREAM}",
                lambda: acme_client.js.get_last_msg(
                    s.RESULTS_STREAM, s.result_subject(theirs, "globex")
                ),
            )  # the lookup whose subject is in the payload, not in the API subject
        finally:
            await acme_client.close()
            await plain_client.close()
        counts = await count_outcomes(js)
    finally:
        for p in procs:
            p.terminate(timeout=30)
        await nc.close()
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == 5


async def _keys(kv: Any) -> list[str]:
    from nats.js.errors import NoKeysError

    try:
        return list(await kv.keys())
    except NoKeysError:
        return []


@pytest.mark.integration
async def test_the_prober_records_status_page_evidence_under_its_own_user(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """`ridethrough prober` as `prober`: it reads anthropic's page (a scripted incident),
    writes the evidence and its event, deletes openai's evidence left from an earlier
    configuration, and the server logs no permission violation."""
    from schemas.health import Evidence, PageComponent, try_decode_evidence
    from services.jetstream.kv import read_entry
    from services.tools.fake.statuspage import PAGE_PATH

    base = make_settings(secured.url, fake_provider.url)
    anthropic = base.providers["anthropic"].model_copy(
        update={
            "status_page_url": fake_provider.url + PAGE_PATH,
            "status_components": {"claude-fake": "claude-fake"},
        }
    )
    base = base.with_changes(
        providers={**base.providers, "anthropic": anthropic},
        breaker=base.breaker.model_copy(update={"status_page_interval_s": 0.1}),
    )
    by_role = {role: secured.settings(base, role) for role in ROLES}
    nc = await connect(by_role["operator"], name="operator")
    js = nc.jetstream()
    await ensure_topology(js, by_role["operator"])
    control = await js.key_value(s.CONTROL_BUCKET)
    forgotten = Evidence(
        provider="openai", degraded=[PageComponent(name="API", status="major_outage", model="*")]
    )
    await control.put(s.evidence_key("openai"), encode(forgotten))
    fake_provider.status_page(components={"claude-fake": "major_outage"}, incident="Down")
    (proc,) = _services(by_role, tmp_path, ("prober",))
    try:

        async def recorded() -> bool:
            raw, _ = await read_entry(control, s.evidence_key("anthropic"))
            e = try_decode_evidence(raw) if raw else None
            gone, _ = await read_entry(control, s.evidence_key("openai"))
            # The event goes out a moment after the entry is written: wait for both.
            seen = await read_stream(js, s.EVENTS_STREAM, s.evidence_event_subject("*"))
            published = len({m.subject for m in seen}) >= 2
            return e is not None and e.degrades("claude-fake") and gone is None and published

        await wait_until(recorded, timeout=30)
        events = await read_stream(js, s.EVENTS_STREAM, s.evidence_event_subject("*"))
    finally:
        code = proc.terminate(timeout=30)
        await nc.close()
    assert sorted(m.subject for m in events) == [
        s.evidence_event_subject("anthropic"),
        s.evidence_event_subject("openai"),
    ]
    assert secured.violations() == []
    assert code == 0


@pytest.mark.integration
async def test_every_wildcard_form_of_the_probers_writes_stays_in_its_scope(
    secured: SecuredNats,
) -> None:
    """The prober's evidence key and event subject, published with each token as a literal
    `*` or cut with `>`: whatever the server stores is inside the prober's own scope
    (`$KV.ai_control.evidence.*`, `ai.events.evidence.*`), never another role's key or
    subject; and the readers of evidence (the view, status) are not troubled by it."""
    from services.breaker.evidence import EvidenceView
    from services.ops.status import collect_status

    base = make_settings(secured.url, "http://127.0.0.1:9")
    operator = await connect(secured.settings(base, "operator"), name="operator")
    ojs = operator.jetstream()
    await ensure_topology(ojs, base)
    scopes = ["$KV.ai_control.evidence.*", "ai.events.evidence.*"]
    assert set(scopes) <= set(auth_users()["prober"]["publish"])
    client = await RoleClient.connect(secured, "prober")
    tried, stored = await _publish_every_form(client, scopes, b'{"provider": "anthropic"}')
    try:
        subjects: list[str] = []
        for stream in ("KV_" + s.CONTROL_BUCKET, s.EVENTS_STREAM):
            info = await ojs.stream_info(stream, subjects_filter=">")
            subjects += list(info.state.subjects or {})
        view = await EvidenceView(ojs, base.providers, base.breaker).start()
        await view.stop()
        status = await collect_status(ojs, base)
    finally:
        await operator.close()
    assert tried >= 8 and stored, stored
    assert len(subjects) > 1, subjects
    for subject in subjects:
        if subject == f"$KV.{s.CONTROL_BUCKET}.{s.LEGACY_JOBS_KEY}":
            continue  # the topology step's
        assert any(nats_match(p, subject) for p in scopes), subject
    assert not view.degraded("anthropic") and not view.degraded("anthropic", "m")
    assert status["providers"]["anthropic"]["state"] == "closed"


@pytest.mark.integration
@pytest.mark.parametrize("role", ["worker", "replayer"])
async def test_every_wildcard_form_of_a_job_location_stays_a_job_location(
    secured: SecuredNats, role: str
) -> None:
    """The settle path's index writes, `$KV.ai_locator.<tenant|_>.<job_id>`, published by a
    worker and a replayer with each token as a literal `*` or cut with `>`: every key the
    server stores is two tokens (tenant, job id), none reaches another bucket, and a lookup
    of a job is not misled by them."""
    from services.ops.inspect import locate_job

    base = make_settings(secured.url, "http://127.0.0.1:9")
    operator = await connect(secured.settings(base, "operator"), name="operator")
    ojs = operator.jetstream()
    await ensure_topology(ojs, base)
    scope = f"$KV.{s.LOCATOR_BUCKET}.*.*"
    assert scope in auth_users()[role]["publish"]
    client = await RoleClient.connect(secured, role)
    payload = b'{"stream": "AI_PARKED", "seq": 1}'
    tried, stored = await _publish_every_form(client, [scope], payload)
    try:
        info = await ojs.stream_info(f"KV_{s.LOCATOR_BUCKET}", subjects_filter=">")
        subjects = list(info.state.subjects or {})
        control = await ojs.stream_info(f"KV_{s.CONTROL_BUCKET}", subjects_filter=">")
        shown = await locate_job(ojs, "acme")
    finally:
        await operator.close()
    assert tried >= 4 and stored, stored
    assert subjects and all(nats_match(scope, subject) for subject in subjects), subjects
    assert not any("ai_locator" in k for k in (control.state.subjects or {}))
    assert shown["where"] == "unknown"  # sequence 1 of AI_PARKED is no job of that id


@pytest.mark.integration
@pytest.mark.parametrize("role", ["worker", "replayer"])
async def test_every_wildcard_form_of_a_tally_stays_in_its_scope(
    secured: SecuredNats, role: str
) -> None:
    """The tally subject of the worker and the replayer (`ai.events.tally.*`), published
    with each token as a literal `*` or cut with `>`: whatever the server stores is a
    tally, never a health event, an audit event or evidence; the notifier's consumer gets
    none of it; and the summary's reader skips what does not decode."""
    from datetime import UTC, datetime, timedelta

    from services.notifier.notifier import tallied

    base = make_settings(secured.url, "http://127.0.0.1:9")
    operator = await connect(secured.settings(base, "operator"), name="operator")
    ojs = operator.jetstream()
    await ensure_topology(ojs, base)
    since = datetime.now(UTC) - timedelta(seconds=5)
    scopes = [s.TALLY_FILTER]
    assert auth_users()[role]["publish"].count(s.TALLY_FILTER) == 1
    for other in ("producer", "prober", "notifier", "tenant-acme"):
        assert not any(
            nats_match(p, s.tally_subject("anthropic")) for p in auth_users()[other]["publish"]
        ), other
    client = await RoleClient.connect(secured, role)
    tried, stored = await _publish_every_form(client, scopes, b'{"provider": "anthropic"')
    try:
        info = await ojs.stream_info(s.EVENTS_STREAM, subjects_filter=">")
        subjects = list(info.state.subjects or {})
        notifier = await ojs.consumer_info(s.EVENTS_STREAM, s.NOTIFIER_CONSUMER)
        sums = await tallied(ojs, "anthropic", {"any"}, since)
    finally:
        await operator.close()
    assert tried >= 4 and stored, stored
    assert subjects, subjects
    for subject in subjects:
        assert nats_match(s.TALLY_FILTER, subject), subject
    assert notifier.num_pending == 0
    assert sums == {"failed_over": 0, "expired": 0}
    assert secured.violations()  # the forms outside the scope were refused


@pytest.mark.integration
async def test_the_operator_can_pause_and_purge(secured: SecuredNats) -> None:
    """The operator user may do what the others may not (pause a provider, purge a stream)."""
    base = make_settings(secured.url, "http://127.0.0.1:9")
    nc = await connect(secured.settings(base, "operator"), name="operator")
    js = nc.jetstream()
    try:
        await ensure_topology(js, base)
        control = await js.key_value(s.CONTROL_BUCKET)
        await control.put("paused.anthropic", b"{}")
        await js.publish(s.dead_subject("anthropic", "invalid"), b"{}")
        await js.purge_stream(s.DEAD_STREAM)
        assert (await js.stream_info(s.DEAD_STREAM)).state.messages == 0
    finally:
        await nc.close()
    assert secured.violations() == []


# --------------------------------------------------------------------------- credential kinds


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=ridethrough test CA", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=ridethrough {name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return {n: d / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def make_nkey(d: Path) -> tuple[str, Path]:
    """A user nkey: (public key, path of the seed file)."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = d / "user.nk"
    path.write_bytes(seed)
    path.chmod(0o600)
    return public, path


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``ridethrough <args>`` in a child process configured only through the environment."""
    from services.tools.stack import child_env

    env = child_env(settings)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "services", *args],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(params=["token", "nkey+mtls"])
def credential_kind(request: Any, tmp_path: Path) -> Iterator[tuple[NatsServer, dict[str, Any]]]:
    """A nats-server demanding one credential kind, and the NATS settings that meet it."""
    if request.param == "token":
        token = secrets.token_urlsafe(24)
        server = NatsServer(data_dir=tmp_path / "nats", extra_args=["--auth", token])
        fields: dict[str, Any] = {"token": SecretStr(token)}
    else:
        if shutil.which("openssl") is None:
            pytest.skip("openssl is needed to make the test certificates")
        pki = make_pki(tmp_path)
        public, seed_file = make_nkey(tmp_path)
        conf = tmp_path / "server.conf"
        conf.write_text(
            "tls {\n"
            f'  cert_file: "{pki["server.crt"]}"\n  key_file: "{pki["server.key"]}"\n'
            f'  ca_file: "{pki["ca.crt"]}"\n  verify: true\n'
            "}\n"
            f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}\n'
        )
        server = NatsServer(data_dir=tmp_path / "nats", extra_args=["-c", str(conf)])
        fields = {
            "nkey_seed_file": seed_file,
            "tls_ca_file": pki["ca.crt"],
            "tls_cert_file": pki["client.crt"],
            "tls_key_file": pki["client.key"],
        }
    server.log_file = tmp_path / "nats.log"
    server.start()
    yield server, fields
    server.cleanup()


@pytest.mark.integration
async def test_every_credential_kind_reaches_cli_worker_and_producer(
    credential_kind: tuple[NatsServer, dict[str, Any]], fake_provider: Any, tmp_path: Path
) -> None:
    """With a token, or an nkey over mutual TLS, the CLI (`ridethrough topology`), a worker
    process (FastStream) and the producer (nats-py) all connect from Settings alone."""
    server, fields = credential_kind
    base = make_settings(server.url, fake_provider.url)
    settings = base.with_changes(nats=base.nats.model_copy(update=fields))
    bare = _cli(base, "topology", "--json")
    assert bare.returncode == 2 and len(bare.stderr.strip().splitlines()) == 1, bare.stderr
    done = _cli(settings, "topology", "--json")
    assert done.returncode == 0, done.stderr
    worker = ServiceProcess(settings, "worker", "--no-topology", log_path=tmp_path / "w.log")
    worker.start()
    try:
        async with await Producer.connect(settings) as producer:
            job_id = await producer.submit(make_job("anthropic", "m", prompt="hi", max_tokens=8))
            result = await producer.result(job_id, timeout=60)
    finally:
        code = worker.terminate(timeout=30)
    assert result.status == "succeeded"
    assert code == 0


@pytest.mark.integration
async def test_tls_refuses_a_server_the_ca_did_not_sign(tmp_path: Path) -> None:
    """A client whose CA did not sign the server's certificate does not connect, and says so
    in one line (the CLI exits 2)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificates")
    pki = make_pki(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_ca = make_pki(other)["ca.crt"]
    conf = tmp_path / "server.conf"
    conf.write_text(
        f'tls {{ cert_file: "{pki["server.crt"]}"\n key_file: "{pki["server.key"]}" }}\n'
    )
    with NatsServer(data_dir=tmp_path / "nats", extra_args=["-c", str(conf)]) as server:
        settings = Settings(nats_url=server.url, nats=NatsSettings(tls_ca_file=other_ca))
        out = _cli(settings, "topology")
        good = Settings(nats_url=server.url, nats=NatsSettings(tls_ca_file=pki["ca.crt"]))
        ok = _cli(good, "topology")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "certificate" in out.stderr.lower() or "ssl" in out.stderr.lower(), out.stderr
    assert ok.returncode == 0, ok.stderr


# --------------------------------------------------------------------------- secrets


def _needles(*secret_values: str) -> list[bytes]:
    """What a leak would look like: each secret as is, and base64-encoded."""
    out: list[bytes] = []
    for value in secret_values:
        out += [value.encode(), base64.b64encode(value.encode())]
    return out


async def _everything_stored(js: Any) -> list[bytes]:
    """Every message (headers and body) of every stream and bucket, as bytes."""
    stored: list[bytes] = []
    streams = [s.JOBS_STREAM, s.PARKED_STREAM, s.RESULTS_STREAM, s.DEAD_STREAM, s.EVENTS_STREAM]
    streams += [f"KV_{b}" for b in (s.HEALTH_BUCKET, s.CONTROL_BUCKET, s.WORKERS_BUCKET)]
    for stream in streams:
        for m in await _read_all(js, stream):
            stored.append(repr(m.headers).encode() + b"\n" + (m.data or b""))
    return stored


async def _read_all(js: Any, stream: str) -> list[Any]:
    """Every message of ``stream``, by plain (not direct) get: KV streams allow no direct get."""
    from nats.js.errors import NotFoundError

    out: list[Any] = []
    seq = 1
    while True:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=">", next=True)
        except NotFoundError:
            return out
        out.append(msg)
        seq = msg.seq + 1


@pytest.mark.integration
async def test_secrets_never_reach_logs_results_events_or_status(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """Provider keys (one from the environment, one from a mounted secret file, neither
    shaped like ``sk-...``) and NATS passwords appear in no log line (debug logging on), no
    result, dead letter, event or KV value, and no CLI error, after successes, permanent
    and transient failures, a provider echoing the key back, an outage with probes and a
    replay."""
    anthropic_key = f"ant.SENTINEL_{secrets.token_hex(12)}"
    openai_key = f"Zq9-SENTINEL.{secrets.token_hex(12)}"
    key_file = tmp_path / "secrets" / "anthropic"
    key_file.parent.mkdir()
    key_file.write_text(anthropic_key + "\n")
    base = make_settings(secured.url, fake_provider.url, max_attempts=2)
    providers = {
        "anthropic": ProviderSettings(
            kind="anthropic", base_url=fake_provider.url, api_key_file=key_file
        ),
        "openai": ProviderSettings(
            kind="openai", base_url=f"{fake_provider.url}/v1", api_key=SecretStr(openai_key)
        ),
    }
    base = base.with_changes(providers=providers)
    by_role = {role: secured.settings(base, role) for role in ROLES}
    nc = await connect(by_role["operator"], name="operator")
    js = nc.jetstream()
    await ensure_topology(js, by_role["operator"])
    procs = _services(
        by_role, tmp_path, ("worker", "--no-topology", "-v"), ("prober", "-v"), ("replayer", "-v")
    )
    try:
        async with await Producer.connect(by_role["producer"]) as producer:
            failing = [
                make_job("anthropic", "m", request=_faulty("anthropic", fault), max_tokens=8)
                for fault in ("fault:401", "fault:403", "fault:529", "fault:echo_key")
            ] + [
                make_job("openai", "m", request=_faulty("openai", fault), max_tokens=8)
                for fault in ("fault:401", "fault:500", "fault:echo_key")
            ]
            failed = [await producer.submit(j) for j in failing]
            ok = [
                await producer.submit(make_job("openai", "m", prompt=f"o{i}", max_tokens=8))
                for i in range(3)
            ]
            await producer.results(failed + ok, timeout=60)
            await _run_outage_cycle(producer, js, fake_provider, clean=3, parked=5)
        stored = await _everything_stored(js)
        counts = await count_outcomes(js)
        failed_result = _cli(by_role["producer"], "result", failed[0], "--json")
    finally:
        codes = {p.role: p.terminate(timeout=30) for p in procs}
        await nc.close()
    # Credentials in the URL (here a wrong password) come out redacted in the CLI's error.
    in_url = base.with_changes(
        nats_url=secured.url.replace("nats://", f"nats://operator:{anthropic_key}@", 1)
    )
    refused = _cli(in_url, "topology")

    assert counts["dead"] == 7 and counts["failed"] == 7, counts
    assert set(codes.values()) == {0}, codes
    assert failed_result.returncode == 1
    needles = _needles(anthropic_key, openai_key, *secured.passwords.values())
    logs = _read_logs(tmp_path)
    assert sum(len(v) for v in logs.values()) > 2000  # debug logging really ran
    haystacks = {
        **logs,
        **{f"stored #{i}": m for i, m in enumerate(stored)},
        "cli result": (failed_result.stdout + failed_result.stderr).encode(),
        "cli refused": (refused.stdout + refused.stderr).encode(),
    }
    leaks = [name for name, data in haystacks.items() for n in needles if n in data]
    assert leaks == [], f"secret found in: {sorted(set(leaks))}"
    assert refused.returncode == 2 and "operator:***@" in refused.stderr, refused.stderr


def _read_logs(d: Path) -> dict[str, bytes]:
    """Every ``*.log`` file in ``d`` (the service processes' and the server's)."""
    return {p.name: p.read_bytes() for p in d.glob("*.log")}


def _faulty(kind: str, fault: str) -> dict[str, Any]:
    """A request that makes the fake provider answer with ``fault`` (via the user field)."""
    body: dict[str, Any] = {"max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    if kind == "anthropic":
        body["metadata"] = {"user_id": fault}
    else:
        body["user"] = fault
    return body


# --------------------------------------------------------------------------- settings → options


def test_settings_take_one_credential_and_complete_tls_pairs() -> None:
    """Two credential kinds at once, a password without a user, a certificate without its
    key, or an inbox prefix with wildcards are refused when the settings are built."""
    bad: list[dict[str, Any]] = [
        {"user": "a", "token": "t"},
        {"token": "t", "nkey_seed_file": "/x"},
        {"password": "p"},
        {"tls_cert_file": "/c"},
        {"inbox_prefix": "_INBOX.>"},
        {"inbox_prefix": "a..b"},
    ]
    for fields in bad:
        with pytest.raises(ValidationError):
            NatsSettings(**fields)


def test_settings_never_print_their_secrets() -> None:
    """repr and JSON dumps of the settings mask the password and the token."""
    n = NatsSettings(user="u", password=SecretStr("hunter2-SENTINEL"))
    t = NatsSettings(token=SecretStr("tok-SENTINEL"))
    for text in (repr(n), repr(t), n.model_dump_json(), t.model_dump_json(), str(n)):
        assert "SENTINEL" not in text


def test_redact_url_hides_passwords_and_tokens() -> None:
    """Credentials inside server URLs are replaced by *** before they are printed."""
    from services.jetstream.connection import redact_url

    assert redact_url("nats://u:secret@h:4222") == "nats://u:***@h:4222"
    assert redact_url("tls://tok@h:4222,nats://h2:4222") == "tls://***@h:4222,nats://h2:4222"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


def test_connect_and_broker_options_carry_every_credential_kind(tmp_path: Path) -> None:
    """nats-py options and the FastStream broker's ``security`` come from the same settings:
    user/password, token, nkey seed file, creds file, each with TLS; and the broker builds."""
    import ssl

    from faststream.nats import NatsBroker
    from faststream.nats.security import (
        NatsCredentials,
        NatsNKey,
        NatsSecurity,
        NatsToken,
        NatsUserPassword,
    )

    from services.jetstream.connection import broker_options, connect_options

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificates")
    pki = make_pki(tmp_path)
    _, seed = make_nkey(tmp_path)
    creds = tmp_path / "user.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n")
    tls = {
        "tls_ca_file": pki["ca.crt"],
        "tls_cert_file": pki["client.crt"],
        "tls_key_file": pki["client.key"],
        "inbox_prefix": "_INBOX.worker",
    }
    cases: list[tuple[dict[str, Any], type[NatsSecurity], dict[str, Any]]] = [
        ({"user": "u", "password": SecretStr("p")}, NatsUserPassword, {"user": "u"}),
        ({"token": SecretStr("t")}, NatsToken, {"token": "t"}),
        ({"nkey_seed_file": seed}, NatsNKey, {"nkeys_seed": str(seed)}),
        ({"creds_file": creds}, NatsCredentials, {"user_credentials": str(creds)}),
        ({}, NatsSecurity, {}),
    ]
    for fields, kind, expected in cases:
        settings = Settings(nats_url="nats://127.0.0.1:4222", nats=NatsSettings(**fields, **tls))
        opts = connect_options(settings)
        assert isinstance(opts["tls"], ssl.SSLContext)
        assert opts["inbox_prefix"] == "_INBOX.worker"
        assert expected.items() <= opts.items()
        b = broker_options(settings)
        assert type(b["security"]) is kind
        assert b["security"].ssl_context is not None
        assert b["inbox_prefix"] == "_INBOX.worker"
        NatsBroker(**b)  # FastStream accepts every option


def test_unreadable_credential_files_are_a_config_error(tmp_path: Path) -> None:
    """A missing seed, creds or CA file is a ConfigError naming the file (never its content)."""
    from services.errors import ConfigError
    from services.jetstream.connection import connect_options

    missing = tmp_path / "nope"
    for fields in (
        {"nkey_seed_file": missing},
        {"creds_file": missing},
        {"tls_ca_file": missing},
        {"tls_cert_file": missing, "tls_key_file": missing},
    ):
        settings = Settings(nats_url="nats://127.0.0.1:4222", nats=NatsSettings(**fields))
        with pytest.raises(ConfigError, match="nope"):
            connect_options(settings)


# --------------------------------------------------------------------------- wildcard forms


def nats_match(pattern: str, subject: str) -> bool:
    """Whether ``subject`` falls in ``pattern`` with NATS wildcards read as wildcards (a
    ``*`` is one token, ``>`` the rest); a literal ``*`` or ``>`` in the subject is just
    a token here, so a subject a wildcard form reached counts only if it is in scope."""
    p, t = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(t) > i
        if i >= len(t) or (token != "*" and token != t[i]):
            return False
    return len(p) == len(t)


def wildcard_forms(pattern: str) -> list[str]:
    """A concrete subject of ``pattern`` and every form of it with one token replaced by a
    literal ``*``, or cut with a ``>`` (the forms a user may send where a subject goes)."""
    concrete = [
        ("acme" if i == len(pattern.split(".")) - 1 else "anthropic") if tok in "*>" else tok
        for i, tok in enumerate(pattern.split("."))
    ]
    forms = {".".join(concrete)}
    for i in range(1, len(concrete)):
        forms.add(".".join([*concrete[:i], "*", *concrete[i + 1 :]]))
        forms.add(".".join([*concrete[:i], ">"]))
    return sorted(forms)


#: One subject of every scope, published by the operator while each role listens.
_BAIT = (
    "ai.results.shared.bait",
    "ai.results.tenant.acme.bait",
    "ai.results.tenant.globex.bait",
)


@pytest.mark.integration
@pytest.mark.parametrize(
    "role", ["producer", "tenant-acme", "worker", "prober", "replayer", "gateway"]
)
async def test_every_wildcard_form_of_a_roles_subjects_stays_in_its_scope(
    secured: SecuredNats, role: str
) -> None:
    """Every subject a role may subscribe to or direct-get, tried with each token as a
    literal `*` or cut with `>`: whatever the server lets through is in the role's scope.
    (A permission X.* lets a user subscribe to X.>; the layout gives no scope anything below
    another's prefix, so that reaches nothing more.)"""
    from nats.js.errors import NotFoundError

    base = make_settings(secured.url, "http://127.0.0.1:9")
    operator = await connect(secured.settings(base, "operator"), name="operator")
    ojs = operator.jetstream()
    await ensure_topology(ojs, base)
    for subject in _BAIT:  # stored results, for direct gets
        await ojs.publish(subject, b'{"bait": "' + subject.encode() + b'"}')
    perms = auth_users()[role]
    subscribe_scope = perms["subscribe"]
    direct = f"$JS.API.DIRECT.GET.{s.RESULTS_STREAM}."
    read_scope = [p.removeprefix(direct) for p in perms["publish"] if p.startswith(direct)]
    client = await RoleClient.connect(secured, role)
    got: dict[str, list[str]] = {}
    tried = 0
    try:
        subs = []
        for allowed in subscribe_scope:
            for form in wildcard_forms(allowed):
                tried += 1

                async def keep(msg: Any, form: str = form) -> None:
                    got.setdefault(form, []).append(msg.subject)

                with contextlib.suppress(Exception):
                    subs.append(await client.nc.subscribe(form, cb=keep))
        await client.nc.flush()
        for subject in _BAIT:
            await operator.publish(subject, b"bait")
        await operator.flush()
        for allowed in read_scope:
            for form in wildcard_forms(allowed):
                tried += 1
                try:
                    msg = await client.js.get_last_msg(s.RESULTS_STREAM, form, direct=True)
                except (NotFoundError, TimeoutError, nats.errors.TimeoutError):
                    continue  # refused (no answer) or nothing there
                got.setdefault(f"direct {form}", []).append(msg.subject)

        async def delivered() -> bool:
            # The server routed the bait before the operator's flush returned; after the
            # role's own flush it is in the subscriptions' queues, and then handled.
            await client.nc.flush()
            return all(sub.pending_msgs == 0 for sub in subs)

        await wait_until(delivered, timeout=10)
    finally:
        await client.close()
        await operator.close()
    assert tried >= 4
    for form, subjects in got.items():
        scope = read_scope if form.startswith("direct ") else subscribe_scope
        for subject in subjects:
            assert any(nats_match(p, subject) for p in scope), (role, form, subject)
    if role in ("producer", "tenant-acme"):  # each reads its own scope, and no other
        own = "ai.results.shared.bait" if role == "producer" else "ai.results.tenant.acme.bait"
        assert any(own in subjects for subjects in got.values()), got


@pytest.mark.integration
async def test_no_producer_can_forge_a_replay_a_tenant_or_claim_anothers_job(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """Under deploy/nats/auth.conf, with a worker running as `worker`:
    - the same idempotency key in two scopes (no tenant, tenant acme) makes two jobs, each
      with its own answer (msg ids and results are scoped by tenant);
    - a producer re-publishing a `failed` job's id with the replay mark (the old attack that
      replaced it with a forged `succeeded`) and one naming tenant acme are dead letters,
      with no provider call and no result touched;
    - every wildcard form of each producer's job subject that the server accepts ends in
      one terminal state, its result (if any) inside that producer's own scope."""
    by_role, nc, js, procs = await _stack_with_a_worker(secured, fake_provider, tmp_path)
    try:
        async with (
            await Producer.connect(by_role["tenant-acme"].with_changes(tenant="acme")) as acme,
            await Producer.connect(by_role["producer"]) as plain,
        ):
            a = await acme.submit(
                make_job("anthropic", "m", prompt="acme asks"), idempotency_key="order-42"
            )
            p = await plain.submit(
                make_job("anthropic", "m", prompt="plain asks"), idempotency_key="order-42"
            )
            assert a == p == "order-42"
            got_a, got_p = await acme.result(a, timeout=60), await plain.result(p, timeout=60)
            assert response_text(got_a.response) == "echo: acme asks"
            assert response_text(got_p.response) == "echo: plain asks"
            failing = make_job("anthropic", "m", request=_faulty("anthropic", "fault:400"))
            victim = await plain.submit(failing)
            assert (await plain.result(victim, timeout=60)).status == "failed"
        calls = fake_provider.counters()["by_path"]["/v1/messages"]

        attacker = await RoleClient.connect(secured, "producer")
        try:
            forged = make_job("anthropic", "m", prompt="forged", id=victim)
            await attacker.js.publish(
                s.jobs_subject("anthropic", "normal"),
                encode(forged),
                headers={s.MSG_ID_HEADER: f"{victim}:rd1", s.REPLAY_HEADER: "d1"},
            )
            as_acme = make_job("anthropic", "m", prompt="forged", id="order-42", tenant="acme")
            await attacker.js.publish(
                s.jobs_subject("anthropic", "normal"),
                encode(as_acme),
                headers={s.MSG_ID_HEADER: "acme:order-43"},
            )
            # Forms of the producers' permissions with a known priority: AI_JOBS takes
            # nothing else (a literal `*` or `>` where the priority goes is refused).
            forms = await _publish_job_forms(attacker, "ai.jobs.*.normal", None)
        finally:
            await attacker.close()
        tenant_client = await RoleClient.connect(secured, "tenant-acme")
        try:
            forms += await _publish_job_forms(tenant_client, "ai.jobs.*.normal.acme", "acme")
        finally:
            await tenant_client.close()

        async def all_settled() -> bool:
            return (await js.stream_info(s.JOBS_STREAM)).state.messages == 0

        await wait_until(all_settled, timeout=60)
        results = {
            m.subject: decode_result(m.data) for m in await read_stream(js, s.RESULTS_STREAM)
        }
        letters = [decode_dead_letter(m.data) for m in await read_stream(js, s.DEAD_STREAM)]
    finally:
        for proc in procs:
            proc.terminate(timeout=30)
        await nc.close()
    assert len(forms) >= 2, forms  # the concrete subjects at least
    victim_result = results[s.result_subject(victim)]
    assert victim_result.status == "failed"  # not replaced by the forged replay
    assert results[s.result_subject("order-42", "acme")].status == "succeeded"
    refused = [d for d in letters if d.reason == "invalid"]
    assert any("Nats-Msg-Id must be" in d.error.message for d in refused)
    assert any("names tenant 'acme'" in d.error.message for d in refused)
    # Each accepted wildcard form: a result in its publisher's scope, or a dead letter.
    for job_id, tenant in forms:
        own = s.result_subject(job_id, tenant)
        elsewhere = [k for k, r in results.items() if r.job_id == job_id and k != own]
        assert not elsewhere, (job_id, tenant, elsewhere)
        assert own in results or any(job_id in (d.raw or "") for d in letters), job_id
    assert fake_provider.counters()["by_path"]["/v1/messages"] == calls + sum(
        1 for job_id, tenant in forms if s.result_subject(job_id, tenant) in results
    )


async def _publish_job_forms(
    client: RoleClient, allowed: str, tenant: str | None
) -> list[tuple[str, str | None]]:
    """Publish a well-formed job (canonical msg id, its own tenant) on every wildcard form
    of ``allowed``; return (job id, tenant) of those the server stored."""
    stored = []
    for i, form in enumerate(wildcard_forms(allowed)):
        job = make_job("anthropic", "m", prompt=f"form {i}", id=f"form-{tenant}-{i}", tenant=tenant)
        try:
            await client.js.publish(
                form, encode(job), headers={s.MSG_ID_HEADER: s.job_msg_id(job.id, tenant)}
            )
        except Exception:  # refused, or no stream listens there
            continue
        stored.append((job.id, tenant))
    return stored


# --------------------------------------------------------------------------- large jobs


@pytest.mark.integration
async def test_a_large_job_goes_through_under_least_privilege(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """acme's producer (user tenant-acme) puts a large job's body and submits it by
    reference; the worker (user worker) reads it, calls with it whole and deletes it; the
    replayer's user may read and delete a body too; the server logs no violation."""
    from services import bodies

    by_role, nc, js, procs = await _stack_with_a_worker(secured, fake_provider, tmp_path)
    request = {
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "word " * 400_000 + "end"}],
    }
    try:
        acme_settings = by_role["tenant-acme"].with_changes(tenant="acme")
        async with await Producer.connect(acme_settings) as acme:
            job_id = await acme.submit(make_job("anthropic", "m", request=request))
            result = await acme.result(job_id, timeout=60)
        (received,) = fake_provider.large_requests()

        async def body_gone() -> bool:  # deleted right after the result is stored
            return (await js.stream_info(bodies.BODIES_STREAM)).state.messages == 0

        await wait_until(body_gone, timeout=30)
        replayer = await RoleClient.connect(secured, "replayer")
        try:
            ref = await bodies.put_body(js, bodies.body_name("r", None), b"x" * 5000, chunk=1024)
            assert await bodies.fetch_body(replayer.js, ref) == b"x" * 5000
            assert await bodies.drop_body(replayer.js, ref.name)
        finally:
            await replayer.close()
    finally:
        for p in procs:
            p.terminate(timeout=30)
        await nc.close()
    assert result.status == "succeeded" and result.tenant == "acme"
    from services.tools.fake.received import content_digest

    assert received["digest"] == content_digest(request)
    assert secured.violations() == []


@pytest.mark.integration
@pytest.mark.parametrize("role", ["producer", "tenant-acme"])
async def test_every_wildcard_form_of_a_producers_body_puts_stays_in_the_bucket(
    secured: SecuredNats, role: str
) -> None:
    """The producers' body subjects (``$O.ai_bodies.C.*``, ``$O.ai_bodies.M.*``), published
    with each token as a literal `*` or cut with `>`: whatever the server stores is a chunk
    or a meta of the bodies bucket, nothing in any other stream; and a stored body is intact
    after it all."""
    from services import bodies

    base = make_settings(secured.url, "http://127.0.0.1:9")
    operator = await connect(secured.settings(base, "operator"), name="operator")
    ojs = operator.jetstream()
    await ensure_topology(ojs, base)
    ref = await bodies.put_body(ojs, bodies.body_name("kept", None), b"k" * 3000, chunk=1024)
    before = {
        name: (await ojs.stream_info(name)).state.messages
        for name in (s.JOBS_STREAM, s.PARKED_STREAM, s.RESULTS_STREAM, s.DEAD_STREAM)
    }
    scopes = [f"$O.{s.BODIES_BUCKET}.C.*", f"$O.{s.BODIES_BUCKET}.M.*"]
    assert set(scopes) <= set(auth_users()[role]["publish"])
    client = await RoleClient.connect(secured, role)
    tried, stored = await _publish_every_form(client, scopes, b"not a body")
    try:
        info = await ojs.stream_info(bodies.BODIES_STREAM, subjects_filter=">")
        subjects = list(info.state.subjects or {})
        after = {name: (await ojs.stream_info(name)).state.messages for name in before}
        kept = await bodies.fetch_body(ojs, ref)
    finally:
        await operator.close()
    assert tried >= 8 and stored, stored
    for subject in subjects:
        assert any(nats_match(p, subject) for p in scopes), subject
    assert after == before
    assert kept == b"k" * 3000


@pytest.mark.integration
async def test_the_replayer_exports_the_fleet_view_under_its_own_user(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """A replayer running as `replayer` (deploy/nats/auth.conf) exports the fleet's gauges
    on /metrics: queue depth, backlog age, workers online, dead letters, storage; and the
    server logs no permission violation for it."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    from services.tools.devstack import free_port

    by_role, nc, _, procs = await _stack_with_a_worker(secured, fake_provider, tmp_path)
    port = free_port()
    procs += _services(by_role, tmp_path, ("replayer", "--http-port", str(port)))
    names: set[str] = set()
    try:
        async with await Producer.connect(by_role["producer"]) as producer:
            job_id = await producer.submit(
                make_job("anthropic", "m", request=fault_request("fault:400", "bad"))
            )
            await producer.result(job_id, timeout=60)

        async def exported() -> bool:
            names.clear()
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{port}/metrics") as r,
                ):
                    text = await r.text()
            except aiohttp.ClientError:
                return False
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    names.add(sample.name)
                    if sample.value:
                        names.add(f"{sample.name}:{sample.labels.get('provider', '')}")
            return "ridethrough_workers_online:anthropic" in names

        await wait_until(exported, timeout=60, interval=0.5)
    finally:
        for proc in procs:
            proc.terminate()
        await nc.close()
    assert {
        "ridethrough_queue_jobs",
        "ridethrough_queue_oldest_job_age_seconds",
        "ridethrough_dead_letters_jobs:anthropic",
        "ridethrough_jetstream_stream_bytes:",
        "ridethrough_jetstream_account_bytes",
    } <= names, names
    assert secured.violations() == []


# --------------------------------------------------------------------------- the gateway

GATEWAY_KEYS = {"acme": "gw-acme-key", "globex": "gw-globex-key"}
GATEWAY_OPERATOR_KEY = "gw-operator-key"


def _gateway_settings(by_role: dict[str, Settings]) -> Settings:
    """``ridethrough gateway`` as user `gateway`: keys of acme and globex, an operator key
    for /status, and a low threshold so that a 4 KB request goes by reference."""
    from services.config import BodySettings, GatewaySettings
    from services.gateway import key_digest

    base = by_role["gateway"]
    return base.with_changes(
        gateway=GatewaySettings(
            keys={key_digest(key): tenant for tenant, key in GATEWAY_KEYS.items()},
            operator_keys=[key_digest(GATEWAY_OPERATOR_KEY)],
        ),
        bodies=BodySettings(threshold_bytes=2048),
    )


@pytest.mark.integration
async def test_the_gateway_serves_under_its_own_user(
    secured: SecuredNats, fake_provider: Any, tmp_path: Path
) -> None:
    """`ridethrough gateway` as user `gateway` (deploy/nats/auth.conf), a worker as
    `worker`: an async request is waiting, parked (an operator's drain), waiting again and
    done at its location; the official SDK's synchronous call gets its answer, a large one
    (its body by reference) too; acme's job's result is stored under acme and globex's key
    gets a 404 for it; /status renders for the operator key; and the server logs no
    permission violation at all."""
    import aiohttp
    import anthropic

    from services.gateway import JOB_ID_HEADER, running_gateway
    from services.ops import moves

    base = make_settings(secured.url, fake_provider.url)
    by_role = {role: secured.settings(base, role) for role in ROLES}
    nc = await connect(by_role["operator"], name="operator")
    js = nc.jetstream()
    await ensure_topology(js, by_role["operator"])
    gw = _gateway_settings(by_role)
    acme = {"x-api-key": GATEWAY_KEYS["acme"]}
    ask = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    procs: list[Any] = []
    try:
        async with running_gateway(gw, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:

            async def state(path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
                async with http.get(f"{url}{path}", headers=headers) as r:
                    return r.status, await r.json()

            async with http.post(
                f"{url}/v1/messages", json=ask, headers={**acme, "prefer": "respond-async"}
            ) as resp:
                assert resp.status == 202
                location = resp.headers["location"]
            assert (await state(location, acme))[1]["state"] == "waiting"
            assert (await moves.drain(js, "anthropic")).moved == 1
            parked = (await state(location, acme))[1]
            assert parked["state"] == "parked" and parked["parked"]["reason"] == "drained"
            assert (await moves.replay(js, base, "anthropic")).moved == 1
            assert (await state(location, acme))[1]["state"] == "waiting"
            procs += _services(by_role, tmp_path, ("worker", "--no-topology"))

            async def done() -> bool:
                return (await state(location, acme))[1]["state"] == "done"

            await wait_until(done, timeout=60)
            async with anthropic.AsyncAnthropic(
                base_url=url, api_key=GATEWAY_KEYS["acme"], max_retries=0
            ) as client:
                raw = await client.messages.with_raw_response.create(
                    model="m", max_tokens=8, messages=[{"role": "user", "content": "sync"}]
                )
                message = await raw.parse()
                job_id = raw.headers[JOB_ID_HEADER]
                large = await client.messages.create(
                    model="m", max_tokens=8, messages=[{"role": "user", "content": "x" * 4096}]
                )
            globex = {"x-api-key": GATEWAY_KEYS["globex"]}
            snooped, body = await state(f"/v1/jobs/{job_id}", globex)
            own, mine = await state(f"/v1/jobs/{job_id}", acme)
            operator = {"authorization": f"Bearer {GATEWAY_OPERATOR_KEY}"}
            async with http.get(f"{url}/status", headers=operator) as r:
                page = (r.status, await r.text())
            async with http.get(f"{url}/status.json", headers=operator) as r:
                status = await r.json()
        stored = await js.get_last_msg(s.RESULTS_STREAM, s.result_subject(job_id, "acme"))
        counts = await count_outcomes(js)
        bodies = (await js.stream_info(f"OBJ_{s.BODIES_BUCKET}")).state
    finally:
        codes = [p.terminate(timeout=30) for p in procs]
        await nc.close()
    assert message.content[0].type == "text" and message.content[0].text == "echo: sync"
    assert large.content[0].type == "text" and large.content[0].text == "echo: " + "x" * 4096
    assert bodies.last_seq >= 2  # its body went by reference (a chunk and a meta) ...
    assert bodies.messages == 0  # ... and the worker deleted it once answered
    assert decode_result(stored.data).tenant == "acme"
    assert (own, mine["state"]) == (200, "done")
    assert snooped == 404 and body["error"]["type"] == "not_found_error"
    assert page[0] == 200 and "ridethrough status" in page[1]
    assert status["workers"] and "anthropic" in status["providers"]
    assert (counts["results"], counts["succeeded"], counts["dead"]) == (3, 3, 0)
    assert secured.violations() == []
    assert codes == [0]


#: What the gateway may never write, one subject pattern each (another role's).
GATEWAY_FORBIDDEN_WRITES = [
    "ai.jobs.*.*.*.requeued",
    "ai.results.shared.*",
    "ai.results.tenant.*.*",
    "ai.dead.*.*",
    "ai.parked.*.*.*",
    "ai.events.health.*",
    "ai.events.tally.*",
    "ai.events.evidence.*",
    "ai.events.ops",
    "$KV.ai_health.*",
    "$KV.ai_control.paused.*",
    "$KV.ai_control.replay.*",
    "$KV.ai_workers.*",
    "$KV.ai_locator.*.*",
]


@pytest.mark.integration
async def test_every_wildcard_form_of_anothers_writes_is_refused_to_the_gateway(
    secured: SecuredNats,
) -> None:
    """The gateway publishes, with each token as a literal `*` or cut with `>`, on every
    subject pattern it may not write (requeued jobs, results, dead letters, parked jobs,
    events, every KV bucket): the server stores none of it but in AI_JOBS, where what it
    stores is a 5-token job subject (a literal `>` where the tenant goes: a dead letter
    for the worker, never a requeued job), and refuses the rest."""
    base = make_settings(secured.url, "http://127.0.0.1:9")
    operator = await connect(secured.settings(base, "operator"), name="operator")
    ojs = operator.jetstream()
    await ensure_topology(ojs, base)
    streams = [s.JOBS_STREAM, s.PARKED_STREAM, s.RESULTS_STREAM, s.DEAD_STREAM, s.EVENTS_STREAM]
    streams += [
        f"KV_{b}" for b in (s.HEALTH_BUCKET, s.CONTROL_BUCKET, s.WORKERS_BUCKET, s.LOCATOR_BUCKET)
    ]
    client = await RoleClient.connect(secured, "gateway")
    tried, stored = await _publish_every_form(client, GATEWAY_FORBIDDEN_WRITES, b"{}")
    try:
        held: dict[str, list[str]] = {}
        for stream in streams:
            info = await ojs.stream_info(stream, subjects_filter=">")
            held[stream] = list(info.state.subjects or {})
    finally:
        await operator.close()
    assert tried >= 40, tried
    assert held.pop(f"KV_{s.CONTROL_BUCKET}") == [f"$KV.{s.CONTROL_BUCKET}.{s.LEGACY_JOBS_KEY}"]
    jobs = held.pop(s.JOBS_STREAM)
    assert all(subjects == [] for subjects in held.values()), held
    assert set(stored) == set(jobs), (stored, jobs)
    for subject in jobs:
        assert s.job_origin(subject) is None, subject  # no job a worker would take as one
        assert nats_match("ai.jobs.*.*.*", subject), subject
    refused = " ".join(secured.violations())
    for pattern in ("ai.jobs.*.*.*.requeued", "ai.results.tenant.*.*", "$KV.ai_health.*"):
        assert wildcard_forms(pattern)[0].lower() in refused.lower(), pattern
