"""The OpenAI Chat Completions adapter, and its classification table.

``OpenAIProvider.call`` sends a provider-native chat completions body through
the official SDK (SDK retries off: the queue owns retries) on the SDK's aiohttp
transport. It works against any OpenAI-compatible server (vLLM, Ollama, ...):
point ``base_url`` at it; local servers accept any non-empty ``api_key``.
A completion comes back as the server sent it, through the SDK's raw-response path
and decoded with msgspec (no SDK response models: see the Anthropic adapter).
A request with ``"stream": true`` is streamed (with usage requested) and
assembled into a ``chat.completion``-shaped body. Every failure leaves as
exactly one ``ProviderError``, chosen by ``TABLE``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx2
import msgspec
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from schemas.results import Usage
from services.errors import PermanentError, ProviderError, RateLimited, TransientError
from services.providers.base import Reply, decode_body, read_fields, sdk_params, split_known
from services.providers.classify import (
    COMMON,
    ErrorObject,
    MalformedResponse,
    Predicate,
    Table,
    by_status,
    classify_with,
    redirect_loop,
)

PROBE_HEADER = "x-ridethrough-probe"
_PROBE_HEADERS = {PROBE_HEADER: "1"}

# Out of credit or over a hard billing limit: retrying cannot help until a human acts.
_QUOTA_CODES = frozenset({
    "insufficient_quota",
    "billing_hard_limit_reached",
    "billing_not_active",
    "quota_exceeded",
})  # fmt: skip

# Error types OpenAI and compatible servers (vLLM, Ollama...) use for their own faults.
_SERVER_ERRORS = ("server_error", "api_error", "internal_error", "internal_server_error")

# Errors a streamed body can raise while being assembled: the provider's fault.
_ASSEMBLY_ERRORS = (
    LookupError,
    TypeError,
    ValueError,
    RuntimeError,
    AssertionError,
    AttributeError,
)


def _status(*codes: int) -> Predicate:
    def match(exc: BaseException) -> bool:
        return isinstance(exc, openai.APIStatusError) and exc.status_code in codes

    return match


def _quota(exc: BaseException) -> bool:
    """Any API error (status or mid-stream) whose ``code`` or ``type`` is a quota code."""
    return isinstance(exc, openai.APIError) and (
        exc.code in _QUOTA_CODES or exc.type in _QUOTA_CODES
    )


def _dropped_connection(exc: BaseException) -> bool:
    """A dropped connection that the SDK reports as ``APITimeoutError``.

    The openai SDK's vendored aiohttp transport maps every aiohttp connection
    error, a reset included, to ``ConnectTimeout``; the cause chain has the truth.
    """
    if not isinstance(exc, openai.APITimeoutError):
        return False
    cause = exc.__cause__
    for _ in range(8):  # the chain is two deep; bound it all the same
        if cause is None:
            return False
        if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__
    return False


def _midstream(*names: str) -> Predicate:
    """An error object under status 200 (inside a stream, where the SDK raises a plain
    ``APIError``, or as the whole JSON body), its type or code in ``names``."""

    def match(exc: BaseException) -> bool:
        in_success = type(exc) is openai.APIError or isinstance(exc, ErrorObject)
        return in_success and (
            getattr(exc, "type", None) in names or getattr(exc, "code", None) in names
        )

    return match


TABLE: Table = (
    # when                                                     outcome         reason
    # A client that gave up following redirects: a wrong base_url, loud and permanent.
    (redirect_loop,                                            PermanentError, "config"),
    (_dropped_connection,                                      TransientError, "connection"),
    (openai.APITimeoutError,                                   TransientError, "timeout"),
    (openai.APIConnectionError,                                TransientError, "connection"),
    (openai.APIResponseValidationError,                        TransientError, "bad_response"),
    (_quota,                                                   PermanentError, "quota"),
    (_status(402),                                             PermanentError, "quota"),
    # An error object after the stream began: no status, meaning in type/code.
    (_midstream("rate_limit_exceeded", "rate_limit_error"),    RateLimited,    "rate_limited"),
    (_midstream("overloaded_error", "overloaded"),             TransientError, "overloaded"),
    (_midstream(*_SERVER_ERRORS),                              TransientError, "server_error"),
    (_midstream("timeout", "timeout_error"),                   TransientError, "timeout"),
    (_midstream("invalid_request_error"),                      PermanentError, "invalid_request"),
    *by_status(_status),
    (openai.APIError,                                          TransientError, "unknown"),
    # Raised only by the SDK's parse helpers; the same request would end the same way.
    (openai.LengthFinishReasonError,                           PermanentError, "length"),
    (openai.ContentFilterFinishReasonError,                    PermanentError, "content_filter"),
    *COMMON,
    # Credentials or options the SDK rejects before sending anything.
    (openai.OpenAIError,                                       PermanentError, "refused"),
)  # fmt: skip


def classify(exc: BaseException) -> ProviderError:
    """Translate an exception from the OpenAI SDK (or its transport) into a ``ProviderError``."""
    return classify_with(TABLE, exc)


class _ToolCall:
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Head(msgspec.Struct):
    """What a reply needs of a completion body; the rest is stored as sent."""

    model: str
    usage: _Usage | None = None


def _usage(usage: CompletionUsage | _Usage | None) -> Usage:
    if usage is None:
        return Usage()
    return Usage(input_tokens=usage.prompt_tokens or 0, output_tokens=usage.completion_tokens or 0)


def _reply(body: bytes) -> Reply:
    """The reply a non-streaming completion body makes (``MalformedResponse`` or
    ``ErrorObject`` if it is none)."""
    data = decode_body(body)
    if "error" in data or not data.get("choices"):
        # A 200 whose body is {"error": {...}}: classified by its type, like an error
        # object inside a stream.
        raise ErrorObject(data.get("error"))
    head = read_fields(data, _Head)
    return Reply(response=data, usage=_usage(head.usage), model=head.model)


@dataclass
class _Choice:
    role: str = "assistant"
    content: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    tool_calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish_reason: str | None = None

    def to_dict(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role,
            "content": "".join(self.content) if self.content else None,
        }
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i].to_dict() for i in sorted(self.tool_calls)]
        return {"index": index, "message": message, "finish_reason": self.finish_reason}


class _Assembler:
    """Folds ``chat.completion.chunk`` events into one ``chat.completion`` body."""

    def __init__(self) -> None:
        self.head: ChatCompletionChunk | None = None
        self.usage: CompletionUsage | None = None
        self.choices: dict[int, _Choice] = {}

    def add(self, chunk: ChatCompletionChunk) -> None:
        if self.head is None:
            self.head = chunk
        if chunk.usage is not None:
            self.usage = chunk.usage
        for delta_choice in chunk.choices:
            choice = self.choices.get(delta_choice.index)
            if choice is None:
                choice = self.choices[delta_choice.index] = _Choice()
            delta = delta_choice.delta
            if delta.role:
                choice.role = delta.role
            if delta.content:
                choice.content.append(delta.content)
            if delta.refusal:
                choice.refusal.append(delta.refusal)
            for part in delta.tool_calls or ():
                call = choice.tool_calls.get(part.index)
                if call is None:
                    call = choice.tool_calls[part.index] = _ToolCall()
                if part.id:
                    call.id = part.id
                if part.type:
                    call.type = part.type
                if part.function is not None:
                    call.name += part.function.name or ""
                    if part.function.arguments:
                        call.arguments.append(part.function.arguments)
            if delta_choice.finish_reason:
                choice.finish_reason = delta_choice.finish_reason

    def result(self) -> dict[str, Any]:
        head = self.head
        if head is None or not self.choices:
            raise MalformedResponse("the stream ended without any choice")
        if any(c.finish_reason is None for c in self.choices.values()):
            raise MalformedResponse("the stream ended before every choice finished")
        body: dict[str, Any] = {
            "id": head.id,
            "object": "chat.completion",
            "created": head.created,
            "model": head.model,
            "choices": [self.choices[i].to_dict(i) for i in sorted(self.choices)],
            "usage": self.usage.to_dict(mode="json") if self.usage is not None else None,
        }
        if head.system_fingerprint is not None:
            body["system_fingerprint"] = head.system_fingerprint
        if head.service_tier is not None:
            body["service_tier"] = head.service_tier
        return body


class OpenAIProvider:
    """A ``Provider`` over ``openai.AsyncOpenAI`` and Chat Completions, or a compatible server."""

    def __init__(
        self,
        name: str,
        *,
        api_key: str,
        base_url: str | None,
        timeout_s: float = 600.0,
        deadline_s: float = 1200.0,
        max_connections: int = 1000,
        extra_headers: dict[str, str] | None = None,
        model_map: Mapping[str, str] | None = None,
    ) -> None:
        """Build one client, reused by every call; ``extra_headers`` go out on every request.

        ``timeout_s`` bounds each read, ``deadline_s`` a whole call."""
        self.name = name
        self.deadline_s = deadline_s
        self.model_map = dict(model_map or {})
        limits = httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        timeout = httpx2.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            default_headers=extra_headers,
            http_client=openai.DefaultAioHttpClient(timeout=timeout, limits=limits),
        )
        self._params = sdk_params(self._client.chat.completions.create)

    async def call(
        self,
        model: str,
        request: dict[str, Any],
        *,
        probe: bool = False,
        betas: Sequence[str] = (),
    ) -> Reply:
        """Send ``request`` with ``model`` (through ``model_map``); stream if it asks to;
        raise only ``ProviderError``. ``betas`` are Anthropic's: an OpenAI door takes none
        (a failover here drops them, with a note on the result)."""
        headers = _PROBE_HEADERS if probe else None
        model = self.model_map.get(model, model)
        try:
            # `timeout_s` bounds each read; this bounds the whole call (see the Anthropic
            # adapter).
            async with asyncio.timeout(self.deadline_s):
                if request.get("stream"):
                    return await self._stream(model, request, headers)
                return await self._create(model, request, headers)
        except Exception as exc:
            raise classify(exc) from exc

    async def _create(
        self, model: str, request: dict[str, Any], headers: dict[str, str] | None
    ) -> Reply:
        kwargs, extra = split_known({**request, "model": model}, self._params)
        # The raw path: the SDK builds and sends the request and raises its own errors for
        # an error status, but builds no ChatCompletion of the answer.
        raw = await self._client.chat.completions.with_raw_response.create(
            **kwargs, extra_headers=headers, extra_body=extra or None
        )
        return _reply(raw.content)

    async def _stream(
        self, model: str, request: dict[str, Any], headers: dict[str, str] | None
    ) -> Reply:
        stream_options = {**(request.get("stream_options") or {}), "include_usage": True}
        body = {**request, "model": model, "stream": True, "stream_options": stream_options}
        kwargs, extra = split_known(body, self._params)
        stream = await self._client.chat.completions.create(
            **kwargs, extra_headers=headers, extra_body=extra or None
        )
        assembler = _Assembler()
        async with stream:
            try:
                async for chunk in stream:
                    assembler.add(chunk)
            except _ASSEMBLY_ERRORS as exc:
                raise MalformedResponse(f"could not assemble the completion: {exc}") from exc
        response = assembler.result()
        return Reply(
            response=response,
            usage=_usage(assembler.usage),
            model=response["model"],
        )

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.close()
