"""The HTTP gateway driven by the official ``anthropic`` SDK: answers, outages ridden
through with one provider call per job, errors in Anthropic's shape, tenants kept apart."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from schemas import subjects as s
from services.config import GatewaySettings, Settings
from services.gateway import JOB_ID_HEADER, key_digest, running_gateway
from services.producer import Producer
from services.tools.stack import running_recovery, running_worker
from tests.support import count_outcomes, stream_state, wait_until

pytestmark = pytest.mark.integration

ACME_KEY = "gw-key-acme"
GLOBEX_KEY = "gw-key-globex"
MODEL = "claude-gw"


def _with_keys(settings: Settings, **gateway: Any) -> Settings:
    keys = {key_digest(ACME_KEY): "acme", key_digest(GLOBEX_KEY): "globex"}
    return settings.with_changes(gateway=GatewaySettings(keys=keys, **gateway))


@pytest.fixture
def gw_settings(settings: Settings) -> Settings:
    """Test settings with two gateway keys: acme's and globex's."""
    return _with_keys(settings)


@pytest.fixture
async def gateway(gw_settings: Settings, js: Any) -> AsyncIterator[str]:
    """The gateway on a free port (topology applied), its base URL."""
    async with running_gateway(gw_settings, "127.0.0.1", 0) as url:
        yield url


def _client(url: str, key: str = ACME_KEY, **kwargs: Any) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, **kwargs)


def _ask(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


async def test_the_sdk_gets_the_providers_answer_through_the_gateway(
    gw_settings: Settings, gateway: str, js: Any
) -> None:
    """messages.create through the gateway returns the fake provider's message, stored as
    acme's job's result."""
    async with running_worker(gw_settings), _client(gateway) as client:
        raw = await client.messages.with_raw_response.create(**_ask("hello through the door"))
        message = await raw.parse()
        job_id = raw.headers[JOB_ID_HEADER]
    assert message.type == "message"
    assert message.model == MODEL
    assert message.content[0].type == "text"
    assert message.content[0].text
    async with await Producer.connect(gw_settings.with_changes(tenant="acme")) as producer:
        stored = await producer.peek_result(job_id)
    assert stored is not None
    assert stored.tenant == "acme"
    assert stored.response == message.to_dict(mode="json")
    counts = await count_outcomes(js)
    assert (counts["results"], counts["result_writes"], counts["dead"]) == (1, 1, 0)


async def test_an_outage_answers_529_and_the_same_key_picks_up_the_one_job(
    gw_settings: Settings, gateway: str, js: Any, fake_provider: Any
) -> None:
    """While the provider 529s, a call with an Idempotency-Key gets a 529 overloaded_error
    naming its job (x-should-retry true), a call without one says x-should-retry false;
    after recovery the same key, and the returned job id, answer the results, with one
    provider call per job after recovery and no second job."""
    fake_provider.start_outage(529)
    short = {"x-ridethrough-wait-s": "1"}
    keyed = {**short, "Idempotency-Key": "order-7"}
    async with (
        running_worker(gw_settings),
        running_recovery(gw_settings),
        _client(gateway) as client,
    ):
        with pytest.raises(anthropic.OverloadedError) as first:
            await client.messages.create(**_ask("keyed"), extra_headers=keyed)
        assert first.value.status_code == 529
        body = first.value.body
        assert isinstance(body, dict)
        assert body["type"] == "error"
        assert body["error"]["type"] == "overloaded_error"
        job_id = first.value.response.headers[JOB_ID_HEADER]
        assert job_id == "order-7"
        assert first.value.response.headers["x-should-retry"] == "true"
        assert int(first.value.response.headers["retry-after"]) >= 1
        with pytest.raises(anthropic.OverloadedError) as unkeyed:
            await client.messages.create(**_ask("unkeyed"), extra_headers=short)
        other_id = unkeyed.value.response.headers[JOB_ID_HEADER]
        assert unkeyed.value.response.headers["x-should-retry"] == "false"

        async def both_parked() -> bool:
            return bool((await stream_state(js, s.PARKED_STREAM)).messages == 2)

        await wait_until(both_parked, timeout=60)
        # A retry during the outage picks up the parked job: the same id, nothing new.
        with pytest.raises(anthropic.OverloadedError) as again:
            await client.messages.create(**_ask("keyed"), extra_headers=keyed)
        assert again.value.response.headers[JOB_ID_HEADER] == job_id
        assert (await stream_state(js, s.JOBS_STREAM)).messages == 0
        before = fake_provider.counters()["normal"]
        fake_provider.stop_outage()
        retry = {"x-ridethrough-wait-s": "60"}
        answer = await client.messages.with_raw_response.create(
            **_ask("keyed"), extra_headers={**retry, "Idempotency-Key": "order-7"}
        )
        by_id = await client.messages.with_raw_response.create(
            **_ask("unkeyed"), extra_headers={**retry, JOB_ID_HEADER: other_id}
        )
        # Once more after the answer: the stored result, no publish, no call.
        repeat = await client.messages.create(
            **_ask("keyed"), extra_headers={**retry, "Idempotency-Key": "order-7"}
        )
    assert answer.headers[JOB_ID_HEADER] == job_id
    assert by_id.headers[JOB_ID_HEADER] == other_id
    answered = await answer.parse()
    assert answered.content[0].text
    assert repeat.to_dict(mode="json") == answered.to_dict(mode="json")
    assert fake_provider.counters()["normal"] - before == 2  # one call for each job
    counts = await count_outcomes(js)
    # Two jobs submitted: two results, written once each; nothing dead, nothing waiting.
    assert (counts["succeeded"], counts["result_writes"], counts["dead"]) == (2, 2, 0)
    assert counts["waiting"] == 0


async def test_a_job_the_provider_refuses_is_a_400_invalid_request_error(
    gw_settings: Settings, gateway: str, js: Any
) -> None:
    """The provider's 400 dead-letters the job; the gateway answers 400
    invalid_request_error, x-should-retry false, naming the job."""
    async with running_worker(gw_settings), _client(gateway) as client:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.create(**_ask("bad", metadata={"user_id": "fault:400"}))
    assert refused.value.body["type"] == "error"  # type: ignore[index]
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert refused.value.response.headers["x-should-retry"] == "false"
    job_id = refused.value.response.headers[JOB_ID_HEADER]
    assert job_id in refused.value.body["error"]["message"]  # type: ignore[index]
    counts = await count_outcomes(js)
    assert (counts["failed"], counts["dead"], counts["succeeded"]) == (1, 1, 0)


async def test_a_wrong_or_missing_key_is_a_401_authentication_error(gateway: str) -> None:
    """An unknown key through the SDK, and no key at all, get 401 authentication_error."""
    async with _client(gateway, key="not-a-gateway-key") as client:
        with pytest.raises(anthropic.AuthenticationError) as wrong:
            await client.messages.create(**_ask("let me in"))
    assert wrong.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gateway}/v1/messages", json=_ask("no key")) as resp,
    ):
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"


async def test_a_tenant_reads_its_own_jobs_and_not_anothers(
    gw_settings: Settings, gateway: str, js: Any
) -> None:
    """globex's job reads as done with its result for globex, and as no job at all (404)
    for acme; acme sending globex's job id gets a job of its own, not globex's answer."""
    async with running_worker(gw_settings), _client(gateway, key=GLOBEX_KEY) as globex:
        raw = await globex.messages.with_raw_response.create(**_ask("globex secret"))
        theirs = raw.headers[JOB_ID_HEADER]
        async with aiohttp.ClientSession() as http:

            async def look(key: str) -> dict[str, Any]:
                async with http.get(
                    f"{gateway}/v1/jobs/{theirs}", headers={"x-api-key": key}
                ) as resp:
                    assert resp.status == 200
                    body: dict[str, Any] = await resp.json()
                    return body

            mine = await look(GLOBEX_KEY)
            assert mine["state"] == "done"
            theirs_message = await raw.parse()
            assert mine["result"] == theirs_message.to_dict(mode="json")
            async with http.get(
                f"{gateway}/v1/jobs/{theirs}", headers={"x-api-key": ACME_KEY}
            ) as resp:
                assert resp.status == 404  # as for a job that does not exist
                snooped = await resp.json()
            assert snooped["error"]["type"] == "not_found_error"
        async with _client(gateway) as acme:
            own = await acme.messages.with_raw_response.create(
                **_ask("acme's own"), extra_headers={JOB_ID_HEADER: theirs}
            )
    assert own.headers[JOB_ID_HEADER] == theirs  # the same id, in acme's scope
    assert (await own.parse()).id != theirs_message.id  # a message of its own
    counts = await count_outcomes(js)
    assert (counts["results"], counts["result_writes"], counts["dead"]) == (2, 2, 0)


async def test_a_job_reads_waiting_in_flight_parked_and_done(
    gw_settings: Settings, gateway: str, js: Any
) -> None:
    """An async job's location says where it is: waiting (no worker yet), parked (drained by
    an operator), waiting again (replayed), in flight (taken, not acked), then done with its
    result once a worker answers it."""
    from services.ops import moves

    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway}/v1/messages",
            json=_ask("where am I"),
            headers={"x-api-key": ACME_KEY, "prefer": "respond-async"},
        ) as resp:
            assert resp.status == 202
            location = resp.headers["location"]

        async def state() -> dict[str, Any]:
            async with http.get(f"{gateway}{location}", headers={"x-api-key": ACME_KEY}) as r:
                assert r.status == 200
                body: dict[str, Any] = await r.json()
                return body

        assert (await state())["state"] == "waiting"
        assert (await moves.drain(js, "anthropic")).moved == 1
        parked = await state()
        assert parked["state"] == "parked" and parked["parked"]["reason"] == "drained"
        assert (await moves.replay(js, gw_settings, "anthropic")).moved == 1
        assert (await state())["state"] == "waiting"
        sub = await js.pull_subscribe_bind(
            durable=s.worker_consumer("anthropic", "normal"), stream=s.JOBS_STREAM
        )
        (taken,) = await sub.fetch(1, timeout=5)
        assert (await state())["state"] == "in_flight"
        await taken.nak()  # between attempts: still in flight until a worker settles it
        async with running_worker(gw_settings):

            async def done() -> bool:
                return (await state())["state"] == "done"

            await wait_until(done, timeout=60)
        final = await state()
    assert final["status"] == "succeeded" and final["result"]["type"] == "message"
    counts = await count_outcomes(js)
    assert (counts["results"], counts["result_writes"], counts["dead"]) == (1, 1, 0)


async def test_respond_async_answers_202_and_the_job_is_read_at_its_location(
    gw_settings: Settings, gateway: str, js: Any
) -> None:
    """Prefer: respond-async gives 202 with the job id and Location; that URL reads done
    with the result once the worker has answered."""
    async with running_worker(gw_settings), aiohttp.ClientSession() as http:
        async with http.post(
            f"{gateway}/v1/messages",
            json=_ask("later"),
            headers={"x-api-key": ACME_KEY, "prefer": "respond-async"},
        ) as resp:
            assert resp.status == 202
            accepted = await resp.json()
            location = resp.headers["location"]
        assert location == f"/v1/jobs/{accepted['id']}"

        async def done() -> bool:
            async with http.get(f"{gateway}{location}", headers={"x-api-key": ACME_KEY}) as r:
                return bool((await r.json())["state"] == "done")

        await wait_until(done, timeout=60)


async def test_a_streamed_request_gets_the_jobs_message_as_sse_events(
    gw_settings: Settings, gateway: str, js: Any
) -> None:
    """stream: true through the SDK's stream helper: text events arrive, and the final
    message it assembles is the job's stored result; one job, one provider call."""
    async with running_worker(gw_settings), _client(gateway) as client:
        async with client.messages.stream(
            **_ask("stream me"), extra_headers={"Idempotency-Key": "streamed-1"}
        ) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        again = await client.messages.create(
            **_ask("stream me"), extra_headers={"Idempotency-Key": "streamed-1"}
        )
    assert "".join(texts) == final.content[0].text  # type: ignore[union-attr]
    async with await Producer.connect(gw_settings.with_changes(tenant="acme")) as producer:
        stored = await producer.peek_result("streamed-1")
    assert stored is not None
    expected = dict(stored.response or {})
    got = final.to_dict(mode="json", exclude_none=True)
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert again.to_dict(mode="json") == anthropic.types.Message.model_validate(
        stored.response
    ).to_dict(mode="json")
    counts = await count_outcomes(js)
    assert (counts["results"], counts["result_writes"], counts["dead"]) == (1, 1, 0)


