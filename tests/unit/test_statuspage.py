"""Status pages as evidence: the fake's scripted page, reading and parsing a Statuspage
summary.json (hostile pages included: never a crash), and mapping components to scopes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import encode
from schemas.health import Evidence, PageComponent, PageIncident, try_decode_evidence
from services.config import ProviderSettings
from services.prober.statuspage import (
    MAX_TEXT,
    evidence_of,
    parse_summary,
    read_page,
    shown_url,
)
from services.tools.fake import FakeProvider, FaultConfig
from services.tools.fake.statuspage import PAGE_PATH, PagePatch

MAPPED = ProviderSettings(
    kind="anthropic", status_components={"claude-fake": "claude-fake", "API": "*"}
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider(FaultConfig())
    await provider.start()
    yield provider
    await provider.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def page(components: dict[str, str], incidents: list[dict[str, Any]] | None = None) -> bytes:
    """A minimal summary.json."""
    return json.dumps(
        {
            "components": [
                {"id": f"id-{n}", "name": n, "status": s} for n, s in components.items()
            ],
            "incidents": incidents or [],
            "status": {"indicator": "minor", "description": "x"},
        }
    ).encode()


def evidence(data: bytes, settings: ProviderSettings = MAPPED) -> Evidence:
    summary = parse_summary(data)
    assert summary is not None
    return evidence_of("anthropic", settings, summary, "https://status.example/x")


# --------------------------------------------------------------------------- the fake's page


async def test_the_fake_page_lists_every_model_and_the_api_operational(
    fake: FakeProvider, session: aiohttp.ClientSession
) -> None:
    """GET /api/v2/summary.json: one component per model plus API, all operational,
    no incident, indicator none: a page that says nothing."""
    async with session.get(fake.url + PAGE_PATH) as response:
        assert response.status == 200
        body = await response.json()
    assert [c["name"] for c in body["components"]] == ["claude-fake", "gpt-fake", "API"]
    assert {c["status"] for c in body["components"]} == {"operational"}
    assert body["incidents"] == [] and body["status"]["indicator"] == "none"
    assert fake.counters["by_path"][PAGE_PATH] == 1


async def test_an_incident_is_scripted_through_the_admin_api_and_resolved(
    fake: FakeProvider, session: aiohttp.ClientSession
) -> None:
    """POST /admin/statuspage opens an incident on the components it sets; "" resolves it
    (its components operational again); DELETE resets everything."""
    patch = {"components": {"claude-fake": "partial_outage"}, "incident": "Elevated errors"}
    async with session.post(fake.url + "/admin/statuspage", json=patch) as response:
        assert response.status == 200
    data = await (await session.get(fake.url + PAGE_PATH)).read()
    body = json.loads(data)
    assert body["status"]["indicator"] == "major"
    (incident,) = body["incidents"]
    assert incident["name"] == "Elevated errors" and incident["impact"] == "major"
    assert incident["shortlink"].startswith(fake.url)
    e = evidence(data)
    assert e.degraded == [
        PageComponent(name="claude-fake", status="partial_outage", model="claude-fake")
    ]
    assert e.incidents[0].name == "Elevated errors"
    fake.status_page.patch(PagePatch(incident=""))
    resolved = evidence(fake.status_page.summary())
    assert (resolved.indicator, resolved.degraded, resolved.incidents) == ("none", [], [])
    fake.status_page.patch(PagePatch(components={"API": "major_outage"}, serve="error"))
    async with session.delete(fake.url + "/admin/statuspage") as response:
        state = await response.json()
    assert state["serve"] == "ok" and set(state["components"].values()) == {"operational"}


@pytest.mark.parametrize(
    "patch",
    [
        {"components": {"API": "melted"}},
        {"serve": "sometimes"},
        {"incident": 5},
        {"unknown": 1},
    ],
)
async def test_a_bad_admin_patch_is_a_400(
    fake: FakeProvider, session: aiohttp.ClientSession, patch: dict[str, Any]
) -> None:
    """Unknown statuses, serve modes and fields are refused, the page left as it was."""
    async with session.post(fake.url + "/admin/statuspage", json=patch) as response:
        assert response.status == 400
    assert fake.status_page.state()["serve"] == "ok"


def test_scheduled_incidents_show_in_their_window_only() -> None:
    """FaultConfig.status_incidents opens an incident from start_s for duration_s, like the
    scripted outages; a bad status is refused when the config is built."""
    now = FakeProvider(FaultConfig(status_incidents=[(0.0, 3600.0, "claude-fake", "major_outage")]))
    later = FakeProvider(FaultConfig(status_incidents=[(3600.0, 10.0, "API", "major_outage")]))
    e = evidence(now.status_page.summary())
    assert [(c.name, c.status) for c in e.degraded] == [("claude-fake", "major_outage")]
    assert e.incidents == [
        PageIncident(
            name="Elevated errors on claude-fake",
            status="investigating",
            impact="critical",
            shortlink=e.incidents[0].shortlink,
        )
    ]
    assert evidence(later.status_page.summary()).degraded == []
    with pytest.raises(ValueError, match="component status"):
        FaultConfig(status_incidents=[(0.0, 1.0, "API", "melted")])


# --------------------------------------------------------------------------- reading


async def test_a_readable_page_is_read(fake: FakeProvider, session: aiohttp.ClientSession) -> None:
    """read_page returns the summary of a good page, and no problem."""
    read = await read_page(session, fake.url + PAGE_PATH, 5.0)
    assert read.summary is not None and read.problem == ""
    assert len(read.summary.components) == 3


@pytest.mark.parametrize(
    ("serve", "problem"),
    [
        ("error", "HTTP 503"),
        ("garbage", "not a Statuspage summary.json"),
        ("huge", "larger than"),
        ("stall", "no answer within"),
    ],
)
async def test_a_page_that_cannot_be_read_is_no_evidence(
    fake: FakeProvider, session: aiohttp.ClientSession, serve: str, problem: str
) -> None:
    """Errors, garbage, an oversized page and a body that never ends give no summary and
    say why; nothing raises (a tiny timeout against the stalling page)."""
    fake.status_page.patch(PagePatch(serve=serve))  # type: ignore[arg-type]
    read = await read_page(session, fake.url + PAGE_PATH, 0.3)
    assert read.summary is None
    assert read.problem.startswith(problem), read.problem


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.json", "not a url", "ftp://x/y", ""])
async def test_an_unreachable_or_invalid_url_is_no_evidence(
    session: aiohttp.ClientSession, url: str
) -> None:
    """A closed port, an invalid URL, another scheme: no summary, a problem, no raise."""
    read = await read_page(session, url, 1.0)
    assert read.summary is None and read.problem


def test_a_shown_page_url_carries_no_credentials() -> None:
    """Userinfo, query and fragment are dropped before a URL is stored or logged."""
    assert shown_url("https://u:secret@status.x/api/v2/summary.json?token=t#f") == (
        "https://status.x/api/v2/summary.json"
    )


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("name", "status", "degraded", "other"),
    [
        ("claude-fake", "operational", [], []),
        ("claude-fake", "degraded_performance", ["claude-fake"], []),
        ("claude-fake", "partial_outage", ["claude-fake"], []),
        ("API", "major_outage", ["*"], []),
        ("claude-fake", "under_maintenance", [], ["claude-fake"]),
        ("claude.ai", "major_outage", [], [""]),  # not mapped: shown, counts for nothing
        ("claude-fake", "melted", [], []),  # no status Statuspage has: ignored
    ],
)
def test_components_map_to_scopes_by_status(
    name: str, status: str, degraded: list[str], other: list[str]
) -> None:
    """Degraded, partial and major outages of a mapped component are degraded; under
    maintenance and unmapped ones are shown only; operational and unknown ones nothing."""
    e = evidence(page({name: status}))
    assert [c.model for c in e.degraded] == degraded
    assert [c.model for c in e.other] == other


def test_a_component_maps_by_its_id_too() -> None:
    """status_components keys may be component ids (names can repeat across groups)."""
    by_id = ProviderSettings(kind="openai", status_components={"id-Chat": "gpt-fake"})
    assert evidence(page({"Chat": "partial_outage"}), by_id).degrades("gpt-fake")


@pytest.mark.parametrize(
    ("components", "provider", "model_a", "model_b"),
    [
        ({}, False, False, False),
        ({"claude-fake": "partial_outage"}, False, True, False),
        ({"API": "degraded_performance"}, True, True, True),
        ({"claude.ai": "major_outage"}, False, False, False),
    ],
)
def test_which_scopes_a_page_degrades(
    components: dict[str, str], provider: bool, model_a: bool, model_b: bool
) -> None:
    """A model's component degrades that model; a `*` one the provider and every model;
    an unmapped one nothing."""
    e = evidence(page(components))
    assert (e.degrades(), e.degrades("claude-fake"), e.degrades("other")) == (
        provider,
        model_a,
        model_b,
    )


def test_incidents_resolved_are_dropped_and_text_is_tamed() -> None:
    """Resolved incidents are not shown; names lose control characters and are cut;
    a shortlink that is no http(s) URL is dropped."""
    incidents = [
        {"name": "done", "status": "resolved"},
        {
            "name": "\x1b[31mred\x07" + "x" * 500,
            "status": "investigating",
            "impact": None,
            "shortlink": "javascript:alert(1)",
        },
    ]
    (shown,) = evidence(page({}, incidents)).incidents
    assert shown.name.startswith("[31mred") and len(shown.name) <= MAX_TEXT
    assert "\x1b" not in shown.name and shown.shortlink == "" and shown.impact == ""


def test_two_reads_saying_the_same_are_one_piece_of_evidence() -> None:
    """says() ignores when the page was read and the order of its components."""
    a = evidence(page({"claude-fake": "partial_outage", "API": "degraded_performance"}))
    b = evidence(page({"API": "degraded_performance", "claude-fake": "partial_outage"}))
    assert a.says() == b.says()
    assert a.summary() == "API: degraded performance; claude-fake: partial outage"
    assert Evidence(provider="x").summary() == "operational"


def test_stored_evidence_that_is_garbage_reads_as_none() -> None:
    """try_decode_evidence: a record round-trips; anything else is None, never a raise."""
    e = evidence(page({"API": "major_outage"}))
    assert try_decode_evidence(encode(e)) == e
    for junk in (b"", b"\xff", b"[]", b"null", b'{"provider": 5}', b'{"degraded": "x"}'):
        assert try_decode_evidence(junk) is None


# --------------------------------------------------------------------------- hostile pages

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_value = st.one_of(st.none(), st.integers(), st.text(max_size=30), st.lists(st.text(max_size=5)))
_status = st.sampled_from(
    ["operational", "degraded_performance", "partial_outage", "major_outage", "under_maintenance"]
) | st.text(max_size=10)
_component = st.fixed_dictionaries(
    {"name": st.sampled_from(["a", "b", "c"]) | st.text(max_size=30), "status": _status},
    optional={"id": _value},
) | st.fixed_dictionaries(
    {},
    optional={"name": st.text(max_size=30) | _value, "status": _status | _value, "id": _value},
)
_incident = st.fixed_dictionaries(
    {"name": st.text(max_size=300), "status": _status},
    optional={"shortlink": st.text(max_size=40) | _value},
) | st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=300) | _value,
        "status": _status | _value,
        "impact": _value,
        "shortlink": st.text(max_size=40) | _value,
    },
)
_page = st.fixed_dictionaries(
    {},
    optional={
        "components": st.lists(_component, max_size=6) | _json,
        "incidents": st.lists(_incident, max_size=4) | _json,
        "status": st.fixed_dictionaries({}, optional={"indicator": _value}) | _json,
        "page": _json,
    },
)


def _never_crashes(data: bytes) -> None:
    summary = parse_summary(data)
    if summary is None:
        return
    settings = ProviderSettings(kind="anthropic", status_components={"a": "*", "b": "m"})
    e = evidence_of("p", settings, summary, "https://x")
    assert try_decode_evidence(encode(e)) == e  # what we store, we can read back
    e.summary()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_page)
def test_a_hostile_page_never_crashes_the_reader(body: dict[str, Any]) -> None:
    """Pages of summary.json's shape with any values in any field: parsed or refused,
    mapped, stored and read back, never a crash."""
    _never_crashes(msgspec.json.encode(body))


@settings(max_examples=300)
@given(st.binary(max_size=200) | _json.map(msgspec.json.encode))
def test_bytes_that_are_no_page_never_crash_the_reader(data: bytes) -> None:
    """Any bytes, any JSON: parsed or refused, never a crash."""
    _never_crashes(data)


def test_one_bad_component_spoils_only_itself() -> None:
    """A component or incident of the wrong shape is left out; the rest of the page counts."""
    data = json.dumps(
        {
            "components": [{"name": None, "status": "major_outage"}, 5, {"name": "API"},
                           {"name": "API", "status": "partial_outage"}],
            "incidents": [{"name": 7}, {"name": "Elevated errors", "status": "identified"}],
            "status": "all good",
        }
    ).encode()  # fmt: skip
    e = evidence(data)
    assert [(c.name, c.model) for c in e.degraded] == [("API", "*")]
    assert [i.name for i in e.incidents] == ["Elevated errors"] and e.indicator == ""


def test_status_shows_what_the_page_says_and_no_markup_from_it() -> None:
    """`ridethrough status` has a status page column: the summary, marked stale while the
    page cannot be read; a page's text is printed as it is, never as rich markup."""
    from rich.console import Console

    from services.cli.status import _status_table

    row = {
        "state": "closed", "since": None, "failure_rate": None, "calls_in_window": 0,
        "waiting": 0, "in_flight": 0, "parked": 0, "dead": 0, "replay": None, "reason": "",
        "evidence": {"summary": "[bold]API[/bold]: partial outage", "stale": True,
                     "failed_reads": 4},
    }  # fmt: skip
    console = Console(record=True, width=400)
    console.print(_status_table({"providers": {"anthropic": row}, "workers": []}))
    text = console.export_text()
    assert "[bold]API[/bold]: partial outage (page unreadable, 4 reads)" in text


def test_pages_are_read_every_30_to_60_seconds_by_default() -> None:
    """The default interval, 45 s, is jittered by a third either way: 30-60 s."""
    from unittest.mock import MagicMock

    from services.config import Settings
    from services.prober.evidence import StatusPageWatch

    watch = StatusPageWatch(MagicMock(), Settings(), "anthropic", MagicMock(), by="t")
    draws = [watch._interval() for _ in range(2000)]
    assert 30 <= min(draws) < 32 and 58 < max(draws) <= 60
    assert watch.url is None  # off when unset
