"""The same model through another door: Bedrock and Vertex adapters (the real SDK clients,
dummy credentials) against the fake's doors, and lossless failover through each of them.

Every failover test counts: submitted = succeeded + dead, no result written twice, and
every request that reached the fallback door is the job's request byte for byte (after
the door's own envelope: ``anthropic_version`` in the body, the model in the path).
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec
import pytest

from schemas import subjects as s
from schemas.jobs import Target
from services.breaker import transition
from services.config import ProviderSettings, Settings
from services.errors import ProviderError, RateLimited, TransientError
from services.producer import Producer, make_job
from services.providers.base import split_known
from services.providers.registry import build_provider
from services.tools.stack import pointed_at_fake, running_worker
from tests.support import count_outcomes, wait_until

pytestmark = pytest.mark.integration

SONNET = "claude-haiku-4-5"
DOOR_IDS = {
    "bedrock": "anthropic.claude-haiku-4-5-20251001-v1:0",
    "vertex": "claude-haiku-4-5@20251001",
}
KINDS = {"bedrock": "anthropic-bedrock", "vertex": "anthropic-vertex"}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32).decode()

#: Envelope keys a cloud door's SDK client adds to the body.
_ENVELOPE = ("anthropic_version", "anthropic_beta")


def door_settings(settings: Settings, fake_url: str) -> Settings:
    """The test settings plus a Bedrock and a Vertex door on the fake, each with a model_map."""
    doors = {
        name: ProviderSettings(kind=kind, model_map={SONNET: DOOR_IDS[name]})  # type: ignore[arg-type]
        for name, kind in KINDS.items()
    }
    with_doors = settings.with_changes(providers={**settings.providers, **doors})
    return pointed_at_fake(with_doors, fake_url, list(doors))


def rich_request(i: int) -> dict[str, Any]:
    """A request the OpenAI mapping would refuse: tools, an image, a cached system prompt."""
    return {
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "max_tokens": 16,
        "tools": [{"name": "lookup", "description": "find", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto"},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": PNG}},
                    {"type": "text", "text": f"door job {i}"},
                ],
            }
        ],
    }  # fmt: skip


def canonical(body: dict[str, Any]) -> bytes:
    """A body's bytes with sorted keys (the same object always gives the same bytes)."""
    return msgspec.json.encode(body, order="sorted")


def arrived(fake: Any, door: str) -> list[tuple[str, dict[str, Any]]]:
    """(model, body without the door's envelope) of every request recorded at ``door``."""
    out = []
    for r in fake.recorded(door):
        body = msgspec.json.decode(base64.b64decode(r["body"]))
        for key in _ENVELOPE:
            body.pop(key, None)
        out.append((r["model"], body))
    return out


@pytest.mark.parametrize("door", ["bedrock", "vertex"])
@pytest.mark.parametrize("stream", [False, True])
async def test_door_answers_through_the_real_sdk_client(
    settings: Settings, fake_provider: Any, door: str, stream: bool
) -> None:
    """Each door's SDK client (dummy credentials) gets the echo back, JSON and streamed, the
    model through model_map, the whole usage object kept."""
    provider = build_provider(door_settings(settings, fake_provider.url), door)
    assert provider is not None
    request: dict[str, Any] = {
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "hello door"}],
    }
    if stream:
        request["stream"] = True
    try:
        reply = await provider.call(SONNET, request, betas=["prompt-caching-2024-07-31"])
    finally:
        await provider.aclose()
    assert reply.response["content"][0]["text"] == "echo: hello door"
    assert reply.provider_usage is not None and reply.provider_usage["output_tokens"] == 3
    recorded = fake_provider.recorded(door)
    assert len(recorded) == 1 and recorded[0]["model"] == DOOR_IDS[door]
    body = msgspec.json.decode(base64.b64decode(recorded[0]["body"]))
    assert body["messages"] == request["messages"] and "model" not in body
    if door == "bedrock":  # Bedrock takes the betas in the body
        assert body["anthropic_beta"] == ["prompt-caching-2024-07-31"]


@pytest.fixture(autouse=True)
def _recording(fake_provider: Any) -> None:
    fake_provider.record_requests()


