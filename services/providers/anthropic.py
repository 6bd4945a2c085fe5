"""The Anthropic Messages API adapter, and its classification table.

``AnthropicProvider.call`` sends a provider-native Messages body (SDK retries off: the
queue owns retries) and returns the message as the API sent it, decoded with msgspec (the
SDK's response models cost more than the rest of the call, and the worker stores the JSON
anyway):

- a first-party plain call (no betas, not streamed, ``max_tokens`` within what the SDK
  sends unstreamed) is posted on a bare aiohttp session with the SDK client's own headers
  (``_Direct``), its failures turned into the SDK's exceptions: about a quarter of the
  CPU of ``messages.create`` (``scripts/provider_call_cpu.py``);
- a cloud door's plain call is posted through the SDK client (which signs it);
- a call with betas goes through ``beta.messages``' raw-response path, and one above
  ``_PLAIN_MAX_TOKENS`` through ``messages.create``'s, so the SDK's own checks apply;
- a request with ``"stream": true`` is streamed with the SDK's stream helper and the
  assembled message returned.

Every failure leaves as exactly one ``ProviderError``, chosen by ``TABLE``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import anthropic
import httpx2
import msgspec

from schemas.results import Usage
from services import tracing
from services.errors import PermanentError, ProviderError, RateLimited, TransientError
from services.providers.base import (
    Reply,
    decode_body,
    read_fields,
    refuse_missing,
    sdk_params,
    sdk_required,
    split_known,
)
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

# Spend limits and billing holds: retrying cannot help until a human acts.
_QUOTA_CODES = frozenset({
    "contract_spend_limit_reached",
    "enforced_spend_limit_reached",
    "linked_organization_spend_limit_reached",
    "linked_organization_billing_unavailable",
})  # fmt: skip
_QUOTA_WORDS = ("credit balance", "spend limit", "usage limit")

# Errors a streamed body can raise while being assembled (bad JSON, events out
# of order, a missing message_start): the provider's fault, not the request's.
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
        return isinstance(exc, anthropic.APIStatusError) and exc.status_code in codes

    return match


def _error_type(*types: str) -> Predicate:
    def match(exc: BaseException) -> bool:
        return isinstance(exc, anthropic.APIStatusError) and exc.type in types

    return match


def _midstream(*types: str) -> Predicate:
    """An error object under status 200 (an ``error`` event inside a stream, or a JSON body
    that is an error) whose ``error.type`` is in ``types`` (or is any)."""

    def match(exc: BaseException) -> bool:
        in_success = isinstance(exc, ErrorObject) or (
            isinstance(exc, anthropic.APIStatusError) and exc.status_code == 200
        )
        kind = getattr(exc, "type", None)
        return in_success and kind is not None and (not types or kind in types)

    return match


def _quota_code(exc: BaseException) -> bool:
    return isinstance(exc, anthropic.APIStatusError) and exc.error_code in _QUOTA_CODES


def _quota_message(exc: BaseException) -> bool:
    """A 400 or 403 whose message says the account is out of credit or over its spend limit."""
    if not isinstance(exc, anthropic.APIStatusError) or exc.status_code not in (400, 403):
        return False
    text = (exc.api_message or exc.message).lower()
    return any(word in text for word in _QUOTA_WORDS)


TABLE: Table = (
    # when                                                     outcome         reason
    # A client that gave up following redirects: a wrong base_url, loud and permanent.
    (redirect_loop,                                            PermanentError, "config"),
    (anthropic.APITimeoutError,                                TransientError, "timeout"),
    (anthropic.APIConnectionError,                             TransientError, "connection"),
    (anthropic.APIResponseValidationError,                     TransientError, "bad_response"),
    (_quota_code,                                              PermanentError, "quota"),
    (_error_type("billing_error"),                             PermanentError, "quota"),
    (_status(402),                                             PermanentError, "quota"),
    (_quota_message,                                           PermanentError, "quota"),
    # An `error` event after the stream began: status 200, meaning in error.type.
    (_midstream("overloaded_error"),                           TransientError, "overloaded"),
    (_midstream("api_error"),                                  TransientError, "server_error"),
    (_midstream("timeout_error"),                              TransientError, "timeout"),
    (_midstream("rate_limit_error"),                           RateLimited,    "rate_limited"),
    (_midstream("authentication_error", "permission_error"),   PermanentError, "auth"),
    (_midstream("not_found_error"),                            PermanentError, "not_found"),
    (_midstream("request_too_large"),                          PermanentError, "too_large"),
    # Any other error type mid-stream names a problem with the request itself.
    (_midstream(),                                             PermanentError, "invalid_request"),
    *by_status(_status),
    (anthropic.RetryableError,                                 TransientError, "unknown"),
    (anthropic.APIError,                                       TransientError, "unknown"),
    *COMMON,
    # Credentials or options the SDK rejects before sending anything.
    (anthropic.AnthropicError,                                 PermanentError, "refused"),
)  # fmt: skip


def classify(exc: BaseException) -> ProviderError:
    """Translate an exception from the Anthropic SDK (or its transport) into a ``ProviderError``."""
    return classify_with(TABLE, exc)


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Head(msgspec.Struct):
    """What a reply needs of a message body; the rest is stored as sent."""

    model: str
    usage: _Usage


def _reply(body: bytes) -> Reply:
    """The reply a non-streaming Messages body makes (``MalformedResponse`` or ``ErrorObject``
    if it is none)."""
    data = decode_body(body)
    if data.get("type") != "message":
        # A 200 whose body is {"type": "error", "error": {...}}: classified by its type,
        # like a mid-stream error.
        raise ErrorObject(data.get("error"))
    head = read_fields(data, _Head)
    usage = Usage(
        input_tokens=head.usage.input_tokens or 0, output_tokens=head.usage.output_tokens or 0
    )
    whole = data.get("usage")
    return Reply(
        response=data,
        usage=usage,
        model=head.model,
        provider_usage=whole if isinstance(whole, dict) else None,
    )


#: The largest ``max_tokens`` no check of ``messages.create`` refuses unstreamed (the SDK
#: refuses a non-streaming call it expects to outlast 10 minutes, ~21k tokens, and more
#: than 8,192 for some models): above it the call goes through ``messages.create``, so
#: the SDK's own refusal still applies.
_PLAIN_MAX_TOKENS = 8192


def _plain(max_tokens: Any) -> bool:
    """Whether a call may skip ``messages.create``'s own checks (see ``_create``)."""
    return isinstance(max_tokens, int) and max_tokens <= _PLAIN_MAX_TOKENS


