"""Translating a request body between the Anthropic Messages and OpenAI Chat Completions shapes.

When a provider is down a job may fail over to a target of the other wire shape.
These pure functions translate the provider-native request body (without
``model``, which travels separately) for the subset of requests that mean the
same thing on both sides, and raise ``Unmappable`` for everything else: the
worker parks such a job rather than send something that means something else.

The mapping::

    Anthropic Messages                     OpenAI Chat Completions
    -------------------------------------  ------------------------------------------------
    system: str                        <-> leading {"role": "system", "content": str}
    system: [text block, ...]          <-> leading {"role": "system", "content": [text part, ...]}
    system: [text block, ...]          <-  several leading "system"/"developer" messages,
                                           one block per string content or text part
    messages[i] user|assistant, str    <-> same role, str content
    messages[i] user|assistant, blocks <-> same role, [{"type": "text", "text": ...}, ...]
    max_tokens (required)               -> max_completion_tokens
    max_tokens                         <-  max_completion_tokens or max_tokens
    temperature (0..1)                 <-> temperature (refused above 1 towards Anthropic)
    top_p (0..1)                       <-> top_p
    stop_sequences: [str, ...]          -> stop: [str, ...] (at most 4)
    stop_sequences: [str, ...]         <-  stop: str | [str, ...]
    stream: bool                       <-> stream: bool
    metadata.user_id                    -> safety_identifier
    metadata.user_id                   <-  safety_identifier or (deprecated) user
    (the same behaviour)               <-  n=1, logprobs=false, presence_penalty=0,
                                           frequency_penalty=0 (the defaults; dropped)

Refused (``Unmappable``, naming the field): tools and tool choice, tool calls
and tool results, images, documents and every other non-text content, thinking,
``top_k``, ``n`` other than 1, ``response_format``, log probabilities,
penalties other than 0, ``seed``, ``metadata`` keys other than ``user_id``,
cache control and citations on text blocks, participant ``name``, roles other
than system/developer/user/assistant, a system message after the first
user/assistant message, two consecutive assistant messages, a conversation
that ends with an assistant message, a request without ``max_tokens`` (both
ways: Anthropic requires it), and every key not listed above.

Decisions:

* A key whose value is ``null`` (``None``) is treated as absent, on the request
  and on its messages and blocks: JSON null means "unset" in both APIs.
* Several leading system messages become a list of system text blocks, one per
  string content or text part, in order; empty strings are left out (Anthropic
  refuses empty text blocks). They are not joined with ``"\\n\\n"``: that would
  put text in the prompt that nobody wrote. A single system message keeps its
  shape (string or list). Anthropic's ``system`` becomes one ``"system"``
  message, never ``"developer"``: OpenAI itself reads ``system`` as
  ``developer`` for the models that want it, and compatible servers know only
  ``system``.
* Consecutive user messages are allowed both ways: Anthropic combines them into
  one turn, OpenAI keeps them apart; the model reads the same text in the same
  order. Consecutive assistant messages are refused: Anthropic would merge two
  replies into one, which changes what the model "said".
* A final assistant message is refused both ways: Anthropic continues it
  (prefill), OpenAI answers it with a new message.
* Towards OpenAI, ``max_tokens`` becomes ``max_completion_tokens``, the field
  current OpenAI models accept (reasoning models refuse ``max_tokens``).
* ``temperature`` and ``top_p`` must lie in 0..1 both ways (Anthropic's range);
  values are copied unchanged (an ``int`` stays an ``int``).
* Empty ``system``/``stop_sequences``/``stop`` lists and a ``metadata`` without
  ``user_id`` mean "none" and are left out.

Normal form: for an Anthropic request in the faithful subset,
``to_anthropic(to_openai(r))`` equals ``r`` with null-valued keys, an empty
``system`` list, an empty ``stop_sequences`` list and a ``metadata`` without a
``user_id`` left out. String content stays a string and block lists stay block
lists; nothing else changes.

Only request bodies are translated; the reply comes back in the shape of the
provider that answered.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any, Final, Literal, TypeAlias

from services.errors import Unmappable

Kind: TypeAlias = Literal["anthropic", "openai"]
Content: TypeAlias = str | list[dict[str, Any]]

_KINDS: Final = ("anthropic", "openai")
_MAX_OPENAI_STOP: Final = 4


# Top-level keys each direction understands.
_ANTHROPIC_KEYS: Final = frozenset(
    {
        "system",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "stop_sequences",
        "stream",
        "metadata",
    }
)
_OPENAI_KEYS: Final = frozenset(
    {
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "safety_identifier",
        "user",
    }
)

# Known keys with no faithful counterpart, and why; any other unknown key is
# refused too, with a generic reason.
_ANTHROPIC_REFUSED: Final[Mapping[str, str]] = {
    "tools": "tool definitions are not translated",
    "tool_choice": "tool choice is not translated",
    "thinking": "extended thinking has no Chat Completions equivalent",
    "top_k": "OpenAI has no top_k",
    "service_tier": "service tiers differ between providers",
    "cache_control": "OpenAI has no cache control",
    "container": "OpenAI has no containers",
    "mcp_servers": "OpenAI Chat Completions has no MCP servers",
    "output_config": "output configuration is not translated",
}
_OPENAI_REFUSED: Final[Mapping[str, str]] = {
    "tools": "tool definitions are not translated",
    "tool_choice": "tool choice is not translated",
    "functions": "function definitions are not translated",
    "function_call": "function calling is not translated",
    "parallel_tool_calls": "tool calling is not translated",
    "response_format": "Anthropic has no response_format",
    "top_logprobs": "Anthropic returns no log probabilities",
    "logit_bias": "Anthropic has no logit bias",
    "seed": "Anthropic has no seed",
    "reasoning_effort": "reasoning effort is not translated",
    "audio": "Anthropic has no audio output",
    "modalities": "Anthropic has no output modalities",
    "prediction": "Anthropic has no predicted outputs",
    "metadata": "OpenAI metadata (stored completions) has no Anthropic equivalent",
    "store": "Anthropic does not store completions",
    "service_tier": "service tiers differ between providers",
    "stream_options": "stream options are not translated",
    "web_search_options": "web search is not translated",
    "verbosity": "Anthropic has no verbosity setting",
    "prompt_cache_key": "Anthropic has no prompt cache key",
}


def _is_zero(value: Any) -> bool:
    return _is_number(value) and value == 0


# OpenAI keys whose default value means what Anthropic always does: dropped
# when they hold that value, refused otherwise.
_OPENAI_DEFAULTS: Final[Mapping[str, tuple[Callable[[Any], bool], str]]] = {
    "n": (lambda v: type(v) is int and v == 1, "Anthropic returns one choice; only n=1 maps"),
    "logprobs": (lambda v: v is False, "Anthropic returns no log probabilities"),
    "presence_penalty": (_is_zero, "Anthropic has no presence penalty; only 0 maps"),
    "frequency_penalty": (_is_zero, "Anthropic has no frequency penalty; only 0 maps"),
}
_OPENAI_ACCEPTED: Final = _OPENAI_KEYS | frozenset(_OPENAI_DEFAULTS)


def to_openai(request: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an Anthropic Messages body into an OpenAI Chat Completions body.

    Raises ``Unmappable`` naming the field when the request uses anything
    outside the faithful subset described in the module docstring. The input
    is not modified and shares no mutable part with the result.
    """
    fields = _set_fields(request, "request")
    _check_keys(fields, _ANTHROPIC_KEYS, _ANTHROPIC_REFUSED, "OpenAI")

    messages: list[dict[str, Any]] = []
    if "system" in fields:
        system = _anthropic_system(fields["system"])
        if system != []:
            messages.append({"role": "system", "content": system})
    turns: list[tuple[int, str]] = []
    for i, raw in enumerate(_message_list(fields)):
        at = f"messages[{i}]"
        message = _set_fields(raw, at)
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise Unmappable(f"{at}.role", f"{role!r} messages cannot be mapped to OpenAI")
        _only_keys(message, ("role", "content"), at, "OpenAI")
        messages.append({"role": role, "content": _content(message, at, "OpenAI")})
        turns.append((i, role))
    _check_turns(turns)

    out: dict[str, Any] = {"messages": messages}
    max_tokens = _positive_int(fields, "max_tokens")
    if max_tokens is None:
        raise Unmappable("max_tokens", "required in an Anthropic request, and missing")
    out["max_completion_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        if key in fields:
            out[key] = _unit_interval(fields, key)
    if "stop_sequences" in fields:
        stops = _strings(fields["stop_sequences"], "stop_sequences")
        if len(stops) > _MAX_OPENAI_STOP:
            raise Unmappable(
                "stop_sequences",
                f"{len(stops)} stop sequences; OpenAI accepts at most {_MAX_OPENAI_STOP}",
            )
        if stops:
            out["stop"] = stops
    if "stream" in fields:
        out["stream"] = _bool(fields, "stream")
    if "metadata" in fields:
        user_id = _anthropic_user_id(fields["metadata"])
        if user_id is not None:
            out["safety_identifier"] = user_id
    return out


def to_anthropic(request: Mapping[str, Any]) -> dict[str, Any]:
    """Translate an OpenAI Chat Completions body into an Anthropic Messages body.

    Raises ``Unmappable`` naming the field when the request uses anything
    outside the faithful subset described in the module docstring, including a
    request with neither ``max_tokens`` nor ``max_completion_tokens`` and a
    ``temperature`` above 1. The input is not modified and shares no mutable
    part with the result.
    """
    fields = _set_fields(request, "request")
    _check_keys(fields, _OPENAI_ACCEPTED, _OPENAI_REFUSED, "Anthropic")
    for key, (is_default, reason) in _OPENAI_DEFAULTS.items():
        if key in fields and not is_default(fields[key]):
            raise Unmappable(key, f"{fields[key]!r}: {reason}")

    system: list[Content] = []
    messages: list[dict[str, Any]] = []
    turns: list[tuple[int, str]] = []
    for i, raw in enumerate(_message_list(fields)):
        at = f"messages[{i}]"
        message = _set_fields(raw, at)
        role = message.get("role")
        if role in ("system", "developer"):
            if messages:
                raise Unmappable(
                    f"{at}.role",
                    f"a {role} message after the first user or assistant message; "
                    "Anthropic has one system prompt, before the conversation",
                )
            _only_keys(message, ("role", "content"), at, "Anthropic")
            system.append(_content(message, at, "Anthropic"))
        elif role in ("user", "assistant"):
            _only_keys(message, ("role", "content"), at, "Anthropic")
            messages.append({"role": role, "content": _content(message, at, "Anthropic")})
            turns.append((i, role))
        else:
            raise Unmappable(f"{at}.role", f"{role!r} messages cannot be mapped to Anthropic")
    _check_turns(turns)

    out: dict[str, Any] = {}
    anthropic_system = _joined_system(system)
    if anthropic_system is not None:
        out["system"] = anthropic_system
    out["messages"] = messages
    out["max_tokens"] = _openai_max_tokens(fields)
    for key in ("temperature", "top_p"):
        if key in fields:
            out[key] = _unit_interval(fields, key)
    if "stop" in fields:
        stop = fields["stop"]
        stops = [stop] if isinstance(stop, str) else _strings(stop, "stop")
        if stops:
            out["stop_sequences"] = stops
    if "stream" in fields:
        out["stream"] = _bool(fields, "stream")
    user_id = _openai_user_id(fields)
    if user_id is not None:
        out["metadata"] = {"user_id": user_id}
    return out


def convert(request: Mapping[str, Any], *, src_kind: Kind, dst_kind: Kind) -> dict[str, Any]:
    """Translate ``request`` from the ``src_kind`` shape to the ``dst_kind`` shape.

    Equal kinds give a deep copy, unchecked. Raises ``Unmappable`` as
    ``to_openai``/``to_anthropic`` do, and for a kind that is neither
    ``"anthropic"`` nor ``"openai"``.
    """
    for name, kind in (("src_kind", src_kind), ("dst_kind", dst_kind)):
        if kind not in _KINDS:
            raise Unmappable(name, f"unknown provider kind {kind!r}")
    if src_kind == dst_kind:
        return copy.deepcopy(dict(request))
    if dst_kind == "openai":
        return to_openai(request)
    return to_anthropic(request)


def shape_of(kind: str) -> Kind:
    """The request shape of a provider kind: every ``anthropic*`` kind speaks the Messages
    API (``services.providers.doors``), ``openai`` Chat Completions."""
    return "anthropic" if kind.startswith("anthropic") else "openai"


# --- shared checks -------------------------------------------------------------


def _set_fields(value: Any, where: str) -> dict[str, Any]:
    """The object's keys that are set: JSON null means unset in both APIs."""
    if not isinstance(value, Mapping):
        raise Unmappable(where, f"expected an object, got {type(value).__name__}")
    return {str(k): v for k, v in value.items() if v is not None}


def _check_keys(
    fields: Mapping[str, Any],
    known: frozenset[str],
    refused: Mapping[str, str],
    target: str,
) -> None:
    """Refuse the first key outside ``known``, with its reason if it has one."""
    for key in fields:
        if key not in known:
            reason = refused.get(key, f"not translated to {target}; refused rather than dropped")
            raise Unmappable(key, reason)


def _only_keys(
    fields: Mapping[str, Any], allowed: tuple[str, ...], where: str, target: str
) -> None:
    """Refuse any key of a message or block outside ``allowed``."""
    for key in fields:
        if key not in allowed:
            raise Unmappable(f"{where}.{key}", f"has no {target} equivalent")


def _message_list(fields: Mapping[str, Any]) -> list[Any]:
    messages = fields.get("messages")
    if not isinstance(messages, list):
        raise Unmappable("messages", "expected a list of messages")
    return messages


def _content(message: Mapping[str, Any], where: str, target: str) -> Content:
    """A message's content, copied: a string, or a list of text blocks (same shape both ways)."""
    content = message.get("content")
    at = f"{where}.content"
    if content is None:
        raise Unmappable(at, "missing")
    if isinstance(content, str):
        return content
    return _text_blocks(content, at, target)


def _text_blocks(value: Any, where: str, target: str) -> list[dict[str, Any]]:
    """A list of ``{"type": "text", "text": ...}`` blocks, copied; anything else refused."""
    if not isinstance(value, list):
        raise Unmappable(where, "expected a string or a list of text blocks")
    blocks: list[dict[str, Any]] = []
    for j, raw in enumerate(value):
        at = f"{where}[{j}]"
        block = _set_fields(raw, at)
        kind = block.get("type")
        if kind != "text":
            raise Unmappable(
                f"{at}.type", f"{kind!r} content cannot be mapped to {target}; only text can"
            )
        _only_keys(block, ("type", "text"), at, target)
        text = block.get("text")
        if not isinstance(text, str):
            raise Unmappable(f"{at}.text", "expected a string")
        blocks.append({"type": "text", "text": text})
    return blocks


def _check_turns(turns: list[tuple[int, str]]) -> None:
    """Refuse conversations whose turns mean different things on the two providers.

    ``turns`` holds (index in the source ``messages``, role) of each user or
    assistant message.
    """
    if not turns:
        raise Unmappable("messages", "no user or assistant message")
    for (_, before), (i, role) in pairwise(turns):
        if before == role == "assistant":
            raise Unmappable(
                f"messages[{i}].role",
                "two consecutive assistant messages; Anthropic would merge them into one reply",
            )
    last, role = turns[-1]
    if role != "user":
        raise Unmappable(
            f"messages[{last}].role",
            "the conversation ends with an assistant message, which Anthropic continues "
            "(prefill) and OpenAI answers; only a final user message maps",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _unit_interval(fields: Mapping[str, Any], key: str) -> int | float:
    """A number in 0..1, unchanged; ``temperature`` above 1 has no Anthropic equivalent."""
    value = fields[key]
    if not _is_number(value):
        raise Unmappable(key, f"expected a number, got {value!r}")
    number: int | float = value
    if not 0 <= number <= 1:
        raise Unmappable(key, f"{number!r} is outside 0..1, the range both providers share")
    return number


def _positive_int(fields: Mapping[str, Any], key: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise Unmappable(key, f"expected a positive integer, got {value!r}")
    return value


def _bool(fields: Mapping[str, Any], key: str) -> bool:
    value = fields[key]
    if not isinstance(value, bool):
        raise Unmappable(key, f"expected true or false, got {value!r}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise Unmappable(where, "expected a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise Unmappable(f"{where}[{i}]", "expected a string")
    return list(value)


# --- Anthropic side ------------------------------------------------------------


def _anthropic_system(value: Any) -> Content:
    """Anthropic ``system`` as OpenAI system message content (an empty list means none)."""
    if isinstance(value, str):
        return value
    return _text_blocks(value, "system", "OpenAI")


def _anthropic_user_id(value: Any) -> str | None:
    """``metadata.user_id``, the one metadata key OpenAI can carry."""
    metadata = _set_fields(value, "metadata")
    _only_keys(metadata, ("user_id",), "metadata", "OpenAI")
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise Unmappable("metadata.user_id", "expected a string")
    return user_id


# --- OpenAI side ---------------------------------------------------------------


def _joined_system(contents: list[Content]) -> Content | None:
    """Leading OpenAI system messages as Anthropic ``system``, or None for no system prompt.

    One message keeps its shape; several become one text block per string or
    part, in order, without inventing separators.
    """
    if len(contents) == 1 and isinstance(contents[0], str):
        return contents[0]
    blocks: list[dict[str, Any]] = []
    for content in contents:
        if isinstance(content, str):
            if content:
                blocks.append({"type": "text", "text": content})
        else:
            blocks.extend(content)
    return blocks or None


def _openai_max_tokens(fields: Mapping[str, Any]) -> int:
    """``max_completion_tokens`` or ``max_tokens``; Anthropic requires one."""
    completion = _positive_int(fields, "max_completion_tokens")
    legacy = _positive_int(fields, "max_tokens")
    if completion is not None and legacy is not None and completion != legacy:
        raise Unmappable(
            "max_tokens",
            f"max_tokens={legacy} and max_completion_tokens={completion} disagree",
        )
    chosen = completion if completion is not None else legacy
    if chosen is None:
        raise Unmappable(
            "max_tokens",
            "Anthropic requires max_tokens; the request sets neither max_tokens "
            "nor max_completion_tokens",
        )
    return chosen


def _openai_user_id(fields: Mapping[str, Any]) -> str | None:
    """``safety_identifier`` or the deprecated ``user``, as Anthropic ``metadata.user_id``."""
    found: dict[str, str] = {}
    for key in ("safety_identifier", "user"):
        if key in fields:
            value = fields[key]
            if not isinstance(value, str):
                raise Unmappable(key, "expected a string")
            found[key] = value
    if len(set(found.values())) > 1:
        raise Unmappable("user", "user and safety_identifier disagree; Anthropic has one user_id")
    return next(iter(found.values()), None)