@pytest.mark.parametrize("door", ["anthropic", "bedrock", "vertex"])
async def test_the_plain_call_sends_what_messages_create_sends(
    settings: Settings, fake_provider: Any, door: str
) -> None:
    """The adapter posts a plain job's body through the client instead of through
    ``messages.create`` (cheaper): each door receives the same model, body (envelope
    included), beta header, credential and API version that ``messages.create`` sends
    for the same request (the first party's goes out on a bare aiohttp session)."""
    provider: Any = build_provider(door_settings(settings, fake_provider.url), door)
    assert provider is not None
    request = {**rich_request(3), "metadata": {"user_id": "u-1"}, "not_in_the_sdk": [1, 2]}
    model = provider.model_map.get(SONNET, SONNET)
    try:
        ours = await provider.call(SONNET, request)
        kwargs, extra = split_known({**request, "model": model}, provider._create_params)
        raw = await provider._client.messages.with_raw_response.create(**kwargs, extra_body=extra)
        theirs = msgspec.json.decode(await raw.read())
    finally:
        await provider.aclose()
    assert ours.response["content"] == theirs["content"]
    first, second = fake_provider.recorded(door)
    assert first["model"] == second["model"]
    assert msgspec.json.decode(base64.b64decode(first["body"])) == msgspec.json.decode(
        base64.b64decode(second["body"])
    )
    assert first["anthropic_beta"] == second["anthropic_beta"] == ""
    assert first["anthropic_version"] == second["anthropic_version"]
    if door == "anthropic":  # a cloud door signs each request (the signature differs)
        assert first["credential"] == second["credential"] != ""
        assert first["anthropic_version"]