class AnthropicProvider:
    """A ``Provider`` over ``anthropic.AsyncAnthropic`` and the Messages API.

    The Bedrock and Vertex doors (``services.providers.clouds``) are this adapter over
    the SDK's own ``AsyncAnthropicBedrock`` / ``AsyncAnthropicVertex`` clients."""

    kind = "anthropic"
    #: The classification table this door's errors go through.
    classify = staticmethod(classify)

    def __init__(
        self,
        name: str,
        *,
        api_key: str | None,
        base_url: str | None,
        timeout_s: float = 600.0,
        deadline_s: float = 1200.0,
        max_connections: int = 1000,
        extra_headers: dict[str, str] | None = None,
        model_map: Mapping[str, str] | None = None,
        **door: Any,
    ) -> None:
        """Build one client, reused by every call; ``extra_headers`` go out on every request.

        ``timeout_s`` bounds each read, ``deadline_s`` a whole call; ``model_map`` turns a
        job's model into this door's id of it; ``door``: the cloud client's credentials."""
        self.name = name
        self.deadline_s = deadline_s
        self.model_map = dict(model_map or {})
        limits = httpx2.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        timeout = httpx2.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self._client = self._make_client(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            default_headers=extra_headers,
            http_client=anthropic.DefaultAioHttpClient(timeout=timeout, limits=limits),
            # The SDK's own spans: off while ours are, metadata only (no prompt) when on.
            open_telemetry=tracing.sdk_option(),
            **door,
        )
        self._create_params = sdk_params(self._client.messages.create)
        #: The first party's plain calls go straight to aiohttp (``_Direct``); a cloud
        #: door's are signed by its SDK client for each request.
        self._direct = (
            _Direct(self._client, timeout_s, max_connections) if self.kind == "anthropic" else None
        )
        self._create_required = sdk_required(self._client.messages.create)
        self._stream_params = sdk_params(self._client.messages.stream)
        self._beta_create_params = sdk_params(self._client.beta.messages.create)
        self._beta_stream_params = sdk_params(self._client.beta.messages.stream)

    def _make_client(self, **options: Any) -> Any:
        """The SDK client this door calls through."""
        return anthropic.AsyncAnthropic(**options)

    async def call(
        self,
        model: str,
        request: dict[str, Any],
        *,
        probe: bool = False,
        betas: Sequence[str] = (),
    ) -> Reply:
        """Send ``request`` with ``model`` (through ``model_map``), and ``betas`` as the SDK
        sends them (``client.beta.messages``); stream if it asks to; raise only
        ``ProviderError``."""
        headers = _PROBE_HEADERS if probe else None
        model = self.model_map.get(model, model)
        try:
            # `timeout_s` bounds each read; this bounds the whole call, so a provider that
            # keeps a call alive without finishing it (pings, a trickled body) cannot hold
            # a worker's slot for ever.
            async with asyncio.timeout(self.deadline_s):
                if request.get("stream"):
                    message = await self._stream(model, request, headers, betas)
                    usage = message.usage
                    return Reply(
                        response=message.to_dict(mode="json"),
                        usage=Usage(
                            input_tokens=usage.input_tokens or 0,
                            output_tokens=usage.output_tokens or 0,
                        ),
                        model=message.model,
                        provider_usage=usage.to_dict(mode="json"),
                    )
                return await self._create(model, request, headers, betas)
        except Exception as exc:
            raise self.classify(exc) from exc

    async def _create(
        self,
        model: str,
        request: dict[str, Any],
        headers: dict[str, str] | None,
        betas: Sequence[str],
    ) -> Reply:
        body = {**request, "model": model}
        plain = not betas and _plain(body.get("max_tokens"))
        if plain and self._direct is not None:
            refuse_missing(body, self._create_required)
            return _reply(await self._direct.post(body, headers))
        if plain:
            # A job's request is already the wire body: posted as it is through the
            # client, the SDK still builds the request (auth, version and platform headers;
            # each cloud door its own URL and signature) and raises its own error types for
            # an error status, but neither transforms the parameters nor builds a Message
            # of the answer (about 0.3 ms of CPU a call less than `messages.create`:
            # scripts/provider_call_cpu.py).
            refuse_missing(body, self._create_required)
            options: dict[str, Any] = {"headers": headers} if headers else {}
            response = await self._client.post(
                "/v1/messages", cast_to=httpx2.Response, body=body, options=options
            )
            return _reply(await response.aread())
        messages, kwargs, extra = self._messages(
            body, betas, self._create_params, self._beta_create_params
        )
        # The raw path: the SDK builds and sends the request and raises its own errors for
        # an error status, but builds no Message of the answer.
        raw = await messages.with_raw_response.create(
            **kwargs, extra_headers=headers, extra_body=extra or None
        )
        return _reply(await raw.read())

    def _messages(
        self,
        body: dict[str, Any],
        betas: Sequence[str],
        params: frozenset[str],
        beta_params: frozenset[str],
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """The SDK resource a call goes through (``beta.messages`` when the job has betas,
        sent as the SDK sends them) and the body split into its known keyword arguments
        and the rest (``extra_body``)."""
        if betas:
            kwargs, extra = split_known({**body, "betas": list(betas)}, beta_params)
            return self._client.beta.messages, kwargs, extra
        kwargs, extra = split_known(body, params)
        return self._client.messages, kwargs, extra

    async def _stream(
        self,
        model: str,
        request: dict[str, Any],
        headers: dict[str, str] | None,
        betas: Sequence[str],
    ) -> Any:
        body = {k: v for k, v in request.items() if k != "stream"}
        body["model"] = model
        messages, kwargs, extra = self._messages(
            body, betas, self._stream_params, self._beta_stream_params
        )
        stopped = False
        async with messages.stream(
            **kwargs, extra_headers=headers, extra_body=extra or None
        ) as stream:
            try:
                async for event in stream:
                    if event.type == "message_stop":
                        stopped = True
                message = stream.current_message_snapshot
            except _ASSEMBLY_ERRORS as exc:
                raise MalformedResponse(f"could not assemble the streamed message: {exc}") from exc
        if not stopped:
            raise MalformedResponse("the stream ended before message_stop")
        return message

    async def aclose(self) -> None:
        """Close the HTTP clients and their connections."""
        if self._direct is not None:
            await self._direct.aclose()
        await self._client.close()


class _Direct:
    """A first-party plain call (no betas, no stream), sent on a bare aiohttp session
    with the headers the SDK client sends on every request (auth, ``anthropic-version``,
    platform and extra headers, read from it once): the SDK's request building and HTTP
    stack cost about 0.6 ms of CPU a call, more than the rest of a job. An error status is
    turned into the SDK's own exception (``_make_status_error_from_response``), a failed
    connection or read into its ``APIConnectionError`` / ``APITimeoutError``, so the
    classification table sees exactly what it would through the SDK.
    """

    def __init__(self, client: Any, timeout_s: float, max_connections: int) -> None:
        self._client = client
        self.url = f"{str(client.base_url).rstrip('/')}/v1/messages"
        self.headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=min(timeout_s, 5.0), sock_read=timeout_s
        )
        self._limit = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=self._timeout,
                skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding"),
            )
        return self._session

    async def post(self, body: dict[str, Any], headers: Mapping[str, str] | None) -> bytes:
        """The body of a 2xx answer to ``body``; the SDK's exception otherwise."""
        sent = {**self.headers, **headers} if headers else self.headers
        try:
            async with self._open().post(
                self.url, data=msgspec.json.encode(body), headers=sent
            ) as response:
                data = await response.read()
                status = response.status
                if status < 400:
                    return data
                answer = list(response.headers.items())
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise anthropic.APITimeoutError(request=self._request()) from exc
        except aiohttp.TooManyRedirects as exc:  # what the SDK's transport says of it
            message = "Exceeded maximum allowed redirects."
            raise anthropic.APIConnectionError(message=message, request=self._request()) from exc
        except aiohttp.ClientError as exc:
            raise anthropic.APIConnectionError(request=self._request()) from exc
        raise self._client._make_status_error_from_response(
            httpx2.Response(status, headers=answer, content=data, request=self._request())
        )

    def _request(self) -> httpx2.Request:
        return httpx2.Request("POST", self.url)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
