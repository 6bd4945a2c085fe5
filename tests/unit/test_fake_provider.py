"""The fake provider, exercised through the real anthropic and openai SDKs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import msgspec
import openai
import pytest

from services.tools.fake import (
    FakeProvider,
    FakeProviderThread,
    FaultConfig,
    Outage,
    config_from_options,
    parse_error_mix,
    parse_outage,
    run_in_thread,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL = "claude-fake"
GPT = "gpt-fake"
PROBE = {"x-ridethrough-probe": "1"}


@pytest.fixture
def fake() -> Iterator[FakeProviderThread]:
    with run_in_thread() as handle:
        yield handle


@pytest.fixture(params=["httpx", "aiohttp"])
async def claude(
    request: pytest.FixtureRequest, fake: FakeProviderThread
) -> AsyncIterator[anthropic.AsyncAnthropic]:
    extra: dict[str, Any] = {}
    if request.param == "aiohttp":
        extra["http_client"] = anthropic.DefaultAioHttpClient()
    client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="test", max_retries=0, **extra)
    yield client
    await client.close()


@pytest.fixture
async def gpt(fake: FakeProviderThread) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=fake.url + "/v1", api_key="test", max_retries=0)
    yield client
    await client.close()


async def ask(client: anthropic.AsyncAnthropic, text: str = "hello there", **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 100)
    return await client.messages.create(
        model=MODEL, messages=[{"role": "user", "content": text}], **kwargs
    )


async def ask_gpt(client: openai.AsyncOpenAI, text: str = "hello there", **kwargs: Any) -> Any:
    return await client.chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": text}], **kwargs
    )


async def collect(stream: Any, sink: list[str], pick: Callable[[Any], str]) -> None:
    async for item in stream:
        sink.append(pick(item))


async def admin(fake: FakeProviderThread, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, fake.url + path, json=body) as response,
    ):
        payload = await response.json()
        if response.status != 200:
            raise AssertionError(f"{method} {path} -> {response.status}: {payload}")
        return payload


# --------------------------------------------------------------------------- Anthropic


async def test_anthropic_create_echoes_last_user_message(claude: anthropic.AsyncAnthropic) -> None:
    """A non-streaming Messages call returns "echo: " plus the last user message."""
    message = await claude.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second question"}]},
        ],
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: second question"
    assert message.model == MODEL
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 3
    assert message.usage.input_tokens == 4
    assert message.id.startswith("msg_")


async def test_anthropic_max_tokens_cuts_reply(claude: anthropic.AsyncAnthropic) -> None:
    """The reply is cut to max_tokens words and ends with stop_reason max_tokens."""
    message = await ask(claude, "one two three four", max_tokens=3)
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: one two"
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


async def test_anthropic_stream_helper_assembles_final_message(
    claude: anthropic.AsyncAnthropic,
) -> None:
    """messages.stream() yields text deltas and get_final_message() assembles the echo."""
    async with claude.messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "stream me please"}]
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == "echo: stream me please"
    assert final.content[0].type == "text"
    assert final.content[0].text == "echo: stream me please"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4


async def test_anthropic_raw_stream_event_order(claude: anthropic.AsyncAnthropic) -> None:
    """create(stream=True) yields the Anthropic SSE events in protocol order."""
    stream = await ask(claude, "hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_anthropic_models_list(claude: anthropic.AsyncAnthropic) -> None:
    """client.models.list() pages through the configured models in Anthropic shape."""
    models = [model async for model in claude.models.list(limit=1)]
    assert [m.id for m in models] == ["claude-fake", "gpt-fake"]
    assert all(m.type == "model" for m in models)
    one = await claude.models.retrieve("gpt-fake")
    assert one.display_name == "Fake gpt-fake"


# --------------------------------------------------------------------------- OpenAI


async def test_openai_create_echoes_last_user_message(gpt: openai.AsyncOpenAI) -> None:
    """A non-streaming chat completion returns the echo with usage."""
    reply = await ask_gpt(gpt, "hello there")
    assert reply.object == "chat.completion"
    assert reply.model == GPT
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3


async def test_openai_max_completion_tokens_cuts_reply(gpt: openai.AsyncOpenAI) -> None:
    """max_completion_tokens cuts the reply and sets finish_reason length."""
    reply = await ask_gpt(gpt, "a b c d", max_completion_tokens=2)
    assert reply.choices[0].message.content == "echo: a"
    assert reply.choices[0].finish_reason == "length"


async def test_openai_stream_chunks_and_usage(gpt: openai.AsyncOpenAI) -> None:
    """A streaming completion yields content chunks, a finish chunk and a usage chunk."""
    stream = await ask_gpt(gpt, "stream me", stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


async def test_openai_models_list(gpt: openai.AsyncOpenAI) -> None:
    """client.models.list() returns the configured models in OpenAI shape."""
    models = [model async for model in gpt.models.list()]
    assert [m.id for m in models] == ["claude-fake", "gpt-fake"]
    assert all(m.owned_by == "fake" for m in models)


# --------------------------------------------------------------------------- fault triggers


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.ContentTooLargeError, "request_too_large"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_anthropic_status_trigger_raises_sdk_error(
    claude: anthropic.AsyncAnthropic,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    """metadata.user_id fault:<status> makes the SDK raise its class for that status."""
    with pytest.raises(error_class) as caught:
        await ask(claude, metadata={"user_id": f"fault:{status}"})
    assert caught.value.status_code == status
    assert caught.value.type == error_type


async def test_anthropic_429_carries_retry_after() -> None:
    """fault:429 raises RateLimitError whose response has retry-after and retry-after-ms."""
    with run_in_thread(FaultConfig(retry_after_s=2.5)) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await ask(client, metadata={"user_id": "fault:429"})
        await client.close()
    assert caught.value.type == "rate_limit_error"
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.response.headers["retry-after-ms"] == "2500"


async def test_capacity_answers_429_beyond_the_requests_in_hand() -> None:
    """capacity=3 with 200 ms replies: of 8 calls at once 3 are answered and 5 get a 429
    rate_limit_error (Anthropic) / 429 (OpenAI) with retry-after; later calls are served."""
    config = FaultConfig(capacity=3, latency_ms=200, retry_after_s=1)
    with run_in_thread(config) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
        outcomes = await asyncio.gather(
            *(ask(client, f"c{i}") for i in range(8)), return_exceptions=True
        )
        limited = [o for o in outcomes if isinstance(o, anthropic.RateLimitError)]
        assert len(limited) == 5 and len(outcomes) - len(limited) == 3
        assert all(e.response.headers["retry-after"] == "1" for e in limited)
        assert (await ask(client, "later")).content
        await client.close()
        gpt = openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key="t", max_retries=0)
        chats = await asyncio.gather(
            *(
                gpt.chat.completions.create(
                    model="gpt-x", messages=[{"role": "user", "content": f"c{i}"}]
                )
                for i in range(5)
            ),
            return_exceptions=True,
        )
        await gpt.close()
        assert sum(isinstance(c, openai.RateLimitError) for c in chats) == 2
        assert fake.counters()["by_fault"]["over_capacity"] == 7


async def test_anthropic_reset_raises_connection_error(claude: anthropic.AsyncAnthropic) -> None:
    """fault:reset drops the connection and the SDK raises APIConnectionError."""
    with pytest.raises(anthropic.APIConnectionError):
        await ask(claude, metadata={"user_id": "fault:reset"})


async def test_anthropic_midstream_error_event(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """fault:midstream sends 200, some events, then an overloaded error event."""
    seen: list[str] = []
    stream = await ask(claude, "a b c d e", stream=True, metadata={"user_id": "fault:midstream"})
    with pytest.raises(anthropic.APIStatusError) as caught:
        await collect(stream, seen, lambda event: event.type)
    assert caught.value.status_code == 200
    assert caught.value.type == "overloaded_error"
    assert seen[:2] == ["message_start", "content_block_start"]
    assert "message_stop" not in seen
    assert fake.counters()["by_fault"]["midstream"] == 1


async def test_anthropic_midstream_on_non_streaming_truncates(
    claude: anthropic.AsyncAnthropic,
) -> None:
    """fault:midstream on a non-streaming call truncates the body: APIConnectionError."""
    with pytest.raises(anthropic.APIConnectionError):
        await ask(claude, metadata={"user_id": "fault:midstream"})


async def test_anthropic_spend_limit_triggers(claude: anthropic.AsyncAnthropic) -> None:
    """fault:spend_limit is a 400 billing_error; fault:spend_limit_429 a coded 429."""
    with pytest.raises(anthropic.BadRequestError) as billing:
        await ask(claude, metadata={"user_id": "fault:spend_limit"})
    assert billing.value.type == "billing_error"
    with pytest.raises(anthropic.RateLimitError) as enforced:
        await ask(claude, metadata={"user_id": "fault:spend_limit_429"})
    assert enforced.value.error_code == "enforced_spend_limit_reached"
    assert "retry-after" not in enforced.value.response.headers


async def test_fault_header_triggers_fault(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """The x-fake-fault header triggers a fault and wins over metadata.user_id."""
    with pytest.raises(anthropic.OverloadedError):
        await ask(
            claude,
            metadata={"user_id": "fault:400"},
            extra_headers={"x-fake-fault": "fault:529"},
        )
    assert fake.counters()["by_fault"] == {"trigger": 1}


async def test_slow_trigger_still_answers(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """fault:slow:<ms> delays but still returns the normal echo."""
    message = await ask(claude, "later", metadata={"user_id": "fault:slow:20"})
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: later"
    assert fake.counters()["by_fault"]["slow"] == 1


async def test_unknown_trigger_is_bad_request(claude: anthropic.AsyncAnthropic) -> None:
    """An unknown fault:... value is answered with a 400 that names it."""
    with pytest.raises(anthropic.BadRequestError, match="fault:nope"):
        await ask(claude, metadata={"user_id": "fault:nope"})


async def test_plain_user_id_is_not_a_fault(claude: anthropic.AsyncAnthropic) -> None:
    """A metadata.user_id that is not a fault:... value leaves the request alone."""
    message = await ask(claude, "fine", metadata={"user_id": "user-123"})
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: fine"


@pytest.mark.parametrize(
    ("trigger", "error_class"),
    [
        ("fault:529", openai.InternalServerError),
        ("fault:500", openai.InternalServerError),
        ("fault:429", openai.RateLimitError),
        ("fault:401", openai.AuthenticationError),
        ("fault:reset", openai.APIConnectionError),
    ],
)
async def test_openai_trigger_raises_sdk_error(
    gpt: openai.AsyncOpenAI, trigger: str, error_class: type[openai.OpenAIError]
) -> None:
    """The OpenAI user field triggers faults that map to the SDK's exception classes."""
    with pytest.raises(error_class):
        await ask_gpt(gpt, user=trigger)