# ----------------------------------------------------------------- the OpenAI door


def _openai(url: str, key: str = ACME_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, **kwargs)


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-gw", "messages": [{"role": "user", "content": text}], **extra}


async def test_the_openai_sdk_gets_completions_plain_and_streamed(
    gw_settings: Settings, gateway: str, js: Any
) -> None:
    """chat.completions.create through the gateway answers the fake's completion (the
    job's stored result); streamed with include_usage, the SDK's stream helper assembles
    the same content and usage; two jobs, two results."""
    async with running_worker(gw_settings), _openai(gateway) as client:
        raw = await client.chat.completions.with_raw_response.create(**_chat("plain"))
        completion = raw.parse()
        job_id = raw.headers[JOB_ID_HEADER]
        async with client.chat.completions.stream(
            **_chat("streamed"), stream_options={"include_usage": True}
        ) as stream:
            streamed = await stream.get_final_completion()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content
    async with await Producer.connect(gw_settings.with_changes(tenant="acme")) as producer:
        stored = await producer.peek_result(job_id)
    assert stored is not None and stored.provider == "openai"
    assert stored.response == completion.to_dict(mode="json", exclude_unset=True)
    assert streamed.choices[0].message.content
    assert streamed.usage is not None and streamed.usage.total_tokens > 0
    counts = await count_outcomes(js)
    assert (counts["results"], counts["result_writes"], counts["dead"]) == (2, 2, 0)


