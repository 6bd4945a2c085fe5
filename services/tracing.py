"""OpenTelemetry traces: one trace from ``submit`` through the worker's provider call to the
result, with the context carried in NATS headers and in the job itself.

Off by default, and then free: ``active`` is None and every call site is one attribute
read (``if (t := tracing.active) is not None``), as with ``services.metrics``. On when
``configure`` finds an exporter named (``TracingSettings``, the ``OTEL_*`` variables; the
SDK and the OTLP exporter come with the ``otel`` extra), or when an application that
submits jobs registered an OpenTelemetry SDK of its own (``for_library``).

The spans of one job:

    submit <provider>    PRODUCER  the producer; its context goes into the job (``trace``)
                                   and into the message's headers (traceparent, tracestate)
    process <provider>   CONSUMER  the worker, one per delivery: a child of the headers'
                                   context (else the job's), until the job is settled
      chat <model>       CLIENT    the provider call, by the GenAI conventions; the SDK's own
                                   span (metadata only) below it
    replay <provider>    PRODUCER  the replayer republishing a parked job: a new trace that
                                   LINKS to the submit; the replayed attempt's ``process``
                                   is its child and links to the submit as well

Parking, replay and fail-over publish the job again with its ``trace`` unchanged. A span
never holds a prompt or a response: ids, models, token counts and finish reasons only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from schemas.jobs import Job
    from services.config import TracingSettings
    from services.errors import ProviderError
    from services.providers.base import Reply

log = logging.getLogger("ridethrough.tracing")

#: The tracing of this process, when it is on.
active: Tracing | None = None

#: The instrumentation scope of every ridethrough span.
SCOPE = "ridethrough"
#: Headers of a message that carry a trace context (W3C Trace Context).
TRACE_HEADERS = ("traceparent", "tracestate")


class Tracing:
    """The spans ridethrough makes, from one tracer."""

    def __init__(self, tracer: Tracer, provider: TracerProvider | None = None) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.context import Context

        self.tracer = tracer
        #: Where the spans go (None: the registered provider).
        self.provider = provider
        self._propagate = propagate
        self._trace = trace
        self._root = Context()

    # -- context --------------------------------------------------------------------------

    def carrier(self, span: Span | None = None) -> dict[str, str]:
        """The propagator's entries for ``span`` (the current span when None)."""
        out: dict[str, str] = {}
        ctx = self._trace.set_span_in_context(span) if span is not None else None
        self._propagate.inject(out, context=ctx)
        return out

    def inject_current(self, headers: dict[str, str]) -> None:
        """Add the current span's context to ``headers`` (nothing when no span is current)."""
        if self._trace.get_current_span().get_span_context().is_valid:
            self._propagate.inject(headers)

    def _context(self, carrier: Mapping[str, str] | None) -> Any:
        return self._propagate.extract(dict(carrier or {}))

    def _span_context(self, carrier: Mapping[str, str] | None) -> Any:
        sc = self._trace.get_current_span(self._context(carrier)).get_span_context()
        return sc if sc.is_valid else None

    # -- producer -------------------------------------------------------------------------

    def submit(self, job: Job, subject: str) -> Span:
        """Start the span of ``job``'s submit (a child of the caller's current span)."""
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(
            f"submit {job.provider}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.operation.name": "submit",
                "messaging.destination.name": subject,
                "messaging.message.id": job.id,
                "ridethrough.job.id": job.id,
                "ridethrough.provider": job.provider,
                "ridethrough.priority": job.priority,
                "gen_ai.request.model": job.model,
            },
        )

    # -- worker ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def process(
        self,
        job: Job,
        headers: Mapping[str, str] | None,
        *,
        attempt: int,
        replay: str | None,
        subject: str,
    ) -> Iterator[Span]:
        """The current span of one delivery of ``job``: a child of the context its message
        carries (else of its submit); a replayed attempt links to the submit."""
        from opentelemetry.trace import Link, SpanKind

        carried = {k: headers[k] for k in TRACE_HEADERS if headers and k in headers}
        links = []
        if replay is not None:
            # A new trace (or the replayer's), linked to where the job began.
            parent = self._context(carried) if carried else self._root
            original = self._span_context(job.trace)
            if original is not None:
                links.append(Link(original, {"ridethrough.link": "submit"}))
        else:
            parent = self._context(carried or job.trace)
        attributes: dict[str, Any] = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": subject,
            "messaging.message.id": job.id,
            "ridethrough.job.id": job.id,
            "ridethrough.provider": job.provider,
            "ridethrough.priority": job.priority,
            "ridethrough.attempt": attempt,
            "gen_ai.request.model": job.model,
        }
        if replay is not None:
            attributes["ridethrough.replay"] = replay
        with self.tracer.start_as_current_span(
            f"process {job.provider}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes=attributes,
        ) as span:
            yield span

    def provider_call(self, job: Job, system: str) -> Span:
        """Start the span of a provider call (OpenTelemetry GenAI conventions: operation
        ``chat``, the provider, the requested model) under the current span."""
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": system,
            "gen_ai.system": system,
            "gen_ai.request.model": job.model,
            "ridethrough.provider": job.provider,
        }
        max_tokens = job.request.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            attributes["gen_ai.request.max_tokens"] = max_tokens
        return self.tracer.start_span(
            f"chat {job.model}", kind=SpanKind.CLIENT, attributes=attributes
        )

    def tracer_span(self, span: Span) -> Any:
        """Make ``span`` current for the block (the SDK's own span becomes its child)."""
        return self._trace.use_span(span, end_on_exit=False)

    def call_ended(self, span: Span, answer: Reply | ProviderError) -> None:
        """End a provider call's span with what the provider answered: the response's
        model, id, usage and finish reasons, or the error's classification."""
        from opentelemetry.trace import Status, StatusCode

        from services.errors import ProviderError

        if isinstance(answer, ProviderError):
            span.set_attribute("error.type", answer.reason)
            span.set_status(Status(StatusCode.ERROR, answer.reason))
        else:
            response = answer.response
            model = answer.model or response.get("model")
            if isinstance(model, str) and model:
                span.set_attribute("gen_ai.response.model", model)
            if isinstance(rid := response.get("id"), str):
                span.set_attribute("gen_ai.response.id", rid)
            span.set_attribute("gen_ai.usage.input_tokens", answer.usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", answer.usage.output_tokens)
            reasons = finish_reasons(response)
            if reasons:
                span.set_attribute("gen_ai.response.finish_reasons", reasons)
        span.end()

    def outcome(self, span: Span, outcome: object) -> None:
        """Name the outcome a delivery was settled with on its span."""
        name = type(outcome).__name__.lower()
        span.set_attribute("ridethrough.outcome", name)
        if name == "dead":
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, str(getattr(outcome, "reason", "dead"))))

    def event(self, name: str, attributes: Mapping[str, Any]) -> None:
        """An event on the current span (a result stored, a job parked)."""
        span = self._trace.get_current_span()
        if span.is_recording():
            span.add_event(name, dict(attributes))

    # -- replayer -------------------------------------------------------------------------

    @contextlib.contextmanager
    def replay(self, job: Job, tag: str) -> Iterator[Span]:
        """The current span of republishing a parked ``job``: a new trace that links to the
        job's submit (a parked job may wait for hours: its replay is not the submit's child)."""
        from opentelemetry.trace import Link, SpanKind

        original = self._span_context(job.trace)
        links = [Link(original, {"ridethrough.link": "submit"})] if original is not None else []
        with self.tracer.start_as_current_span(
            f"replay {job.provider}",
            context=self._root,
            kind=SpanKind.PRODUCER,
            links=links,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "send",
                "messaging.operation.name": "replay",
                "ridethrough.job.id": job.id,
                "ridethrough.provider": job.provider,
                "ridethrough.replay": tag,
            },
        ) as span:
            yield span


