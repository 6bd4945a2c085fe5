"""The notifier's pure parts: which events notify (flapping coalesced), the summary's
numbers, the sinks' shapes and signatures, and its settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import HealthEvent, OpsEvent
from services.config import Settings, load_settings
from services.errors import ConfigError
from services.notifier import incidents as inc
from services.notifier import notices
from services.notifier.sinks import (
    build_sinks,
    cloudevent,
    pagerduty_event,
    sign,
    slack_message,
    verify,
)

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def ev(at: float, state: str, previous: str, outage: str, **kw: Any) -> HealthEvent:
    return HealthEvent(
        provider="anthropic",
        state=state,  # type: ignore[arg-type]
        previous=previous,  # type: ignore[arg-type]
        outage_id=outage,
        at=T0 + timedelta(seconds=at),
        **kw,
    )


def history(*events: HealthEvent) -> list[inc.Seen]:
    return [inc.Seen(i + 1, e) for i, e in enumerate(events)]


ONE = history(
    ev(
        0,
        "open",
        "closed",
        "A",
        failures=5,
        calls=7,
        reason="5 failures in a row",
        failing_since=T0 - timedelta(seconds=2.5),
    ),
    ev(10, "half_open", "open", "A"),
    ev(12, "open", "half_open", "A"),
    ev(20, "half_open", "open", "A"),
    ev(30, "closed", "half_open", "A", parked=40, replayed=38),
)
FLAP = history(
    ev(0, "open", "closed", "A"),
    ev(5, "half_open", "open", "A"),
    ev(10, "closed", "half_open", "A", parked=10, replayed=10),
    ev(15, "open", "closed", "B"),  # 5 s after A closed
    ev(20, "half_open", "open", "B"),
    ev(25, "closed", "half_open", "B", parked=3, replayed=3),
    ev(200, "open", "closed", "C"),  # long after: an incident of its own
)
LATE = T0 + timedelta(hours=1)


@pytest.mark.parametrize(
    ("events", "seq", "flap", "now", "expect"),
    [
        (ONE, 1, 60, LATE, ("opened", "A")),
        (ONE, 2, 60, LATE, ("quiet", "within the outage")),
        (ONE, 3, 60, LATE, ("quiet", "within the outage")),  # re-open from half_open
        (ONE, 5, 60, T0 + timedelta(seconds=40), ("wait", 90.0)),
        (ONE, 5, 60, LATE, ("closed", "A")),
        (ONE, 5, 0, T0 + timedelta(seconds=30), ("closed", "A")),
        (FLAP, 1, 60, LATE, ("opened", "A")),
        (FLAP, 3, 60, LATE, ("quiet", "re-opened within")),
        (FLAP, 4, 60, LATE, ("quiet", "incident A goes on")),
        (FLAP, 6, 60, LATE, ("closed", "A")),
        (FLAP, 7, 60, LATE, ("opened", "C")),
        (FLAP, 3, 2, LATE, ("closed", "A")),  # a 2 s window: B is its own incident
        (FLAP, 4, 2, LATE, ("opened", "B")),
        (FLAP, 99, 60, LATE, ("quiet", "not in its scope's history")),
    ],
)
def test_decisions(
    events: list[inc.Seen], seq: int, flap: float, now: datetime, expect: tuple[str, Any]
) -> None:
    """Open notifies, a close notifies once the flap window passed without a re-open, a
    re-open within it continues the first incident; nothing else notifies."""
    d = inc.decide(events, seq, flap_s=flap, now=now)
    kind, what = expect
    if kind == "wait":
        assert isinstance(d, inc.Wait)
        assert (d.until - T0).total_seconds() == what
    elif kind == "quiet":
        assert isinstance(d, inc.Quiet)
        assert what in d.why
    else:
        assert isinstance(d, inc.Opened if kind == "opened" else inc.Closed)
        assert d.incident.id == what


def test_a_flapping_incident_adds_up_its_outages() -> None:
    """The close of a flapping incident sums the parked and replayed jobs of its outages and
    runs from the first open to the last close."""
    d = inc.decide(FLAP, 6, flap_s=60, now=LATE)
    assert isinstance(d, inc.Closed)
    n = d.incident.numbers()
    assert (n["outage_ids"], n["parked"], n["replayed"], n["flaps"]) == (["A", "B"], 13, 13, 1)
    assert n["duration_s"] == 25.0


def test_the_summary_carries_every_number() -> None:
    """The closed notice: duration, detection, parked, replayed, failed over and expired
    (lower bounds, from the tallies), dead (by reason), calls saved; explicit nulls for
    what could not be read."""
    d = inc.decide(ONE, 5, flap_s=0, now=LATE)
    assert isinstance(d, inc.Closed)
    unread = notices.closed(d.incident, {"provider_outage": 3, "retries_exhausted": 1})
    assert unread.data["failed_over"] is None and unread.data["expired"] is None
    assert "failed over not read, expired not read" in unread.text
    n = notices.closed(
        d.incident,
        {"provider_outage": 3, "retries_exhausted": 1},
        {"failed_over": 7, "expired": 2},
    )
    assert n.id == "A:closed" and n.incident == "A" and n.type == notices.CLOSED
    data = n.data
    assert data["duration_s"] == 30.0
    assert data["detected_on"] == {"reason": "5 failures in a row", "failures": 5, "calls": 7}
    assert (data["parked"], data["replayed"], data["dead"]) == (40, 38, 4)
    assert data["provider_calls_saved"] == 40 and data["reopened"] == 1
    assert (data["failed_over"], data["expired"]) == (7, 2)
    assert "at least 7 failed over, at least 2 expired, 4 dead" in n.text
    assert data["time_to_detect_s"] == 2.5
    assert "30.0s" in n.title and "40 parked" in n.text
    assert "Detected 2.5s after the first failure on 5 failures of 7 calls" in n.text
    d = inc.decide(FLAP, 6, flap_s=60, now=LATE)  # events without failing_since
    assert isinstance(d, inc.Closed) and d.incident.time_to_detect_s is None


@given(
    gaps=st.lists(st.floats(min_value=0, max_value=500), min_size=1, max_size=8),
    flap=st.floats(min_value=0, max_value=120),
)
def test_every_outage_has_exactly_one_open_and_one_close_notice(
    gaps: list[float], flap: float
) -> None:
    """Over any sequence of outages, each incident gets one opened and one closed notice,
    with the same id, and the incidents cover every outage once."""
    events: list[HealthEvent] = []
    t = 0.0
    for i, gap in enumerate(gaps):
        t += gap
        events.append(ev(t, "open", "closed", f"O{i}"))
        events.append(ev(t + 1, "half_open", "open", f"O{i}"))
        events.append(ev(t + 2, "closed", "half_open", f"O{i}", parked=1))
        t += 2
    hist = history(*events)
    opened, closed = [], []
    for seen in hist:
        d = inc.decide(hist, seen.seq, flap_s=flap, now=LATE + timedelta(days=1))
        if isinstance(d, inc.Opened):
            opened.append(d.incident.id)
        elif isinstance(d, inc.Closed):
            closed.append(d.incident)
    assert opened == [c.id for c in closed]
    assert sum(len(c.outage_ids) for c in closed) == len(gaps)
    assert sum(c.parked for c in closed) == len(gaps)


def test_signatures_verify_and_refuse_tampering_and_replays() -> None:
    """A signature verifies with the secret and timestamp; another body, secret or a stale
    timestamp does not."""
    body = b'{"id":"x"}'
    sig = sign("s3cret-key", 1_700_000_000, body)
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify("s3cret-key", body, "1700000000", sig, now=1_700_000_010)
    assert not verify("s3cret-key", body + b" ", "1700000000", sig, now=1_700_000_010)
    assert not verify("other-key", body, "1700000000", sig, now=1_700_000_010)
    assert not verify("s3cret-key", body, "1700000000", sig, now=1_700_001_000)
    assert not verify("s3cret-key", body, "not-a-time", sig, now=1_700_000_000)


def _open_notice() -> notices.Notice:
    d = inc.decide(ONE, 1, flap_s=60, now=LATE)
    assert isinstance(d, inc.Opened)
    return notices.opened(d.incident)


def test_cloudevent_slack_and_pagerduty_shapes() -> None:
    """The CloudEvent has the required attributes; Slack gets text and blocks; PagerDuty a
    trigger (open) and a resolve (close) with the incident id as dedup key, nothing for ops."""
    n = _open_notice()
    ce = cloudevent(n, "ridethrough/test")
    assert {k: ce[k] for k in ("specversion", "id", "source", "type", "subject")} == {
        "specversion": "1.0",
        "id": "A:opened",
        "source": "ridethrough/test",
        "type": "dev.ridethrough.outage.opened",
        "subject": "anthropic",
    }
    assert datetime.fromisoformat(ce["time"]) == T0
    slack = slack_message(n)
    assert slack["text"].startswith("Outage: anthropic is down")
    assert [b["type"] for b in slack["blocks"]] == ["header", "section", "context"]
    trigger = pagerduty_event(n, "rk", "src")
    assert trigger is not None
    assert (trigger["event_action"], trigger["dedup_key"]) == ("trigger", "A")
    assert trigger["payload"]["severity"] == "critical"
    d = inc.decide(ONE, 5, flap_s=0, now=LATE)
    assert isinstance(d, inc.Closed)
    resolve = pagerduty_event(notices.closed(d.incident, {}), "rk", "src")
    assert resolve == {"routing_key": "rk", "event_action": "resolve", "dedup_key": "A"}
    op = notices.ops(7, OpsEvent(action="pause", who="alice@h", provider="anthropic"))
    assert pagerduty_event(op, "rk", "src") is None
    assert op.id == "ops:7" and "alice@h ran pause anthropic" in op.text
    msgspec.json.encode(cloudevent(op, "s"))  # JSON-ready


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RIDETHROUGH_NOTIFY__WEBHOOK_URL": "http://h/x"}, "needs webhook_secret"),
        (
            {
                "RIDETHROUGH_NOTIFY__WEBHOOK_URL": "ftp://h/x",
                "RIDETHROUGH_NOTIFY__WEBHOOK_SECRET": "k" * 16,
            },
            "http:// or https://",
        ),
        ({"RIDETHROUGH_NOTIFY__SLACK_WEBHOOK_URL": "hooks.slack.com/x"}, "http:// or https://"),
        ({"RIDETHROUGH_NOTIFY__FLAP_WINDOW_S": "-1"}, "notify.flap_window_s"),
        ({"RIDETHROUGH_NOTIFY__MAX_ATTEMPTS": "0"}, "notify.max_attempts"),
        (
            {
                "RIDETHROUGH_NOTIFY__PAGERDUTY_ROUTING_KEY": "k" * 32,
                "RIDETHROUGH_NOTIFY__PAGERDUTY_ROUTING_KEY_FILE": "/x",
            },
            "not both",
        ),
    ],
)
def test_bad_notify_settings_are_one_clear_error(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each bad notify setting is a ConfigError naming the problem."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_sinks_read_their_files(tmp_path: Path) -> None:
    """URLs and keys come from files too; a missing or empty file is a ConfigError."""
    url, secret, key = tmp_path / "url", tmp_path / "secret", tmp_path / "pd"
    url.write_text("http://127.0.0.1:9/hook\n")
    secret.write_text("whsec-0123456789\n")
    key.write_text("R0UTINGKEY0123456789\n")
    notify: dict[str, Any] = {
        "webhook_url_file": url,
        "webhook_secret_file": secret,
        "pagerduty_routing_key_file": key,
    }
    sinks = build_sinks(Settings(notify=notify))
    assert [s.name for s in sinks] == ["webhook", "pagerduty"]
    assert sinks[0].url == "http://127.0.0.1:9/hook"  # type: ignore[attr-defined]
    assert sinks[0].secret == "whsec-0123456789"  # type: ignore[attr-defined]
    assert sinks[1].routing_key == "R0UTINGKEY0123456789"  # type: ignore[attr-defined]
    key.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        build_sinks(Settings(notify=notify))
    key.unlink()
    with pytest.raises(ConfigError, match="cannot read pagerduty_routing_key file"):
        build_sinks(Settings(notify=notify))
    assert build_sinks(Settings()) == []


def test_sinks_come_from_a_mounted_secrets_directory(tmp_path: Path) -> None:
    """With ``secrets_dir`` (a Kubernetes Secret or compose secret mounted as a directory)
    each file named like a sink setting that is there turns its sink on; an explicit
    setting wins; a webhook URL there without its signing secret is a ConfigError."""
    (tmp_path / "slack_webhook_url").write_text("https://hooks.slack.example/T0/B0/x\n")
    (tmp_path / "pagerduty_routing_key").write_text("R0UTINGKEY0123456789\n")
    sinks = build_sinks(Settings(notify={"secrets_dir": tmp_path}))
    assert [s.name for s in sinks] == ["slack", "pagerduty"]
    explicit = {"secrets_dir": tmp_path, "pagerduty_routing_key": "OTHERKEY0123456789"}
    chosen = build_sinks(Settings(notify=explicit))[1]
    assert chosen.routing_key == "OTHERKEY0123456789"  # type: ignore[attr-defined]
    (tmp_path / "webhook_url").write_text("http://127.0.0.1:9/hook\n")
    with pytest.raises(ConfigError, match="needs webhook_secret"):
        build_sinks(Settings(notify={"secrets_dir": tmp_path}))
    (tmp_path / "webhook_secret").write_text("whsec-0123456789\n")
    hook = build_sinks(Settings(notify={"secrets_dir": tmp_path}))[0]
    assert hook.name == "webhook" and hook.secret == "whsec-0123456789"  # type: ignore[attr-defined]
    assert build_sinks(Settings(notify={"secrets_dir": tmp_path / "none"})) == []