async def test_openai_spend_limit_is_insufficient_quota(gpt: openai.AsyncOpenAI) -> None:
    """fault:spend_limit is a 429 with type and code insufficient_quota for OpenAI."""
    with pytest.raises(openai.RateLimitError) as caught:
        await ask_gpt(gpt, user="fault:spend_limit")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"


async def test_openai_midstream_error_chunk(gpt: openai.AsyncOpenAI) -> None:
    """fault:midstream on an OpenAI stream yields chunks, then the SDK raises APIError."""
    contents: list[str] = []
    stream = await ask_gpt(gpt, "a b c d e", stream=True, user="fault:midstream")
    with pytest.raises(openai.APIError) as caught:
        await collect(stream, contents, lambda chunk: chunk.choices[0].delta.content or "")
    assert not isinstance(caught.value, openai.APIStatusError)
    assert caught.value.type == "server_error"
    assert "".join(contents) == "echo: a b "


# --------------------------------------------------------------------------- scripted faults


async def test_random_errors_follow_error_mix() -> None:
    """error_rate 1 with a single-status mix answers every request with that status."""
    config = FaultConfig(error_rate=1.0, error_mix={503: 1.0}, seed=7)
    with run_in_thread(config) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
        for _ in range(3):
            with pytest.raises(anthropic.ServiceUnavailableError):
                await ask(client)
        await client.close()
        counters = fake.counters()
    assert counters["by_status"] == {"503": 3}
    assert counters["by_fault"] == {"random": 3}


