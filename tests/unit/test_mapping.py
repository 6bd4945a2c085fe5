"""Request translation between Anthropic Messages and OpenAI Chat Completions bodies."""

from __future__ import annotations

import copy
import pickle
from itertools import takewhile
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.errors import RidethroughError, Unmappable
from services.providers.mapping import convert, to_anthropic, to_openai

OPENAI_OUT_KEYS = {
    "messages",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "safety_identifier",
}
OPENAI_DEFAULTS = {"n", "logprobs", "presence_penalty", "frequency_penalty"}


def text(t: str) -> dict[str, Any]:
    """A text block (Anthropic) or text part (OpenAI): the same shape."""
    return {"type": "text", "text": t}


def user(content: Any = "hi") -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any = "hello") -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def anthropic(**fields: Any) -> dict[str, Any]:
    """A minimal valid Anthropic body, with ``fields`` added or replaced."""
    return {"messages": [user()], "max_tokens": 64, **fields}


def openai(**fields: Any) -> dict[str, Any]:
    """A minimal valid OpenAI body, with ``fields`` added or replaced."""
    return {"messages": [user()], "max_completion_tokens": 64, **fields}


# --- generators of the faithful subset -------------------------------------------

texts = st.text(max_size=30)
blocks = st.lists(texts.map(text), max_size=3)
contents = st.one_of(texts, blocks)
unit = st.one_of(st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=1))


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """1-6 alternating user/assistant messages ending with a user message."""
    n = draw(st.integers(min_value=1, max_value=6))
    roles = ["user" if (n - 1 - i) % 2 == 0 else "assistant" for i in range(n)]
    return [{"role": role, "content": draw(contents)} for role in roles]


def maybe(draw: st.DrawFn, out: dict[str, Any], key: str, values: st.SearchStrategy[Any]) -> None:
    """Leave ``key`` out, set it to null, or set it to one of ``values``."""
    choice = draw(st.sampled_from(["absent", "null", "set"]))
    if choice == "null":
        out[key] = None
    elif choice == "set":
        out[key] = draw(values)


