"""services/metrics.py and deploy/monitoring/: Prometheus naming, bounded labels, and
alert rules that query only what the services export (checked by promtool too)."""

from __future__ import annotations

import json
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


def test_tracing_off_imports_no_opentelemetry_sdk() -> None:
    """With tracing off the services and the producer never import the OpenTelemetry SDK
    (the API alone: a no-op), and the worker's hooks find ``tracing.active`` None."""
    code = (
        "import sys, services.runner, services.producer, services.worker.runtime; "
        "from services import tracing; from services.config import TracingSettings; "
        "tracing.configure(TracingSettings(enabled=False), 'worker'); "
        "sys.exit(tracing.active is not None or "
        "any(m.startswith('opentelemetry.sdk') for m in sys.modules))"
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
    assert alerts >= ALERTS, ALERTS - alerts


#: The alerts the issue asks for (breaker open, parked growing while closed, dead letters
#: rising, replay stalled, no workers, backlog age, JetStream store nearly full).
ALERTS = {
    "RidethroughBreakerOpen",
    "RidethroughParkedGrowingWhileClosed",
    "RidethroughDeadLettersRising",
    "RidethroughReplayStalled",
    "RidethroughNoWorkers",
    "RidethroughBacklogOld",
    "RidethroughParkedJobsOld",
    "RidethroughJetStreamStoreNearlyFull",
    "RidethroughFleetViewMissing",
}


def test_monitors_scrape_the_port_the_pods_serve() -> None:
    """The ServiceMonitor (through the headless Service) and the alternative PodMonitor
    scrape the container port the service pods name ``http``; kustomize ships the
    ServiceMonitor, the rules and the dashboard's ConfigMap."""
    doc = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    [endpoint] = doc["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}
    service = yaml.safe_load((MONITORING / "service.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert service["spec"]["ports"] == [{"name": "http", "port": 9090, "targetPort": "http"}]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "ridethrough"}
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["service.yaml", "servicemonitor.yaml", "rules.yaml"]
    [generated] = kustomization["configMapGenerator"]
    assert generated["files"] == ["dashboard.json"]
    assert generated["options"]["labels"] == {"grafana_dashboard": "1"}


# --------------------------------------------------------------------------- the dashboard

#: Panel types of Grafana's core that the dashboard may use.
PANEL_TYPES = {"row", "timeseries", "state-timeline", "stat", "table", "bargauge", "gauge"}


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MONITORING / "dashboard.json").read_text())
    return doc


def test_dashboard_has_the_shape_grafana_loads() -> None:
    """dashboard.json is a Grafana dashboard: title, uid, schema version, a Prometheus
    datasource variable, panels with unique ids, known types and grid positions inside the
    24 columns, and targets with a refId and an expression each."""
    d = _dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, panel
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def _dashboard_queries() -> dict[str, str]:
    """Every PromQL expression of the dashboard, by where it is."""
    d = _dashboard()
    out = {
        f"{p['title']}/{t['refId']}": t["expr"] for p in d["panels"] for t in p.get("targets", [])
    }
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out[f"variable {v['name']}"] = v["query"]["query"]
    return out


def test_every_metric_a_panel_queries_is_exported() -> None:
    """Each panel (and variable) queries only metrics services/metrics.py defines, and the
    dashboard shows what the issue asks: breakers, call duration, errors, jobs, queues,
    replay, backlog age, tokens, in-flight calls."""
    exported = Metrics().names()
    used: set[str] = set()
    for where, expr in _dashboard_queries().items():
        names = _names_in(expr)
        assert names, where
        assert names <= exported, (where, names - exported)
        used |= names
    assert {
        "ridethrough_breaker_state",
        "ridethrough_provider_call_duration_seconds_bucket",
        "ridethrough_provider_errors_total",
        "ridethrough_jobs_finished_total",
        "ridethrough_queue_jobs",
        "ridethrough_jobs_parked_total",
        "ridethrough_jobs_replayed_total",
        "ridethrough_queue_oldest_job_age_seconds",
        "ridethrough_tokens_total",
        "ridethrough_provider_calls_in_flight",
    } <= used


def test_promtool_accepts_the_dashboard_queries(tmp_path: Path) -> None:
    """Every dashboard expression parses as PromQL (Grafana's $variables replaced by
    values), checked by promtool as recording rules."""
    promtool = _promtool()
    rules = [
        {"record": f"dashboard:q{i}", "expr": _grafana_free(expr)}
        for i, expr in enumerate(_dashboard_queries().values())
        if not expr.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _grafana_free(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$provider", ".*")


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return promtool


def test_storage_and_backlog_age_gauges() -> None:
    """The storage gauges export a limit only where there is one, and a replica that no
    longer exports them drops them all; backlog ages are dropped with the fleet view."""
    m = Metrics()
    m.storage({"AI_JOBS": (90, 100), "AI_DEAD": (5, -1)}, {"file": (10, -1), "memory": (0, 0)})
    m.backlog_ages("anthropic", {("high", "waiting"): 12.5, ("high", "parked"): 0.0})
    text = _exposition(m)
    assert 'ridethrough_jetstream_stream_max_bytes{stream="AI_JOBS"} 100.0' in text
    assert 'ridethrough_jetstream_stream_max_bytes{stream="AI_DEAD"}' not in text
    assert 'ridethrough_jetstream_account_bytes{storage="file"} 10.0' in text
    assert "ridethrough_jetstream_account_max_bytes{" not in text
    assert (
        'ridethrough_queue_oldest_job_age_seconds{priority="high",provider="anthropic",'
        'state="waiting"} 12.5'
    ) in text
    m.forget_storage()
    m.forget("anthropic")
    text = _exposition(m)
    assert "ridethrough_jetstream_stream_bytes{" not in text
    assert "ridethrough_queue_oldest_job_age_seconds{" not in text


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    """`promtool check rules` on the PrometheusRule's groups (Debian's prometheus package;
    .ci/run installs it when it can)."""
    promtool = _promtool()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(_rule_groups()))
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_as_their_unit_tests_say(tmp_path: Path) -> None:
    """`promtool test rules` on deploy/monitoring/rules.test.yaml: each alert fires on the
    series it is for, and not on its look-alikes (a breaker open parks legitimately, a
    replayer that replays is not stalled)."""
    promtool = _promtool()
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_rule_groups()))
    shutil.copy(MONITORING / "rules.test.yaml", tmp_path / "rules.test.yaml")
    done = subprocess.run(
        [promtool, "test", "rules", "rules.test.yaml"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "rules.test.yaml").read_text()))
    assert tested >= ALERTS, ALERTS - tested


