"""Traces (services/tracing.py) with the real OpenTelemetry SDK and an in-memory exporter:
one trace from submit to result, a replayed attempt linked to its submit, no prompt in
any span. The worker and the replayer run in this process, so their spans are collected
here; the provider is the fake, called by the real SDKs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from schemas import subjects as s
from services import tracing
from services.breaker import transition
from services.producer import Producer, make_job
from services.tools.stack import running_recovery, running_worker
from tests.conftest import make_settings
from tests.support import stream_state, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every ended span kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def _of_job(exporter: InMemorySpanExporter, job_id: str) -> list[ReadableSpan]:
    """The spans of ridethrough that name ``job_id``."""
    return [
        sp
        for sp in exporter.get_finished_spans()
        if (sp.attributes or {}).get("ridethrough.job.id") == job_id
    ]


def _named(found: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [sp for sp in found if sp.name.startswith(prefix)]


async def test_one_trace_from_submit_to_result(
    nats_server: Any, fake_provider: Any, spans: InMemorySpanExporter
) -> None:
    """submit (producer) → process (worker) → chat (the provider call) share one trace id,
    each the child of the one before; the call span has the GenAI attributes."""
    settings = make_settings(nats_server.url, fake_provider.url)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        job_id = await producer.submit(make_job("anthropic", "claude-t", prompt="hi", max_tokens=8))
        result = await producer.result(job_id, timeout=60)
    assert result.status == "succeeded"
    found = _of_job(spans, job_id)
    [submit] = _named(found, "submit ")
    [process] = _named(found, "process ")
    chats = [
        sp
        for sp in spans.get_finished_spans()
        if sp.name == "chat claude-t" and sp.parent is not None
        and sp.parent.span_id == process.context.span_id
    ]  # fmt: skip
    [chat] = chats
    # A plain first-party call does not go through messages.create (the adapter posts it on
    # its own session): there is no SDK span under the call span, only ours.
    sdk = [sp for sp in spans.get_finished_spans() if sp.name.startswith("anthropic.")]
    assert sdk == []
    trace_id = submit.context.trace_id
    assert {process.context.trace_id, chat.context.trace_id} == {trace_id}
    assert process.parent is not None and process.parent.span_id == submit.context.span_id
    attrs = dict(chat.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["gen_ai.request.model"] == "claude-t"
    assert attrs["gen_ai.response.model"]
    assert attrs["gen_ai.usage.input_tokens"] == result.usage.input_tokens  # type: ignore[union-attr]
    assert attrs["gen_ai.usage.output_tokens"] == result.usage.output_tokens  # type: ignore[union-attr]
    assert list(attrs["gen_ai.response.finish_reasons"]) == [  # type: ignore[arg-type]
        result.response["stop_reason"]  # type: ignore[index]
    ]
    assert dict(process.attributes or {})["ridethrough.outcome"] == "succeeded"
    # The result is the end of the trace: an event on the worker's span.
    assert [e.name for e in process.events] == ["result"]


async def test_a_replayed_attempt_links_to_the_original_submit(
    nats_server: Any, fake_provider: Any, js: Any, spans: InMemorySpanExporter
) -> None:
    """A job parked during an outage keeps its trace context in AI_PARKED; the replay and
    the replayed attempt's process span link to the submit span (a new trace: the job
    waited), and the job still ends in exactly one result."""
    settings = make_settings(nats_server.url, fake_provider.url)
    kv = await js.key_value(s.HEALTH_BUCKET)
    async with running_worker(settings), await Producer.connect(settings) as producer:
        await transition(js, kv, "anthropic", to="open", allowed_from=("closed",), by="t")
        job_id = await producer.submit(make_job("anthropic", "claude-t", prompt="p", max_tokens=8))

        async def parked() -> bool:
            return (await stream_state(js, s.PARKED_STREAM)).messages == 1

        await wait_until(parked, timeout=60)
        async with running_recovery(settings):
            await transition(js, kv, "anthropic", to="closed", allowed_from=("open",), by="t")
            result = await producer.result(job_id, timeout=60)
    assert result.status == "succeeded"
    assert (await stream_state(js, s.RESULTS_STREAM)).messages == 1
    found = _of_job(spans, job_id)
    [submit] = _named(found, "submit ")
    [replay] = _named(found, "replay ")
    processes = _named(found, "process ")
    first = [p for p in processes if "ridethrough.replay" not in (p.attributes or {})]
    again = [p for p in processes if "ridethrough.replay" in (p.attributes or {})]
    assert [dict(p.attributes or {})["ridethrough.outcome"] for p in first] == ["park"]
    [replayed] = again
    original = submit.context
    assert first[0].context.trace_id == original.trace_id
    for sp in (replay, replayed):
        assert [link.context.span_id for link in sp.links] == [original.span_id]
        assert sp.context.trace_id != original.trace_id
    assert replayed.parent is not None and replayed.parent.span_id == replay.context.span_id
    assert dict(replayed.attributes or {})["ridethrough.outcome"] == "succeeded"


# Each prompt opens with words no id or number holds: a drawn "000000000000" alone would
# be found inside a trace or request id without any prompt having leaked.
_PROMPTS = (
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60
    )
    .filter(lambda p: p.strip())
    .map(lambda p: f"secret prompt {p.strip()}")
)


async def test_no_prompt_or_response_in_any_span(
    nats_server: Any, fake_provider: Any, spans: InMemorySpanExporter
) -> None:
    """Prompts drawn by hypothesis, submitted and answered (the fake echoes them back):
    no span attribute or event, ours or the SDK's, holds the prompt or the reply's text."""
    settings_ = make_settings(nats_server.url, fake_provider.url)
    async with running_worker(settings_), await Producer.connect(settings_) as producer:
        prompts: list[str] = []

        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(prompt=_PROMPTS)
        def draw(prompt: str) -> None:
            prompts.append(prompt)

        draw()
        texts: list[str] = []
        for prompt in prompts:
            job_id = await producer.submit(
                make_job("anthropic", "claude-t", prompt=prompt, max_tokens=64)
            )
            result = await producer.result(job_id, timeout=60)
            assert result.status == "succeeded"
            texts += [b.get("text", "") for b in result.response["content"]]  # type: ignore[index]
    recorded = []
    for sp in spans.get_finished_spans():
        recorded += [str(v) for v in (sp.attributes or {}).values()]
        for event in sp.events:
            recorded += [str(v) for v in (event.attributes or {}).values()]
    assert recorded and any(sp.name.startswith("chat ") for sp in spans.get_finished_spans())
    for secret in [p.strip() for p in prompts] + [t for t in texts if len(t) >= 12]:
        assert not [v for v in recorded if secret in v], secret


def test_tracing_off_is_free_and_on_needs_an_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing configured ``configure`` leaves tracing off (no SDK imported by it),
    the SDK clients' own spans are off too; OTEL_SDK_DISABLED wins over the setting."""
    from services.config import TracingSettings

    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    tracing.disable()
    assert tracing.configure(TracingSettings(), "worker") is None
    assert tracing.active is None and tracing.sdk_option() is False
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.configure(TracingSettings(enabled=True), "worker") is None
