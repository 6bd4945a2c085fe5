"""A finished answer replayed as the provider's server-sent events, for ``stream: true``.

The gateway's jobs are answered whole (the worker makes a non-streaming call, so a job
can be parked and replayed), so a streamed request is answered once its result is in:
the final message cut into the events the provider would have sent, each block in one
delta. The official SDKs' stream helpers assemble these into the same message the
non-streaming call returns (tested with their own accumulators). Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec

_encode = msgspec.json.encode


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event: ``event:`` (when named) and a one-line ``data:``."""
    payload = data if isinstance(data, bytes) else _encode(data)
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"


# ------------------------------------------------------------------ Anthropic


def _block_events(index: int, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The start, delta(s) and stop of one content block, as the Messages API streams it:
    text and thinking arrive as deltas, tool inputs as one ``input_json_delta``; a block of
    a type without deltas (redacted thinking, tool results...) starts whole."""
    kind = block.get("type")
    start: dict[str, Any]
    deltas: list[dict[str, Any]] = []
    if kind == "text" and isinstance(block.get("text"), str):
        start = {**block, "text": ""}
        citations = block.get("citations")
        if isinstance(citations, list):
            start["citations"] = []
            deltas += [{"type": "citations_delta", "citation": c} for c in citations]
        if block["text"]:
            deltas.insert(0, {"type": "text_delta", "text": block["text"]})
    elif kind == "thinking" and isinstance(block.get("thinking"), str):
        start = {**block, "thinking": "", "signature": ""}
        if block["thinking"]:
            deltas.append({"type": "thinking_delta", "thinking": block["thinking"]})
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind in ("tool_use", "server_tool_use", "mcp_tool_use") and "input" in block:
        start = {**block, "input": {}}
        if block["input"] != {}:
            deltas.append(
                {"type": "input_json_delta", "partial_json": _encode(block["input"]).decode()}
            )
    else:
        start = block
    yield {"type": "content_block_start", "index": index, "content_block": start}
    for delta in deltas:
        yield {"type": "content_block_delta", "index": index, "delta": delta}
    yield {"type": "content_block_stop", "index": index}


def anthropic_events(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The Messages API stream of ``message`` (a finished ``message`` object): what
    ``client.messages.stream(...).get_final_message()`` turns back into ``message``."""
    usage = message.get("usage")
    usage = dict(usage) if isinstance(usage, dict) else {}
    output_tokens = usage.get("output_tokens", 0)
    ending = ("stop_reason", "stop_sequence", "stop_details")
    head = {k: v for k, v in message.items() if k not in ("content", "usage", *ending)}
    head.update(
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage={**usage, "output_tokens": 0},
    )
    yield {"type": "message_start", "message": head}
    content = message.get("content")
    for index, block in enumerate(content if isinstance(content, list) else []):
        if isinstance(block, dict):
            yield from _block_events(index, block)
    yield {
        "type": "message_delta",
        "delta": {k: message.get(k) for k in ending if k in message or k != "stop_details"},
        "usage": {**usage, "output_tokens": output_tokens},
    }
    yield {"type": "message_stop"}


def anthropic_stream(message: dict[str, Any]) -> bytes:
    """``anthropic_events`` as the bytes of an SSE body."""
    return b"".join(sse(event["type"], event) for event in anthropic_events(message))


# ------------------------------------------------------------------ OpenAI


def _choice_delta(message: dict[str, Any]) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": message.get("role", "assistant")}
    for key in ("content", "refusal"):
        if message.get(key) is not None:
            delta[key] = message[key]
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        delta["tool_calls"] = [
            {"index": i, **call} for i, call in enumerate(calls) if isinstance(call, dict)
        ]
    return delta


def openai_chunks(completion: dict[str, Any], *, include_usage: bool) -> Iterator[dict[str, Any]]:
    """The Chat Completions stream of ``completion`` (a finished ``chat.completion``): per
    choice one chunk with its whole message, then one with its ``finish_reason``; the usage
    in a last chunk with no choices when the request asked for it
    (``stream_options.include_usage``)."""
    head: dict[str, Any] = {
        k: completion[k]
        for k in ("id", "created", "model", "system_fingerprint", "service_tier")
        if k in completion
    }
    head["object"] = "chat.completion.chunk"
    choices = completion.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        yield {
            **head,
            "choices": [
                {
                    "index": index,
                    "delta": _choice_delta(message),
                    "logprobs": choice.get("logprobs"),
                    "finish_reason": None,
                }
            ],
        }
        yield {
            **head,
            "choices": [
                {"index": index, "delta": {}, "logprobs": None,
                 "finish_reason": choice.get("finish_reason")}
            ],
        }  # fmt: skip
    if include_usage:
        yield {**head, "choices": [], "usage": completion.get("usage")}


def openai_stream(completion: dict[str, Any], *, include_usage: bool) -> bytes:
    """``openai_chunks`` as the bytes of an SSE body, ended by ``data: [DONE]``."""
    chunks = openai_chunks(completion, include_usage=include_usage)
    return b"".join(sse(None, chunk) for chunk in chunks) + sse(None, b"[DONE]")
