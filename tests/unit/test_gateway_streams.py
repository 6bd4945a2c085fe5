"""Finished answers replayed as the providers' server-sent events (``services/gateway/sse.py``)
and the Chat Completions door's checks (``openai_wire``): each stream, fed to the official
SDK's own accumulator, gives back exactly the answer it was cut from."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from hypothesis import given
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from schemas.results import ErrorInfo, JobResult
from services.gateway import openai_wire
from services.gateway.anthropic_wire import BadRequest
from services.gateway.sse import anthropic_events, anthropic_stream, openai_chunks, openai_stream

_text = st.text(max_size=40)
_scalars = st.none() | st.booleans() | st.integers() | _text
_inputs = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.recursive(
        _scalars,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=6,
    ),
    max_size=4,
)
_blocks = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.builds(
        lambda i, n, x: {"type": "tool_use", "id": f"toolu_{i}", "name": n, "input": x},
        st.integers(0, 99),
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
        _inputs,
    ),
    st.builds(
        lambda t, s: {"type": "thinking", "thinking": t, "signature": s},
        _text,
        st.from_regex(r"[A-Za-z0-9]{0,16}", fullmatch=True),
    ),
    st.builds(lambda d: {"type": "redacted_thinking", "data": d}, _text),
)
_usage = st.fixed_dictionaries(
    {"input_tokens": st.integers(0, 10**6), "output_tokens": st.integers(0, 10**6)},
    optional={
        "cache_creation_input_tokens": st.integers(0, 10**6),
        "cache_read_input_tokens": st.integers(0, 10**6),
    },
)
_messages = st.builds(
    lambda content, stop, usage: {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    },
    st.lists(_blocks, max_size=4),
    st.sampled_from(["end_turn", "max_tokens", "tool_use", "stop_sequence"]),
    _usage,
)


@given(message=_messages)
def test_the_anthropic_sdk_assembles_the_events_into_the_same_message(
    message: dict[str, Any],
) -> None:
    """Every event stream the gateway sends, accumulated by the SDK's stream helper, is the
    message it was cut from (text, tool inputs, thinking, signatures, usage)."""
    snapshot: Any = None
    bufs: dict[int, bytes] = {}
    for event in anthropic_events(message):
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    # None and absent are the same to the SDK's model (it sets stop_details from the delta).
    expected = Message.model_validate(message).to_dict(mode="json", exclude_none=True)
    got = Message.model_validate(snapshot.to_dict(mode="json"))
    assert got.to_dict(mode="json", exclude_none=True) == expected


def test_the_anthropic_stream_is_named_events_in_order() -> None:
    """The wire: ``event: <type>`` before each ``data:``, message_start first and
    message_stop last."""
    body = anthropic_stream(
        {"id": "m", "type": "message", "role": "assistant", "model": "x",
         "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
         "usage": {"input_tokens": 1, "output_tokens": 2}}
    )  # fmt: skip
    frames = body.decode().split("\n\n")
    assert frames[-1] == ""
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames[:-1]]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "content_block_delta" in names
    for frame in frames[:-1]:
        name, data = frame.split("\n")
        assert msgspec.json.decode(data.removeprefix("data: "))["type"] == name[len("event: ") :]


_calls = st.lists(
    st.builds(
        lambda i, n, a: {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": n, "arguments": msgspec.json.encode(a).decode()},
        },
        st.integers(0, 99),
        st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
        _inputs,
    ),
    max_size=3,
)
_completions = st.builds(
    lambda content, calls, finish, n_choices, usage: {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-x",
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": content,
                    **({"tool_calls": calls} if calls else {}),
                },
                "logprobs": None,
                "finish_reason": finish,
            }
            for i in range(n_choices)
        ],
        "usage": usage,
    },
    st.none() | _text,
    _calls,
    st.sampled_from(["stop", "length", "tool_calls", "content_filter"]),
    st.integers(1, 2),
    st.builds(
        lambda p, c: {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        st.integers(0, 10**6),
        st.integers(0, 10**6),
    ),
)


@given(completion=_completions)
def test_the_openai_sdk_assembles_the_chunks_into_the_same_completion(
    completion: dict[str, Any],
) -> None:
    """Every chunk stream (usage included), accumulated by the SDK's stream helper, is the
    completion it was cut from: content, tool calls, finish reasons, usage."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in openai_chunks(completion, include_usage=True):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    # The snapshot, not get_final_completion(): that one refuses length/content_filter.
    final = state.current_completion_snapshot
    expected = ChatCompletion.model_validate(completion)
    assert final.usage == expected.usage
    assert len(final.choices) == len(expected.choices)
    for got, want in zip(final.choices, expected.choices, strict=True):
        assert got.finish_reason == want.finish_reason
        assert got.message.content == want.message.content
        got_calls = [c.model_dump() for c in got.message.tool_calls or []]
        want_calls = [c.model_dump() for c in want.message.tool_calls or []]
        fields = ("id", "type")
        assert [
            ({k: c[k] for k in fields}, c["function"]["name"], c["function"]["arguments"])
            for c in got_calls
        ] == [
            ({k: c[k] for k in fields}, c["function"]["name"], c["function"]["arguments"])
            for c in want_calls
        ]


