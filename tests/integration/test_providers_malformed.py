"""Both adapters against a server that answers status 200 with a body that is not a reply:
not JSON, JSON of the wrong shape, the right shape with fields of the wrong type. Each must
leave the adapter as the transient ``bad_response`` (the provider's fault; retried), never
as a success, a crash, or a permanent refusal of the request.

The server is a real HTTP server (aiohttp) spoken to by the real SDKs, like the fake provider;
it answers every request with the one body the test chose.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from services.errors import ProviderError, TransientError
from services.providers.anthropic import AnthropicProvider
from services.providers.base import Provider
from services.providers.openai import OpenAIProvider

pytestmark = pytest.mark.integration

KEY = "sk-test-malformed-0123456789"
REQUEST: dict[str, Any] = {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
MODELS = {"anthropic": "claude-fake", "openai": "gpt-fake"}

# (id, body, content type): bodies under status 200 that no adapter can take as a reply.
BODIES: list[tuple[str, bytes, str]] = [
    ("not-json", b"<html>bad gateway</html>", "text/html"),
    ("not-json-said-json", b"{\"id\": \"msg_1\", \"type\": ", "application/json"),
    ("a-list", b"[1, 2, 3]", "application/json"),
    ("a-string", b"\"hello\"", "application/json"),
    ("no-model", b"{\"type\": \"message\", \"object\": \"chat.completion\", \"choices\": [{}],"
     b" \"usage\": {\"input_tokens\": 1, \"output_tokens\": 1}}", "application/json"),
    ("usage-of-the-wrong-type", b"{\"type\": \"message\", \"model\": \"m\", \"choices\": [{}],"
     b" \"usage\": {\"input_tokens\": \"many\", \"prompt_tokens\": \"many\"}}", "application/json"),
]  # fmt: skip


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, dict[str, tuple[bytes, str]]]]:
    """A server on a free port answering every POST with ``answer["body"]``; yields its URL
    and the dict to put the answer in."""
    answer: dict[str, tuple[bytes, str]] = {}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        body, content_type = answer["body"]
        return web.Response(status=200, body=body, headers={"content-type": content_type})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", answer
    finally:
        await runner.cleanup()


def _adapter(kind: str, url: str) -> Provider:
    if kind == "anthropic":
        return AnthropicProvider(kind, api_key=KEY, base_url=url)
    return OpenAIProvider(kind, api_key=KEY, base_url=f"{url}/v1")


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
@pytest.mark.parametrize(
    ("body", "content_type"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES]
)
async def test_a_200_that_is_not_a_reply_is_a_transient_bad_response(
    served: tuple[str, dict[str, tuple[bytes, str]]], kind: str, body: bytes, content_type: str
) -> None:
    """A 200 body that is not JSON, or not a message / completion, is `bad_response`."""
    url, answer = served
    answer["body"] = (body, content_type)
    provider = _adapter(kind, url)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.call(MODELS[kind], REQUEST)
    finally:
        await provider.aclose()
    assert type(caught.value) is TransientError
    assert (caught.value.reason, caught.value.status) == ("bad_response", None)