async def test_the_openai_door_answers_503_in_an_outage_and_the_key_finds_the_job(
    gw_settings: Settings, gateway: str, js: Any, fake_provider: Any
) -> None:
    """While the provider is down, a keyed call gets OpenAI's 503 (server_error, retryable,
    naming the job); after recovery the same key answers that one job: one provider call."""
    fake_provider.start_outage(503)
    keyed = {"x-ridethrough-wait-s": "1", "Idempotency-Key": "chat-9"}
    async with (
        running_worker(gw_settings),
        running_recovery(gw_settings),
        _openai(gateway) as client,
    ):
        with pytest.raises(openai.InternalServerError) as down:
            await client.chat.completions.create(**_chat("wait for me"), extra_headers=keyed)
        assert down.value.status_code == 503
        error = down.value.body
        assert isinstance(error, dict)
        assert (error["type"], error["code"]) == ("server_error", "overloaded")
        assert down.value.response.headers[JOB_ID_HEADER] == "chat-9"
        assert down.value.response.headers["x-should-retry"] == "true"

        async def parked() -> bool:
            return bool((await stream_state(js, s.PARKED_STREAM)).messages == 1)

        await wait_until(parked, timeout=60)
        before = fake_provider.counters()["normal"]
        fake_provider.stop_outage()
        answer = await client.chat.completions.create(
            **_chat("wait for me"),
            extra_headers={"x-ridethrough-wait-s": "60", "Idempotency-Key": "chat-9"},
        )
    assert answer.choices[0].message.content
    assert fake_provider.counters()["normal"] - before == 1
    counts = await count_outcomes(js)
    assert (counts["succeeded"], counts["result_writes"], counts["dead"]) == (1, 1, 0)
    assert counts["waiting"] == 0