@pytest.mark.parametrize(
    ("door", "status", "expected"),
    [
        ("bedrock", 529, (TransientError, "overloaded", 503)),
        ("bedrock", 429, (RateLimited, "rate_limited", 429)),
        ("bedrock", 500, (TransientError, "server_error", 500)),
        ("vertex", 429, (RateLimited, "rate_limited", 429)),
        ("vertex", 503, (TransientError, "overloaded", 503)),
        ("vertex", 529, (TransientError, "overloaded", 529)),
    ],
)
async def test_door_outage_is_classified_as_the_cloud_says_it(
    settings: Settings, fake_provider: Any, door: str, status: int, expected: Any
) -> None:
    """An outage of one door answers in that cloud's error shape; the other doors stay up."""
    st = door_settings(settings, fake_provider.url)
    sick, other = build_provider(st, door), build_provider(st, "anthropic")
    assert sick is not None and other is not None
    fake_provider.start_outage(status, doors=[door])
    request = {"max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    try:
        with pytest.raises(ProviderError) as caught:
            await sick.call(SONNET, request)
        healthy = await other.call(SONNET, request)
    finally:
        fake_provider.stop_outage()
        await sick.aclose()
        await other.aclose()
    kind, reason, sent = expected
    assert type(caught.value) is kind
    assert (caught.value.reason, caught.value.status) == (reason, sent)
    assert healthy.response["content"][0]["text"] == "echo: x"


@pytest.mark.parametrize("door", ["bedrock", "vertex"])
async def test_failover_through_a_door_keeps_every_job_whole(
    settings: Settings, js: Any, fake_provider: Any, door: str
) -> None:
    """With the first party open, jobs with tools, images and cache control fail over to
    the door (which names no model: the job's follows, through model_map): none parked,
    all succeed once, each result names its door, and each request at the door is the
    job's request byte for byte. A job using a feature the door does not serve parks."""
    st = door_settings(settings, fake_provider.url)
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    fallback = [Target(provider=door)]
    jobs = [
        make_job(
            "anthropic", SONNET, request=rich_request(i), on_outage="failover", fallbacks=fallback
        )
        for i in range(12)
    ]
    unserved = make_job(
        "anthropic", SONNET, on_outage="failover", fallbacks=fallback,
        request={**rich_request(99), "mcp_servers": [{"type": "url", "url": "https://x",
                                                      "name": "x"}]},
    )  # fmt: skip
    async with running_worker(st), await Producer.connect(st) as producer:
        ids = [await producer.submit(j) for j in jobs]
        await producer.submit(unserved)
        results = [await producer.result(i, timeout=60) for i in ids]

        async def one_parked() -> bool:
            return (await js.stream_info(s.PARKED_STREAM)).state.messages == 1

        await wait_until(one_parked, timeout=30)
        outcomes = await count_outcomes(js)
    assert outcomes["succeeded"] + outcomes["dead"] == len(jobs)
    assert outcomes["result_writes"] == outcomes["results"] == len(jobs)
    for result in results:
        assert result.status == "succeeded" and result.provider == door
        assert result.served_by is not None
        assert (result.served_by.provider, result.served_by.kind) == (door, KINDS[door])
        assert result.served_by.fallback and result.served_by.fallback_from.startswith("anthropic/")
        assert result.model == DOOR_IDS[door]
    assert fake_provider.counters()["by_path"].get("/v1/messages", 0) == 0
    sent = {canonical(j.request) for j in jobs}
    got = arrived(fake_provider, door)
    assert len(got) == len(jobs)
    assert {model for model, _ in got} == {DOOR_IDS[door]}
    assert {canonical({k: v for k, v in b.items() if k != "stream"}) for _, b in got} == sent


async def test_betas_go_out_and_are_dropped_only_where_the_door_does_not_take_them(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A job's betas reach the first party as the anthropic-beta header; failing over to
    Bedrock keeps those it takes and drops the Files API one, with a note on the result."""
    st = door_settings(settings, fake_provider.url)
    betas = ["prompt-caching-2024-07-31", "files-api-2025-04-14"]
    direct = make_job("anthropic", SONNET, prompt="direct", max_tokens=8)
    direct = msgspec.structs.replace(direct, betas=betas)
    async with running_worker(st), await Producer.connect(st) as producer:
        first = await producer.result(await producer.submit(direct), timeout=60)
        kv = await js.key_value(s.HEALTH_BUCKET)
        await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
        moved = make_job(
            "anthropic", SONNET, prompt="moved", max_tokens=8, on_outage="failover",
            fallbacks=[Target(provider="bedrock")],
        )  # fmt: skip
        moved = msgspec.structs.replace(moved, betas=betas)
        second = await producer.result(await producer.submit(moved), timeout=60)
        outcomes = await count_outcomes(js)
    assert first.status == second.status == "succeeded"
    assert first.notes == [] and first.served_by is not None and not first.served_by.fallback
    assert second.notes and "files-api-2025-04-14" in second.notes[0]
    [first_party] = fake_provider.recorded("anthropic")
    assert first_party["anthropic_beta"] == ",".join(betas)
    [at_bedrock] = fake_provider.recorded("bedrock")
    raw = msgspec.json.decode(base64.b64decode(at_bedrock["body"]))
    assert raw["anthropic_beta"] == ["prompt-caching-2024-07-31"]
    assert raw["messages"] == moved.request["messages"]
    assert outcomes["succeeded"] == outcomes["results"] == outcomes["result_writes"] == 2


async def test_betas_survive_park_and_replay(
    settings: Settings, js: Any, fake_provider: Any
) -> None:
    """A job with betas parked through an outage is replayed with them: the call after
    recovery carries the same anthropic-beta header; one result, nothing dead."""
    from services.tools.stack import running_recovery

    st = door_settings(settings, fake_provider.url)
    kv = await js.key_value(s.HEALTH_BUCKET)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    betas = ["prompt-caching-2024-07-31", "context-1m-2025-08-07"]
    job = msgspec.structs.replace(
        make_job("anthropic", SONNET, prompt="p", max_tokens=8), betas=betas
    )
    async with running_worker(st), await Producer.connect(st) as producer:
        await producer.submit(job)

        async def parked() -> bool:
            return (await js.stream_info(s.PARKED_STREAM)).state.messages == 1

        await wait_until(parked, timeout=30)
        await transition(js, kv, "anthropic", to="half_open", allowed_from=("open",), by="test")
        async with running_recovery(st):
            result = await producer.result(job.id, timeout=60)
        outcomes = await count_outcomes(js)
    assert result.status == "succeeded" and result.notes == []
    [call] = fake_provider.recorded("anthropic")
    assert call["anthropic_beta"] == ",".join(betas)
    assert outcomes["succeeded"] == outcomes["results"] == outcomes["result_writes"] == 1
    assert outcomes["dead"] == 0
