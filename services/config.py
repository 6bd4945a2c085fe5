"""One typed, frozen settings object, built once from the environment and passed in.

Environment variables use the prefix ``RIDETHROUGH_`` (nested fields with ``__``),
plus the conventional ``NATS_URL``, ``ANTHROPIC_API_KEY`` and ``OPENAI_API_KEY``.
Nothing reads the environment at import time: call ``Settings()`` (or
``load_settings``) where a process starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.subjects import PRIORITIES, is_token
from services.errors import ConfigError

DAY = 86_400.0


ProviderKind = Literal["anthropic", "openai", "anthropic-bedrock", "anthropic-vertex"]

#: The kinds that speak the Anthropic Messages API (one request shape, three doors): a job
#: fails over between them with its request unchanged but for the model id.
ANTHROPIC_SHAPE: tuple[ProviderKind, ...] = ("anthropic", "anthropic-bedrock", "anthropic-vertex")


class ProviderSettings(BaseModel):
    """One provider endpoint: which SDK speaks to it, where, and with which key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ProviderKind
    base_url: str | None = None
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    timeout_s: float = Field(600.0, gt=0, description="longest wait for each read of a reply")
    deadline_s: float = Field(
        1200.0, gt=0, description="longest a whole call may take (a stalled stream included)"
    )
    max_connections: int = Field(1000, gt=0)
    latency_budget_s: float | None = Field(
        None,
        gt=0,
        description="a call slower than this counts towards the breaker like a failure "
        "(it still succeeds); off when unset",
    )
    model_latency_budget_s: dict[str, float] = Field(
        default_factory=dict, description="latency_budget_s of single models (model: seconds)"
    )
    probe_model: str | None = Field(None, description="model of the health probe")
    probe_request: dict[str, Any] | None = Field(None, description="body of the health probe")
    status_page_url: str | None = Field(
        None,
        description="the provider's Atlassian Statuspage summary "
        "(https://status.example.com/api/v2/summary.json); read by the prober as evidence, "
        "never as proof; off when unset",
    )
    status_components: dict[str, str] = Field(
        default_factory=dict,
        description="status page component (name or id) -> the model it covers, or '*' for "
        "the whole provider; a component not listed lowers no threshold (it is only shown)",
    )
    model_map: dict[str, str] = Field(
        default_factory=dict,
        description="a job's model -> this provider's id of it (claude-sonnet-4-5 -> "
        "anthropic.claude-sonnet-4-5-20250929-v1:0 on Bedrock); applied when it is called, "
        "so a fallback names only a provider and the model follows; unlisted models pass as-is",
    )
    # anthropic-bedrock: the AWS credential chain (environment, profile, instance role)
    # unless keys are given here; a Bedrock API key goes in api_key / api_key_file.
    aws_region: str | None = Field(None, description="Bedrock region (default: AWS_REGION)")
    aws_profile: str | None = Field(None, description="a profile of ~/.aws/config")
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_secret_access_key_file: Path | None = Field(
        None, description="file holding the secret access key (a mounted secret)"
    )
    aws_session_token: SecretStr | None = None
    # anthropic-vertex: Google application default credentials unless an access token is
    # given (gcp_access_token or a file a token refresher writes).
    gcp_project_id: str | None = Field(
        None, description="Vertex project (default: ANTHROPIC_VERTEX_PROJECT_ID or the ADC's)"
    )
    gcp_region: str | None = Field(None, description="Vertex region (default: CLOUD_ML_REGION)")
    gcp_access_token: SecretStr | None = None
    gcp_access_token_file: Path | None = None

    @model_validator(mode="after")
    def _check_door(self) -> ProviderSettings:
        for model, target in self.model_map.items():
            if not model.strip() or not target.strip():
                raise ValueError("model_map entries must name a model on both sides")
        aws = self.aws_access_key_id, self.aws_secret_access_key or self.aws_secret_access_key_file
        if self.kind != "anthropic-bedrock" and (
            any(aws) or self.aws_region or self.aws_profile or self.aws_session_token
        ):
            raise ValueError(f"aws_* settings are for kind anthropic-bedrock, not {self.kind}")
        if (aws[0] is None) != (aws[1] is None):
            raise ValueError("give aws_access_key_id and aws_secret_access_key together")
        gcp = (self.gcp_project_id, self.gcp_region, self.gcp_access_token,
               self.gcp_access_token_file)  # fmt: skip
        if self.kind != "anthropic-vertex" and any(v is not None for v in gcp):
            raise ValueError(f"gcp_* settings are for kind anthropic-vertex, not {self.kind}")
        return self

    def map_model(self, model: str) -> str:
        """This provider's id of ``model`` (``model`` itself when ``model_map`` has none)."""
        return self.model_map.get(model, model)

    def latency_budget(self, model: str) -> float | None:
        """Seconds a call of ``model`` may take before it counts as slow (None: no budget)."""
        return self.model_latency_budget_s.get(model, self.latency_budget_s)

    def key(self) -> str | None:
        """The API key, read from ``api_key`` or from the mounted secret file."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_file is not None:
            try:
                return self.api_key_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read api_key_file {self.api_key_file}: {exc}") from exc
        return None


#: An inbox prefix: dot-separated subject tokens, no wildcards (``_INBOX``, ``_INBOX.worker``).
_INBOX_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class NatsSettings(BaseModel):
    """How to reach NATS (servers, credentials, TLS), and how the JetStream topology is sized.

    Credentials: at most one of ``user`` (with ``password``), ``token``, ``creds_file``
    (a JWT + nkey ``.creds`` file) and ``nkey_seed_file`` (a bare nkey seed). TLS: a CA
    bundle to verify the servers with, and a client certificate and key for mutual TLS.
    Secrets are ``SecretStr`` or files, so they never print with the settings.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    nkey_seed_file: Path | None = Field(None, description="file holding an nkey seed (SU...)")
    tls_ca_file: Path | None = Field(None, description="CA bundle that signed the servers' certs")
    tls_cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    tls_key_file: Path | None = Field(None, description="key of the client certificate")
    tls_hostname: str | None = Field(None, description="name to verify the server cert against")
    inbox_prefix: str = Field(
        "_INBOX", description="prefix of reply subjects; per-role prefixes narrow permissions"
    )
    connect_timeout_s: float = Field(2.0, gt=0)
    replicas: int = Field(1, ge=1, le=5)
    storage: Literal["file", "memory"] = "file"
    dedup_window_s: float = Field(3600.0, ge=3600.0)
    jobs_max_age_s: float = Field(0.0, ge=0, description="0 keeps waiting jobs until consumed")
    parked_max_age_s: float = Field(7 * DAY, gt=0)
    results_max_age_s: float = Field(7 * DAY, gt=0)
    dead_max_age_s: float = Field(30 * DAY, gt=0)
    events_max_age_s: float = Field(30 * DAY, gt=0)
    worker_ttl_s: float = Field(15.0, gt=0)

    @model_validator(mode="after")
    def _check_auth(self) -> NatsSettings:
        methods = [
            name
            for name, value in (
                ("user", self.user),
                ("token", self.token),
                ("creds_file", self.creds_file),
                ("nkey_seed_file", self.nkey_seed_file),
            )
            if value is not None
        ]
        if len(methods) > 1:
            raise ValueError(f"give one NATS credential, not several: {', '.join(methods)}")
        if self.password is not None and self.user is None:
            raise ValueError("a NATS password needs a user")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        if not _INBOX_PREFIX.match(self.inbox_prefix):
            raise ValueError(
                f"inbox_prefix {self.inbox_prefix!r} must be dot-separated subject tokens "
                "without wildcards"
            )
        return self

    @property
    def tls(self) -> bool:
        """Whether any TLS file is configured (a ``tls://`` URL also turns TLS on)."""
        return self.tls_ca_file is not None or self.tls_cert_file is not None

    @property
    def servers(self) -> list[str]:
        """The server URLs (``url`` may list several, comma-separated)."""
        return [u.strip() for u in self.url.split(",") if u.strip()]


