"""What every provider adapter offers, and the reply it returns.

An adapter wraps one official SDK client (SDK retries off: the queue owns
retries) and translates every SDK exception into one ``ProviderError`` of
``services.errors`` through its module's classification table.

A non-streaming reply is stored as the provider sent it, so adapters take the SDK's
raw-response path (its request building, auth, transport and error types, but not its
response models) and read the few fields they need with ``decode_body``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

import msgspec

from schemas.results import Usage
from services.providers.classify import MalformedResponse

S = TypeVar("S", bound=msgspec.Struct)

_JSON = msgspec.json.Decoder()


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """A successful provider call: the provider-native response body and its usage."""

    response: dict[str, Any]
    usage: Usage
    model: str
    #: The provider's whole usage object, as it sent it (None: it sent none).
    provider_usage: dict[str, Any] | None = None


class Provider(Protocol):
    """A provider the worker can call."""

    name: str

    async def call(
        self,
        model: str,
        request: dict[str, Any],
        *,
        probe: bool = False,
        betas: Sequence[str] = (),
    ) -> Reply:
        """Send ``request`` (provider-native body without ``model``) and return the reply.

        Streams when ``request`` has ``"stream": true`` and returns the assembled
        message. Raises ``ProviderError`` (never an SDK exception). ``probe`` marks
        health probes so the far end can tell them apart. ``betas``: the job's beta flags
        (an Anthropic door sends them as the SDK does; no other door gets any). The
        adapter maps ``model`` through its provider's ``model_map``.
        """
        ...

    async def aclose(self) -> None:
        """Close the underlying HTTP client."""
        ...


def sdk_params(method: Any) -> frozenset[str]:
    """The request fields an SDK ``method`` takes as keywords (not its transport options)."""
    names = inspect.signature(method).parameters
    return frozenset(names) - {"extra_headers", "extra_query", "extra_body", "timeout"}


def sdk_required(method: Any) -> frozenset[str]:
    """The request fields an SDK ``method`` cannot be called without."""
    return frozenset(
        name
        for name, param in inspect.signature(method).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty
    )


def refuse_missing(body: Mapping[str, Any], required: frozenset[str]) -> None:
    """Refuse ``body`` as the SDK's own call would (a ``TypeError``, before any request) when
    it lacks a field the SDK requires."""
    if missing := sorted(required.difference(body)):
        raise TypeError(f"missing required keyword argument(s): {', '.join(map(repr, missing))}")


def split_known(
    body: dict[str, Any], known: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments the SDK knows, and the rest, sent as-is in the JSON body."""
    if known.issuperset(body):
        return body, {}
    kwargs = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    return kwargs, extra


def decode_body(body: bytes) -> dict[str, Any]:
    """The JSON object ``body`` holds (``MalformedResponse``, a transient
    ``bad_response``, if it is not JSON, or not an object)."""
    try:
        data = _JSON.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedResponse(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedResponse(f"the body is JSON but not an object: {type(data).__name__}")
    return data


def read_fields(data: dict[str, Any], shape: type[S]) -> S:
    """The fields of ``shape`` in ``data`` (others ignored; ``MalformedResponse`` on a wrong
    type or a missing field)."""
    try:
        return msgspec.convert(data, shape)
    except msgspec.ValidationError as exc:
        raise MalformedResponse(f"the body is not of the expected shape: {exc}") from None