async def test_random_faults_are_reproducible_with_seed() -> None:
    """The same seed yields the same sequence of random outcomes."""

    async def outcomes() -> list[str]:
        config = FaultConfig(error_rate=0.3, reset_rate=0.2, error_mix={500: 1, 529: 1}, seed=42)
        results: list[str] = []
        with run_in_thread(config) as fake:
            client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
            for _ in range(20):
                try:
                    await ask(client)
                    results.append("ok")
                except anthropic.APIStatusError as exc:
                    results.append(str(exc.status_code))
                except anthropic.APIConnectionError:
                    results.append("reset")
            await client.close()
        return results

    first = await outcomes()
    assert first == await outcomes()
    assert len(set(first)) > 1


async def test_random_reset_and_midstream_rates() -> None:
    """reset_rate 1 resets every call; midstream_rate 1 breaks every stream."""
    with run_in_thread(FaultConfig(reset_rate=1.0)) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
        with pytest.raises(anthropic.APIConnectionError):
            await ask(client)
        await client.close()
    with run_in_thread(FaultConfig(midstream_rate=1.0)) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
        assert (await ask(client, "non streaming is spared")).stop_reason == "end_turn"
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(
                model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}]
            ) as stream:
                await stream.get_final_message()
        await client.close()
    assert caught.value.type == "overloaded_error"


