"""Prometheus metrics: every name, label and bucket in one place, one registry per process.

Off by default. ``enable()`` (the serve commands, when an HTTP port is configured) makes
``active`` a ``Metrics``; the few places that already count things call it as
``if (m := metrics.active) is not None: m.<hook>(...)``, so with metrics off a hook costs
one attribute read, and ``prometheus_client`` is not even imported.

Who exports what (so that a sum over the fleet is right):

    every worker          calls, errors, tokens, in-flight calls, jobs it settled, retries
    every service         breaker transitions it made (the one that won the compare-and-set)
    the prober holder     probes
    the replayer holder   replayed jobs, replay rate and backlog, and the fleet's view (one
      of a provider       exporter per provider: its replay lease): breaker state, queue
                          depth, dead letters stored, workers online

Labels are bounded: never a job id. Providers are configured (bounded); reasons, states,
outcomes, priorities and kinds are closed sets. Models and tenants are not bounded in
principle: each label keeps its first ``max_models`` / ``max_tenants`` distinct values
(per process), and reports the rest as ``other``. ``model=""`` is a provider's own scope.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from services.config import HttpSettings
from services.errors import ProviderError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from prometheus_client import CollectorRegistry, Counter, Gauge
    from prometheus_client.metrics_core import Metric

    from schemas.jobs import Job
    from schemas.results import JobResult
    from services.providers.base import Reply

#: The metrics of this process, when they are on (``enable``).
active: Metrics | None = None

OTHER = "other"
#: Most labelled children a per-job hook keeps at hand (then it starts afresh).
_CACHE_MAX = 4096
BREAKER_STATES = ("closed", "open", "half_open", "paused")
QUEUE_STATES = ("waiting", "in_flight", "parked")
#: Provider call duration buckets (seconds): LLM calls run from 100 ms to minutes.
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


_CACHE_KEYS = ("cache_read_input_tokens", "cache_creation_input_tokens")


class Capped:
    """The first ``limit`` distinct values of an unbounded label; ``other`` after that."""

    __slots__ = ("limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        """The label value to export for ``value``."""
        v = value or ""
        if not v or v in self.seen:  # "" (no model: the provider; no tenant) is free
            return v
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(v)
        return v


class _Cell:
    """One labelled series of a ``Plain`` counter or gauge: a number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Buckets:
    """One labelled series of a ``Plain`` histogram: a count per bucket (not cumulative;
    the last one is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # le: the first bound >= amount
        self.sum += amount


class Plain:
    """A labelled counter, gauge or histogram kept as plain numbers, and exposed as
    ``prometheus_client`` would expose it (same names, labels, buckets, values) when the
    registry is collected: at scrape time.

    The worker's per-job hooks update these. ``prometheus_client``'s metrics take a lock
    and go through a value object per update (a histogram observe walks its buckets and
    takes the lock twice): measured with ``ridethrough bench -s metrics``, most of the
    CPU metrics on cost a job. These are updated and collected on the service's event
    loop (one thread: the scrape handler runs there too), so they need no lock.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        documentation: str,
        labelnames: list[str],
        registry: CollectorRegistry,
        buckets: tuple[float, ...] = (),
    ) -> None:
        self.kind = kind  # "counter", "gauge" or "histogram"
        self.name = name
        self.documentation = documentation
        self._labelnames = tuple(labelnames)  # as prometheus_client names it
        self.bounds = tuple(float(b) for b in buckets)
        self.children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        """The series of these label values (created at zero)."""
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            if len(key) != len(self._labelnames):
                raise ValueError(
                    f"{self.name}: {self._labelnames} want {len(self._labelnames)} values"
                )
            child = _Buckets(self.bounds) if self.kind == "histogram" else _Cell()
            self.children[key] = child
        return child

    def describe(self) -> Iterator[Metric]:
        """The family (what the registry checks names against when it is registered)."""
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        """The family with every series, as ``prometheus_client`` would render it."""
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        labels = list(self._labelnames)
        series = list(self.children.items())
        if self.kind == "histogram":
            hist = HistogramMetricFamily(self.name, self.documentation, labels=labels)
            les = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
            les.append("+Inf")
            for key, child in series:
                total, buckets = 0, []
                for le, n in zip(les, list(child.counts), strict=True):
                    total += n
                    buckets.append((le, float(total)))
                hist.add_metric(list(key), buckets, child.sum)
            yield hist
            return
        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = kind(self.name, self.documentation, labels=labels)
        for key, child in series:
            family.add_metric(list(key), child.value)
        yield family


