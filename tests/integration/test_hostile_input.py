"""Generated hostile input: whatever a publisher puts on AI_JOBS ends in exactly one terminal
state within a bounded number of attempts, the worker never crashes, and the next good job
is still served.

Hypothesis draws batches of messages: arbitrary bytes, and JSON near the job schema (right
and wrong types, unknown providers, bad tenants and priorities, deep nesting, requests the
fake refuses), on every job subject form (with a tenant, requeued, literal `*` and `>`
tokens), with and without the canonical msg id and the replay mark.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import subjects as s
from schemas.codec import encode
from schemas.results import decode_result
from services.config import Settings
from services.jetstream.errors import NO_RESPONDERS
from services.producer import Producer, make_job
from services.tools.stack import running_worker
from tests.conftest import make_settings
from tests.support import read_stream, wait_until

pytestmark = pytest.mark.integration

_SUBJECTS = (
    "ai.jobs.anthropic.normal",
    "ai.jobs.openai.high",
    "ai.jobs.anthropic.low.acme",
    "ai.jobs.anthropic.normal._.requeued",
    "ai.jobs.anthropic.normal.acme.requeued",
    "ai.jobs.anthropic.*",
    "ai.jobs.anthropic.>",
    "ai.jobs.anthropic.normal.x.y",
)

_DEEP = b'{"id":"deep","provider":"anthropic","model":"m","request":' + b"[" * 50_000
_DEEP += b"]" * 50_000 + b"}"

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_request = st.one_of(
    _json,
    st.fixed_dictionaries(
        {
            "max_tokens": st.integers(-5, 50),
            "messages": st.just([{"role": "user", "content": "x"}]),
        },
        optional={"stream": st.booleans(), "metadata": st.just({"user_id": "fault:400"})},
    ),
)
_job = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["j1", "j2", "has.dot", "*", ">", ""]) | st.text(max_size=10),
        "provider": st.sampled_from(["anthropic", "openai", "nosuch", "*"]) | _json,
        "model": st.sampled_from(["m", ""]) | _json,
        "request": _request,
        "priority": st.sampled_from(["high", "normal", "low", "urgent"]) | _json,
        "tenant": st.sampled_from(["acme", "globex", "*", None]) | _json,
        "deadline": st.sampled_from(["2000-01-01T00:00:00Z", "soon", "2999-01-01T00:00:00+00:00"]),
        "on_outage": st.sampled_from(["park", "failover", "fail", "never"]),
        "fallbacks": _json,
        "metadata": _json,
    },
)
_body = st.one_of(
    st.binary(max_size=200),
    _job.map(lambda d: json.dumps(d).encode()),
    st.just(
        b'{"id":"deep","provider":"anthropic","model":"m","request":'
        + b"[" * 50_000
        + b"]" * 50_000
        + b"}"
    ),
)
_message = st.tuples(
    st.sampled_from(_SUBJECTS),
    _body,
    st.sampled_from(["canonical", "none", "other"]),
    st.booleans(),
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(_message, min_size=1, max_size=6))
async def test_any_message_ends_in_one_terminal_state_and_the_worker_carries_on(
    nats_server: Any, fake_provider: Any, js: Any, batch: list[tuple[str, bytes, str, bool]]
) -> None:
    """Each stored message leaves AI_JOBS within max_attempts deliveries as a dead letter or a
    result (one on a subject naming no priority is refused at publish); no unexpected error
    in the worker; the good job after each bad one is served."""
    cfg: Settings = make_settings(nats_server.url, fake_provider.url, max_attempts=3)
    before_dead = (await js.stream_info(s.DEAD_STREAM)).state.last_seq
    before_results = (await js.stream_info(s.RESULTS_STREAM)).state.last_seq
    stored = requeued = 0
    goods: list[str] = []
    for i, (subject, body, msg_id, replay) in enumerate(batch):
        headers: dict[str, str] = {}
        try:
            job_id = json.loads(body).get("id")
        except Exception:
            job_id = None
        if msg_id == "canonical" and isinstance(job_id, str):
            headers[s.MSG_ID_HEADER] = job_id
        elif msg_id == "other":
            headers[s.MSG_ID_HEADER] = f"other-{stored}-{len(body)}-{id(body)}"
        if replay:
            headers[s.REPLAY_HEADER] = "d1"
        try:
            ack = await js.publish(subject, body, headers=headers or None)
        except NO_RESPONDERS:
            # No known priority in the subject: AI_JOBS does not take it (no consumer
            # could), so the publisher is told at once and nothing is stored.
            assert subject.split(".")[3] not in s.PRIORITIES
            ack = None
        if ack is not None and not ack.duplicate:
            stored += 1
            requeued += subject.endswith(".requeued")
        good = make_job("anthropic", "m", prompt=f"good {i}")  # after each bad one
        await js.publish(
            s.jobs_subject("anthropic", "normal"), encode(good), headers={s.MSG_ID_HEADER: good.id}
        )
        goods.append(good.id)
    async with running_worker(cfg) as (_, worker), await Producer.connect(cfg) as producer:
        served = await producer.results(goods, timeout=60)
        assert {r.status for r in served.values()} == {"succeeded"}

        async def drained() -> bool:
            return (await js.stream_info(s.JOBS_STREAM)).state.messages == 0

        await wait_until(drained, timeout=60)
        assert worker.runner is not None
        assert worker.runner.stats.internal_errors == 0
    dead = (await js.stream_info(s.DEAD_STREAM)).state.last_seq - before_dead
    results = [
        decode_result(m.data)
        for m in await read_stream(js, s.RESULTS_STREAM)
        if m.seq > before_results
    ]
    # Every stored message was settled (AI_JOBS is empty) after writing its end: a dead
    # letter, or a result of its own. Only a requeued copy of a job that already has a
    # result may end with no record (a duplicate). Each good job has exactly one result.
    assert sorted(r.job_id for r in results if r.job_id in goods) == sorted(goods)
    assert dead <= stored
    assert dead + len(results) - len(goods) >= stored - requeued
