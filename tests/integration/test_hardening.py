"""Hostile input and a misbehaving provider: every message still ends in exactly one terminal
state, within a bounded number of attempts, and an answer the provider gave is paid for once.

Each test runs a real worker (in this event loop) against a real nats-server and the real SDKs
against the fake provider's hostile triggers (``fault:retry_after``, ``fault:stall``,
``fault:error_200``, ``fault:redirect``, ``fault:huge``).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import msgspec
import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.jobs import Job
from schemas.parking import decode_dead_letter
from schemas.results import response_text
from services.breaker import paused_key
from services.config import ProviderSettings, Settings
from services.lifecycle import decide, settle
from services.overflow import HEADROOM, take
from services.producer import Producer, make_job
from services.tools.stack import running_worker
from tests.support import count_outcomes, read_stream, wait_until

pytestmark = pytest.mark.integration


def _job(trigger: str, provider: str = "anthropic", **request: Any) -> Job:
    """A job whose request asks the fake for ``trigger``."""
    body: dict[str, Any] = {
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
        **request,
    }
    if provider == "anthropic":
        body["metadata"] = {"user_id": trigger}
    else:
        body["user"] = trigger
    return make_job(provider, "m", request=body)


async def _dead_letters(js: Any) -> list[Any]:
    return [decode_dead_letter(m.data) for m in await read_stream(js, s.DEAD_STREAM)]


async def _one_result(producer: Producer, job_id: str) -> Any:
    return await producer.result(job_id, timeout=60)


async def _still_serves(producer: Producer) -> None:
    """A good job after the bad ones is still served."""
    good = await producer.submit(make_job("anthropic", "m", prompt="still here"))
    result = await producer.result(good, timeout=60)
    assert result.status == "succeeded" and response_text(result.response) == "echo: still here"


async def test_deeply_nested_job_is_dead_letter_with_its_exact_bytes(
    settings: Settings, js: Any
) -> None:
    """A job nested deeper than the decoder goes becomes a dead letter `invalid` at once
    (no release loop), keeping its bytes exactly; non-UTF-8 bytes are kept exactly too."""
    nested = (
        b'{"id":"deep","provider":"anthropic","model":"m","request":{"a":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}}"
    )
    binary = b"\xff\xfe\x00not json \xc3"
    async with running_worker(settings) as (_, worker), await Producer.connect(settings) as p:
        await js.publish(s.jobs_subject("anthropic", "normal"), nested)
        await js.publish(s.jobs_subject("anthropic", "normal"), binary)
        await _still_serves(p)
        await wait_until(lambda: _count_dead(js, 2))
        assert worker.runner is not None and worker.runner.stats.internal_errors == 0
    letters = await _dead_letters(js)
    assert {d.reason for d in letters} == {"invalid"}
    assert all(d.attempts == 1 for d in letters)
    kept = {
        (d.raw.encode() if d.raw is not None else base64.b64decode(d.raw_base64 or ""))
        for d in letters
    }
    assert kept == {nested, binary}


async def _count_dead(js: Any, n: int) -> bool:
    return (await js.stream_info(s.DEAD_STREAM)).state.messages >= n


async def test_an_unexpected_error_counts_towards_the_attempts_and_ends_in_a_dead_letter(
    nats_server: Any, fake_provider: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """Our own bug on one job (simulated inside the worker) is retried max_attempts times,
    then dead-lettered `internal_error` with the job's bytes; other jobs are untouched."""
    from tests.conftest import make_settings

    settings = make_settings(nats_server.url, fake_provider.url, max_attempts=3)
    real = settle.timings

    def buggy(job: Job, started: float, provider_s: float) -> Any:
        if job.metadata.get("bug"):
            raise KeyError("a bug we did not foresee")
        return real(job, started, provider_s)

    monkeypatch.setattr(settle, "timings", buggy)
    async with (
        running_worker(settings) as (_, worker),
        await Producer.connect(settings) as producer,
    ):
        js = producer.js
        bad = make_job("anthropic", "m", prompt="boom", metadata={"bug": "1"})
        await producer.submit(bad)
        await _still_serves(producer)
        await wait_until(lambda: _count_dead(js, 1))
        assert worker.runner is not None and worker.runner.stats.internal_errors == 3
        (letter,) = await _dead_letters(js)
        assert letter.reason == "internal_error" and letter.attempts == 3
        assert "KeyError" in letter.error.message
        assert letter.raw is not None and msgspec.json.decode(letter.raw)["id"] == bad.id
        assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 0