def test_the_openai_stream_ends_with_done_and_usage_only_when_asked() -> None:
    """``data: [DONE]`` closes the stream; the usage chunk (no choices) is sent only with
    include_usage."""
    completion = {
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip
    plain = openai_stream(completion, include_usage=False).decode()
    assert plain.endswith("data: [DONE]\n\n")
    assert '"usage"' not in plain
    with_usage = openai_stream(completion, include_usage=True).decode()
    last = with_usage.split("\n\n")[-3]
    assert msgspec.json.decode(last.removeprefix("data: "))["choices"] == []


GOOD_CHAT = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}


def test_a_chat_body_keeps_everything_but_the_call_options() -> None:
    """model, stream and stream_options travel apart; the rest is the job's request."""
    body = msgspec.json.encode(
        {**GOOD_CHAT, "stream": True, "stream_options": {"include_usage": True}, "n": 2}
    )
    parsed = openai_wire.parse_chat_request(body)
    assert (parsed.model, parsed.stream, parsed.include_usage) == ("gpt-x", True, True)
    assert parsed.request == {"messages": GOOD_CHAT["messages"], "n": 2}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"nope", "not valid JSON"),
        (b"3", "JSON object"),
        (msgspec.json.encode({**GOOD_CHAT, "model": None}), "model"),
        (msgspec.json.encode({**GOOD_CHAT, "messages": {}}), "messages"),
        (msgspec.json.encode({**GOOD_CHAT, "stream": 1}), "stream"),
        (msgspec.json.encode({**GOOD_CHAT, "stream_options": {}}), "only allowed"),
        (msgspec.json.encode({**GOOD_CHAT, "stream": True, "stream_options": 5}), "object"),
        (
            msgspec.json.encode(
                {**GOOD_CHAT, "stream": True, "stream_options": {"include_usage": "y"}}
            ),
            "include_usage",
        ),
    ],
)
def test_a_bad_chat_body_is_a_bad_request_naming_the_field(body: bytes, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        openai_wire.parse_chat_request(body)


@pytest.mark.parametrize(
    ("reason", "status", "kind"),
    [
        ("invalid_request", 400, "invalid_request_error"),
        ("not_found", 404, "invalid_request_error"),
        ("quota", 429, "insufficient_quota"),
        ("auth", 500, "server_error"),
        ("provider_outage", 503, "server_error"),
        ("something_new", 500, "server_error"),
    ],
)
def test_a_failed_job_answers_in_openais_error_shape(reason: str, status: int, kind: str) -> None:
    result = JobResult(
        job_id="j1",
        provider="openai",
        model="gpt-x",
        status="failed",
        error=ErrorInfo(type=reason, message="boom"),
    )
    got_status, body = openai_wire.failure(result)
    error = msgspec.json.decode(body)["error"]
    assert got_status == status
    assert error["type"] == kind
    assert "j1" in error["message"] and "boom" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