async def test_the_openai_door_speaks_openais_errors(gateway: str) -> None:
    """A wrong key is a 401 with OpenAI's error object; a bad body a 400
    invalid_request_error; an unknown path under the door too is OpenAI-shaped."""
    async with _openai(gateway, key="nope") as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.chat.completions.create(**_chat("hi"))
    assert denied.value.code == "invalid_api_key"
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gateway}/v1/chat/completions",
            data=b"{not json",
            headers={"authorization": f"Bearer {ACME_KEY}"},
        ) as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
        assert body["error"]["type"] == "invalid_request_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_a_body_over_the_limit_is_a_413_request_too_large(
    settings: Settings, js: Any
) -> None:
    """A body over gateway.max_body_bytes is a 413 request_too_large, not a 500."""
    small = _with_keys(settings, max_body_bytes=1024)
    async with (
        running_gateway(small, "127.0.0.1", 0) as url,
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/v1/messages", json=_ask("x" * 4096), headers={"x-api-key": ACME_KEY}
        ) as resp,
    ):
        assert resp.status == 413
        assert (await resp.json())["error"]["type"] == "request_too_large"


# ----------------------------------------------------------------- hostile bodies


@pytest.fixture
def threaded_gateway(gw_settings: Settings, js: Any) -> Iterator[str]:
    """The gateway on a thread of its own (hypothesis drives it synchronously)."""
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[str] = loop.create_future()
    stop = asyncio.Event()

    async def serve() -> None:
        async with running_gateway(gw_settings, "127.0.0.1", 0) as url:
            ready.set_result(url)
            await stop.wait()

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    url = asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 30), loop)
    yield url.result(35)
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    loop.close()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_messages_like = st.fixed_dictionaries(
    {},
    optional={
        "model": _json | st.text(min_size=1, max_size=20),
        "max_tokens": _json | st.integers(min_value=-5, max_value=50),
        "messages": _json,
        "stream": _json,
    },
)
_bodies = (
    st.binary(max_size=200)
    | _json.map(lambda v: json.dumps(v).encode())
    | _messages_like.map(lambda v: json.dumps(v).encode())
)