async def test_a_huge_reply_is_paid_once_kept_aside_and_the_job_ends_failed(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A 2 MB reply to a small job (over max_payload) is called for once, kept whole in
    ai_overflow, and the job ends `failed` (`response_too_large`) with a dead letter."""
    async with running_worker(settings), await Producer.connect(settings) as producer:
        max_payload = producer.nc.max_payload
        job_id = await producer.submit(_job(f"fault:huge:{2 * max_payload}"))
        result = await _one_result(producer, job_id)
        await _still_serves(producer)
    assert result.status == "failed" and result.error is not None
    assert result.error.type == "response_too_large"
    (letter,) = await _dead_letters(js)
    assert letter.reason == "response_too_large" and letter.overflow
    kept = msgspec.json.decode(await take(js, letter.overflow))
    assert kept["status"] == "succeeded" and len(response_text(kept["response"])) > max_payload
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 2  # the huge one, the good one


async def test_an_invalid_message_inflated_by_escaping_keeps_its_bytes_aside(
    settings: Settings, js: Any
) -> None:
    """A malformed message near max_payload whose bytes would grow six-fold when quoted
    into a dead letter is dead-lettered once, its exact bytes in ai_overflow."""
    async with running_worker(settings), await Producer.connect(settings) as producer:
        size = producer.nc.max_payload - HEADROOM
        body = b"\x01" * size
        await js.publish(s.jobs_subject("anthropic", "normal"), body)
        await _still_serves(producer)
        await wait_until(lambda: _count_dead(js, 1))
    (letter,) = await _dead_letters(js)
    assert letter.reason == "invalid" and letter.raw is None and letter.overflow
    assert await take(js, letter.overflow) == body


async def test_a_job_too_large_to_park_ends_as_a_dead_letter_not_a_loop(
    settings: Settings, js: Any
) -> None:
    """A job published past the producer's limit, for a paused provider, cannot be parked:
    it is dead-lettered `too_large` once (its bytes kept), not released for ever."""
    kv = await js.key_value(s.CONTROL_BUCKET)
    await kv.put(paused_key("anthropic"), b'{"reason":"test","by":"test"}')
    async with running_worker(settings), await Producer.connect(settings) as producer:
        room = producer.nc.max_payload - 200
        job = make_job("anthropic", "m", prompt="x" * (room - 300))
        data = encode(job)
        assert len(data) < room
        await js.publish(
            s.jobs_subject("anthropic", "normal"), data, headers={s.MSG_ID_HEADER: job.id}
        )
        await wait_until(lambda: _count_dead(js, 1))
        result = await _one_result(producer, job.id)
    assert result.status == "failed" and result.error is not None
    assert result.error.type == "too_large"
    (letter,) = await _dead_letters(js)
    assert letter.reason == "too_large"
    assert letter.overflow and await take(js, letter.overflow) == data
    assert (await js.stream_info(s.PARKED_STREAM)).state.messages == 0


async def test_a_retry_after_of_a_billion_seconds_is_capped(
    nats_server: Any, fake_provider: Any
) -> None:
    """A provider asking to retry in 10^9 s gets backoff_max_s at most: the job is retried
    and dead-lettered `retries_exhausted` in a bounded time, not parked in AI_JOBS for decades."""
    from tests.conftest import make_settings

    settings = make_settings(
        nats_server.url, fake_provider.url, max_attempts=3, breaker={"consecutive_failures": 50}
    )
    async with running_worker(settings), await Producer.connect(settings) as producer:
        job_id = await producer.submit(_job("fault:retry_after:1000000000"))
        result = await _one_result(producer, job_id)
    assert result.status == "failed" and result.error is not None
    assert result.error.type == "retries_exhausted" and result.attempts == 3
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 3


def test_backoff_never_exceeds_its_cap_whatever_the_provider_asks() -> None:
    """backoff_delay honours retry-after up to backoff_max_s and no further."""
    from services.config import WorkerSettings

    w = WorkerSettings(backoff_base_s=1, backoff_max_s=60)
    assert decide.backoff_delay(1, w, 1e9) == 60
    assert decide.backoff_delay(1, w, 30.0) == 30.0
    assert decide.backoff_delay(10_000, w, None) <= 60


async def test_a_call_that_never_finishes_hits_its_deadline(
    nats_server: Any, fake_provider: Any
) -> None:
    """A provider that keeps a call alive (SSE pings, a body one byte a second) is cut at
    the provider's deadline_s: the job is retried and ends, the worker slot is freed."""
    from tests.conftest import make_settings

    base = make_settings(nats_server.url, fake_provider.url, max_attempts=2)
    providers = {
        name: ProviderSettings(**{**p.model_dump(), "deadline_s": 1.0})
        for name, p in base.providers.items()
    }
    settings = base.with_changes(providers=providers)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        ids = [
            await producer.submit(_job("fault:stall", stream=True)),
            await producer.submit(_job("fault:stall")),
            await producer.submit(_job("fault:stall", provider="openai", stream=True)),
        ]
        results = await producer.results(ids, timeout=60)
    for result in results.values():
        assert result.status == "failed" and result.error is not None
        assert result.error.type == "retries_exhausted" and "timeout" in result.error.message
        assert result.attempts == 2


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_an_error_object_under_status_200_is_classified_by_its_type(
    settings: Settings, js: Any, fake_provider: Any, provider: str
) -> None:
    """A 200 whose body is an error object is an error of its type: invalid_request is
    permanent (dead at once, no breaker count), never a success or an `unknown` retry."""
    async with running_worker(settings) as (_, worker), await Producer.connect(settings) as p:
        job_id = await p.submit(_job("fault:error_200:invalid_request_error", provider=provider))
        result = await _one_result(p, job_id)
        assert worker.runner is not None
        calls, failures = worker.runner.window_counts()[provider]
    assert result.status == "failed" and result.error is not None
    assert result.error.type == "invalid_request" and result.attempts == 1
    assert failures == 0 and calls == 1


async def test_a_redirect_loop_is_a_loud_permanent_config_error(
    settings: Settings, js: Any, caplog: Any
) -> None:
    """A wrong base URL that redirects for ever is a configuration error: dead at the first
    attempt with reason `config`, logged at ERROR, and it does not count as an outage."""
    caplog.set_level(logging.INFO)
    async with running_worker(settings) as (_, worker), await Producer.connect(settings) as p:
        job_id = await p.submit(_job("fault:redirect"))
        result = await _one_result(p, job_id)
        assert worker.runner is not None
        assert worker.runner.window_counts().get("anthropic", (0, 0))[1] == 0
    assert result.status == "failed" and result.error is not None
    assert result.error.type == "config" and result.attempts == 1
    assert "redirects" in result.error.message
    assert any(r.levelno == logging.ERROR and "config" in r.getMessage() for r in caplog.records)


async def test_nats_going_away_mid_job_is_a_warning_and_the_job_still_ends_once(
    nats_server: Any, fake_provider: Any, caplog: Any
) -> None:
    """nats-server stopped while a call is in flight: the worker logs warnings (no ERROR,
    no traceback), keeps the paid answer and stores it once NATS is back; one call, one result."""
    if not hasattr(nats_server, "restart"):
        pytest.skip("needs the embedded nats-server (restart keeps its store)")
    from tests.conftest import make_settings

    settings = make_settings(nats_server.url, fake_provider.url)
    caplog.set_level(logging.WARNING)
    async with (
        running_worker(settings) as (_, worker),
        await Producer.connect(settings) as producer,
    ):
        job_id = await producer.submit(_job("fault:slow:3000"))

        async def calling() -> bool:
            return worker.in_flight == 1

        await wait_until(calling)
        nats_server.stop(kill=True)  # the call (3 s) ends while NATS is down

        async def retrying() -> bool:
            return any("NATS did not take its answer" in r.getMessage() for r in caplog.records)

        await wait_until(retrying, timeout=30)
        nats_server.start()

        async def reconnected() -> bool:
            return bool(producer.nc.is_connected)

        await wait_until(reconnected, timeout=30)
        result = await producer.result(job_id, timeout=60)
        js = producer.js
        counts = await count_outcomes(js)
    assert result.status == "succeeded"
    assert counts["result_writes"] == 1
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 1
    worker_errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("ridethrough")
    ]
    assert worker_errors == []