def test_the_per_job_hooks_count_alike_with_their_children_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hooks a worker calls per job keep their labelled children: the counts are the
    ones ``labels()`` would give, for every model and tenant, past the cache's bound too."""
    from schemas.results import JobResult, Usage
    from services import metrics as metrics_module
    from services.producer import make_job
    from services.providers.base import Reply

    monkeypatch.setattr(metrics_module, "_CACHE_MAX", 2)
    m = Metrics()
    reply = Reply(response={"usage": {}}, usage=Usage(input_tokens=3, output_tokens=5), model="")
    jobs = [make_job("anthropic", f"m{i % 3}", prompt="x", tenant=f"t{i % 2}") for i in range(12)]
    for job in jobs:
        m.call_started(job.provider)
        m.call_ended(job, reply, 0.2)
        m.result_stored(
            JobResult(job_id=job.id, status="succeeded", provider="anthropic", model="m")
        )
    text = _exposition(m)
    assert 'ridethrough_jobs_finished_total{provider="anthropic",status="succeeded"} 12.0' in text
    assert 'ridethrough_provider_calls_in_flight{provider="anthropic"} 0.0' in text
    for model in ("m0", "m1", "m2"):
        count = (
            "ridethrough_provider_call_duration_seconds_count"
            f'{{model="{model}",outcome="success",provider="anthropic"}} 4.0'
        )
        assert count in text
    inputs = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ridethrough_tokens_total{") and 'kind="input"' in line
    )
    assert inputs == 12 * 3


@pytest.mark.parametrize("kind", ["counter", "gauge", "histogram"])
def test_plain_metrics_render_as_prometheus_client_would(kind: str) -> None:
    """The worker's per-job metrics are ``Plain`` (numbers, rendered at scrape): a scrape
    shows exactly what ``prometheus_client``'s own metric would after the same updates,
    values on a bucket's bound and past the last one included."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from services.metrics import CALL_BUCKETS, Plain

    ours_reg, theirs_reg = CollectorRegistry(), CollectorRegistry()
    name = {"counter": "x_total", "gauge": "x", "histogram": "x_seconds"}[kind]
    labels = ["provider", "model"]
    ours = Plain(kind, name, "doc", labels, registry=ours_reg, buckets=CALL_BUCKETS)
    theirs: Any
    if kind == "counter":
        theirs = Counter(name, "doc", labels, registry=theirs_reg)
    elif kind == "gauge":
        theirs = Gauge(name, "doc", labels, registry=theirs_reg)
    else:
        theirs = Histogram(name, "doc", labels, buckets=CALL_BUCKETS, registry=theirs_reg)
    values = [0.0, 0.05, 0.07, 0.1, 1.0, 2.4, 300.0, 301.0, 7.5, 0.05]
    for i, v in enumerate(values):
        for metric in (ours, theirs):
            child = metric.labels("anthropic", f"m{i % 3}")
            if kind == "histogram":
                child.observe(v)
            else:
                child.inc(v)
                if kind == "gauge" and i % 4 == 0:
                    child.dec(0.5)
    rendered = generate_latest(ours_reg).decode()
    assert rendered == generate_latest(theirs_reg).decode()
    assert 'model="m2"' in rendered
