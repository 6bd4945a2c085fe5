"""Both provider adapters, over real HTTP, against the fake provider server.

The real SDKs (on their aiohttp transport) talk to ``services.tools.fake``;
each forced fault (header ``x-fake-fault``) must come out of the adapter as
exactly one ``ProviderError`` with the documented class and reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest

from services.errors import PermanentError, ProviderError, RateLimited, TransientError
from services.providers.anthropic import AnthropicProvider
from services.providers.base import Provider, Reply
from services.providers.openai import OpenAIProvider
from services.tools.fake import FakeProviderThread, FaultConfig, run_in_thread

# No NATS here, but real HTTP between the real SDKs and the fake provider's server.
pytestmark = pytest.mark.integration

KEY = "sk-test-adapters-0123456789"
PROMPT = "hello there"
ECHO = "echo: hello there"
REQUEST: dict[str, Any] = {"max_tokens": 50, "messages": [{"role": "user", "content": PROMPT}]}
MODELS = {"anthropic": "claude-fake", "openai": "gpt-fake"}
# retry-after-ms (2500) must win over the whole-seconds retry-after (3) the fake also sends.
RETRY_AFTER_S = 2.5

Expected = tuple[type[ProviderError], str, int | None, float | None]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviderThread]:
    """One fake provider for the module; tests that count requests reset its counters."""
    handle = run_in_thread(FaultConfig(retry_after_s=RETRY_AFTER_S))
    yield handle
    handle.stop()


def make_provider(
    kind: str, fake: FakeProviderThread, fault: str | None = None, **options: Any
) -> Provider:
    """A real adapter of ``kind`` pointed at ``fake``, forcing ``fault`` on every call."""
    headers = {"x-fake-fault": fault} if fault else None
    if kind == "anthropic":
        return AnthropicProvider(
            kind, api_key=KEY, base_url=fake.url, extra_headers=headers, **options
        )
    return OpenAIProvider(
        kind, api_key=KEY, base_url=f"{fake.url}/v1", extra_headers=headers, **options
    )


async def call_with_fault(
    kind: str, fake: FakeProviderThread, fault: str, stream: bool, **options: Any
) -> ProviderError:
    """The ``ProviderError`` one call with ``fault`` raises (fails the test if none is raised)."""
    provider = make_provider(kind, fake, fault, **options)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.call(MODELS[kind], {**REQUEST, "stream": stream})
    finally:
        await provider.aclose()
    return caught.value


def text_of(kind: str, reply: Reply) -> str:
    """The generated text in a provider-native response body."""
    if kind == "anthropic":
        return "".join(block["text"] for block in reply.response["content"])
    return str(reply.response["choices"][0]["message"]["content"])


@pytest.fixture(params=["anthropic", "openai"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which adapter a test runs against."""
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["json", "stream"])
def stream(request: pytest.FixtureRequest) -> bool:
    """Whether the request asks to stream."""
    return bool(request.param)


@pytest.fixture
async def provider(kind: str, fake: FakeProviderThread) -> AsyncIterator[Provider]:
    """A fault-free adapter of ``kind``, closed after the test."""
    adapter = make_provider(kind, fake)
    yield adapter
    await adapter.aclose()


async def test_reply(kind: str, stream: bool, provider: Provider) -> None:
    """A call returns the provider-native body, its usage and model, streamed or not."""
    reply = await provider.call(MODELS[kind], {**REQUEST, "stream": stream})
    assert text_of(kind, reply) == ECHO
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (2, 3)
    assert reply.model == MODELS[kind]
    if kind == "anthropic":
        assert reply.response["type"] == "message"
        assert reply.response["stop_reason"] == "end_turn"
        assert reply.response["usage"]["output_tokens"] == 3
    else:
        assert reply.response["object"] == "chat.completion"
        assert reply.response["choices"][0]["finish_reason"] == "stop"
        assert reply.response["choices"][0]["message"]["role"] == "assistant"
        assert reply.response["usage"]["completion_tokens"] == 3


async def test_streamed_reply_matches_json_reply(kind: str, provider: Provider) -> None:
    """The assembled streamed message carries the same text, usage and stop as the JSON one."""
    plain = await provider.call(MODELS[kind], REQUEST)
    streamed = await provider.call(MODELS[kind], {**REQUEST, "stream": True})
    assert text_of(kind, streamed) == text_of(kind, plain)
    assert streamed.usage == plain.usage
    if kind == "anthropic":
        assert streamed.response["stop_reason"] == plain.response["stop_reason"]
    else:
        finish = [r.response["choices"][0]["finish_reason"] for r in (streamed, plain)]
        assert finish[0] == finish[1]


async def test_cut_reply_reports_the_cut(kind: str, stream: bool, provider: Provider) -> None:
    """A reply cut at max_tokens keeps the provider's own stop reason."""
    request = {**REQUEST, "max_tokens": 2, "stream": stream}
    reply = await provider.call(MODELS[kind], request)
    assert text_of(kind, reply) == "echo: hello"
    if kind == "anthropic":
        assert reply.response["stop_reason"] == "max_tokens"
    else:
        assert reply.response["choices"][0]["finish_reason"] == "length"


async def test_reply_encodes_for_the_results_stream(kind: str, provider: Provider) -> None:
    """A reply is plain JSON data that msgspec encodes and decodes unchanged."""
    reply = await provider.call(MODELS[kind], {**REQUEST, "stream": True})
    assert msgspec.json.decode(msgspec.json.encode(reply), type=Reply) == reply