class WorkerSettings(BaseModel):
    """How one worker process consumes and retries."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: int = Field(256, gt=0, description="provider calls in flight per process")
    adaptive_limit: bool = Field(
        True,
        description=(
            "per provider, learn how many calls in flight it accepts: halve on a 429 or an "
            "overload, grow back as calls succeed (never above concurrency)"
        ),
    )
    batch_size: int = Field(64, gt=0, description="messages fetched per pull")
    fetch_timeout_s: float = Field(0.05, gt=0, description="longest wait to fill a pull batch")
    ack_wait_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(8, gt=0, description="deliveries before a transient failure is dead")
    rate_limited_max_attempts: int = Field(
        64, gt=0, description="deliveries before a job that only met 429s is dead"
    )
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    shutdown_grace_s: float = Field(20.0, ge=0)
    max_ack_pending: int = Field(10_000, gt=0)
    priority_weights: dict[str, int] = Field(
        default_factory=lambda: {"high": 16, "normal": 4, "low": 1},
        description=(
            "shares of the freed call slots while jobs of several priorities wait for one: "
            "of every 21 by default, 16 go to high, 4 to normal and 1 to low"
        ),
    )

    @model_validator(mode="after")
    def _check_weights(self) -> WorkerSettings:
        if sorted(self.priority_weights) != sorted(PRIORITIES):
            raise ValueError(f"priority_weights must name exactly {', '.join(PRIORITIES)}")
        if any(w <= 0 for w in self.priority_weights.values()):
            raise ValueError("priority_weights must be positive (0 would starve a priority)")
        return self


class BreakerSettings(BaseModel):
    """When a breaker (a provider's, or one model's) opens, and how the prober decides it
    has recovered. Each scope has its own window with these thresholds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window_s: float = Field(10.0, gt=0, description="sliding window of the failure rate")
    min_calls: int = Field(10, gt=0, description="calls in the window before the rate counts")
    failure_rate: float = Field(0.5, gt=0, le=1)
    consecutive_failures: int = Field(5, gt=0)
    models_to_open_provider: int = Field(
        2,
        ge=0,
        description="the provider's breaker opens when this many of its models are open (0: never)",
    )
    timeouts_count: bool = Field(
        True, description="a call that timed out counts towards the breaker (slow is down too)"
    )
    probe_successes: int = Field(2, gt=0, description="consecutive probe successes to half_open")
    probe_interval_s: float = Field(1.0, gt=0, description="first probe delay; after a success")
    probe_max_interval_s: float = Field(5.0, gt=0, description="cap of the probe backoff")
    probe_timeout_s: float = Field(
        30.0, gt=0, description="a probe not answered within this is a failed probe"
    )
    board_poll_s: float = Field(0.25, gt=0, description="how often processes re-read ai_health")
    consecutive_failures_degraded: int | None = Field(
        None,
        gt=0,
        description="consecutive_failures while the status page says the scope is degraded "
        "(default: half, rounded up; never above consecutive_failures)",
    )
    failure_rate_degraded: float | None = Field(
        None,
        gt=0,
        le=1,
        description="failure_rate while the status page says the scope is degraded "
        "(default: half; never above failure_rate)",
    )
    status_page_interval_s: float = Field(
        45.0,
        gt=0,
        description="mean time between two reads of a provider's status page (jittered by a "
        "third either way: 30-60 s by default)",
    )
    status_page_timeout_s: float = Field(5.0, gt=0, description="longest read of a status page")
    evidence_poll_s: float = Field(
        5.0, gt=0, description="how often workers re-read the status page evidence"
    )

    def trip_thresholds(self, *, degraded: bool = False) -> tuple[int, float]:
        """(consecutive failures, failure rate) that trip a breaker; lower (never higher)
        while a status page says the scope is degraded."""
        if not degraded:
            return self.consecutive_failures, self.failure_rate
        consecutive = self.consecutive_failures_degraded or -(-self.consecutive_failures // 2)
        rate = self.failure_rate_degraded or self.failure_rate / 2
        return min(consecutive, self.consecutive_failures), min(rate, self.failure_rate)


class ReplaySettings(BaseModel):
    """How fast parked jobs go back to the queue once a provider recovers.

    ``pace = "adaptive"`` (the default): a slow start (``initial_rate``, times
    ``ramp_factor`` every ``ramp_interval_s``) until the workers push back, then additive
    increase (``increase`` jobs/s per interval) and multiplicative decrease
    (``decrease_factor``) on pushback: the jobs waiting for the provider's workers hold
    more than ``queue_target_s`` seconds of the replay rate (the workers, so the provider,
    do not keep up: slow answers, 429s and overload all show there). ``max_rate`` is then
    a safety limit, not the pace. ``pace = "ramp"``: the slow start alone, up to
    ``max_rate``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pace: Literal["adaptive", "ramp"] = "adaptive"
    initial_rate: float = Field(5.0, gt=0, description="jobs/s when replay starts")
    ramp_factor: float = Field(2.0, ge=1, description="rate multiplier per ramp interval")
    ramp_interval_s: float = Field(1.0, gt=0)
    max_rate: float = Field(2000.0, ge=0, description="jobs/s cap; 0 = uncapped")
    increase: float = Field(
        50.0, gt=0, description="adaptive: jobs/s added per ramp interval after a pushback"
    )
    decrease_factor: float = Field(
        0.5, gt=0, lt=1, description="adaptive: the rate's multiplier on a pushback"
    )
    queue_target_s: float = Field(
        2.0,
        gt=0,
        description="adaptive: seconds of the replay rate the workers' queue may hold "
        "before it counts as a pushback",
    )
    batch_size: int = Field(100, gt=0)
    lease_s: float = Field(3.0, gt=0, description="leadership lease of a prober or replayer")
    ack_wait_s: float = Field(10.0, gt=0)


class HttpSettings(BaseModel):
    """The optional HTTP port of a service: ``/metrics``, ``/livez``, ``/readyz``.

    Off unless ``port`` is set (``--http-port`` or ``RIDETHROUGH_HTTP__PORT``). Model,
    tenant and reason labels keep their first N distinct values; the rest are ``other``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int | None = Field(None, ge=0, le=65535, description="0 picks a free port")
    host: str = Field("0.0.0.0", description="the address to listen on (all: a pod's port)")
    max_models: int = Field(50, ge=1, description="distinct model labels; the rest: other")
    max_tenants: int = Field(50, ge=1, description="distinct tenant labels; the rest: other")
    max_reasons: int = Field(50, ge=1, description="distinct reason labels; the rest: other")


class TracingSettings(BaseModel):
    """OpenTelemetry traces of the services (``services/tracing.py``).

    ``enabled`` None (the default) follows the standard variables: on when
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, or
    ``OTEL_TRACES_EXPORTER`` names an exporter; ``OTEL_SDK_DISABLED=true`` turns it off.
    The exporter, sampler and resource are read by the SDK from the ``OTEL_*`` variables.
    Needs the ``otel`` extra (``pip install 'ridethrough[otel]'``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool | None = Field(None, description="None: on when OTEL_* names an exporter")
    exporter: Literal["otlp", "console"] = Field(
        "otlp", description="otlp (OTLP over HTTP, OTEL_EXPORTER_OTLP_*) or console"
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces URL (.../v1/traces); default: the OTEL_EXPORTER_OTLP_* "
        "variables, else http://localhost:4318/v1/traces",
    )


#: The Anthropic Messages API's request size limit (32 MB).
MESSAGES_MAX_BYTES = 32 * 1024 * 1024


class GatewaySettings(BaseModel):
    """The HTTP gateway (``ridethrough gateway``): where it listens, which provider its
    Anthropic door submits to, how long a request waits, and whose keys open it.

    Keys are never stored in clear: ``keys`` maps the SHA-256 hex digest of a gateway key
    to its tenant; ``keys_file`` holds more, one ``<sha256-hex> <tenant>`` a line.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    anthropic_provider: str = Field(
        "anthropic", description="the configured provider (of kind anthropic) /v1/messages uses"
    )
    openai_provider: str | None = Field(
        "openai",
        description="the configured provider (of kind openai) /v1/chat/completions uses; "
        "null: that door is not served",
    )
    wait_s: float = Field(
        60.0, ge=0, description="how long a request waits for its result by default"
    )
    max_wait_s: float = Field(
        600.0, ge=0, description="the longest wait a client may ask for (x-ridethrough-wait-s)"
    )
    retry_after_s: float = Field(
        5.0, gt=0, description="retry-after of the 529 a request gets when its wait runs out"
    )
    max_body_bytes: int = Field(MESSAGES_MAX_BYTES, gt=0, description="largest request body")
    keys: dict[str, str] = Field(
        default_factory=dict, description="SHA-256 hex digest of a gateway key -> its tenant"
    )
    keys_file: Path | None = Field(
        None, description="file of '<sha256-hex> <tenant>' lines (# comments), read at start"
    )
    operator_keys: list[str] = Field(
        default_factory=list,
        description="SHA-256 hex digests of the keys that open /status (none: it stays shut)",
    )
    status_refresh_s: float = Field(5.0, gt=0, description="how often /status reloads itself")

    @model_validator(mode="after")
    def _check_keys(self) -> GatewaySettings:
        for digest in self.operator_keys:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("operator keys must be SHA-256 hex digests (64 lowercase hex)")
        for digest, tenant in self.keys.items():
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("gateway keys must be SHA-256 hex digests (64 lowercase hex)")
            if not is_token(tenant):
                raise ValueError(f"tenant {tenant!r} must be a subject token (A-Z a-z 0-9 _ -)")
        return self


class BodySettings(BaseModel):
    """Large jobs: a request body over ``threshold_bytes`` waits in the object store bucket
    ``ai_bodies`` and the job carries a reference (``services/bodies.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold_bytes: int = Field(
        1024 * 1024,
        gt=0,
        description="a job whose encoding is larger goes by reference (never above the "
        "server's max_payload less the room a park record needs)",
    )
    max_bytes: int = Field(
        MESSAGES_MAX_BYTES, gt=0, description="the largest request body a job may have"
    )
    max_age_s: float = Field(
        30 * DAY,
        gt=0,
        description="bodies left behind (a dead letter's, a submit that failed half way, a "
        "delete that failed) go after this long; keep it >= parked and dead max ages",
    )
    bucket_max_bytes: int = Field(
        -1, description="the bucket's size cap (-1: none); a full bucket refuses new bodies"
    )
    timeout_s: float = Field(60.0, gt=0, description="longest put or fetch of one body")


def _read_secret(value: SecretStr | None, path: Path | None, what: str) -> str | None:
    """A secret from its setting, else from its file (stripped); None when neither is set."""
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc
    if not text:
        raise ConfigError(f"{what} file {path} is empty")
    return text


class NotifySettings(BaseModel):
    """Where ``ridethrough notifier`` sends outage notifications, and how it retries.

    Each sink is on when its URL (or key) is set, in the setting or in a file (a mounted
    secret): a generic webhook (CloudEvents JSON signed with HMAC-SHA256 under
    ``webhook_secret``), a Slack incoming webhook, PagerDuty Events v2. URLs are secrets
    too (a Slack webhook URL is its own credential): they never print or log.

    ``secrets_dir`` takes them from a mounted directory instead (a Kubernetes Secret, a
    compose secret): each file named like a setting (``webhook_url``, ``webhook_secret``,
    ``slack_webhook_url``, ``pagerduty_routing_key``) that is there turns its sink on; a
    setting or ``*_file`` given too wins over its file there.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    webhook_url: SecretStr | None = Field(None, description="generic webhook (CloudEvents)")
    webhook_url_file: Path | None = None
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key the webhook's notifications are signed with"
    )
    webhook_secret_file: Path | None = None
    slack_webhook_url: SecretStr | None = Field(None, description="Slack incoming webhook URL")
    slack_webhook_url_file: Path | None = None
    pagerduty_routing_key: SecretStr | None = Field(
        None, description="PagerDuty Events v2 integration (routing) key"
    )
    pagerduty_routing_key_file: Path | None = None
    secrets_dir: Path | None = Field(
        None, description="directory of mounted secrets named like the sink settings"
    )
    pagerduty_url: str = Field(
        "https://events.pagerduty.com/v2/enqueue", description="PagerDuty Events v2 endpoint"
    )
    source: str = Field("ridethrough", description="CloudEvents source of every notification")
    flap_window_s: float = Field(
        60.0,
        ge=0,
        description="a scope that re-opens within this many seconds of closing is one "
        "incident: one open and one close notification (0: every outage its own)",
    )
    ops_events: bool = Field(True, description="notify operator actions (dry runs never)")
    timeout_s: float = Field(10.0, gt=0, description="longest wait for a sink's answer")
    retry_base_s: float = Field(1.0, ge=0, description="first delay between two attempts")
    retry_max_s: float = Field(60.0, ge=0, description="cap of the delay between attempts")
    max_attempts: int = Field(
        10, gt=0, description="attempts per sink and notification before giving up on it"
    )
    ack_wait_s: float = Field(30.0, gt=0, description="ack_wait of the notifier's consumer")
    lease_s: float = Field(5.0, gt=0, description="lease of the one active notifier")

    @model_validator(mode="after")
    def _check_sinks(self) -> NotifySettings:
        for name in ("webhook_url", "webhook_secret", "slack_webhook_url", "pagerduty_routing_key"):
            if getattr(self, name) is not None and getattr(self, f"{name}_file") is not None:
                raise ValueError(f"give {name} or {name}_file, not both")
        has_url = self.webhook_url is not None or self.webhook_url_file is not None
        has_secret = self.webhook_secret is not None or self.webhook_secret_file is not None
        if has_url and not has_secret:
            raise ValueError("the webhook needs webhook_secret (or webhook_secret_file) to sign")
        for name in ("webhook_url", "slack_webhook_url"):
            value = getattr(self, name)
            if value is not None:
                _check_url(name, value.get_secret_value())
        _check_url("pagerduty_url", self.pagerduty_url)
        return self

    def _secret(self, name: str) -> str | None:
        """Secret ``name``: its setting, its ``*_file``, or its file in ``secrets_dir``."""
        value: SecretStr | None = getattr(self, name)
        path: Path | None = getattr(self, f"{name}_file")
        if value is None and path is None and self.secrets_dir is not None:
            candidate = self.secrets_dir / name
            path = candidate if candidate.exists() else None
        return _read_secret(value, path, name)

    def webhook(self) -> tuple[str, str] | None:
        """(URL, signing secret) of the generic webhook; None when it is off."""
        url = self._secret("webhook_url")
        if url is None:
            return None
        _url_or_error("webhook_url_file", url)
        secret = self._secret("webhook_secret")
        if secret is None:  # from secrets_dir (the validator asks for it otherwise)
            raise ConfigError(f"the webhook needs webhook_secret in {self.secrets_dir} to sign")
        return url, secret

    def slack(self) -> str | None:
        """The Slack incoming webhook URL; None when it is off."""
        url = self._secret("slack_webhook_url")
        if url is not None:
            _url_or_error("slack_webhook_url_file", url)
        return url

    def pagerduty(self) -> str | None:
        """The PagerDuty routing key; None when it is off."""
        return self._secret("pagerduty_routing_key")


