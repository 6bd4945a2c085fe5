"""Submit → worker → provider → result, end to end on a real nats-server and the real SDKs."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from schemas.parking import decode_dead_letter
from schemas.results import response_text
from services.config import BodySettings, Settings
from services.errors import InvalidJob, PayloadTooLarge, ResultTimeout, UnknownProvider
from services.producer import Producer, make_job
from services.tools.stack import running_worker
from tests.support import count_outcomes, fault_request, read_stream

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("provider", "model", "stream"),
    [
        ("anthropic", "claude-test", False),
        ("anthropic", "claude-test", True),
        ("openai", "gpt-test", False),
        ("openai", "gpt-test", True),
    ],
)
async def test_submit_returns_the_providers_answer(
    settings: Settings, js: Any, provider: str, model: str, stream: bool
) -> None:
    """A job through each adapter (JSON and streaming) comes back with the fake's echo."""
    request: dict[str, Any] = {
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hello there ridethrough"}],
    }
    if stream:
        request["stream"] = True
    async with running_worker(settings), await Producer.connect(settings) as producer:
        job_id = await producer.submit(make_job(provider, model, request=request))
        result = await producer.result(job_id, timeout=30)
    assert result.status == "succeeded", result.error
    assert result.job_id == job_id
    assert response_text(result.response) == "echo: hello there ridethrough"
    assert result.usage is not None and result.usage.output_tokens == 4
    assert result.attempts == 1


async def test_result_found_whether_it_arrived_before_or_during_the_call(
    settings: Settings, js: Any
) -> None:
    """result() returns a result stored before the call, and one that arrives during it."""
    async with await Producer.connect(settings) as producer:
        job_id = await producer.submit(make_job("anthropic", "m", prompt="late"))
        with pytest.raises(ResultTimeout):
            await producer.result(job_id, timeout=0.2)
        import asyncio

        waiting = asyncio.create_task(producer.result(job_id, timeout=30))
        async with running_worker(settings):
            during = await waiting
        before = await producer.result(job_id, timeout=0.2)
    assert during.status == before.status == "succeeded"
    assert during.job_id == before.job_id == job_id