async def test_a_second_copy_of_a_job_under_another_msg_id_never_calls_again(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """The same job id published again under another msg id (while the first is in flight,
    and after it is done) is refused, not called: one provider call, one result."""
    job = _job("fault:slow:1000")
    data = encode(job)
    subject = s.jobs_subject("anthropic", "normal")
    async with (
        running_worker(settings) as (_, worker),
        await Producer.connect(settings) as producer,
    ):
        await js.publish(subject, data, headers={s.MSG_ID_HEADER: job.id})

        async def calling() -> bool:
            return worker.in_flight == 1

        await wait_until(calling)
        await js.publish(subject, data, headers={s.MSG_ID_HEADER: f"{job.id}-in-flight"})
        assert (await producer.result(job.id, timeout=30)).status == "succeeded"
        await js.publish(subject, data, headers={s.MSG_ID_HEADER: f"{job.id}-after"})
        again = await js.publish(subject, data, headers={s.MSG_ID_HEADER: job.id})
        assert again.duplicate  # the dedup window holds the canonical id
        await wait_until(lambda: _count_dead(js, 2))
    counts = await count_outcomes(js)
    assert counts["result_writes"] == 1 and counts["waiting"] == 0
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 1
    assert {d.reason for d in await _dead_letters(js)} == {"invalid"}


@pytest.mark.parametrize(
    "header",
    [
        {"Nats-Rollup": "all"},
        {"Nats-Rollup": "sub"},
        {"Nats-TTL": "1s"},
        {"Nats-Schedule": "@at 2000-01-01T00:00:00Z"},
    ],
)
async def test_a_producer_header_cannot_purge_expire_or_schedule_accepted_jobs(
    js: Any, header: dict[str, str]
) -> None:
    """Headers a producer can set that would purge the queue (rollup), expire a job before a
    worker sees it (per-message TTL) or hold it back (schedules) are refused by AI_JOBS'
    configuration: the publish fails, and the job already stored stays."""
    import nats.js.errors

    first = make_job("anthropic", "m", prompt="stored first")
    subject = s.jobs_subject("anthropic", "normal")
    await js.publish(subject, encode(first), headers={s.MSG_ID_HEADER: first.id})
    hostile = make_job("anthropic", "m", prompt="with a header")
    with pytest.raises(nats.js.errors.APIError):
        await js.publish(subject, encode(hostile), headers={s.MSG_ID_HEADER: hostile.id, **header})
    assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 1


@pytest.mark.parametrize(
    "header",
    [
        {"Nats-Rollup": "all"},
        {"Nats-Rollup": "sub"},
        {"Nats-TTL": "1s"},
        {"Nats-Schedule": "@at 2000-01-01T00:00:00Z"},
    ],
)
@pytest.mark.parametrize("part", ["C", "M"])
async def test_a_producer_header_cannot_purge_or_expire_anothers_body(
    js: Any, header: dict[str, str], part: str
) -> None:
    """The same headers on a body chunk or meta (the subjects every producer may publish
    on) are refused by the ai_bodies bucket's configuration: a stored body stays whole."""
    import nats.js.errors

    from services import bodies

    kept = await bodies.put_body(js, bodies.body_name("kept", "acme"), b"k" * 3000, chunk=1024)
    subject = f"$O.{s.BODIES_BUCKET}.{part}.mine"
    with pytest.raises(nats.js.errors.APIError):
        await js.publish(subject, b"hostile", headers=header)
    assert await bodies.fetch_body(js, kept) == b"k" * 3000
    assert (await js.stream_info(bodies.BODIES_STREAM)).state.messages == 4  # 3 chunks, 1 meta


async def test_an_unreadable_parked_message_is_a_dead_letter_with_its_exact_bytes(
    settings: Settings, js: Any
) -> None:
    """The replayer meets a parked message it cannot read (not UTF-8, not a park record):
    it is dead-lettered `invalid` once, its bytes kept exactly, and nothing is replayed."""
    from services.tools.stack import running_recovery

    body = b"\xff\x00 not a park record"
    await js.publish(s.parked_subject("anthropic", "normal"), body)
    async with running_recovery(settings):
        await wait_until(lambda: _count_dead(js, 1), timeout=30)

        async def parked_empty() -> bool:
            return (await js.stream_info(s.PARKED_STREAM)).state.messages == 0

        await wait_until(parked_empty, timeout=30)
    (letter,) = await _dead_letters(js)
    assert letter.reason == "invalid" and letter.raw is None
    assert base64.b64decode(letter.raw_base64 or "") == body
    assert (await js.stream_info(s.JOBS_STREAM)).state.messages == 0