async def test_scheduled_outage_window() -> None:
    """A scheduled outage starting at 0 answers with its status and is counted."""
    with run_in_thread(FaultConfig(outages=[(0.0, 3600.0, 529)])) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
        with pytest.raises(anthropic.OverloadedError):
            await ask(client)
        await client.close()
        counters = fake.counters()
    assert counters["by_fault"] == {"scheduled_outage": 1}
    assert counters["outage"]["requests"] == 1


async def test_latency_config_still_answers() -> None:
    """Configured latency with exponential jitter delays but does not change replies."""
    config = FaultConfig(latency_ms=1, latency_jitter_ms=1, latency_distribution="exponential")
    with run_in_thread(config) as fake:
        client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="t", max_retries=0)
        message = await ask(client, "slowly")
        await client.close()
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: slowly"


def test_fault_config_rejects_impossible_values() -> None:
    """FaultConfig refuses rates outside [0, 1], rates summing over 1 and bad statuses."""
    with pytest.raises(ValueError, match="within"):
        FaultConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="<= 1"):
        FaultConfig(error_rate=0.6, reset_rate=0.6)
    with pytest.raises(ValueError, match="400-599"):
        FaultConfig(error_mix={200: 1.0})
    with pytest.raises(ValueError, match="400-599"):
        FaultConfig(outages=[(0.0, 1.0, 302)])


# --------------------------------------------------------------------------- admin API