async def test_resubmit_with_same_idempotency_key_creates_one_job(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """Re-submitting with the same key returns the same id and yields one job, one call."""
    async with await Producer.connect(settings) as producer:
        ids = [
            await producer.submit(
                make_job("anthropic", "m", prompt="once"), idempotency_key="order-42"
            )
            for _ in range(3)
        ]
        weird = [
            await producer.submit(make_job("anthropic", "m", prompt="x"), idempotency_key="a.b c/d")
            for _ in range(2)
        ]
        assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 2
        async with running_worker(settings):
            await producer.results([ids[0], weird[0]], timeout=30)
    assert ids == ["order-42"] * 3
    assert weird[0] == weird[1] and weird[0] != "a.b c/d"
    counts = await count_outcomes(js)
    assert counts["succeeded"] == 2 and counts["result_writes"] == 2
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 2


async def test_thousand_jobs_through_submit_many_give_a_thousand_results(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """1,000 jobs via submit_many end in exactly 1,000 results, each written once."""
    jobs = [make_job("anthropic", "m", prompt=f"job {i}", max_tokens=8) for i in range(1000)]
    async with running_worker(settings), await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many(jobs)
        assert all(o.ok for o in outcomes)
        results = await producer.results([o.job_id for o in outcomes], timeout=60)
    assert len(results) == 1000
    assert {r.status for r in results.values()} == {"succeeded"}
    counts = await count_outcomes(js)
    assert counts == {**counts, "results": 1000, "result_writes": 1000, "dead": 0, "waiting": 0}
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 1000


async def test_submit_many_reports_per_job_failures(settings: Settings, js: Any) -> None:
    """One bad job in a batch gets its own error; the others are accepted."""
    good = make_job("anthropic", "m", prompt="fine")
    bad_provider = make_job("nosuch", "m", prompt="nowhere")
    async with await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many([good, {"provider": "anthropic"}, bad_provider])
    assert outcomes[0].ok
    assert isinstance(outcomes[1].error, InvalidJob)
    assert isinstance(outcomes[2].error, UnknownProvider)


async def test_producer_errors_are_clear(settings: Settings, js: Any) -> None:
    """Invalid jobs name the field; oversize payloads and unknown providers are refused."""
    async with await Producer.connect(settings) as producer:
        with pytest.raises(InvalidJob, match=r"\$\.priority"):
            await producer.submit(
                {
                    "id": "x1",
                    "provider": "anthropic",
                    "model": "m",
                    "request": {},
                    "priority": "urgent",
                }
            )
        with pytest.raises(InvalidJob, match=r"\$\.id"):
            await producer.submit(
                {"id": "has.dot", "provider": "anthropic", "model": "m", "request": {}}
            )
        # Over max_payload a job goes by reference (tests/integration/test_large_jobs.py);
        # over bodies.max_bytes (the Messages API's 32 MB; smaller here) it is refused.
        capped = Producer(producer.nc, bodies=BodySettings(max_bytes=producer.nc.max_payload))
        huge = make_job("anthropic", "m", prompt="x" * (producer.nc.max_payload + 1))
        with pytest.raises(PayloadTooLarge, match="max_bytes"):
            await capped.submit(huge)
        with pytest.raises(UnknownProvider, match="nosuch"):
            await producer.submit(make_job("nosuch", "m", prompt="hi"))
    assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 0


@pytest.mark.parametrize(
    ("body", "subject", "why"),
    [
        (b"{not json", "ai.jobs.anthropic.normal", "malformed"),
        (b'{"id": "j1", "provider": "anthropic"}', "ai.jobs.anthropic.normal", "model"),
        (
            b'{"id":"j2","provider":"openai","model":"m","request":{}}',
            "ai.jobs.anthropic.normal",
            "arrived on",
        ),
        (
            b'{"id":"other","provider":"anthropic","model":"m","request":{}}',
            "ai.jobs.anthropic.normal",
            "Nats-Msg-Id must be 'other'",
        ),
        (
            b'{"id":"j2","provider":"anthropic","model":"m","request":{},"tenant":"acme"}',
            "ai.jobs.anthropic.normal",
            "names tenant 'acme' but was published without one",
        ),
        (
            b'{"id":"j2","provider":"anthropic","model":"m","request":{}}',
            "ai.jobs.anthropic.normal.acme",
            "names tenant None but was published for tenant 'acme'",
        ),
        (
            b'{"id":"j2","provider":"anthropic","model":"m","request":{}}',
            "ai.jobs.anthropic.normal.x.y.z",
            "is not a job subject",
        ),
    ],
)
async def test_malformed_message_becomes_dead_letter_with_reason(
    settings: Settings, js: Any, body: bytes, subject: str, why: str
) -> None:
    """Bad JSON, a wrong schema or a wrong provider end as dead letters `invalid`; the
    worker carries on with the next job. A producer's job must carry its id as Nats-Msg-Id
    and the tenant its subject names, or it is refused the same way (no result written)."""
    await js.publish(subject, body, headers={s.MSG_ID_HEADER: "j2"})
    async with running_worker(settings), await Producer.connect(settings) as producer:
        after = await producer.submit(make_job("anthropic", "m", prompt="after the bad one"))
        assert (await producer.result(after, timeout=30)).status == "succeeded"
    dead = await read_stream(js, s.DEAD_STREAM)
    assert len(dead) == 1
    assert dead[0].subject == "ai.dead.anthropic.invalid"
    letter = decode_dead_letter(dead[0].data)
    assert letter.reason == "invalid" and why in letter.error.message
    assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 0
    if why != "arrived on":  # an unknown or refused job gets no `failed` result
        assert (await js.stream_info(s.RESULTS_STREAM)).state.messages == 1


async def test_permanent_error_dead_letters_and_tells_the_producer(
    settings: Settings, js: Any
) -> None:
    """A 400 from the provider gives a dead letter and a failed result, with no retry."""
    request = fault_request("fault:400", "bad", max_tokens=8)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        job_id = await producer.submit(make_job("anthropic", "m", request=request))
        result = await producer.result(job_id, timeout=30)
    assert result.status == "failed"
    assert result.error is not None and result.error.type == "invalid_request"
    assert result.attempts == 1
    dead = await read_stream(js, s.DEAD_STREAM)
    assert [m.subject for m in dead] == ["ai.dead.anthropic.invalid_request"]
    assert decode_dead_letter(dead[0].data).job_id == job_id


async def test_transient_errors_retry_until_attempts_run_out(
    nats_server: Any, js: Any, fake_provider: Any
) -> None:
    """A job meeting 529 every time (while the breaker stays closed) is retried
    max_attempts times, then dead-lettered."""
    from tests.conftest import make_settings

    # A breaker that would not trip on one job's failures: this test is about attempts.
    settings = make_settings(
        nats_server.url, fake_provider.url, breaker={"consecutive_failures": 100, "min_calls": 100}
    )
    request = fault_request("fault:529", "busy", max_tokens=8)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        job_id = await producer.submit(make_job("anthropic", "m", request=request))
        result = await producer.result(job_id, timeout=60)
    assert result.status == "failed"
    assert result.error is not None and result.error.type == "retries_exhausted"
    assert result.attempts == settings.worker.max_attempts
    assert fake_provider.counters()["by_path"]["/v1/messages"] == settings.worker.max_attempts
    assert (await js.stream_info(s.DEAD_STREAM)).state.messages == 1
    assert (await js.stream_info(s.RESULTS_STREAM)).state.messages == 1


async def test_steady_trickle_is_never_redelivered(
    nats_server: Any, fake_provider: Any, js: Any
) -> None:
    """Jobs arriving one by one (as a steady producer sends them) are each delivered once:
    no fetched message is dropped to wait out ack_wait."""
    import asyncio

    from tests.conftest import make_settings

    # A long ack_wait: only a dropped message, never a slow machine, can cause a redelivery.
    settings = make_settings(nats_server.url, fake_provider.url, ack_wait_s=30.0)

    async with running_worker(settings), await Producer.connect(settings) as producer:
        ids = []
        for i in range(150):
            ids.append(await producer.submit(make_job("anthropic", "m", prompt=f"t{i}")))
            await asyncio.sleep(0.01)
        results = await producer.results(ids, timeout=60)
    assert {r.attempts for r in results.values()} == {1}


async def test_result_returns_the_stored_result_not_one_the_stream_refused(
    settings: Settings, js: Any
) -> None:
    """A result the stream refuses (a second copy's, or one dropped as a duplicate) still
    reaches subscribers; result() waits for, and returns, the one the stream stored."""
    import asyncio

    import nats.js.errors

    from schemas.codec import encode
    from schemas.results import JobResult

    subject = s.result_subject("racing")
    refused = JobResult(job_id="racing", status="failed", provider="anthropic", model="m")
    stored = JobResult(job_id="racing", status="succeeded", provider="anthropic", model="m")
    async with await Producer.connect(settings) as producer:
        waiting = asyncio.create_task(producer.result("racing", timeout=30))
        await asyncio.sleep(0.2)  # let it subscribe; the refused copy must reach it first
        with pytest.raises(nats.js.errors.APIError):
            await js.publish(subject, encode(refused), headers={s.EXPECTED_LAST_SUBJECT_SEQ: "999"})
        await js.publish(subject, encode(stored), headers={s.EXPECTED_LAST_SUBJECT_SEQ: "0"})
        got = await waiting
    assert got.status == "succeeded"
