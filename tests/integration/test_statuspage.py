"""Status pages as evidence, never as proof: a prober, a real nats-server and the fake's
status page with a scripted incident.

What the page says lands in ai_control (``evidence.<provider>``) when it changes, with an
event on ``ai.events.evidence.<provider>``, and shows in ``status`` and the outage report.
A page that cannot be read changes nothing, and no page ever moves a breaker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from schemas import subjects as s
from schemas.codec import encode
from schemas.events import decode_evidence_event
from schemas.health import Evidence, PageComponent, try_decode_evidence
from services.breaker import transition
from services.breaker.evidence import EvidenceView
from services.breaker.recovery import service_owner
from services.config import Settings
from services.jetstream.kv import read_entry
from services.ops.inspect import outage_timeline
from services.ops.status import collect_status
from services.prober import Prober
from services.providers.registry import build_providers
from services.tools.fake.statuspage import PAGE_PATH
from tests.support import breaker_state, health_events, read_stream, wait_until

pytestmark = pytest.mark.integration

COMPONENTS = {"claude-fake": "claude-fake", "API": "*"}
INCIDENT = {"components": {"claude-fake": "partial_outage"}, "incident": "Elevated errors"}


@pytest.fixture
def paged(settings: Settings, fake_provider: Any) -> Settings:
    """``settings`` with the fake's status page for anthropic (none for openai), read
    every 0.1 s or so."""
    anthropic = settings.providers["anthropic"].model_copy(
        update={
            "status_page_url": fake_provider.url + PAGE_PATH,
            "status_components": COMPONENTS,
        }
    )
    breaker = settings.breaker.model_copy(
        update={"status_page_interval_s": 0.1, "status_page_timeout_s": 0.5}
    )
    return settings.with_changes(
        providers={**settings.providers, "anthropic": anthropic}, breaker=breaker
    )


@contextlib.asynccontextmanager
async def running_prober(js: Any, settings: Settings) -> AsyncIterator[Prober]:
    """A prober in this event loop (it holds every probe lease: it is alone)."""
    prober = await Prober(
        js, build_providers(settings), settings, owner=service_owner("prober")
    ).start()
    try:
        yield prober
    finally:
        await prober.stop()


async def stored(js: Any, provider: str = "anthropic") -> tuple[Evidence | None, int]:
    """(evidence, revision) of ``provider`` in ai_control."""
    raw, revision = await read_entry(await js.key_value(s.CONTROL_BUCKET), s.evidence_key(provider))
    return (try_decode_evidence(raw) if raw else None), revision


async def page_events(js: Any, provider: str = "anthropic") -> list[Any]:
    """Every status page change of ``provider`` on AI_EVENTS, oldest first."""
    msgs = await read_stream(js, s.EVENTS_STREAM, s.evidence_event_subject(provider))
    return [decode_evidence_event(m.data) for m in msgs]


async def reads_more(prober: Prober, n: int = 3, provider: str = "anthropic") -> None:
    """Wait until the prober has read the page ``n`` more times."""
    watch = prober.status_pages[provider]
    target = watch.reads + n

    async def done() -> bool:
        return watch.reads >= target

    await wait_until(done, timeout=20)


async def evidence_is(js: Any, predicate: Any) -> Evidence:
    """Wait until the stored evidence satisfies ``predicate``; return it."""
    found: list[Evidence] = []

    async def holds() -> bool:
        e, _ = await stored(js)
        if e is not None and predicate(e):
            found.append(e)
            return True
        return False

    await wait_until(holds, timeout=20)
    return found[-1]


async def test_a_scripted_incident_is_evidence_an_event_and_status(
    paged: Settings, js: Any, fake_provider: Any
) -> None:
    """An incident on the fake's page becomes evidence in ai_control, one event, and a
    line in status; its end, a second event; reads that say the same write nothing.
    Workers' view: the model's scope is degraded, the provider's and other models' not.
    No breaker moved."""
    fake_provider.status_page(**INCIDENT)
    async with running_prober(js, paged) as prober:
        first = await evidence_is(js, lambda e: e.degraded)
        assert first.degraded == [
            PageComponent(name="claude-fake", status="partial_outage", model="claude-fake")
        ]
        assert [i.name for i in first.incidents] == ["Elevated errors"]
        assert first.incidents[0].shortlink.startswith(fake_provider.url)
        view = await EvidenceView(js, paged.providers, paged.breaker).start()
        try:
            assert view.degraded("anthropic", "claude-fake")
            assert not view.degraded("anthropic")
            assert not view.degraded("anthropic", "claude-other")
            assert not view.degraded("openai", "gpt-fake")
        finally:
            await view.stop()

        status = (await collect_status(js, paged))["providers"]
        shown = status["anthropic"]["evidence"]
        assert shown["summary"] == (
            "claude-fake: partial outage; incident: Elevated errors (investigating)"
        )
        assert shown["page"] == fake_provider.url + PAGE_PATH and not shown["stale"]
        assert status["anthropic"]["state"] == "closed"
        assert status["openai"]["evidence"] is None

        _, revision = await stored(js)
        await reads_more(prober)
        assert (await stored(js))[1] == revision  # the same page: nothing written

        fake_provider.status_page(incident="")
        cleared = await evidence_is(js, lambda e: not e.degraded)
        assert cleared.incidents == [] and cleared.summary() == "operational"
        await reads_more(prober)
    events = await page_events(js)
    assert [e.summary for e in events] == [shown["summary"], "operational"]
    assert events[0].evidence.degraded == first.degraded and events[0].by == prober.owner
    assert await health_events(js) == [] and await breaker_state(js) == "closed"


@pytest.mark.parametrize("serve", ["error", "garbage", "stall", "huge"])
async def test_a_page_that_cannot_be_read_changes_nothing(
    paged: Settings, js: Any, fake_provider: Any, serve: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the page answers errors, garbage, never or too much: the last evidence stays
    (same revision, still degraded for workers), no event, one warning for the streak;
    status shows the page as stale. Readable again and saying the same: still nothing."""
    fake_provider.status_page(**INCIDENT)
    async with running_prober(js, paged) as prober:
        await evidence_is(js, lambda e: e.degraded)
        before, revision = await stored(js)
        caplog.set_level(logging.INFO, logger="ridethrough.prober.statuspage")
        caplog.clear()
        fake_provider.status_page(serve=serve, components={"claude-fake": "operational"})
        watch = prober.status_pages["anthropic"]

        async def failing() -> bool:
            return watch.failed >= 3

        await wait_until(failing, timeout=30)
        assert await stored(js) == (before, revision)
        view = await EvidenceView(js, paged.providers, paged.breaker).start()
        await view.stop()
        assert view.degraded("anthropic", "claude-fake")
        seen: list[dict[str, Any]] = []

        async def stale() -> bool:  # the lease's info says so at its next renewal
            seen.append((await collect_status(js, paged))["providers"]["anthropic"]["evidence"])
            return bool(seen[-1]["stale"])

        await wait_until(stale, timeout=20)
        assert seen[-1]["failed_reads"] >= 1 and seen[-1]["problem"]
        assert "claude-fake: partial outage" in seen[-1]["summary"]

        fake_provider.status_page(serve="ok", components={"claude-fake": "partial_outage"})

        async def readable() -> bool:
            return watch.failed == 0

        await wait_until(readable, timeout=30)
        await reads_more(prober)
        assert await stored(js) == (before, revision)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "cannot be read" in warned[0].getMessage()
    assert any("reads again" in r.getMessage() for r in caplog.records)
    assert len(await page_events(js)) == 1