def _post(url: str, body: bytes, path: str = "/v1/messages") -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}{path}",
        data=body,
        method="POST",
        headers={
            "x-api-key": ACME_KEY,
            "content-type": "application/json",
            "x-ridethrough-wait-s": "0",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@hyp_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_bodies)
def test_no_body_gets_a_500_and_every_error_has_anthropics_shape(
    threaded_gateway: str, body: bytes
) -> None:
    """Any body (bytes, JSON, Messages-like objects of wrong types) gets a 400
    invalid_request_error, or is accepted (a 529 with wait 0): never a 500."""
    status, answer = _post(threaded_gateway, body)
    assert status in (400, 529), (status, answer)
    assert answer["type"] == "error"
    expected = "invalid_request_error" if status == 400 else "overloaded_error"
    assert answer["error"]["type"] == expected
    assert isinstance(answer["error"]["message"], str)


_chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": _json | st.text(min_size=1, max_size=20),
        "messages": _json | st.just([{"role": "user", "content": "hi"}]),
        "stream": _json,
        "stream_options": _json,
    },
)


@hyp_settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.binary(max_size=100) | _chat_like.map(lambda v: json.dumps(v).encode()))
def test_no_chat_body_gets_a_500_and_every_error_has_openais_shape(
    threaded_gateway: str, body: bytes
) -> None:
    """Any body on /v1/chat/completions gets a 400 invalid_request_error or is accepted (a
    503 server_error with wait 0), in OpenAI's error object: never a 500."""
    status, answer = _post(threaded_gateway, body, "/v1/chat/completions")
    assert status in (400, 503), (status, answer)
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    expected = "invalid_request_error" if status == 400 else "server_error"
    assert answer["error"]["type"] == expected
