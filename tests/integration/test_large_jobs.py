"""Large jobs (up to the Messages API's 32 MB) travel by reference to the object store
bucket ``ai_bodies``: through an outage, a park and a replay, to the provider whole, and
their bodies are deleted once they end (``services/bodies.py``)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgspec
import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.jobs import BodyRef, decode_job
from schemas.parking import decode_dead_letter, decode_parked
from services import bodies
from services.config import BodySettings, Settings
from services.errors import BodyUnavailable, PayloadTooLarge
from services.producer import Producer, make_job
from services.tools.fake.received import content_digest
from services.tools.stack import running_recovery, running_worker
from tests.support import count_outcomes, read_stream, wait_until

pytestmark = pytest.mark.integration

MB = 1024 * 1024


def _document_request(size: int, text: str = "summarize the document") -> dict[str, Any]:
    """A Messages request with a base64 document of about ``size`` bytes and a short
    question (the fake echoes the question, not the document)."""
    raw = hashlib.shake_256(text.encode()).digest(size * 3 // 4)
    return {
        "max_tokens": 16,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": base64.b64encode(raw).decode(),
                        },
                    },
                    {"type": "text", "text": text},
                ],
            }
        ],
    }


async def _objects(js: Any) -> int:
    """Messages in the bodies bucket (chunks and metas of every stored body)."""
    return int((await js.stream_info(bodies.BODIES_STREAM)).state.messages)


async def _bucket_empties(js: Any) -> None:
    """Wait until every body is gone (a body is deleted right after its job's result)."""

    async def empty() -> bool:
        return await _objects(js) == 0

    await wait_until(empty, timeout=30)


def _parked(n: int, js: Any) -> Any:
    async def check() -> bool:
        return bool((await js.stream_info(s.PARKED_STREAM)).state.messages == n)

    return check


async def test_a_20mb_job_rides_through_an_outage_and_a_replay_whole(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """During an outage a 20 MB job is parked by reference (its park record small, its
    body in ai_bodies); once the provider recovers it is replayed, the fake receives its
    exact content, it succeeds once, and its body is deleted. Every job ends once."""
    request = _document_request(20 * MB)
    digest = content_digest(request)
    async with (
        running_worker(settings),
        running_recovery(settings),
        await Producer.connect(settings) as producer,
    ):
        fake_provider.start_outage(529)
        small = [
            await producer.submit(make_job("anthropic", "m", prompt=f"trip {i}", max_tokens=8))
            for i in range(8)
        ]
        await wait_until(_parked(8, js), timeout=60)
        large_id = await producer.submit(make_job("anthropic", "m", request=request))
        del request
        await wait_until(_parked(9, js), timeout=60)
        held = [decode_parked(m.data) for m in await read_stream(js, s.PARKED_STREAM)]
        (big,) = [p.job for p in held if p.job.id == large_id]
        assert big.request == {} and big.request_ref is not None
        assert big.request_ref.size > 20 * MB
        assert max(len(m.data) for m in await read_stream(js, s.PARKED_STREAM)) < 64 * 1024
        assert (await bodies.body_status(js, big.request_ref))["present"]  # parked: kept
        fake_provider.stop_outage()
        results = await producer.results([*small, large_id], timeout=120)

        async def body_gone() -> bool:
            return await _objects(js) == 0

        await wait_until(body_gone, timeout=30)
    assert {r.status for r in results.values()} == {"succeeded"}
    assert results[large_id].response is not None
    received = [r for r in fake_provider.large_requests() if r["path"] == "/v1/messages"]
    assert [r["digest"] for r in received] == [digest]  # one call, the content whole
    assert not (await bodies.body_status(js, big.request_ref))["present"]
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == 9
    assert counts["dead"] == 0 and counts["waiting"] == 0


async def test_a_small_job_stays_inline_byte_for_byte(settings: Settings, js: Any) -> None:
    """A job under the threshold is published exactly as before: its own encoding, no
    reference, nothing in the bodies bucket."""
    async with await Producer.connect(settings) as producer:
        job = make_job("anthropic", "m", request=_document_request(64 * 1024))
        await producer.submit(job)
    (msg,) = await read_stream(js, s.JOBS_STREAM)
    assert msg.data == encode(job)
    assert b"request_ref" not in msg.data
    assert await _objects(js) == 0


async def test_the_threshold_decides_and_a_reference_round_trips(
    settings: Settings, js: Any
) -> None:
    """Over ``bodies.threshold_bytes`` a job goes by reference: the stored job names its
    body, whose bytes are the request's JSON (chunked at any size), and a job over
    ``bodies.max_bytes`` is refused with a clear error before anything is stored."""
    small = settings.with_changes(bodies=BodySettings(threshold_bytes=4096, max_bytes=200_000))
    request = _document_request(100_000)
    async with await Producer.connect(small) as producer:
        job_id = await producer.submit(make_job("anthropic", "m", request=request))
        with pytest.raises(PayloadTooLarge, match=r"bodies\.max_bytes"):
            await producer.submit(make_job("anthropic", "m", request=_document_request(300_000)))
    (msg,) = await read_stream(js, s.JOBS_STREAM)
    job = decode_job(msg.data)
    assert job.id == job_id and job.request == {} and job.request_ref is not None
    ref = job.request_ref
    assert ref.name.startswith(f"_.{job_id}.") and len(ref.name.rsplit(".", 1)[1]) == 32
    data = await bodies.fetch_body(js, ref)
    assert msgspec.json.decode(data) == request
    assert (await bodies.resolve(js, job, {"anthropic": "anthropic"})).request == request
    assert await bodies.drop_body(js, ref.name)
    assert await _objects(js) == 0


@pytest.mark.parametrize("size", [1, 1023, 1024, 1025, 5 * 1024 + 7])
async def test_bodies_of_any_size_come_back_whole(js: Any, size: int) -> None:
    """A body is cut into chunks and read back the same, whatever its size against the
    chunk size; a changed size or digest in the reference is refused, not used."""
    data = hashlib.shake_256(str(size).encode()).digest(size)
    ref = await bodies.put_body(js, bodies.body_name("j", None), data, chunk=1024)
    assert await bodies.fetch_body(js, ref) == data
    forged = msgspec.structs.replace(ref, sha256="0" * 64)
    with pytest.raises(BodyUnavailable) as caught:
        await bodies.fetch_body(js, forged)
    assert caught.value.reason == "invalid"
    assert await bodies.drop_body(js, ref.name)
    with pytest.raises(BodyUnavailable) as gone:
        await bodies.fetch_body(js, ref)
    assert gone.value.reason == "body_missing"


async def test_a_job_whose_body_vanished_is_a_dead_letter_not_a_loop(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A job by reference whose body is gone ends at its first delivery as a dead letter
    `body_missing` (and a `failed` result), with no provider call; a job naming another
    tenant's body is `invalid`. The next job is still served; every job ends once."""
    small = settings.with_changes(bodies=BodySettings(threshold_bytes=4096))
    async with running_worker(small), await Producer.connect(small) as producer:
        fake_provider.start_outage(529)  # nothing reaches the provider meanwhile
        lost = await producer.submit(make_job("anthropic", "m", request=_document_request(50_000)))
        (msg,) = await read_stream(js, s.JOBS_STREAM)
        ref = decode_job(msg.data).request_ref
        assert ref is not None
        await bodies.drop_body(js, ref.name)
        fake_provider.stop_outage()
        result = await producer.result(lost, timeout=60)
        stranger = make_job("anthropic", "m", request={}, id="stranger")
        other = BodyRef(name=f"acme.x.{'ab' * 16}", size=1, sha256="0" * 64)
        forged = msgspec.structs.replace(stranger, request_ref=other)
        await js.publish(
            s.jobs_subject("anthropic", "normal"),
            encode(forged),
            headers={s.MSG_ID_HEADER: forged.id},
        )
        refused = await producer.result("stranger", timeout=60)
        good = await producer.submit(make_job("anthropic", "m", prompt="still here"))
        assert (await producer.result(good, timeout=60)).status == "succeeded"
    assert result.status == "failed" and result.error is not None
    assert result.error.type == "body_missing" and result.attempts == 1
    assert refused.status == "failed" and refused.error is not None
    assert refused.error.type == "invalid" and "not its tenant's" in refused.error.message
    letters = [decode_dead_letter(m.data) for m in await read_stream(js, s.DEAD_STREAM)]
    assert sorted(d.reason for d in letters) == ["body_missing", "invalid"]
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 1  # only the good job
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == 3
    assert counts["succeeded"] == 1 and counts["dead"] == 2


async def test_a_parked_large_job_fails_over_by_reference_mapped_at_the_fallback(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A large job asking for fail-over, its provider paused: the copy sent to the openai
    fallback still goes by reference (same body, marked as written for anthropic), the
    fallback's worker maps it, the job succeeds, and its body is deleted."""
    from schemas.jobs import Target
    from services.breaker import paused_key

    small = settings.with_changes(bodies=BodySettings(threshold_bytes=4096))
    kv = await js.key_value(s.CONTROL_BUCKET)
    await kv.put(paused_key("anthropic"), b'{"reason":"test","by":"test"}')
    request = {
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "x " * 200_000 + "over there"}],
    }
    async with running_worker(small), await Producer.connect(small) as producer:
        job = make_job(
            "anthropic",
            "m",
            request=request,
            on_outage="failover",
            fallbacks=[Target(provider="openai", model="m")],
        )
        result = await producer.result(await producer.submit(job), timeout=60)

        async def body_gone() -> bool:
            return await _objects(js) == 0

        await wait_until(body_gone, timeout=30)
    assert result.status == "succeeded" and result.provider == "openai"
    copies = [decode_job(m.data) for m in await read_stream(js, s.JOBS_STREAM)]
    assert copies == []  # consumed
    chat = [r for r in fake_provider.large_requests() if r["path"] == "/v1/chat/completions"]
    assert len(chat) == 1
    counts = await count_outcomes(js)
    assert counts["results"] == counts["result_writes"] == counts["succeeded"] == 1


def test_a_body_reference_is_additive_to_the_job_schema() -> None:
    """A job without a reference encodes exactly as before (no new key), and one with a
    reference decodes back the same."""
    job = make_job("anthropic", "m", prompt="hi")
    assert b"request_ref" not in encode(job)
    ref = BodyRef(name=f"_.{job.id}.{'0f' * 16}", size=3, sha256="a" * 64)
    light = msgspec.structs.replace(job, request={}, request_ref=ref)
    assert decode_job(encode(light)) == light
    for bad in (
        {"name": "x", "size": 1, "sha256": "a" * 64},
        {**msgspec.to_builtins(ref), "size": -1},
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, BodyRef)


async def test_operators_follow_the_reference(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """Large jobs ended dead (provider paused, `on_outage=fail`) keep their bodies:
    `jobs show` says where the body is, `dead replay` sends one back and it succeeds with
    its body (then deleted), `dead purge` deletes the other's body with its letter."""
    from services.breaker import paused_key
    from services.ops.inspect import locate_job, purge_dead
    from services.ops.moves import replay

    small = settings.with_changes(bodies=BodySettings(threshold_bytes=4096))
    kv = await js.key_value(s.CONTROL_BUCKET)
    await kv.put(paused_key("anthropic"), b'{"reason":"test","by":"test"}')
    async with running_worker(small) as (_, worker), await Producer.connect(small) as producer:
        ids = [
            await producer.submit(
                make_job(
                    "anthropic", "m", request=_document_request(50_000, f"q{i}"), on_outage="fail"
                )
            )
            for i in range(2)
        ]
        first = await producer.results(ids, timeout=60)
        shown = await locate_job(js, ids[0])
        await kv.delete(paused_key("anthropic"))

        async def resumed() -> bool:
            assert worker.board is not None
            return worker.board.state("anthropic") == "closed"

        await wait_until(resumed, timeout=30)
        report = await replay(js, small, "anthropic", source="dead", limit=1)

        async def replayed() -> bool:
            found = await producer.peek_result(ids[0])
            return found is not None and found.status == "succeeded"

        await wait_until(replayed, timeout=60)
        purged = await purge_dead(js, "anthropic", None)
    assert {r.status for r in first.values()} == {"failed"}
    assert shown["dead"]["reason"] == "provider_outage" and shown["body"]["present"] is True
    assert report.moved == 1 and purged == 1
    await _bucket_empties(js)  # one body went with its result, the other with its letter
    assert fake_provider.counters()["by_path"]["/v1/messages"] == 1


async def test_the_gateway_takes_a_20mb_request(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A 20 MB Messages request through the gateway (the official SDK) is answered: its
    body went by reference, the fake received its content whole, nothing is left behind."""
    import anthropic

    from services.config import GatewaySettings
    from services.gateway import key_digest, running_gateway

    gw = settings.with_changes(gateway=GatewaySettings(keys={key_digest("k"): "acme"}))
    request = _document_request(20 * MB, "what is in it")
    digest = content_digest(request)
    async with (
        running_worker(gw),
        running_gateway(gw, "127.0.0.1", 0) as url,
        anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as client,
    ):
        message = await client.messages.create(model="claude-gw", **request)
    assert message.content[0].type == "text" and message.content[0].text == "echo: what is in it"
    received = [r for r in fake_provider.large_requests() if r["path"] == "/v1/messages"]
    assert [r["digest"] for r in received] == [digest]
    await _bucket_empties(js)
    counts = await count_outcomes(js)
    assert counts["results"] == counts["succeeded"] == 1 and counts["dead"] == 0


async def test_a_large_job_that_expires_while_parked_loses_its_body(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A large job parked (its provider paused) keeps its body while it waits; its deadline
    passes, the replayer ends it `expired` and its body goes. No provider call."""
    from datetime import UTC, datetime, timedelta

    from services.breaker import paused_key

    small = settings.with_changes(bodies=BodySettings(threshold_bytes=4096))
    kv = await js.key_value(s.CONTROL_BUCKET)
    await kv.put(paused_key("anthropic"), b'{"reason":"test","by":"test"}')
    async with (
        running_worker(small),
        running_recovery(small),
        await Producer.connect(small) as producer,
    ):
        deadline = datetime.now(UTC) + timedelta(seconds=5)  # time enough to park it
        job = make_job("anthropic", "m", request=_document_request(50_000), deadline=deadline)
        job_id = await producer.submit(job)
        await wait_until(_parked(1, js), timeout=30)
        kept = await _objects(js)
        await wait_until(lambda: _past(deadline), timeout=30)
        await kv.delete(paused_key("anthropic"))
        result = await producer.result(job_id, timeout=60)
        await _bucket_empties(js)
    assert kept > 0  # parked: its body stays
    assert result.status == "expired"
    assert fake_provider.counters()["normal"] == 0  # probes only
    counts = await count_outcomes(js)
    assert counts["results"] == counts["expired"] == 1 and counts["dead"] == 0


async def _past(when: Any) -> bool:
    from datetime import UTC, datetime

    return bool(datetime.now(UTC) > when)