def finish_reasons(response: Mapping[str, Any]) -> list[str]:
    """The finish reasons of a provider-native response: Anthropic's ``stop_reason``, or
    each OpenAI choice's ``finish_reason``."""
    reason = response.get("stop_reason")
    if isinstance(reason, str):
        return [reason]
    out = []
    for choice in response.get("choices") or []:
        if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
            out.append(choice["finish_reason"])
    return out


def sdk_option() -> Any:
    """The ``open_telemetry`` option of an Anthropic SDK client: its spans off while ours
    are (nothing to pay), and never with content (prompts) while ours are on."""
    if active is None:
        return False
    option: dict[str, Any] = {"traces": {"enabled": True, "content_mode": "metadata_only"}}
    if active.provider is not None:
        option["tracer_provider"] = active.provider
    return option


def _env_enabled() -> bool:
    env = os.environ
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return True
    return env.get("OTEL_TRACES_EXPORTER", "none").strip().lower() not in ("", "none")


def _sdk_registered() -> TracerProvider | None:
    """The tracer provider an application registered, if it is not the API's no-op."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider


def configure(settings: TracingSettings, service: str) -> Tracing | None:
    """Turn tracing on for a ridethrough service when the settings or the ``OTEL_*``
    variables ask for it (building the SDK's tracer provider and exporter); ``active``."""
    if active is not None:
        return active
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    wanted = (
        settings.enabled
        if settings.enabled is not None
        else bool(settings.endpoint or _env_enabled())
    )
    if not wanted:
        return None
    registered = _sdk_registered()
    if registered is not None:
        return use(registered)
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        from services.errors import ConfigError

        raise ConfigError(
            "tracing is on but the OpenTelemetry SDK is not installed: "
            "pip install 'ridethrough[otel]' (or turn it off: RIDETHROUGH_TRACING__ENABLED=false)"
        ) from exc
    exporter: Any
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            from services.errors import ConfigError

            raise ConfigError(
                "the OTLP exporter is not installed: pip install 'ridethrough[otel]'"
            ) from exc
        exporter = OTLPSpanExporter(endpoint=settings.endpoint)
    name = os.environ.get("OTEL_SERVICE_NAME") or f"ridethrough-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s exporter, service.name %s", settings.exporter, name)
    return use(provider)


def use(provider: TracerProvider) -> Tracing:
    """Trace with ``provider`` from now on (tests; an application's own SDK)."""
    global active
    active = Tracing(provider.get_tracer(SCOPE), provider)
    return active


def for_library() -> Tracing | None:
    """The tracing a producer in someone's application uses: this process's, or one on the
    SDK the application registered; None (free) when neither."""
    if active is not None:
        return active
    registered = _sdk_registered()
    return Tracing(registered.get_tracer(SCOPE), registered) if registered is not None else None


def disable() -> None:
    """Turn tracing off again (tests)."""
    global active
    active = None


def shutdown() -> None:
    """Flush and stop the SDK's exporter at a service's exit (queued spans are sent)."""
    if active is None:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    with contextlib.suppress(Exception):
        provider.shutdown()  # type: ignore[attr-defined]