async def test_unknown_request_keys_pass_through(
    kind: str, stream: bool, provider: Provider
) -> None:
    """Fields the SDK does not know are sent in the body, not refused."""
    request = {**REQUEST, "stream": stream, "future_field": {"enabled": True}}
    reply = await provider.call(MODELS[kind], request)
    assert text_of(kind, reply) == ECHO


#: The classification both SDKs must give each trigger (a spend limit is a 400 from the
#: Anthropic API, a 429 from OpenAI's).
_FAULTS: dict[str, Expected] = {
    "fault:529": (TransientError, "overloaded", 529, None),
    "fault:500": (TransientError, "server_error", 500, None),
    "fault:503": (TransientError, "server_error", 503, None),
    "fault:408": (TransientError, "timeout", 408, None),
    "fault:409": (TransientError, "conflict", 409, None),
    "fault:429": (RateLimited, "rate_limited", 429, RETRY_AFTER_S),
    "fault:400": (PermanentError, "invalid_request", 400, None),
    "fault:401": (PermanentError, "auth", 401, None),
    "fault:402": (PermanentError, "quota", 402, None),
    "fault:403": (PermanentError, "auth", 403, None),
    "fault:404": (PermanentError, "not_found", 404, None),
    "fault:413": (PermanentError, "too_large", 413, None),
    "fault:reset": (TransientError, "connection", None, None),
    "fault:spend_limit_429": (PermanentError, "quota", 429, None),
}
FAULTS: dict[str, dict[str, Expected]] = {
    "anthropic": {**_FAULTS, "fault:spend_limit": (PermanentError, "quota", 400, None)},
    "openai": {**_FAULTS, "fault:spend_limit": (PermanentError, "quota", 429, None)},
}
FAULT_CASES = [(k, f, expected) for k, table in FAULTS.items() for f, expected in table.items()]


def assert_outcome(error: ProviderError, expected: Expected) -> None:
    """``error`` has exactly the expected class, reason, status and retry-after."""
    outcome, reason, status, retry_after = expected
    assert type(error) is outcome, error
    assert (error.reason, error.status, error.retry_after) == (reason, status, retry_after)
    assert error.__cause__ is not None
    assert KEY not in str(error)


@pytest.mark.parametrize(
    ("sdk", "fault", "expected"), FAULT_CASES, ids=[f"{k}-{f}" for k, f, _ in FAULT_CASES]
)
async def test_forced_fault(
    sdk: str, fault: str, expected: Expected, stream: bool, fake: FakeProviderThread
) -> None:
    """Each forced fault leaves the adapter as its documented ProviderError, streamed or not."""
    assert_outcome(await call_with_fault(sdk, fake, fault, stream), expected)


@pytest.mark.parametrize(
    ("sdk", "expected"),
    [
        ("anthropic", (TransientError, "overloaded", 200, None)),
        ("openai", (TransientError, "server_error", None, None)),
    ],
)
async def test_midstream_error(sdk: str, expected: Expected, fake: FakeProviderThread) -> None:
    """An error event after a 200 stream began is classified by its error type."""
    assert_outcome(await call_with_fault(sdk, fake, "fault:midstream", stream=True), expected)


async def test_truncated_body_is_a_connection_error(kind: str, fake: FakeProviderThread) -> None:
    """A 200 JSON body cut off by a reset is a transient connection error, not a reply."""
    error = await call_with_fault(kind, fake, "fault:midstream", stream=False)
    assert_outcome(error, (TransientError, "connection", None, None))


async def test_slow_reply_times_out(kind: str, stream: bool, fake: FakeProviderThread) -> None:
    """A reply slower than the adapter's timeout is a transient timeout."""
    answered = fake.counters()["by_status"].get("200", 0)
    error = await call_with_fault(kind, fake, "fault:slow:600", stream, timeout_s=0.1)
    assert_outcome(error, (TransientError, "timeout", None, None))
    # Let the fake finish the abandoned reply, so stopping it cuts off no handler.
    fake.wait_for_counters(lambda c: c["by_status"].get("200", 0) > answered)


async def test_probe_header_is_counted_as_probe(
    kind: str, stream: bool, provider: Provider, fake: FakeProviderThread
) -> None:
    """probe=True sends the probe header; an ordinary call does not."""
    fake.reset_counters()
    request = {**REQUEST, "stream": stream}
    await provider.call(MODELS[kind], request, probe=True)
    await provider.call(MODELS[kind], request)
    await provider.call(MODELS[kind], request, probe=True)
    counters = fake.wait_for_counters(lambda c: c["total"] >= 3)
    assert (counters["probes"], counters["normal"]) == (2, 1)


async def test_outage_and_recovery(kind: str, provider: Provider, fake: FakeProviderThread) -> None:
    """During an outage calls are transient overloads; after it the same client succeeds."""
    fake.start_outage(529)
    try:
        with pytest.raises(TransientError) as caught:
            await provider.call(MODELS[kind], REQUEST, probe=True)
    finally:
        fake.stop_outage()
    assert caught.value.reason == "overloaded"
    reply = await provider.call(MODELS[kind], REQUEST, probe=True)
    assert text_of(kind, reply) == ECHO


async def test_wrong_key_never_appears_in_the_error(kind: str, fake: FakeProviderThread) -> None:
    """An auth failure names the problem without repeating the key."""
    error = await call_with_fault(kind, fake, "fault:401", stream=False)
    assert error.reason == "auth"
    assert KEY not in error.message
    assert KEY not in repr(error)
