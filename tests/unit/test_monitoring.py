"""services/metrics.py and deploy/monitoring/: Prometheus naming, bounded labels, and
alert rules that query only what the services export (checked by promtool too)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.config import HttpSettings
from services.metrics import OTHER, Capped, Metrics, cache_tokens

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
#: Labels that would be unbounded, never used.
FORBIDDEN_LABELS = {"job_id", "id", "job", "msg_id", "subject", "worker_id"}


def _families() -> list[Any]:
    return list(Metrics().registry.collect())


def test_metric_names_follow_prometheus_conventions() -> None:
    """Every metric is ridethrough_*, counters end in _total, durations are in seconds,
    and no label can hold a job id."""
    families = _families()
    assert families
    for f in families:
        assert f.name.startswith("ridethrough_"), f.name
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f.name
    metrics = Metrics()
    for attr in vars(metrics).values():
        labels = set(getattr(attr, "_labelnames", ()))
        assert not labels & FORBIDDEN_LABELS, attr
    assert {n for n in metrics.names() if n.endswith("_total")} >= {
        "ridethrough_jobs_dead_total",
        "ridethrough_breaker_transitions_total",
        "ridethrough_tokens_total",
    }


def test_unbounded_labels_keep_their_first_values_then_other() -> None:
    """A capped label exports its first N distinct values, then ``other`` for the rest; a
    value seen before keeps its own label, and "" (no model, no tenant) costs no place."""
    cap = Capped(2)
    assert [cap(None), cap("a"), cap("b"), cap("c"), cap("a"), cap("")] == [
        "",
        "a",
        "b",
        OTHER,
        "a",
        "",
    ]
    m = Metrics(HttpSettings(max_tenants=1))
    assert m.tenant("acme") == "acme"
    assert m.tenant("globex") == OTHER


def test_cache_tokens_are_read_from_either_provider_shape() -> None:
    """Anthropic's cache read and creation tokens, OpenAI's cached prompt tokens, or 0."""
    anthropic = {"usage": {"cache_read_input_tokens": 5, "cache_creation_input_tokens": 2}}
    openai = {"usage": {"prompt_tokens_details": {"cached_tokens": 7}}}
    assert cache_tokens(anthropic) == 7
    assert cache_tokens(openai) == 7
    assert cache_tokens({"usage": {"cache_read_input_tokens": True}}) == 0
    assert cache_tokens({}) == 0


def test_a_replica_that_loses_the_lease_stops_exporting_the_fleet_view() -> None:
    """``forget`` drops a provider's fleet gauges (the new holder exports them) and keeps
    the other providers'."""
    m = Metrics()
    for name in ("anthropic", "openai"):
        m.fleet_view(name, {None: "open"}, {("high", "waiting"): 3}, {"invalid": 1}, 2)
    m.forget("anthropic")
    text = _exposition(m)
    assert 'provider="anthropic"' not in text
    assert 'ridethrough_queue_jobs{priority="high",provider="openai",state="waiting"} 3.0' in text


def _exposition(m: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_metrics_off_import_no_prometheus_client() -> None:
    """With no HTTP port nothing imports prometheus_client: the hot path and the CLI's
    start pay nothing for metrics."""
    code = (
        "import sys, services.runner, services.lifecycle.settle, services.worker.runtime; "
        "sys.exit('prometheus_client' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False)
    assert done.returncode == 0


# --------------------------------------------------------------------------- deploy/monitoring


def _rule_groups() -> dict[str, Any]:
    doc = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    spec: dict[str, Any] = doc["spec"]
    return spec


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bridethrough_[a-zA-Z0-9_:]*", expr))


def test_every_metric_an_alert_queries_is_exported() -> None:
    """Each alert expression names only metrics services/metrics.py defines."""
    exported = Metrics().names()
    used: set[str] = set()
    for group in _rule_groups()["groups"]:
        for rule in group["rules"]:
            names = _names_in(rule["expr"])
            assert names, rule["alert"]
            used |= names
    assert used <= exported, used - exported
    alerts = {r["alert"] for g in _rule_groups()["groups"] for r in g["rules"]}
    assert {"RidethroughBreakerOpen", "RidethroughDeadLettersRising", "RidethroughNoWorkers"} <= (
        alerts
    )


def test_podmonitor_scrapes_the_port_the_pods_serve() -> None:
    """The PodMonitor scrapes the container port the service pods name ``http``."""
    doc = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    [endpoint] = doc["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["podmonitor.yaml", "rules.yaml"]


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    """`promtool check rules` on the PrometheusRule's groups (Debian's prometheus package;
    .ci/run installs it when it can)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(_rule_groups()))
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
