"""Doors: the same Messages API behind several providers, and what each door does not take.

A job fails over between providers of the same API shape (``anthropic``,
``anthropic-bedrock``, ``anthropic-vertex``: the Anthropic Messages API) with its
request unchanged, byte for byte, but for the model id (which the target's ``model_map``
turns into that door's id when it is called). Between shapes (Anthropic <-> OpenAI) the
request is translated by ``services.providers.mapping``, which refuses what it cannot
carry faithfully.

Within the Anthropic shape the only thing that refuses a failover (the job then parks) is
a feature the target door does not serve. The list, short on purpose:

=====================  ============================================================
door                   refuses a request that uses
=====================  ============================================================
anthropic-bedrock      ``mcp_servers`` (the MCP connector), ``container`` (code
                       execution containers), a content block whose ``source`` is a
                       Files API ``file`` (file ids live at the first party only)
anthropic-vertex       the same three
anthropic              nothing
=====================  ============================================================

Beta flags (``Job.betas``) a door does not take are dropped, with a note on the
result, never refused: the Files API and MCP connector betas on Bedrock and Vertex (a
request that really uses them is refused above), and every beta on an OpenAI door.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from services.config import ANTHROPIC_SHAPE
from services.errors import Unmappable
from services.providers.mapping import Kind, shape_of

#: Top-level request keys a door does not serve, and why.
_CLOUD_KEYS: Final[Mapping[str, str]] = {
    "mcp_servers": "the MCP connector is served by the first-party API only",
    "container": "code execution containers are served by the first-party API only",
}
UNSUPPORTED_KEYS: Final[Mapping[str, Mapping[str, str]]] = {
    "anthropic": {},
    "anthropic-bedrock": _CLOUD_KEYS,
    "anthropic-vertex": _CLOUD_KEYS,
}
#: Kinds that refuse content blocks whose ``source.type`` is ``file`` (Files API ids).
_NO_FILE_IDS: Final = frozenset({"anthropic-bedrock", "anthropic-vertex"})
#: Prefixes of beta flags a door drops (a kind not listed takes every beta; ``*``: none).
_CLOUD_BETAS: Final = ("files-api-", "mcp-client-")
DROPPED_BETAS: Final[Mapping[str, tuple[str, ...]]] = {
    "anthropic-bedrock": _CLOUD_BETAS,
    "anthropic-vertex": _CLOUD_BETAS,
    "openai": ("*",),
}


def shape(kind: str) -> Kind:
    """The request shape a provider kind speaks (``anthropic`` or ``openai``)."""
    return "anthropic" if kind in ANTHROPIC_SHAPE else shape_of(kind)


def same_shape(a: str, b: str) -> bool:
    """Whether kinds ``a`` and ``b`` take the same request body."""
    return shape(a) == shape(b)


def check_door(request: Mapping[str, Any], kind: str) -> None:
    """Raise ``Unmappable`` naming the first feature of ``request`` that door ``kind``
    does not serve (see the module's table); return quietly when it serves them all."""
    for key, why in UNSUPPORTED_KEYS.get(kind, {}).items():
        if request.get(key) is not None:
            raise Unmappable(key, f"{why}; {kind} does not serve it")
    if kind in _NO_FILE_IDS:
        where = _file_source(request)
        if where:
            raise Unmappable(where, f"a Files API file id; {kind} cannot read first-party files")


def _file_source(request: Mapping[str, Any]) -> str:
    """Where ``request`` holds a content block with a ``file`` source ("" if nowhere)."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return ""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for j, block in enumerate(content):
            if _is_file(block):
                return f"messages[{i}].content[{j}].source"
            inner = block.get("content") if isinstance(block, Mapping) else None
            if isinstance(inner, list):  # a tool_result's own blocks
                for k, sub in enumerate(inner):
                    if _is_file(sub):
                        return f"messages[{i}].content[{j}].content[{k}].source"
    return ""


def _is_file(block: Any) -> bool:
    source = block.get("source") if isinstance(block, Mapping) else None
    return isinstance(source, Mapping) and source.get("type") == "file"


def split_betas(betas: Sequence[str], kind: str) -> tuple[list[str], list[str]]:
    """(the betas door ``kind`` takes, those it drops), each in the job's order."""
    prefixes = DROPPED_BETAS.get(kind, ())
    if "*" in prefixes:
        return [], list(betas)
    kept = [b for b in betas if not b.startswith(prefixes)] if prefixes else list(betas)
    dropped = [b for b in betas if b not in kept]
    return kept, dropped


def dropped_note(dropped: Iterable[str], provider: str) -> str:
    """The result's note for betas a failover dropped."""
    return f"betas dropped by the failover to {provider} (it does not take them): " + ", ".join(
        dropped
    )