class Metrics:
    """Every metric of a ridethrough process, in its own registry."""

    def __init__(self, settings: HttpSettings | None = None) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            disable_created_metrics,
        )

        # No *_created series: half the samples, and nothing queries them.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        cfg = settings or HttpSettings()
        self.registry: CollectorRegistry = CollectorRegistry()
        self.model = Capped(cfg.max_models)
        self.tenant = Capped(cfg.max_tenants)
        self.reason = Capped(cfg.max_reasons)
        r = self.registry
        p = "ridethrough_"
        self._flight_kids: dict[str, Any] = {}
        self._success_kids: dict[tuple[str, str, str | None], Any] = {}
        self._result_kids: dict[tuple[str, str], Any] = {}
        # -- breakers
        self.breaker_state: Gauge = Gauge(
            f"{p}breaker_state",
            "1 for the state a breaker scope is in (model empty: the provider's own breaker); "
            "exported by the provider's replay lease holder",
            ["provider", "model", "state"],
            registry=r,
        )
        self.breaker_transitions: Counter = Counter(
            f"{p}breaker_transitions_total",
            "Breaker transitions made by this process (it won the compare-and-set)",
            ["provider", "model", "from_state", "to_state"],
            registry=r,
        )
        # -- provider calls (workers)
        self.call_duration: Plain = Plain(
            "histogram",
            f"{p}provider_call_duration_seconds",
            "Duration of provider calls by outcome (success, transient, permanent)",
            ["provider", "model", "outcome"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.call_errors: Plain = Plain(
            "counter",
            f"{p}provider_errors_total",
            "Failed provider calls by classification reason",
            ["provider", "model", "reason"],
            registry=r,
        )
        self.calls_in_flight: Plain = Plain(
            "gauge",
            f"{p}provider_calls_in_flight",
            "Provider calls under way in this process",
            ["provider"],
            registry=r,
        )
        self.tokens: Plain = Plain(
            "counter",
            f"{p}tokens_total",
            "Tokens billed by the provider, by kind (input, output, cache)",
            ["provider", "model", "tenant", "kind"],
            registry=r,
        )
        self.probes: Counter = Counter(
            f"{p}probes_total",
            "Health probes sent by the prober, by result (success, failure)",
            ["provider", "model", "result"],
            registry=r,
        )
        # -- jobs (the settle writers)
        self.results: Plain = Plain(
            "counter",
            f"{p}jobs_finished_total",
            "Results stored, by status (succeeded, failed, expired); a failed job also "
            "counts in jobs_dead_total",
            ["provider", "status"],
            registry=r,
        )
        self.dead: Plain = Plain(
            "counter",
            f"{p}jobs_dead_total",
            "Dead letters written, by reason",
            ["provider", "reason"],
            registry=r,
        )
        self.parked: Plain = Plain(
            "counter",
            f"{p}jobs_parked_total",
            "Jobs parked in AI_PARKED",
            ["provider", "priority"],
            registry=r,
        )
        self.replayed: Counter = Counter(
            f"{p}jobs_replayed_total",
            "Parked jobs republished to AI_JOBS by the replayer",
            ["provider", "model"],
            registry=r,
        )
        self.failed_over: Plain = Plain(
            "counter",
            f"{p}jobs_failed_over_total",
            "Jobs republished to another provider (by the provider they left)",
            ["provider"],
            registry=r,
        )
        self.retries: Plain = Plain(
            "counter",
            f"{p}job_retries_total",
            "Deliveries released for a retry (nak with delay)",
            ["provider"],
            registry=r,
        )
        # -- replay (the replay lease holder)
        self.replay_rate: Gauge = Gauge(
            f"{p}replay_rate_jobs_per_second",
            "The replayer's current slow-start rate per pacing scope",
            ["provider", "model"],
            registry=r,
        )
        self.replay_backlog: Gauge = Gauge(
            f"{p}replay_backlog_jobs",
            "Parked jobs the replayer still has to replay",
            ["provider"],
            registry=r,
        )
        # -- the fleet's queues (the replay lease holder)
        self.queue: Gauge = Gauge(
            f"{p}queue_jobs",
            "Jobs per provider, priority and state (waiting, in_flight, parked)",
            ["provider", "priority", "state"],
            registry=r,
        )
        self.dead_stored: Gauge = Gauge(
            f"{p}dead_letters_jobs",
            "Dead letters stored in AI_DEAD, by reason",
            ["provider", "reason"],
            registry=r,
        )
        self.workers_online: Gauge = Gauge(
            f"{p}workers_online",
            "Workers whose heartbeat in ai_workers names the provider",
            ["provider"],
            registry=r,
        )
        self.oldest_age: Gauge = Gauge(
            f"{p}queue_oldest_job_age_seconds",
            "Age of the oldest job per provider, priority and state: waiting (still in "
            "AI_JOBS: waiting, being called or backing off; since it was stored there) or "
            "parked (since it was parked); 0 when there is none",
            ["provider", "priority", "state"],
            registry=r,
        )
        # -- JetStream storage (the holder of the first provider's replay lease)
        self.stream_bytes: Gauge = Gauge(
            f"{p}jetstream_stream_bytes",
            "Bytes stored by each ridethrough stream",
            ["stream"],
            registry=r,
        )
        self.stream_max_bytes: Gauge = Gauge(
            f"{p}jetstream_stream_max_bytes",
            "The stream's byte limit (absent when it has none)",
            ["stream"],
            registry=r,
        )
        self.account_bytes: Gauge = Gauge(
            f"{p}jetstream_account_bytes",
            "JetStream storage the account uses, by storage (file, memory)",
            ["storage"],
            registry=r,
        )
        self.account_max_bytes: Gauge = Gauge(
            f"{p}jetstream_account_max_bytes",
            "The account's JetStream limit by storage (absent when it has none)",
            ["storage"],
            registry=r,
        )
        # -- notifications (the notifier lease holder)
        self.notifications_sent: Counter = Counter(
            f"{p}notifications_sent_total",
            "Notifications a sink accepted (2xx), by sink and kind (opened, closed, ops)",
            ["sink", "kind"],
            registry=r,
        )
        self.notification_failures: Counter = Counter(
            f"{p}notification_attempts_failed_total",
            "Attempts to deliver a notification that a sink refused or did not answer",
            ["sink", "kind"],
            registry=r,
        )
        self.notifications_given_up: Counter = Counter(
            f"{p}notifications_given_up_total",
            "Notifications given up on after notify.max_attempts attempts, by sink and kind",
            ["sink", "kind"],
            registry=r,
        )

    # -- hooks (a line each at the call sites) ---------------------------------------------
    #
    # The per-job hooks keep the labelled series they touch (``labels()`` costs a few
    # microseconds each, several per job: measured, a tenth of the worker's throughput);
    # the caches are emptied when they grow past ``_CACHE_MAX`` keys (the series stay in
    # their metric). The metrics they update are ``Plain``: numbers, rendered at scrape.

    def _in_flight(self, provider: str) -> Any:
        child = self._flight_kids.get(provider)
        if child is None:
            child = self._flight_kids[provider] = self.calls_in_flight.labels(provider)
        return child

    def call_started(self, provider: str) -> None:
        """A provider call begins."""
        self._in_flight(provider).inc()

    def call_ended(self, job: Job, answer: Reply | ProviderError, took_s: float) -> None:
        """A provider call ended with ``answer`` after ``took_s`` seconds."""
        provider = job.provider
        self._in_flight(provider).dec()
        if isinstance(answer, ProviderError):
            model = self.model(job.model)
            outcome = "transient" if answer.retryable else "permanent"
            self.call_errors.labels(provider, model, self.reason(answer.reason)).inc()
            self.call_duration.labels(provider, model, outcome).observe(took_s)
            return
        key = (provider, job.model, job.tenant)
        kids = self._success_kids.get(key)
        if kids is None:
            if len(self._success_kids) >= _CACHE_MAX:
                self._success_kids.clear()
            model, tenant = self.model(job.model), self.tenant(job.tenant)
            kids = self._success_kids[key] = (
                self.call_duration.labels(provider, model, "success"),
                self.tokens.labels(provider, model, tenant, "input"),
                self.tokens.labels(provider, model, tenant, "output"),
                model,
                tenant,
            )
        duration, tokens_in, tokens_out, model, tenant = kids
        usage = answer.usage
        tokens_in.inc(usage.input_tokens)
        tokens_out.inc(usage.output_tokens)
        cache = cache_tokens(answer.response)
        if cache:
            self.tokens.labels(provider, model, tenant, "cache").inc(cache)
        duration.observe(took_s)

    def result_stored(self, result: JobResult) -> None:
        """A job's result was stored."""
        key = (result.provider, result.status)
        child = self._result_kids.get(key)
        if child is None:
            if len(self._result_kids) >= _CACHE_MAX:
                self._result_kids.clear()
            child = self._result_kids[key] = self.results.labels(*key)
        child.inc()

    def dead_lettered(self, provider: str, reason: str) -> None:
        """A dead letter was written."""
        self.dead.labels(provider, self.reason(reason)).inc()

    def transition(self, provider: str, model: str | None, old: str, new: str) -> None:
        """This process moved a breaker."""
        self.breaker_transitions.labels(provider, self.model(model), old, new).inc()

    def replay_progress(self, provider: str, info: Mapping[str, Any]) -> None:
        """The replay lease holder's progress (``Replayer._info``): rate and backlog."""
        rate = info.get("rate")
        if isinstance(rate, int | float):
            self.replay_rate.labels(provider, "").set(rate)
        self.replay_backlog.labels(provider).set(float(info.get("backlog") or 0))
        for model, m in (info.get("models") or {}).items():
            if isinstance(m.get("rate"), int | float):
                self.replay_rate.labels(provider, self.model(model)).set(m["rate"])

    def fleet_view(
        self,
        provider: str,
        states: Mapping[str | None, str],
        queue: Mapping[tuple[str, str], int],
        dead: Mapping[str, int],
        workers: int,
    ) -> None:
        """What the provider's replay lease holder exports for the fleet: breaker states per
        scope, queue depth per (priority, state), dead letters per reason, workers."""
        self.forget(provider)
        for model, state in states.items():
            for s in BREAKER_STATES:
                self.breaker_state.labels(provider, self.model(model), s).set(s == state)
        for (priority, state), n in queue.items():
            self.queue.labels(provider, priority, state).set(n)
        by_reason: dict[str, int] = {}
        for reason, n in dead.items():
            label = self.reason(reason)
            by_reason[label] = by_reason.get(label, 0) + n
        for label, n in by_reason.items():
            self.dead_stored.labels(provider, label).set(n)
        self.workers_online.labels(provider).set(workers)

    def backlog_ages(self, provider: str, ages: Mapping[tuple[str, str], float]) -> None:
        """Age in seconds of the oldest job per (priority, state) of ``provider``."""
        for (priority, state), age in ages.items():
            self.oldest_age.labels(provider, priority, state).set(age)

    def storage(
        self,
        streams: Mapping[str, tuple[int, int]],
        account: Mapping[str, tuple[int, int]],
    ) -> None:
        """JetStream storage: per stream and per account storage kind, (bytes, limit); a
        limit <= 0 (none) exports no limit series."""
        self.forget_storage()
        for gauge, limits, values in (
            (self.stream_bytes, self.stream_max_bytes, streams),
            (self.account_bytes, self.account_max_bytes, account),
        ):
            for name, (used, limit) in values.items():
                gauge.labels(name).set(used)
                if limit > 0:
                    limits.labels(name).set(limit)

    def forget_storage(self) -> None:
        """Drop the storage gauges (another replica exports them now)."""
        for gauge in (
            self.stream_bytes,
            self.stream_max_bytes,
            self.account_bytes,
            self.account_max_bytes,
        ):
            gauge.clear()

    def forget(self, provider: str) -> None:
        """Drop the fleet view of ``provider`` (this process no longer holds its lease: the
        new holder exports it, and two exporters would double the sums)."""
        for gauge in (
            self.breaker_state,
            self.queue,
            self.dead_stored,
            self.workers_online,
            self.replay_rate,
            self.replay_backlog,
            self.oldest_age,
        ):
            for labels in _label_sets(gauge):
                if labels[0] == provider:
                    gauge.remove(*labels)

    def names(self) -> set[str]:
        """Every metric name this process exports (sample names: ``_total``, ``_bucket``...)."""
        out: set[str] = set()
        for family in self.registry.collect():
            out.add(family.name)
            if family.type == "counter":
                out.add(f"{family.name}_total")
            elif family.type == "histogram":
                out |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
        return out


def _label_sets(metric: Any) -> list[tuple[str, ...]]:
    """The label value tuples a labelled metric holds now."""
    with metric._lock:
        return list(metric._metrics)


def cache_tokens(response: Mapping[str, Any]) -> int:
    """Cached prompt tokens in a provider-native response body (Anthropic:
    ``cache_read_input_tokens`` + ``cache_creation_input_tokens``; OpenAI:
    ``prompt_tokens_details.cached_tokens``); 0 when it names none."""
    usage = response.get("usage")
    if not usage or not isinstance(usage, dict):
        return 0
    n = 0
    for key in _CACHE_KEYS:
        if key in usage:  # most answers name none: one lookup each
            v = usage[key]
            if isinstance(v, int) and not isinstance(v, bool):
                n += v
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        v = details.get("cached_tokens")
        if isinstance(v, int) and not isinstance(v, bool):
            n += v
    return n


def enable(settings: HttpSettings | None = None) -> Metrics:
    """Turn metrics on for this process (idempotent): ``active`` from now on."""
    global active
    if active is None:
        active = Metrics(settings)
    return active


def disable() -> None:
    """Turn metrics off again (tests running several services in one process)."""
    global active
    active = None
