"""A provider's status page (Atlassian Statuspage ``api/v2/summary.json``), read as evidence.

    read_page(session, url, timeout_s)   fetch and parse; never raises: a page that cannot
                                         be read is a ``PageRead`` with no summary and why
    parse_summary(data)                  the parts of summary.json we read, or None
    evidence_of(provider, settings, …)   components mapped to scopes: ``Evidence``

What counts. A component is mapped to a scope by ``ProviderSettings.status_components``
(its name or id -> a model name, or ``*`` for the whole provider). Its status:

    operational                                     nothing
    degraded_performance, partial_outage,
    major_outage                                    degraded: lowers its scope's trip
                                                    thresholds (``degraded``), shown
    under_maintenance                               shown only (``other``): announced
                                                    maintenance is no failure, and real
                                                    failures during it trip as ever
    a degraded component nobody mapped              shown only (``other``)
    any other string                                no status Statuspage has: ignored

Unresolved incidents are shown (name, status, impact, shortlink). Nothing here can close,
half-open or open a breaker: only calls and probes do that.

A hostile or broken page (not JSON, the wrong shape, wrong types, a redirect loop, a body
that never ends or is larger than ``MAX_PAGE_BYTES``) is a page that cannot be read; a
component or incident of the wrong shape in a page otherwise fine is left out.
Strings are cut to ``MAX_TEXT`` printable characters, lists to a few dozen entries.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, NamedTuple

import aiohttp
import msgspec
import yarl

from schemas.health import (
    DEGRADED_STATUSES,
    Evidence,
    PageComponent,
    PageIncident,
)
from services.config import ProviderSettings

#: A real summary.json is tens of KiB; anything over this is not one.
MAX_PAGE_BYTES: Final = 1 << 20
MAX_TEXT: Final = 200
MAX_LISTED: Final = 20
MAX_COMPONENTS: Final = 1000
MAINTENANCE: Final = "under_maintenance"
_DONE: Final = ("resolved", "postmortem", "completed")


class _Component(msgspec.Struct):
    name: str
    status: str
    id: str | None = None


class _Incident(msgspec.Struct):
    name: str
    status: str | None = None
    impact: str | None = None
    shortlink: str | None = None


class _Status(msgspec.Struct):
    indicator: str | None = None


class _Page(msgspec.Struct):
    components: list[msgspec.Raw] = msgspec.field(default_factory=list)
    incidents: list[msgspec.Raw] = msgspec.field(default_factory=list)
    status: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class Summary(msgspec.Struct):
    """The parts of a Statuspage ``summary.json`` ridethrough reads."""

    components: list[_Component] = msgspec.field(default_factory=list)
    incidents: list[_Incident] = msgspec.field(default_factory=list)
    status: _Status | None = None


_page_decoder: Final = msgspec.json.Decoder(_Page)
_component_decoder: Final = msgspec.json.Decoder(_Component)
_incident_decoder: Final = msgspec.json.Decoder(_Incident)
_status_decoder: Final = msgspec.json.Decoder(_Status)


def _each(raws: list[msgspec.Raw], decoder: msgspec.json.Decoder[Any]) -> list[Any]:
    """The entries ``decoder`` reads; one entry of the wrong shape spoils only itself."""
    out = []
    for raw in raws[:MAX_COMPONENTS]:
        if not raw:  # absent
            continue
        try:
            out.append(decoder.decode(raw))
        except msgspec.DecodeError:
            continue
    return out


class PageRead(NamedTuple):
    """One read of a status page: the summary, or ``None`` and ``problem`` (why not)."""

    summary: Summary | None
    problem: str = ""


def parse_summary(data: bytes) -> Summary | None:
    """The summary in ``data``, or ``None`` when ``data`` is not one (never raises). A
    component or incident of the wrong shape is left out; the rest of the page counts."""
    try:
        page = _page_decoder.decode(data)
    except msgspec.DecodeError:  # not JSON, wrong shape or types (ValidationError is one)
        return None
    return Summary(
        components=_each(page.components, _component_decoder),
        incidents=_each(page.incidents, _incident_decoder),
        status=next(iter(_each([page.status], _status_decoder)), None),
    )


def shown_url(url: str) -> str:
    """``url`` as it may be shown and stored: without credentials, query or fragment."""
    try:
        return str(yarl.URL(url).with_user(None).with_query(None).with_fragment(None))
    except (TypeError, ValueError):
        return "(unparsable url)"


async def _body(response: aiohttp.ClientResponse) -> bytes | None:
    """The body, or ``None`` once it grows past ``MAX_PAGE_BYTES``."""
    if (response.content_length or 0) > MAX_PAGE_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_PAGE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def read_page(session: aiohttp.ClientSession, url: str, timeout_s: float) -> PageRead:
    """Fetch and parse the status page at ``url`` within ``timeout_s``; never raises (but
    for cancellation): a page that cannot be read is ``PageRead(None, problem)``."""
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(
                url,
                headers={"Accept": "application/json"},
                max_redirects=3,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                if response.status != 200:
                    return PageRead(None, f"HTTP {response.status}")
                body = await _body(response)
    except TimeoutError:
        return PageRead(None, f"no answer within {timeout_s:g}s")
    except Exception as exc:  # any failure to reach or read the page: no evidence
        return PageRead(None, type(exc).__name__)
    if body is None:
        return PageRead(None, f"larger than {MAX_PAGE_BYTES} bytes")
    summary = parse_summary(body)
    if summary is None:
        return PageRead(None, "not a Statuspage summary.json")
    return PageRead(summary)


def _text(value: str | None) -> str:
    """``value`` cut to ``MAX_TEXT`` printable characters (a page is no terminal's master)."""
    if not value:
        return ""
    return "".join(ch if ch.isprintable() else " " for ch in value[:MAX_TEXT]).strip()


def _link(value: str | None) -> str:
    text = _text(value)
    return text if text.startswith(("https://", "http://")) else ""


def _order(c: PageComponent) -> tuple[str, str, str]:
    """Components sorted: a page that reorders them says nothing new."""
    return c.name, c.status, c.model


def evidence_of(provider: str, settings: ProviderSettings, summary: Summary, page: str) -> Evidence:
    """What ``summary`` says about ``provider``'s scopes (see the module docstring)."""
    mapping = settings.status_components
    degraded: list[PageComponent] = []
    other: list[PageComponent] = []
    for c in summary.components[:MAX_COMPONENTS]:
        if c.status not in DEGRADED_STATUSES and c.status != MAINTENANCE:
            continue  # operational, or no status Statuspage has
        model = mapping.get(c.name) or (mapping.get(c.id) if c.id else None) or ""
        component = PageComponent(name=_text(c.name), status=c.status, model=_text(model))
        if model and c.status in DEGRADED_STATUSES:
            degraded.append(component)
        else:
            other.append(component)
    incidents = [
        PageIncident(
            name=_text(i.name),
            status=_text(i.status),
            impact=_text(i.impact),
            shortlink=_link(i.shortlink),
        )
        for i in summary.incidents
        if i.status not in _DONE
    ]
    return Evidence(
        provider=provider,
        page=page,
        indicator=_text(summary.status.indicator if summary.status else ""),
        degraded=sorted(degraded, key=_order)[:MAX_LISTED],
        other=sorted(other, key=_order)[:MAX_LISTED],
        incidents=sorted(incidents, key=lambda i: i.name)[:MAX_LISTED],
    )
