"""deploy/ and compose.yaml: valid against their schemas, and consistent with the code.

No Docker engine or Kubernetes cluster runs here, so nothing is started: compose.yaml
is checked against the Compose specification (check-jsonschema's vendored schema), the
Kubernetes manifests against the Kubernetes schemas (kubernetes-validate, offline), the
KEDA ScaledObject and kustomization files against schemas in deploy/kubernetes/schemas,
the NATS configs by nats-server itself (``-t``). The example overlay is rendered by a
small kustomize subset below and validated as rendered. The probes run for real: the HTTP
ones against a ``services.monitor`` port, the alive-file one against a file written by
``services.liveness``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from schemas import subjects as s
from services.config import NotifySettings, Settings, WorkerSettings
from services.liveness import alive_file, write_status
from services.monitor import CHECK_TIMEOUT_S
from services.tools.devstack import find_nats_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
SCHEMAS = K8S / "schemas"
AUTH_CONF = DEPLOY / "nats" / "auth.conf"
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
SERVICE_ROLES = ("worker", "prober", "replayer", "notifier")
#: Where the notifier's sink secrets are mounted (Kubernetes), one file per sink setting.
NOTIFY_DIR = "/var/run/secrets/ridethrough/notify"
#: Where the gateway's keys file is mounted (Kubernetes, Secret ridethrough-gateway-keys).
GATEWAY_KEYS_DIR = "/var/run/secrets/ridethrough/gateway"
#: The sink settings a mounted secrets directory may hold (services/config.py NotifySettings).
NOTIFY_SECRETS = ("webhook_url", "webhook_secret", "slack_webhook_url", "pagerduty_routing_key")
#: The HTTP probes of every service pod (services/monitor.py).
PROBE_PATHS = {"startupProbe": "/livez", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
#: What a worker needs after shutdown_grace_s: releasing unfinished jobs and draining NATS.
RELEASE_MARGIN_S = 10


# --------------------------------------------------------------------------- helpers


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def schema(name: str) -> dict[str, Any]:
    """One of deploy/kubernetes/schemas/*.json."""
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return loaded


def strategic_merge(dst: dict[str, Any], patch: dict[str, Any]) -> None:
    """The part of a strategic merge patch the overlays use: maps merge recursively, lists
    of named items (containers, env, volumes) merge by ``name``, anything else replaces."""
    for key, value in patch.items():
        have = dst.get(key)
        if isinstance(value, dict) and isinstance(have, dict):
            strategic_merge(have, value)
        elif (
            isinstance(value, list)
            and isinstance(have, list)
            and all(isinstance(i, dict) and "name" in i for i in [*value, *have])
        ):
            by_name = {item["name"]: item for item in have}
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    have.append(item)
        else:
            dst[key] = value


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod spec of a Deployment or Job (none for other kinds)."""
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    return []


def render(kdir: Path) -> list[dict[str, Any]]:
    """``kustomize build kdir`` for the features deploy/ uses (the kustomization schema
    in deploy/kubernetes/schemas admits exactly those): resources, patches, namespace,
    images and labels."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    jsonschema.validate(k, schema("kustomization-v1beta1.json"))
    docs: list[dict[str, Any]] = []
    for resource in k["resources"]:
        path = kdir / resource
        docs += render(path) if path.is_dir() else load_yaml_docs(path)
    for patch in k.get("patches", []):
        p = yaml.safe_load((kdir / patch["path"]).read_text())
        targets = [
            d
            for d in docs
            if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]
        ]
        assert len(targets) == 1, f"patch {patch['path']} matches {len(targets)} resources"
        strategic_merge(targets[0], p)
    for d in docs:
        if "namespace" in k and d["kind"] != "Namespace":
            d["metadata"]["namespace"] = k["namespace"]
        for label in k.get("labels", []):
            d["metadata"].setdefault("labels", {}).update(label["pairs"])
        for spec in pod_specs(d):
            for c in spec["containers"]:
                for image in k.get("images", []):
                    name, _, tag = c["image"].partition(":")
                    if name == image["name"]:
                        new_tag = image.get("newTag", tag)
                        c["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")
    return docs


def validate_manifest(doc: dict[str, Any]) -> None:
    """Validate one rendered manifest: Kubernetes kinds with kubernetes-validate (strict),
    KEDA's ScaledObject with its schema."""
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, schema("scaledobject-keda-v1alpha1.json"))
        return
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The documents of ``kind``, by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """A container's ``env`` as name → value (or valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def password_variable(user: str) -> str:
    """The variable auth.conf reads ``user``'s password from."""
    return f"RIDETHROUGH_{user.upper().replace('-', '_')}_PASSWORD"


def auth_users() -> dict[str, dict[str, list[str]]]:
    """Users of deploy/nats/auth.conf: name → {"publish": [...], "subscribe": [...]}."""
    text = AUTH_CONF.read_text()
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    users: dict[str, dict[str, list[str]]] = {}
    for block in re.split(r"\buser:\s*", text)[1:]:
        name = re.match(r"[\w-]+", block)
        assert name is not None
        publish, _, subscribe = block.partition("subscribe:")
        users[name.group(0)] = {
            "publish": re.findall(r'"([^"]+)"', publish),
            "subscribe": re.findall(r'"([^"]+)"', subscribe),
        }
    return users


def auth_accounts() -> list[str]:
    """Account names declared in deploy/nats/auth.conf."""
    text = AUTH_CONF.read_text()
    block = text[text.index("accounts {") :]
    return re.findall(r"^  (\w+) \{", block, re.MULTILINE)


def compose() -> dict[str, Any]:
    """compose.yaml as loaded (anchors and merge keys resolved)."""
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


# --------------------------------------------------------------------------- compose


def test_compose_validates_against_the_compose_specification() -> None:
    """compose.yaml passes check-jsonschema's vendored Compose specification (offline)."""
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "compose.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_a_three_node_cluster_and_every_role() -> None:
    """Three NATS nodes with distinct names and their own volumes; topology first; workers
    with replicas; prober and replayer; the demo profile with the fake provider."""
    services = compose()["services"]
    nodes = {n: services[n] for n in ("nats-1", "nats-2", "nats-3")}
    assert len({n["environment"]["NATS_SERVER_NAME"] for n in nodes.values()}) == 3
    assert len({v for n in nodes.values() for v in n["volumes"] if v.endswith(":/data")}) == 3
    conf = (DEPLOY / "nats" / "nats.conf").read_text()
    assert all(f"nats-route://{n}:6222" in conf for n in nodes)

    assert services["topology"]["command"] == ["topology"]
    assert services["worker"]["command"] == ["worker", "--no-topology"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["prober"]["command"] == ["prober"]
    assert services["replayer"]["command"] == ["replayer"]
    assert services["notifier"]["command"] == ["notifier"]
    for role in SERVICE_ROLES:
        after = services[role]["depends_on"]["topology"]["condition"]
        assert after == "service_completed_successfully"
        assert services[role]["environment"]["NATS_URL"].count("nats://") == 3
        assert services[role]["environment"]["RIDETHROUGH_NATS__REPLICAS"] == "3"

    fake = services["fake-provider"]
    assert fake["profiles"] == ["demo"]
    assert fake["command"][:3] == ["fake-provider", "--host", "0.0.0.0"]
    demo = (DEPLOY / "compose" / "demo.env").read_text()
    assert "http://fake-provider:8787" in demo


def test_compose_workers_stop_after_their_drain_grace() -> None:
    """A worker container gets longer than shutdown_grace_s to stop, so SIGKILL never
    cuts a settlement short."""
    worker = compose()["services"]["worker"]
    grace = float(worker["environment"]["RIDETHROUGH_WORKER__SHUTDOWN_GRACE_S"])
    stop = int(worker["stop_grace_period"].removesuffix("s"))
    assert stop >= grace + RELEASE_MARGIN_S


# --------------------------------------------------------------------------- NATS configs


def _nats_test(conf: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_nats_server(), "-t", "-c", str(conf)],
        capture_output=True, text=True, timeout=30, cwd=conf.parent,
        env={"PATH": os.environ.get("PATH", ""), **env},
    )  # fmt: skip


def test_nats_cluster_config_is_valid_and_refuses_missing_passwords() -> None:
    """nats-server accepts deploy/nats/nats.conf (with auth.conf) when every password is
    in its environment, and refuses to start when one is missing."""
    passwords = {password_variable(u): "x" for u in auth_users()}
    ok = _nats_test(DEPLOY / "nats" / "nats.conf", {"NATS_SERVER_NAME": "n1", **passwords})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    passwords.pop("RIDETHROUGH_WORKER_PASSWORD")
    missing = _nats_test(DEPLOY / "nats" / "nats.conf", {"NATS_SERVER_NAME": "n1", **passwords})
    assert missing.returncode != 0
    assert "RIDETHROUGH_WORKER_PASSWORD" in missing.stdout + missing.stderr


def test_every_users_password_is_given_to_nats_everywhere() -> None:
    """Each user of auth.conf has its password variable, and the compose NATS nodes, the
    compose env files and the Helm values all give nats-server every one of them (it
    refuses to start when one is missing)."""
    needed = {password_variable(u) for u in auth_users()}
    assert needed == set(re.findall(r"\$(RIDETHROUGH_\w+_PASSWORD)", AUTH_CONF.read_text()))
    for node in ("nats-1", "nats-2", "nats-3"):
        env = compose()["services"][node]["environment"]
        assert needed <= set(env), (node, needed - set(env))
    for env_file in ("demo.env", "production.env.example"):
        text = (DEPLOY / "compose" / env_file).read_text()
        given = set(re.findall(r"^(RIDETHROUGH_\w+_PASSWORD)=", text, re.MULTILINE))
        assert needed == given, (env_file, needed ^ given)


def test_every_deployed_role_has_its_user_and_inbox() -> None:
    """Each role in compose and Kubernetes connects as a user of auth.conf, and its inbox
    prefix is the one that user may subscribe to."""
    users = auth_users()
    assert set(users) == {
        "producer", "tenant-acme", "worker", "prober", "replayer", "notifier", "gateway",
        "operator", "sys",
    }  # fmt: skip
    seen: list[tuple[str, str | None]] = []
    for name, svc in compose()["services"].items():
        env = svc.get("environment") or {}
        if "RIDETHROUGH_NATS__USER" in env:
            seen.append((env["RIDETHROUGH_NATS__USER"], env.get("RIDETHROUGH_NATS__INBOX_PREFIX")))
        elif name not in ("fake-provider",) and not name.startswith("nats-"):
            pytest.fail(f"compose service {name} connects to NATS as nobody")
    for d in render(BASE):
        for spec in pod_specs(d):
            env = env_of(spec["containers"][0])
            seen.append((env["RIDETHROUGH_NATS__USER"], env.get("RIDETHROUGH_NATS__INBOX_PREFIX")))
    assert {u for u, _ in seen} >= {
        "producer", "worker", "prober", "replayer", "notifier", "operator"
    }  # fmt: skip
    for user, prefix in seen:
        assert user in users, user
        allowed = users[user]["subscribe"]
        assert f"{prefix or '_INBOX'}.>" in allowed, (user, prefix, allowed)


#: The one create a service may make: the replayer's consumers of one model's parked jobs
#: (made when a model has some), each filtered inside AI_PARKED (an unfiltered one, or one
#: of another stream, is refused: tests/integration/test_security.py).
REPLAYER_CREATES = f"$JS.API.CONSUMER.CREATE.{s.PARKED_STREAM}.*.ai.parked.>"


#: The gateway's per-tenant ordered consumers of results (``services/gateway/results.py``):
#: nats-py creates them on the ephemeral endpoint, which refuses durable names.
GATEWAY_CREATES = f"$JS.API.CONSUMER.CREATE.{s.RESULTS_STREAM}"


#: The one purge a service may make: the worker and the replayer delete a large job's body
#: (its subjects in OBJ_ai_bodies, ``services/bodies.py``) once the job has its result.
BODY_DELETES = "$JS.API.STREAM.PURGE.OBJ_ai_bodies"


def test_least_privilege_denies_the_dangerous_apis_to_services() -> None:
    """No user but the operator may call the JetStream API broadly, purge or delete; the
    only creates a service may make are the replayer's filtered consumers of AI_PARKED and
    the gateway's ephemeral consumers of AI_RESULTS, the only purge the worker's and the
    replayer's of a finished job's body."""
    for name, perms in auth_users().items():
        if name in ("operator", "sys"):
            continue
        for subject in perms["publish"]:
            assert subject not in ("$JS.API.>", ">", "$KV.>"), (name, subject)
            if subject == BODY_DELETES and name in ("worker", "replayer"):
                continue
            assert "PURGE" not in subject and "DELETE" not in subject, (name, subject)
            if (name, subject) in (("replayer", REPLAYER_CREATES), ("gateway", GATEWAY_CREATES)):
                continue
            assert "CREATE" not in subject and "UPDATE" not in subject, (name, subject)
        assert "_INBOX.>" not in perms["subscribe"], name


def test_producers_read_their_own_results_only() -> None:
    """Result lookups and waits are scoped: `producer` to ai.results.shared.*, a tenant's
    user to ai.results.tenant.<tenant>.*; jobs are published on ai.jobs.*.* and
    ai.jobs.*.*.<tenant>; no producer may use the JetStream API whose subject does not name
    the result (besides listing stream names, to tell an unknown provider from a stream
    between leaders)."""
    lookup = f"$JS.API.DIRECT.GET.{s.RESULTS_STREAM}."
    scopes = []
    for name, perms in auth_users().items():
        if not (name == "producer" or name.startswith("tenant-")):
            continue
        tenant = None if name == "producer" else name[7:]
        scope = s.result_subject("*", tenant)
        scopes.append(scope)
        reads = [p for p in perms["publish"] if p.startswith("$JS.")]
        assert reads == [lookup + scope, "$JS.API.STREAM.NAMES"], (name, reads)
        results = [p for p in perms["subscribe"] if p.startswith("ai.")]
        assert results == [scope], (name, results)
        jobs = [p for p in perms["publish"] if p.startswith("ai.")]
        assert jobs == [s.jobs_subject("*", "*", tenant)], (name, jobs)
    # A `*` also matches a literal `>`: a scope X.* reaches everything below X, so no
    # scope's literal prefix may be the beginning of another's.
    prefixes = [scope.removesuffix("*") for scope in scopes]
    for a in prefixes:
        for b in prefixes:
            assert a == b or not b.startswith(a), (a, b)


def test_the_gateway_writes_jobs_only_and_reads_tenants_results_only() -> None:
    """The `gateway` user publishes jobs on 5-token subjects only (a tenant's: never a
    requeued one) and large jobs' bodies (put, never read); looks up and waits on tenants'
    results only; writes no KV bucket, result, dead letter, parked job or event; consumes
    nothing (no MSG.NEXT, no ack)."""
    perms = auth_users()["gateway"]
    writes = [p for p in perms["publish"] if not p.startswith("$JS.")]
    assert writes == [
        s.jobs_subject("*", "*", "*"),
        f"$O.{s.BODIES_BUCKET}.C.*",
        f"$O.{s.BODIES_BUCKET}.M.*",
    ]
    lookups = [
        p for p in perms["publish"] if p.startswith(f"$JS.API.DIRECT.GET.{s.RESULTS_STREAM}")
    ]
    assert lookups == [f"$JS.API.DIRECT.GET.{s.RESULTS_STREAM}.{s.result_subject('*', '*')}"]
    assert [p for p in perms["subscribe"] if p.startswith("ai.")] == [s.result_subject("*", "*")]
    for p in perms["publish"]:
        assert "MSG.NEXT" not in p and not p.startswith("$JS.ACK") and "UPDATE" not in p, p
        assert "DURABLE" not in p and "OBJ_" not in p, p  # no body read, lookup or delete
        assert not p.startswith("$JS.FC.") or p == f"$JS.FC.{s.RESULTS_STREAM}.*.*", p


# --------------------------------------------------------------------------- Kubernetes


def test_kubernetes_base_manifests_validate() -> None:
    """Every manifest of the base validates: Kubernetes kinds against the Kubernetes
    schemas (strict, two versions), the ScaledObject against KEDA's documented fields."""
    docs = render(BASE)
    assert {d["kind"] for d in docs} == {
        "ConfigMap",
        "Job",
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
        "Service",
    }
    for d in docs:
        validate_manifest(d)


def test_example_overlay_renders_and_validates() -> None:
    """The example overlay renders (namespace, image, patches applied) and validates."""
    docs = render(OVERLAY)
    for d in docs:
        validate_manifest(d)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "ridethrough"
    }
    worker = by_kind(docs, "Deployment")["ridethrough-worker"]
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/ridethrough:0.1.0"
    assert env_of(container)["RIDETHROUGH_WORKER__CONCURRENCY"] == "512"
    assert env_of(container)["RIDETHROUGH_NATS__USER"] == "worker"  # the base's env is kept
    assert by_kind(docs, "ScaledObject")["ridethrough-worker"]["spec"]["maxReplicaCount"] == 60


def test_workers_get_longer_to_stop_than_their_drain_grace() -> None:
    """terminationGracePeriodSeconds of the workers exceeds shutdown_grace_s plus the
    release of unfinished jobs (the configured value, or the default)."""
    docs = render(BASE)
    config = by_kind(docs, "ConfigMap")["ridethrough-config"]["data"]
    grace = float(
        config.get("RIDETHROUGH_WORKER__SHUTDOWN_GRACE_S", WorkerSettings().shutdown_grace_s)
    )
    worker = by_kind(docs, "Deployment")["ridethrough-worker"]
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= (
        grace + RELEASE_MARGIN_S
    )


def test_every_pod_runs_unprivileged_with_probes_and_requests() -> None:
    """Non-root, read-only root, no capabilities, resource requests; worker, prober and
    replayer have startup, readiness and liveness probes; workers skip the topology step."""
    docs = render(BASE)
    for d in docs:
        for spec in pod_specs(d):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["automountServiceAccountToken"] is False
            for c in spec["containers"]:
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
                assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {f"ridethrough-{r}" for r in (*SERVICE_ROLES, "gateway")}
    for role in SERVICE_ROLES:
        c = deployments[f"ridethrough-{role}"]["spec"]["template"]["spec"]["containers"][0]
        assert c["args"][0] == role
        env = {e["name"]: e.get("value") for e in c["env"]}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert str(ports["http"]) == env["RIDETHROUGH_HTTP__PORT"], role
        assert env["RIDETHROUGH_ALIVE_FILE"] == "/tmp/alive", role  # for those without a port
        paths = {p: c[p]["httpGet"]["path"] for p in PROBE_PATHS}
        assert paths == PROBE_PATHS, role
        assert all(c[p]["httpGet"]["port"] == "http" for p in PROBE_PATHS), role
        # A not-ready answer (503 within CHECK_TIMEOUT_S) must arrive before the probe gives up.
        assert c["readinessProbe"]["timeoutSeconds"] > CHECK_TIMEOUT_S, role
    worker = deployments["ridethrough-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert "--no-topology" in worker["args"]
    assert by_kind(docs, "Job")["ridethrough-topology"]["spec"]["template"]["spec"]["containers"][
        0
    ]["args"] == ["topology"]


def test_provider_keys_are_mounted_only_where_providers_are_called() -> None:
    """Workers and the prober mount the provider keys as files; the replayer and the
    topology job do not; the settings name those files."""
    docs = render(BASE)
    config = by_kind(docs, "ConfigMap")["ridethrough-config"]["data"]
    providers = json.loads(config["RIDETHROUGH_PROVIDERS"])
    settings = Settings(providers=providers)
    mounted: dict[str, set[str]] = {}
    for d in docs:
        for spec in pod_specs(d):
            secrets = {
                v["name"] for v in spec.get("volumes", []) if "secret" in v
            }  # volume names backed by a Secret
            mounts = {
                m["mountPath"] for m in spec["containers"][0].get("volumeMounts", [])
                if m["name"] in secrets
            }  # fmt: skip
            mounted[d["metadata"]["name"]] = mounts
    key_dir = "/var/run/secrets/ridethrough/providers"
    assert mounted["ridethrough-worker"] == mounted["ridethrough-prober"] == {key_dir}
    assert mounted["ridethrough-replayer"] == mounted["ridethrough-topology"] == set()
    assert mounted["ridethrough-notifier"] == {NOTIFY_DIR}  # its sinks, not provider keys
    assert mounted["ridethrough-gateway"] == {GATEWAY_KEYS_DIR}  # its keys, not providers'
    for name, p in settings.providers.items():
        assert str(p.api_key_file) == f"{key_dir}/{name}"


def _env_values(env: dict[str, Any]) -> list[str]:
    return [str(v) for v in env.values() if v is not None]


def test_the_notifier_is_deployed_with_its_sinks_from_secrets_only(tmp_path: Path) -> None:
    """compose (profile `notify`) and Kubernetes run `ridethrough notifier`, two leased
    replicas as user notifier; its sinks come from a secret mounted as a directory
    (RIDETHROUGH_NOTIFY__SECRETS_DIR), never from an environment value; files named as in
    the manifests' comments turn the sinks on."""
    from services.notifier.sinks import build_sinks

    for name in NOTIFY_SECRETS:  # the file names are settings (and have *_file forms)
        assert {name, f"{name}_file"} <= set(NotifySettings.model_fields), name
    svc = compose()["services"]["notifier"]
    assert svc["profiles"] == ["notify"] and svc["deploy"]["replicas"] == 2
    env = svc["environment"]
    target = env["RIDETHROUGH_NOTIFY__SECRETS_DIR"]
    assert [x["target"] for x in svc["secrets"]] == [target]
    assert svc["secrets"][0]["source"] in compose()["secrets"]
    assert not [k for k in env if k.startswith("RIDETHROUGH_NOTIFY__") and k != (
        "RIDETHROUGH_NOTIFY__SECRETS_DIR"
    )]  # fmt: skip
    docs = render(BASE)
    dep = by_kind(docs, "Deployment")["ridethrough-notifier"]
    assert dep["spec"]["replicas"] == 2
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    k8s_env = {e["name"]: e for e in c["env"]}
    assert k8s_env["RIDETHROUGH_NOTIFY__SECRETS_DIR"]["value"] == NOTIFY_DIR
    assert [k for k in k8s_env if k.startswith("RIDETHROUGH_NOTIFY__")] == [
        "RIDETHROUGH_NOTIFY__SECRETS_DIR"
    ]
    volume = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == NOTIFY_DIR)
    secret = next(v["secret"] for v in spec["volumes"] if v["name"] == volume)
    assert secret["secretName"] == "ridethrough-notify"
    comments = (BASE / "notifier.yaml").read_text() + (BASE / "kustomization.yaml").read_text()
    assert all(name in comments for name in NOTIFY_SECRETS)
    assert "ridethrough-notify" in (BASE / "kustomization.yaml").read_text()
    # Such a directory, as mounted: the files present are the sinks.
    (tmp_path / "slack_webhook_url").write_text("https://hooks.slack.example/T/B/x")
    settings = Settings(notify={"secrets_dir": tmp_path})
    assert [s.name for s in build_sinks(settings)] == ["slack"]
    assert not any("hooks.slack" in v for v in _env_values(env))


def test_the_gateway_is_deployed_as_its_user_with_its_keys_from_a_secret() -> None:
    """compose (profile `gateway`) and Kubernetes run `ridethrough gateway` on port 8080 as
    NATS user gateway with its inbox prefix; its keys file comes from a secret (compose
    file, Kubernetes Secret ridethrough-gateway-keys mounted read-only), its settings build
    from that environment; Kubernetes probes its port over TCP (no /readyz) and a Service
    sends port 80 there."""
    from services.gateway import KeyRing

    svc = compose()["services"]["gateway"]
    assert svc["profiles"] == ["gateway"]
    assert svc["command"] == ["gateway", "--host", "0.0.0.0", "--port", "8080"]
    env = svc["environment"]
    assert env["RIDETHROUGH_NATS__USER"] == "gateway"
    assert env["RIDETHROUGH_NATS__INBOX_PREFIX"] == "_INBOX.gateway"
    assert "RIDETHROUGH_GATEWAY_PASSWORD" in env["RIDETHROUGH_NATS__PASSWORD"]
    assert [x["target"] for x in svc["secrets"]] == [env["RIDETHROUGH_GATEWAY__KEYS_FILE"]]
    keys_file = compose()["secrets"][svc["secrets"][0]["source"]]["file"]
    example = ROOT / keys_file.split(":-", 1)[1].rstrip("}")
    assert len(KeyRing.from_settings(Settings(gateway={"keys_file": example}).gateway)) == 0
    assert svc["depends_on"]["topology"]["condition"] == "service_completed_successfully"
    assert not [k for k in env if "API_KEY" in k or k.startswith("RIDETHROUGH_PROVIDERS__")]

    docs = render(BASE)
    dep = by_kind(docs, "Deployment")["ridethrough-gateway"]
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["args"] == ["gateway", "--host", "0.0.0.0", "--port", "8080"]
    k8s_env = env_of(c)
    assert k8s_env["RIDETHROUGH_NATS__USER"] == "gateway"
    assert k8s_env["RIDETHROUGH_NATS__INBOX_PREFIX"] == "_INBOX.gateway"
    assert k8s_env["RIDETHROUGH_NATS__PASSWORD"]["secretKeyRef"]["key"] == "gateway"
    keys = Path(k8s_env["RIDETHROUGH_GATEWAY__KEYS_FILE"])
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(keys.parent))
    assert mount["mountPath"] == GATEWAY_KEYS_DIR and mount["readOnly"] is True
    secret = next(v["secret"] for v in spec["volumes"] if v["name"] == mount["name"])
    assert secret["secretName"] == "ridethrough-gateway-keys"
    assert keys.name == "keys" and "`keys`" in (BASE / "kustomization.yaml").read_text()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    for probe in PROBE_PATHS:
        assert c[probe]["tcpSocket"]["port"] == "http", probe
    service = by_kind(docs, "Service")["ridethrough-gateway"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_every_deployment_has_a_disruption_budget() -> None:
    """A PodDisruptionBudget selects the pods of each Deployment."""
    docs = render(BASE)
    pdbs = list(by_kind(docs, "PodDisruptionBudget").values())
    for name, dep in by_kind(docs, "Deployment").items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        matching = [
            p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, name


def test_keda_scales_workers_on_every_provider_consumer() -> None:
    """The ScaledObject targets the worker Deployment, with one nats-jetstream trigger per
    configured provider and priority, on consumer workers-<provider>-<priority> of AI_JOBS,
    in an account of auth.conf."""
    docs = render(BASE)
    scaled = by_kind(docs, "ScaledObject")["ridethrough-worker"]
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind(docs, "Deployment")
    config = by_kind(docs, "ConfigMap")["ridethrough-config"]["data"]
    providers = sorted(json.loads(config["RIDETHROUGH_PROVIDERS"]))
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"nats-jetstream"}
    assert sorted(t["metadata"]["consumer"] for t in triggers) == sorted(
        s.worker_consumer(p, prio) for p in providers for prio in s.PRIORITIES
    )
    assert {t["metadata"]["stream"] for t in triggers} == {s.JOBS_STREAM}
    assert {t["metadata"]["account"] for t in triggers} <= set(auth_accounts())
    assert scaled["spec"]["minReplicaCount"] >= 2


# --------------------------------------------------------------------------- probes


def _alive_command() -> str:
    """Compose's healthcheck for a service without a port (``x-alive-healthcheck``)."""
    healthcheck = compose()["x-alive-healthcheck"]["test"]
    assert healthcheck[:3] == ["CMD", "sh", "-c"]
    return str(healthcheck[3]).replace("$$", "$")  # compose's escaping of "$"


def _run_probe(command: str, health: Path) -> int:
    if shutil.which("sh") is None or shutil.which("stat") is None:
        pytest.skip("needs sh and coreutils' stat, as the image has")
    return subprocess.run(
        ["sh", "-c", command.replace("/tmp/alive", str(health))], timeout=10, check=False
    ).returncode


def test_alive_probe_tells_ready_from_not_ready_stale_and_missing(tmp_path: Path) -> None:
    """Run compose's alive-file healthcheck (for services without a port) against a file
    written by services.liveness: only a fresh "ready" passes."""
    command = _alive_command()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "RIDETHROUGH_ALIVE_FILE=/tmp/alive" in dockerfile
    health = tmp_path / "health"
    write_status(health, connected=True)
    assert _run_probe(command, health) == 0
    write_status(health, connected=False)
    assert _run_probe(command, health) != 0
    write_status(health, connected=True)
    stale = time.time() - 600
    os.utime(health, (stale, stale))
    assert _run_probe(command, health) != 0
    health.unlink()
    assert _run_probe(command, health) != 0


def test_compose_services_probe_readyz_on_their_http_port() -> None:
    """compose's worker, prober and replayer set RIDETHROUGH_HTTP__PORT, and their
    healthcheck asks /readyz on that port."""
    c = compose()
    port = c["x-env"]["RIDETHROUGH_HTTP__PORT"]
    for role in SERVICE_ROLES:
        test = c["services"][role]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], role
        assert f"http://127.0.0.1:{port}/readyz" in test[3], role
        assert c["services"][role]["environment"]["RIDETHROUGH_HTTP__PORT"] == port


def test_http_probes_follow_readiness_of_a_real_port(tmp_path: Path) -> None:
    """The compose healthcheck command and the manifests' probe paths, against a real
    services.monitor port: /livez always 200, /readyz 200 only while the service is ready."""
    from services.config import HttpSettings
    from services.monitor import http_port
    from services.tools.devstack import free_port

    port = free_port()
    command = compose()["services"]["worker"]["healthcheck"]["test"][3]
    command = command.replace(":9090/", f":{port}/")
    why = ["not connected to NATS"]

    async def ready() -> str:
        return why[0]

    async def check() -> list[tuple[int, int, int]]:
        seen = []
        async with http_port(HttpSettings(port=port, host="127.0.0.1"), ready):
            for state in ("not connected to NATS", ""):
                why[0] = state
                probe = await asyncio.create_subprocess_exec(sys.executable, "-c", command)
                rc = await probe.wait()
                seen.append((rc, await _status(port, "/livez"), await _status(port, "/readyz")))
        return seen

    not_ready, ready_now = asyncio.run(check())
    assert not_ready[0] != 0 and not_ready[1:] == (200, 503)
    assert ready_now == (0, 200, 200)


async def _status(port: int, path: str) -> int:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        return r.status


def test_alive_file_beats_while_the_service_runs(tmp_path: Path) -> None:
    """alive_file writes "ready" or "not-ready" as the connection goes, and removes the
    file when the service stops."""
    health = tmp_path / "sub" / "health"
    connected = [True]

    async def scenario() -> list[str]:
        seen = []
        async with alive_file(health, lambda: connected[0], interval_s=0.01):
            for want in ("ready", "not-ready"):
                connected[0] = want == "ready"
                for _ in range(500):  # bounded: 5 s at most
                    await asyncio.sleep(0.01)
                    text = health.read_text().strip() if health.exists() else ""
                    if text == want:
                        break
                seen.append(text)
        return seen

    assert asyncio.run(scenario()) == ["ready", "not-ready"]
    assert not health.exists()


# --------------------------------------------------------------------------- image, Helm


def test_dockerfile_runs_ridethrough_as_a_non_root_user() -> None:
    """The final stage runs as a numeric non-root user with `ridethrough` as its only entry
    point, and copies only the virtualenv from the build stage."""
    text = (DEPLOY / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^FROM python:[\d.]+-slim\s*$", final, re.MULTILINE)
    user = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.findall(r"^ENTRYPOINT (.+)$", final, re.MULTILINE) == ['["ridethrough"]']
    assert re.findall(r"^COPY (.+)$", final, re.MULTILINE) == [
        "--from=build /opt/ridethrough /opt/ridethrough"
    ]
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    copied = re.findall(r"^COPY (?!--)(.+) \S+$", text, re.MULTILINE)
    for sources in copied:
        for src in sources.split():
            assert f"!{src}" in ignore or f"!{src}/**" in ignore, src


def test_helm_values_make_a_three_node_jetstream_cluster_with_our_accounts() -> None:
    """Values for the official NATS chart: cluster of 3, JetStream on file storage,
    monitoring on (for KEDA), auth.conf included from a mounted ConfigMap, and every
    password it needs in the container's environment."""
    values = yaml.safe_load((DEPLOY / "helm" / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["cluster"]["enabled"] is True and config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["monitor"]["enabled"] is True and config["monitor"]["port"] == 8222
    include = config["merge"]["$include"]
    mounts = [p["value"] for p in values["container"]["patch"] if p["path"] == "/volumeMounts/-"]
    mounted = Path("/etc/nats-config", include).resolve()
    assert any(mounted.parent == Path(m["mountPath"]) for m in mounts), (include, mounts)
    assert mounted.name == AUTH_CONF.name
    needed = set(re.findall(r"\$(RIDETHROUGH_\w+_PASSWORD)", AUTH_CONF.read_text()))
    assert needed == set(values["container"]["env"]) - {"GOMEMLIMIT"}
    scaled = by_kind(render(BASE), "ScaledObject")["ridethrough-worker"]
    endpoints = {t["metadata"]["natsServerMonitoringEndpoint"] for t in scaled["spec"]["triggers"]}
    assert endpoints == {f"nats-headless.nats.svc.cluster.local:{config['monitor']['port']}"}


@pytest.mark.parametrize("command", ["worker", "prober", "replayer"])
def test_the_alive_file_keeps_its_old_option_and_variable_names(command: str) -> None:
    """`--health-file` / RIDETHROUGH_HEALTH_FILE (the names before `--alive-file`) still
    reach the same option: manifests written for them keep working."""
    import typer.main

    from services.cli.app import app

    click_cmd = typer.main.get_command(app)
    param = next(p for p in click_cmd.commands[command].params if p.name == "alive_file")  # type: ignore[attr-defined]
    assert {"--alive-file", "--health-file"} <= set(param.opts)
    assert param.envvar == ["RIDETHROUGH_ALIVE_FILE", "RIDETHROUGH_HEALTH_FILE"]