@st.composite
def anthropic_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Anthropic bodies within the faithful subset, including its degenerate spellings."""
    r: dict[str, Any] = {
        "messages": draw(conversations()),
        "max_tokens": draw(st.integers(min_value=1, max_value=200_000)),
    }
    maybe(draw, r, "system", contents)
    maybe(draw, r, "temperature", unit)
    maybe(draw, r, "top_p", unit)
    maybe(draw, r, "stop_sequences", st.lists(texts, max_size=4))
    maybe(draw, r, "stream", st.booleans())
    maybe(draw, r, "metadata", st.one_of(st.just({}), st.fixed_dictionaries({"user_id": texts})))
    return r


def anthropic_normal_form(r: dict[str, Any]) -> dict[str, Any]:
    """``r`` without null values, empty ``system``/``stop_sequences``, empty ``metadata``."""
    out = {k: v for k, v in r.items() if v is not None}
    for key in ("system", "stop_sequences"):
        if out.get(key) == []:
            del out[key]
    if "metadata" in out and out["metadata"].get("user_id") is None:
        del out["metadata"]
    return out


@st.composite
def openai_requests(draw: st.DrawFn) -> dict[str, Any]:
    """OpenAI bodies within the faithful subset, including aliases and spelled-out defaults."""
    system = draw(
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "developer"]), "content": contents}
            ),
            max_size=2,
        )
    )
    r: dict[str, Any] = {"messages": system + draw(conversations())}
    limit = draw(st.integers(min_value=1, max_value=200_000))
    for key in draw(
        st.sampled_from(
            [["max_completion_tokens"], ["max_tokens"], ["max_tokens", "max_completion_tokens"]]
        )
    ):
        r[key] = limit
    maybe(draw, r, "temperature", unit)
    maybe(draw, r, "top_p", unit)
    maybe(draw, r, "stop", st.one_of(texts, st.lists(texts, max_size=4)))
    maybe(draw, r, "stream", st.booleans())
    identity = draw(texts)
    maybe(draw, r, "user", st.just(identity))
    maybe(draw, r, "safety_identifier", st.just(identity))
    maybe(draw, r, "n", st.just(1))
    maybe(draw, r, "logprobs", st.just(False))
    maybe(draw, r, "presence_penalty", st.sampled_from([0, 0.0]))
    maybe(draw, r, "frequency_penalty", st.sampled_from([0, 0.0]))
    return r


def openai_normal_form(r: dict[str, Any]) -> dict[str, Any]:
    """What ``to_openai(to_anthropic(r))`` gives for a body of the faithful subset.

    Nulls and spelled-out defaults go; leading system/developer messages become
    one system message (a single string one is kept, several become text parts
    with empty strings left out); ``max_tokens`` becomes ``max_completion_tokens``;
    a ``stop`` string becomes a list and an empty list goes; ``user`` becomes
    ``safety_identifier``.
    """
    out = {k: v for k, v in r.items() if v is not None and k not in OPENAI_DEFAULTS}
    leading = list(takewhile(lambda m: m["role"] in ("system", "developer"), r["messages"]))
    system: list[dict[str, Any]] = []
    if len(leading) == 1 and isinstance(leading[0]["content"], str):
        system = [{"role": "system", "content": leading[0]["content"]}]
    else:
        parts: list[dict[str, Any]] = []
        for m in leading:
            if isinstance(m["content"], str):
                parts.extend([text(m["content"])] if m["content"] else [])
            else:
                parts.extend(m["content"])
        system = [{"role": "system", "content": parts}] if parts else []
    out["messages"] = system + r["messages"][len(leading) :]
    out["max_completion_tokens"] = out.pop("max_tokens", None) or out["max_completion_tokens"]
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if out.get("stop") == []:
        del out["stop"]
    if "user" in out:
        out["safety_identifier"] = out.pop("user")
    return out


# --- round trips -----------------------------------------------------------------


@given(anthropic_requests())
def test_anthropic_round_trip_gives_the_normal_form(r: dict[str, Any]) -> None:
    """to_anthropic(to_openai(r)) is r in normal form, and r itself is left untouched."""
    before = copy.deepcopy(r)
    body = to_openai(r)
    assert set(body) <= OPENAI_OUT_KEYS
    assert to_anthropic(body) == anthropic_normal_form(r)
    assert r == before


@given(openai_requests())
def test_openai_round_trip_gives_the_normal_form(r: dict[str, Any]) -> None:
    """to_openai(to_anthropic(r)) is r in the documented OpenAI normal form."""
    before = copy.deepcopy(r)
    assert to_openai(to_anthropic(r)) == openai_normal_form(r)
    assert r == before


@given(anthropic_requests())
def test_convert_between_equal_kinds_is_a_deep_copy(r: dict[str, Any]) -> None:
    """convert() with equal kinds returns an equal body that shares nothing mutable."""
    out = convert(r, src_kind="anthropic", dst_kind="anthropic")
    assert out == r
    assert out["messages"] is not r["messages"]


# --- examples --------------------------------------------------------------------


def test_anthropic_body_becomes_the_expected_openai_body() -> None:
    """A full Anthropic body maps field by field onto Chat Completions."""
    body = {
        "system": "Be brief.",
        "messages": [user("a"), assistant([text("b")]), user([text("c"), text("d")])],
        "max_tokens": 100,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": True,
        "metadata": {"user_id": "u-1"},
    }
    assert to_openai(body) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            user("a"),
            assistant([text("b")]),
            user([text("c"), text("d")]),
        ],
        "max_completion_tokens": 100,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END"],
        "stream": True,
        "safety_identifier": "u-1",
    }


def test_openai_body_becomes_the_expected_anthropic_body() -> None:
    """A full Chat Completions body maps field by field onto Anthropic Messages."""
    body = {
        "messages": [{"role": "developer", "content": "Be brief."}, user("a")],
        "max_tokens": 100,
        "temperature": 1,
        "top_p": 0.9,
        "stop": "END",
        "stream": False,
        "user": "u-1",
    }
    assert to_anthropic(body) == {
        "system": "Be brief.",
        "messages": [user("a")],
        "max_tokens": 100,
        "temperature": 1,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "stream": False,
        "metadata": {"user_id": "u-1"},
    }


def test_system_blocks_become_one_system_message_with_text_parts() -> None:
    """An Anthropic system block list becomes one system message keeping the parts."""
    body = to_openai(anthropic(system=[text("a"), text("b")]))
    assert body["messages"][0] == {"role": "system", "content": [text("a"), text("b")]}


def test_several_system_messages_become_system_blocks_without_separators() -> None:
    """Leading system/developer messages become one text block each; empty strings go."""
    body = openai(
        messages=[
            {"role": "system", "content": "a"},
            {"role": "developer", "content": ""},
            {"role": "system", "content": [text("b"), text("c")]},
            user(),
        ]
    )
    assert to_anthropic(body)["system"] == [text("a"), text("b"), text("c")]


def test_consecutive_user_messages_are_kept_both_ways() -> None:
    """Consecutive user messages map unchanged (Anthropic merges them into one turn)."""
    messages = [user("a"), user("b")]
    assert to_openai(anthropic(messages=messages))["messages"] == messages
    assert to_anthropic(openai(messages=messages))["messages"] == messages


def test_openai_defaults_are_dropped() -> None:
    """n=1, logprobs=false and zero penalties mean what Anthropic always does."""
    body = openai(n=1, logprobs=False, presence_penalty=0, frequency_penalty=0.0)
    assert to_anthropic(body) == {"messages": [user()], "max_tokens": 64}


def test_equal_max_tokens_aliases_are_accepted() -> None:
    """max_tokens and max_completion_tokens may both be set when they agree."""
    assert to_anthropic(openai(max_tokens=64))["max_tokens"] == 64


def test_null_values_are_treated_as_absent() -> None:
    """JSON null means unset, on the request and on message keys."""
    body = openai(
        messages=[{"role": "user", "content": "hi", "name": None}],
        temperature=None,
        stop=None,
        tools=None,
    )
    assert to_anthropic(body) == {"messages": [user()], "max_tokens": 64}


def test_output_shares_no_mutable_part_with_the_input() -> None:
    """Changing the translated body leaves the source body alone."""
    source = anthropic(system=[text("s")], messages=[user([text("a")])])
    before = copy.deepcopy(source)
    body = to_openai(source)
    body["messages"][0]["content"][0]["text"] = "changed"
    body["messages"][1]["content"].append(text("more"))
    assert source == before


def test_convert_dispatches_on_the_kinds() -> None:
    """convert() picks to_openai or to_anthropic from the source and target kinds."""
    assert convert(anthropic(), src_kind="anthropic", dst_kind="openai") == to_openai(anthropic())
    assert convert(openai(), src_kind="openai", dst_kind="anthropic") == to_anthropic(openai())


def test_convert_refuses_an_unknown_kind() -> None:
    """An unknown provider kind is refused, naming the argument."""
    with pytest.raises(Unmappable) as info:
        convert(anthropic(), src_kind="anthropic", dst_kind="gemini")  # type: ignore[arg-type]
    assert info.value.field == "dst_kind"


def test_unmappable_is_a_value_error_in_the_error_tree() -> None:
    """Unmappable is a ValueError and a RidethroughError, and survives pickling."""
    error = Unmappable("temperature", "too hot")
    assert isinstance(error, ValueError) and isinstance(error, RidethroughError)
    assert str(error) == "temperature: too hot"
    copied = pickle.loads(pickle.dumps(error))
    assert (copied.field, copied.reason) == ("temperature", "too hot")


# --- refusals --------------------------------------------------------------------


def image() -> dict[str, Any]:
    return {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(anthropic(tools=[{"name": "f"}]), "tools", id="tools"),
        pytest.param(anthropic(tool_choice={"type": "auto"}), "tool_choice", id="tool-choice"),
        pytest.param(anthropic(thinking={"type": "enabled"}), "thinking", id="thinking"),
        pytest.param(anthropic(top_k=5), "top_k", id="top-k"),
        pytest.param(anthropic(frobnicate=1), "frobnicate", id="unknown-key"),
        pytest.param(
            anthropic(metadata={"user_id": "u", "tenant": "t"}), "metadata.tenant", id="metadata"
        ),
        pytest.param(
            anthropic(
                messages=[
                    user(),
                    assistant([{"type": "tool_use", "id": "t", "name": "f", "input": {}}]),
                    user(),
                ]
            ),
            "messages[1].content[0].type",
            id="tool-use-block",
        ),
        pytest.param(
            anthropic(messages=[user([{"type": "tool_result", "tool_use_id": "t"}])]),
            "messages[0].content[0].type",
            id="tool-result-block",
        ),
        pytest.param(
            anthropic(messages=[user([text("look"), image()])]),
            "messages[0].content[1].type",
            id="image-block",
        ),
        pytest.param(
            anthropic(messages=[user([{"type": "document", "source": {}}])]),
            "messages[0].content[0].type",
            id="document-block",
        ),
        pytest.param(
            anthropic(messages=[user([{**text("a"), "cache_control": {"type": "ephemeral"}}])]),
            "messages[0].content[0].cache_control",
            id="cache-control",
        ),
        pytest.param(
            anthropic(system=[{**text("a"), "cache_control": {"type": "ephemeral"}}]),
            "system[0].cache_control",
            id="system-cache-control",
        ),
        pytest.param(anthropic(system=[image()]), "system[0].type", id="system-image"),
        pytest.param(anthropic(system=7), "system", id="system-not-text"),
        pytest.param(
            anthropic(messages=[{"role": "system", "content": "s"}, user()]),
            "messages[0].role",
            id="system-role-message",
        ),
        pytest.param(
            anthropic(messages=[{**user(), "id": "m1"}]), "messages[0].id", id="message-key"
        ),
        pytest.param(
            anthropic(messages=[{"role": "user"}]), "messages[0].content", id="missing-content"
        ),
        pytest.param(
            {"messages": [user()], "temperature": 0.5}, "max_tokens", id="missing-max-tokens"
        ),
        pytest.param(anthropic(max_tokens=0), "max_tokens", id="max-tokens-zero"),
        pytest.param(anthropic(temperature=1.5), "temperature", id="temperature-above-1"),
        pytest.param(anthropic(top_p=True), "top_p", id="top-p-bool"),
        pytest.param(
            anthropic(stop_sequences=["a", "b", "c", "d", "e"]),
            "stop_sequences",
            id="five-stop-sequences",
        ),
        pytest.param(anthropic(stop_sequences="a"), "stop_sequences", id="stop-not-list"),
        pytest.param(anthropic(stream="yes"), "stream", id="stream-not-bool"),
        pytest.param(
            anthropic(messages=[user(), assistant("The answer is")]),
            "messages[1].role",
            id="prefill",
        ),
        pytest.param(
            anthropic(messages=[user(), assistant(), assistant(), user()]),
            "messages[2].role",
            id="consecutive-assistants",
        ),
        pytest.param(anthropic(messages=[]), "messages", id="no-messages"),
    ],
)
def test_to_openai_refuses_what_it_cannot_map(body: dict[str, Any], field: str) -> None:
    """Each Anthropic body outside the faithful subset raises Unmappable naming the field."""
    with pytest.raises(Unmappable) as info:
        to_openai(body)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def tool_call() -> dict[str, Any]:
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(openai(tools=[{"type": "function"}]), "tools", id="tools"),
        pytest.param(openai(tool_choice="auto"), "tool_choice", id="tool-choice"),
        pytest.param(openai(functions=[{"name": "f"}]), "functions", id="functions"),
        pytest.param(openai(function_call="auto"), "function_call", id="function-call"),
        pytest.param(
            openai(response_format={"type": "json_object"}),
            "response_format",
            id="response-format",
        ),
        pytest.param(openai(n=2), "n", id="n-above-1"),
        pytest.param(openai(n=True), "n", id="n-bool"),
        pytest.param(openai(logprobs=True), "logprobs", id="logprobs"),
        pytest.param(openai(top_logprobs=3), "top_logprobs", id="top-logprobs"),
        pytest.param(openai(presence_penalty=0.5), "presence_penalty", id="presence-penalty"),
        pytest.param(openai(frequency_penalty=-1), "frequency_penalty", id="frequency-penalty"),
        pytest.param(openai(seed=7), "seed", id="seed"),
        pytest.param(openai(logit_bias={"50256": -100}), "logit_bias", id="logit-bias"),
        pytest.param(openai(metadata={"k": "v"}), "metadata", id="metadata"),
        pytest.param(
            openai(stream=True, stream_options={"include_usage": True}),
            "stream_options",
            id="stream-options",
        ),
        pytest.param(openai(frobnicate=1), "frobnicate", id="unknown-key"),
        pytest.param(openai(temperature=1.5), "temperature", id="temperature-above-1"),
        pytest.param(openai(temperature=-0.1), "temperature", id="temperature-negative"),
        pytest.param(openai(temperature=float("nan")), "temperature", id="temperature-nan"),
        pytest.param({"messages": [user()]}, "max_tokens", id="missing-max-tokens"),
        pytest.param(
            openai(max_tokens=32, max_completion_tokens=64), "max_tokens", id="max-tokens-disagree"
        ),
        pytest.param(
            openai(max_completion_tokens=1.5), "max_completion_tokens", id="max-tokens-float"
        ),
        pytest.param(
            openai(
                messages=[
                    user(),
                    {"role": "assistant", "content": None, "tool_calls": [tool_call()]},
                    {"role": "tool", "tool_call_id": "c1", "content": "42"},
                    user(),
                ]
            ),
            "messages[1].tool_calls",
            id="tool-calls",
        ),
        pytest.param(
            openai(messages=[user(), {"role": "tool", "tool_call_id": "c1", "content": "42"}]),
            "messages[1].role",
            id="tool-role",
        ),
        pytest.param(
            openai(messages=[user(), {"role": "function", "name": "f", "content": "42"}]),
            "messages[1].role",
            id="function-role",
        ),
        pytest.param(
            openai(
                messages=[user([text("look"), {"type": "image_url", "image_url": {"url": "u"}}])]
            ),
            "messages[0].content[1].type",
            id="image-part",
        ),
        pytest.param(
            openai(messages=[user([{"type": "input_audio", "input_audio": {}}])]),
            "messages[0].content[0].type",
            id="audio-part",
        ),
        pytest.param(
            openai(messages=[user([{"type": "file", "file": {"file_id": "f"}}])]),
            "messages[0].content[0].type",
            id="file-part",
        ),
        pytest.param(
            openai(messages=[user(), assistant([{"type": "refusal", "refusal": "no"}]), user()]),
            "messages[1].content[0].type",
            id="refusal-part",
        ),
        pytest.param(openai(messages=[{**user(), "name": "alice"}]), "messages[0].name", id="name"),
        pytest.param(
            openai(messages=[{"role": "system", "content": "s", "name": "x"}, user()]),
            "messages[0].name",
            id="system-name",
        ),
        pytest.param(
            openai(messages=[user(), assistant(), {"role": "system", "content": "s"}, user()]),
            "messages[2].role",
            id="late-system",
        ),
        pytest.param(
            openai(messages=[user(), {"role": "developer", "content": "s"}]),
            "messages[1].role",
            id="late-developer",
        ),
        pytest.param(
            openai(messages=[{"role": "moderator", "content": "s"}]),
            "messages[0].role",
            id="unknown-role",
        ),
        pytest.param(
            openai(messages=[{"role": "system", "content": "s"}]),
            "messages",
            id="only-system",
        ),
        pytest.param(
            openai(messages=[user(), assistant("Sure:")]), "messages[1].role", id="final-assistant"
        ),
        pytest.param(
            openai(messages=[user(), assistant(), assistant(), user()]),
            "messages[2].role",
            id="consecutive-assistants",
        ),
        pytest.param(openai(stop=["a", 1]), "stop[1]", id="stop-not-string"),
        pytest.param(openai(user="a", safety_identifier="b"), "user", id="user-ids-disagree"),
        pytest.param(openai(messages="hi"), "messages", id="messages-not-list"),
    ],
)
def test_to_anthropic_refuses_what_it_cannot_map(body: dict[str, Any], field: str) -> None:
    """Each OpenAI body outside the faithful subset raises Unmappable naming the field."""
    with pytest.raises(Unmappable) as info:
        to_anthropic(body)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