def _check_url(name: str, url: str) -> None:
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{name} must be an http:// or https:// URL")


def _url_or_error(name: str, url: str) -> None:
    try:
        _check_url(name, url)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _default_providers() -> dict[str, ProviderSettings]:
    return {
        "anthropic": ProviderSettings(kind="anthropic"),
        "openai": ProviderSettings(kind="openai"),
    }


class Settings(BaseSettings):
    """Everything a ridethrough process needs to know."""

    model_config = SettingsConfigDict(
        env_prefix="RIDETHROUGH_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    nats: NatsSettings = Field(default_factory=NatsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    bodies: BodySettings = Field(default_factory=BodySettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    providers: dict[str, ProviderSettings] = Field(default_factory=_default_providers)
    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("RIDETHROUGH_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("RIDETHROUGH_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    nats_url: str | None = Field(None, validation_alias=AliasChoices("NATS_URL"))
    tenant: str | None = Field(
        None,
        description="the tenant a producer (and the CLI's submit, result, jobs show) acts for",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for name in self.providers:
            if not is_token(name):
                raise ValueError(
                    f"provider name {name!r} must be a subject token (A-Z a-z 0-9 _ -)"
                )
        if self.tenant is not None and not is_token(self.tenant):
            raise ValueError(f"tenant {self.tenant!r} must be a subject token (A-Z a-z 0-9 _ -)")
        return self

    def provider_key(self, name: str) -> str | None:
        """The API key of provider ``name``: its own setting, else the SDK's usual variable."""
        p = self.providers[name]
        key = p.key()
        if key is None and p.kind in ("anthropic", "openai"):
            fallback = self.anthropic_api_key if p.kind == "anthropic" else self.openai_api_key
            key = fallback.get_secret_value() if fallback is not None else None
        return key

    @property
    def nats_servers(self) -> list[str]:
        """The NATS URLs, ``NATS_URL`` taking precedence over ``RIDETHROUGH_NATS__URL``."""
        if self.nats_url:
            return [u.strip() for u in self.nats_url.split(",") if u.strip()]
        return self.nats.servers

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with top-level fields replaced (settings stay frozen)."""
        return self.model_copy(update=changes)


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment, then apply explicit overrides."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        # One line per problem would be several lines; the CLI prints one.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