async def test_evidence_never_closes_or_half_opens_a_breaker(
    paged: Settings, js: Any, fake_provider: Any
) -> None:
    """An open breaker over a provider still failing its probes: the page goes from an
    incident to all operational, and the breaker stays open (only probes half-open it);
    the outage report shows what the page said during the outage."""
    kv = await js.key_value(s.HEALTH_BUCKET)
    fake_provider.start_outage(529)
    await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="test")
    fake_provider.status_page(**INCIDENT)
    async with running_prober(js, paged) as prober:
        await evidence_is(js, lambda e: e.degraded)
        fake_provider.status_page(incident="")
        await evidence_is(js, lambda e: not e.degraded and not e.incidents)
        await reads_more(prober, 5)

        async def probed() -> bool:
            return prober.probes["anthropic"] >= 3

        await wait_until(probed, timeout=30)
        assert await breaker_state(js) == "open"
    assert [e.state for e in await health_events(js)] == ["open"]
    fake_provider.stop_outage()
    await transition(js, kv, "anthropic", to="closed", allowed_from=("open",), by="test")
    (outage,) = await outage_timeline(js)
    said = [p["summary"] for p in outage["status_page"]]
    assert said == [
        "claude-fake: partial outage; incident: Elevated errors (investigating)",
        "operational",
    ]
    assert outage["status_page"][0]["incidents"][0]["name"] == "Elevated errors"


async def test_evidence_of_a_page_no_longer_configured_is_deleted(paged: Settings, js: Any) -> None:
    """openai has no status page: evidence left from an earlier configuration (say, a
    major outage) is deleted by the probe lease holder, with an event, so it lowers no
    threshold for ever."""
    control = await js.key_value(s.CONTROL_BUCKET)
    old = Evidence(
        provider="openai",
        page="https://status.openai.example/api/v2/summary.json",
        degraded=[PageComponent(name="API", status="major_outage", model="*")],
    )
    await control.put(s.evidence_key("openai"), encode(old))
    async with running_prober(js, paged):

        async def gone() -> bool:
            return (await stored(js, "openai"))[0] is None

        await wait_until(gone, timeout=20)
    (event,) = await page_events(js, "openai")
    assert event.summary == "no status page configured" and event.evidence.degraded == []


async def test_garbage_evidence_is_no_evidence_and_is_replaced(
    paged: Settings, js: Any, fake_provider: Any
) -> None:
    """Garbage under evidence.<p> degrades nothing, breaks neither the view nor status
    (the breaker's state stays known), and the prober's next read replaces it."""
    control = await js.key_value(s.CONTROL_BUCKET)
    await control.put(s.evidence_key("anthropic"), b'{"provider": "anthropic", "degraded": 5}')
    view = await EvidenceView(js, paged.providers, paged.breaker).start()
    await view.refresh()
    await view.stop()
    assert view.unreadable == 1 and not view.degraded("anthropic", "claude-fake")
    status = (await collect_status(js, paged))["providers"]["anthropic"]
    assert status["state"] == "closed" and status["evidence"]["unreadable_record"]
    fake_provider.status_page(components={"API": "degraded_performance"}, incident="Slow")
    async with running_prober(js, paged):
        e = await evidence_is(js, lambda e: e.degraded)
    assert e.degrades() and e.degrades("claude-fake")