async def test_admin_outage_start_and_stop(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """POST /admin/outage fails every request until DELETE /admin/outage."""
    state = await admin(fake, "POST", "/admin/outage", {"status": 529})
    assert state["active"] is True
    assert state["status"] == 529
    with pytest.raises(anthropic.OverloadedError):
        await ask(claude)
    assert (await admin(fake, "GET", "/admin/outage"))["active"] is True
    await admin(fake, "DELETE", "/admin/outage")
    message = await ask(claude, "back")
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: back"


async def test_admin_outage_reset_and_models(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """A reset outage limited to one model drops its requests and spares other models."""
    await admin(fake, "POST", "/admin/outage", {"status": "reset", "models": [MODEL]})
    with pytest.raises(anthropic.APIConnectionError):
        await ask(claude)
    other = await claude.messages.create(
        model="other-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert other.model == "other-model"


async def test_outage_with_elapsed_duration_ends(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """An outage whose duration has elapsed no longer affects requests."""
    fake.start_outage(503, duration_s=0.0)
    message = await ask(claude, "after")
    assert message.stop_reason == "end_turn"
    assert (await admin(fake, "GET", "/admin/outage")) == {"active": False}


async def test_counters_count_probes_and_outage_separately(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """Counters split probes from normal requests and record requests during an outage."""
    await ask(claude)
    await ask(claude, extra_headers=PROBE)
    fake.start_outage(529)
    for headers in ({}, PROBE, PROBE):
        with pytest.raises(anthropic.OverloadedError):
            await ask(claude, extra_headers=headers)
    fake.stop_outage()
    counters = await admin(fake, "GET", "/admin/counters")
    assert counters["total"] == 5
    assert counters["probes"] == 3
    assert counters["normal"] == 2
    assert counters["by_path"] == {"/v1/messages": 5}
    assert counters["by_status"] == {"200": 2, "529": 3}
    assert counters["by_model"] == {MODEL: 5}
    assert counters["outage"]["requests"] == 3
    assert counters["outage"]["probes"] == 2
    assert counters["outage"]["first_ts"] <= counters["outage"]["last_ts"]
    reset = await admin(fake, "POST", "/admin/counters/reset")
    assert reset["total"] == 0
    assert reset["outage"]["first_ts"] is None


async def test_admin_config_round_trip(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """PUT /admin/config replaces the FaultConfig at run time; bad configs are refused."""
    new = await admin(fake, "PUT", "/admin/config", {"error_rate": 1.0, "error_mix": {"500": 1}})
    assert new["error_mix"] == {"500": 1.0}
    assert (await admin(fake, "GET", "/admin/config"))["error_rate"] == 1.0
    with pytest.raises(anthropic.InternalServerError):
        await ask(claude)
    async with (
        aiohttp.ClientSession() as session,
        session.put(fake.url + "/admin/config", json={"error_rate": 7}) as response,
    ):
        assert response.status == 400
    async with (
        aiohttp.ClientSession() as session,
        session.put(fake.url + "/admin/config", json={"nonsense": 1}) as response,
    ):
        assert response.status == 400


async def test_healthz_and_unknown_paths(fake: FakeProviderThread) -> None:
    """/healthz answers ok uncounted; unknown paths get a wire-format 404 and are counted."""
    async with aiohttp.ClientSession() as session:
        async with session.get(fake.url + "/healthz") as response:
            assert await response.json() == {"ok": True}
        async with session.get(
            fake.url + "/v1/nothing", headers={"anthropic-version": "2023-06-01"}
        ) as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found_error"
        async with session.post(fake.url + "/v1/messages", data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
    counters = fake.counters()
    assert counters["by_path"] == {"/v1/nothing": 1, "/v1/messages": 1}


async def test_wait_for_counters_wakes_on_condition(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """wait_for_counters returns once a request makes the predicate true."""
    waiter = asyncio.get_running_loop().run_in_executor(
        None, fake.wait_for_counters, lambda c: c["by_status"].get("200", 0) >= 2
    )
    await ask(claude)
    await ask(claude)
    snapshot = await waiter
    assert snapshot["by_status"]["200"] >= 2


async def test_in_loop_provider_start_stop() -> None:
    """FakeProvider runs inside the caller's event loop and reports counters."""
    provider = FakeProvider()
    url = await provider.start()
    try:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="t", max_retries=0)
        provider.start_outage(529)
        with pytest.raises(anthropic.OverloadedError):
            await ask(client)
        provider.stop_outage()
        assert (await ask(client, "ok")).stop_reason == "end_turn"
        await client.close()
        assert provider.counters["by_status"] == {"529": 1, "200": 1}
    finally:
        await provider.stop()


# --------------------------------------------------------------------------- per model, call log

OTHER = "claude-other"


async def ask_model(client: anthropic.AsyncAnthropic, model: str, **kwargs: Any) -> Any:
    return await client.messages.create(
        model=model, max_tokens=10, messages=[{"role": "user", "content": "hi"}], **kwargs
    )


async def test_scheduled_outage_of_one_model_spares_the_others(
    claude: anthropic.AsyncAnthropic, gpt: openai.AsyncOpenAI, fake: FakeProviderThread
) -> None:
    """A scheduled 529 window naming one model fails that model's calls only, on both wires."""
    fake.set_config(FaultConfig(outages=[Outage(start_s=0, duration_s=3600, models=[MODEL])]))
    with pytest.raises(anthropic.OverloadedError):
        await ask(claude)
    assert (await ask_model(claude, OTHER)).model == OTHER
    assert (await ask_gpt(gpt, "fine")).choices[0].message.content == "echo: fine"
    counters = fake.counters()
    assert counters["by_fault"] == {"scheduled_outage": 1}
    assert counters["outage"]["requests"] == 1


async def test_scheduled_slow_window_times_the_model_out(
    claude: anthropic.AsyncAnthropic, gpt: openai.AsyncOpenAI, fake: FakeProviderThread
) -> None:
    """A slow window of one model outlasts a short client timeout (APITimeoutError on both
    SDKs) while the other models answer within it."""
    fake.set_config(
        FaultConfig(
            outages=[
                Outage(start_s=0, duration_s=3600, status="slow", slow_ms=5000, models=[MODEL]),
                Outage(start_s=0, duration_s=3600, status="slow", slow_ms=5000, models=[GPT]),
            ]
        )
    )
    with pytest.raises(anthropic.APITimeoutError):
        await ask(claude, timeout=0.2)
    with pytest.raises(openai.APITimeoutError):
        await ask_gpt(gpt, timeout=0.2)
    assert (await ask_model(claude, OTHER, timeout=5)).model == OTHER
    assert fake.counters()["by_fault"]["slow"] == 2


async def test_flapping_windows_are_listed_in_wall_clock_time(fake: FakeProviderThread) -> None:
    """Two windows of one model with a gap (a flap) are listed with Unix start and end times
    counted from the moment the config took effect, in order, with their models."""
    config = FaultConfig(
        outages=[
            Outage(start_s=5, duration_s=2, models=[MODEL]),
            (1.0, 2.0, "reset"),
            Outage(start_s=8, duration_s=2, status="slow", slow_ms=900, models=[MODEL]),
        ]
    )
    before = time.time()
    fake.set_config(config)
    after = time.time()
    windows = fake.calls()["windows"]
    assert [(w["status"], w["models"], w["kind"]) for w in windows] == [
        ("reset", [], "scheduled"),
        (529, [MODEL], "scheduled"),
        ("slow", [MODEL], "scheduled"),
    ]
    for window, (start, duration) in zip(windows, [(1, 2), (5, 2), (8, 2)], strict=True):
        assert before + start <= window["start"] <= after + start
        assert window["end"] == pytest.approx(window["start"] + duration)
    assert windows[2]["slow_ms"] == 900


async def test_call_log_keeps_arrival_times_per_model_with_probes_apart(
    claude: anthropic.AsyncAnthropic, gpt: openai.AsyncOpenAI, fake: FakeProviderThread
) -> None:
    """GET /admin/calls lists, per model, when each call and each probe arrived; ?model=
    and ?since= narrow it; resetting the counters empties it."""
    before = time.time()
    await ask(claude)
    await ask(claude, extra_headers=PROBE)
    fake.start_outage(529, models=[MODEL])
    with pytest.raises(anthropic.OverloadedError):
        await ask(claude)
    fake.stop_outage()
    await ask_gpt(gpt)
    after = time.time()
    log = await admin(fake, "GET", "/admin/calls")
    assert set(log["models"]) == {MODEL, GPT}
    mine = log["models"][MODEL]
    assert len(mine["calls"]) == 2 and len(mine["probes"]) == 1 and mine["dropped"] == 0
    assert len(log["models"][GPT]["calls"]) == 1
    assert all(before <= t <= after for t in mine["calls"] + mine["probes"])
    assert mine["calls"] == sorted(mine["calls"])
    [window] = log["windows"]
    assert window["kind"] == "runtime" and window["models"] == [MODEL]
    assert before <= window["start"] <= window["end"] <= after
    only = await admin(fake, "GET", f"/admin/calls?model={GPT}")
    assert set(only["models"]) == {GPT}
    later = await admin(fake, "GET", f"/admin/calls?since={mine['calls'][1]}")
    assert len(later["models"][MODEL]["calls"]) == 1
    await admin(fake, "POST", "/admin/counters/reset")
    emptied = fake.calls()
    assert emptied["models"] == {} and emptied["windows"] == []


async def test_runtime_slow_outage_of_one_model(
    claude: anthropic.AsyncAnthropic, fake: FakeProviderThread
) -> None:
    """POST /admin/outage with status "slow" delays one model's replies past the client's
    timeout; a slow outage without slow_ms, or slow_ms on a 529, is a 400."""
    state = await admin(
        fake, "POST", "/admin/outage", {"status": "slow", "slow_ms": 5000, "models": [MODEL]}
    )
    assert state["status"] == "slow" and state["slow_ms"] == 5000
    with pytest.raises(anthropic.APITimeoutError):
        await ask(claude, timeout=0.2)
    assert (await ask_model(claude, OTHER)).model == OTHER
    for bad in ({"status": "slow"}, {"status": 529, "slow_ms": 10}, {"status": "slower"}):
        with pytest.raises(AssertionError, match="400"):
            await admin(fake, "POST", "/admin/outage", bad)


def test_outage_objects_reject_impossible_values() -> None:
    """An Outage refuses negative times, a slow window without slow_ms and slow_ms on a
    status that is not slow; a config with a bad one does not decode."""
    with pytest.raises(ValueError, match=">= 0"):
        Outage(start_s=-1, duration_s=1)
    with pytest.raises(ValueError, match="slow_ms"):
        Outage(start_s=0, duration_s=1, status="slow")
    with pytest.raises(ValueError, match="slow_ms"):
        Outage(start_s=0, duration_s=1, status=503, slow_ms=10)
    with pytest.raises(ValueError, match="400-599"):
        Outage(start_s=0, duration_s=1, status=302)
    bad = b'{"outages": [{"start_s": 0, "duration_s": 1, "status": "slow"}]}'
    with pytest.raises(msgspec.ValidationError, match="slow_ms"):
        msgspec.json.decode(bad, type=FaultConfig)


async def test_admin_config_takes_both_outage_forms(fake: FakeProviderThread) -> None:
    """PUT /admin/config accepts tuple and object outages side by side and returns them."""
    body = {
        "outages": [
            [0, 1, 503],
            {"start_s": 2, "duration_s": 3, "status": "slow", "slow_ms": 400, "models": ["m"]},
        ]
    }
    served = await admin(fake, "PUT", "/admin/config", body)
    assert served["outages"] == body["outages"]
    assert fake.provider.config.outages == [
        (0, 1, 503),
        Outage(start_s=2, duration_s=3, status="slow", slow_ms=400, models=["m"]),
    ]


def test_call_log_drops_its_oldest_half_when_full() -> None:
    """A model's log stops at its cap: the oldest half goes and is counted as dropped."""
    from services.tools.fake.calls import CallLog

    log = CallLog(max_per_model=4)
    for _ in range(5):
        log.record("m", probe=False)
    log.record("m", probe=True)
    entry = log.snapshot()["m"]
    assert len(entry["calls"]) == 3 and entry["dropped"] == 2 and len(entry["probes"]) == 1


def test_parse_outage_takes_models_and_slowness() -> None:
    """--outage START:DURATION:STATUS[:MODEL,...]: models after a third colon (a model name
    may hold colons), STATUS slow=MS; without either it stays the tuple form."""
    assert parse_outage("1:2:503") == (1.0, 2.0, 503)
    assert parse_outage("1:2:529:claude-opus-4-1,anthropic.claude-v1:0") == Outage(
        start_s=1, duration_s=2, models=["claude-opus-4-1", "anthropic.claude-v1:0"]
    )
    assert parse_outage("0:5:slow=3000:m") == Outage(
        start_s=0, duration_s=5, status="slow", slow_ms=3000, models=["m"]
    )
    assert parse_outage("0:5:slow=3000") == Outage(
        start_s=0, duration_s=5, status="slow", slow_ms=3000
    )


# --------------------------------------------------------------------------- CLI


def test_config_from_options_lays_flags_over_the_config_file(tmp_path: Path) -> None:
    """`ridethrough fake-provider`'s --config file and flags build the FaultConfig, flags
    winning, flags not given leaving the file's values."""
    config_file = tmp_path / "faults.json"
    config_file.write_bytes(msgspec.json.encode({"latency_ms": 5, "reset_rate": 0.1}))
    config = config_from_options(
        config_file,
        latency_ms=9,
        error_mix=parse_error_mix("529:2,500:1"),
        outages=[parse_outage("10:5:reset"), parse_outage("0:1:503")],
        reset_rate=None,
    )
    assert config.latency_ms == 9
    assert config.reset_rate == 0.1
    assert config.error_mix == {529: 2.0, 500: 1.0}
    assert config.outages == [(10.0, 5.0, "reset"), (0.0, 1.0, 503)]
    assert config_from_options() == FaultConfig()


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_outage, "1:2"),
        (parse_outage, "a:1:503"),
        (parse_outage, "1:2:503:"),
        (parse_outage, "1:2:slow=0:m"),
        (parse_outage, "1:2:slow=x"),
        (parse_error_mix, "5x"),
    ],
)
def test_option_text_that_does_not_parse_is_a_value_error(
    parse: Callable[[str], object], text: str
) -> None:
    with pytest.raises(ValueError, match=repr(text)):
        parse(text)


def test_config_from_options_turns_bad_values_into_value_errors(tmp_path: Path) -> None:
    """A bad flag value or config file is a ValueError (the CLI's one-line usage error)."""
    with pytest.raises(ValueError, match="must be <= 1"):
        config_from_options(error_rate=0.7, reset_rate=0.5)
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"latency_ms": "slow"}')
    with pytest.raises(ValueError, match="latency_ms"):
        config_from_options(bad)


def test_cli_serves_with_every_option_until_sigterm(tmp_path: Path) -> None:
    """`ridethrough fake-provider` prints its URL, serves the FaultConfig its options build
    (each option of the former module CLI is there), and exits 0 on SIGTERM."""
    config_file = tmp_path / "faults.json"
    config_file.write_bytes(msgspec.json.encode({"midstream_after_events": 2, "retry_after_s": 4}))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [
        sys.executable, "-m", "services", "fake-provider", "--port", "0",
        "--config", str(config_file),
        "--latency-ms", "1", "--latency-jitter-ms", "0.5",
        "--latency-distribution", "exponential", "--seed", "3",
        "--error-rate", "0", "--error-mix", "529:2,500:1", "--retry-after-s", "2",
        "--reset-rate", "0", "--midstream-rate", "0", "--stream-chunk-delay-ms", "0",
        "--outage", "100:5:reset", "--outage", "200:1:503",
        "--model", MODEL, "--model", "claude-other",
    ]  # fmt: skip
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("fake provider listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1].strip()
            with urllib.request.urlopen(url + "/admin/config", timeout=10) as response:
                served = msgspec.json.decode(response.read(), type=FaultConfig)
            assert served == FaultConfig(
                latency_ms=1,
                latency_jitter_ms=0.5,
                latency_distribution="exponential",
                seed=3,
                error_mix={529: 2, 500: 1},
                retry_after_s=2,
                midstream_after_events=2,
                outages=[(100, 5, "reset"), (200, 1, 503)],
                models=[MODEL, "claude-other"],
            )
            with anthropic.Anthropic(base_url=url, api_key="t", max_retries=0) as client:
                reply = client.messages.create(
                    model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "cli"}]
                )
            assert reply.content[0].type == "text"
            assert reply.content[0].text == "echo: cli"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
