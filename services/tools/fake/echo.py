"""The reply both wire formats give: an echo of the last user message, and its token counts.

The reply text is deterministic: ``"echo: " + <text of the last user message>``, split on
single spaces and cut to ``max_tokens`` words (``"echo:"`` counts as the first word).
``output_tokens`` is the number of words in the reply and ``input_tokens`` the number of
whitespace-separated words in all messages and the system prompt (at least 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

import msgspec


class Block(msgspec.Struct):
    """A content block of a message; only ``text`` blocks carry words."""

    type: str = "text"
    text: str | None = None


Content: TypeAlias = str | list[Block] | None
"""A message's content in either wire format: a string or a list of blocks."""


class Message(Protocol):
    """A request message of either wire format."""

    @property
    def role(self) -> str:
        """``user``, ``assistant``, ``system``..."""

    @property
    def content(self) -> Content:
        """Its text or blocks."""


def text_of(content: Content) -> str:
    """The text of a message's content (its text blocks joined by spaces)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(b.text for b in content if b.type == "text" and b.text is not None)


def count_words(parts: Sequence[Content]) -> int:
    """The input tokens of ``parts``: their whitespace-separated words, at least 1."""
    return max(1, sum(len(text_of(p).split()) for p in parts))


def echo(user_text: str, max_tokens: int | None) -> tuple[str, int, bool]:
    """The reply text, its word count and whether it was cut at ``max_tokens``."""
    words = ("echo: " + user_text).split(" ")
    if max_tokens is not None and len(words) > max_tokens:
        kept = words[: max(max_tokens, 0)]
        return " ".join(kept), len(kept), True
    return " ".join(words), len(words), False


def pieces(text: str) -> list[str]:
    """Split ``text`` into word-sized stream deltas whose concatenation is ``text``."""
    if not text:
        return []
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def last_user_text(messages: Sequence[Message]) -> str:
    """The text of the last ``user`` message ("" when there is none)."""
    for message in reversed(messages):
        if message.role == "user":
            return text_of(message.content)
    return ""
