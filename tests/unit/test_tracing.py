"""services/tracing.py's pure parts, and the job's ``trace`` field as the wire carries it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import encode
from schemas.jobs import decode_job
from services import tracing
from services.errors import InvalidJob
from services.producer import make_job
from services.producer.client import validate_job


@pytest.mark.parametrize(
    ("response", "reasons"),
    [
        ({"stop_reason": "end_turn"}, ["end_turn"]),
        ({"choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]}, ["stop", "length"]),
        ({"choices": [{"finish_reason": None}, "junk"]}, []),
        ({"stop_reason": 3}, []),
        ({}, []),
    ],
)
def test_finish_reasons_of_either_provider_shape(
    response: dict[str, Any], reasons: list[str]
) -> None:
    """Anthropic's stop_reason or each OpenAI choice's finish_reason; nothing else."""
    assert tracing.finish_reasons(response) == reasons


def test_the_sdk_clients_trace_only_when_we_do() -> None:
    """Tracing off: the Anthropic client's own spans are off (nothing to pay); on: metadata
    only, never the prompt."""
    from opentelemetry.sdk.trace import TracerProvider

    tracing.disable()
    assert tracing.sdk_option() is False
    provider = TracerProvider()
    try:
        tracing.use(provider)
        option = tracing.sdk_option()
        assert option["traces"] == {"enabled": True, "content_mode": "metadata_only"}
        assert option["tracer_provider"] is provider
    finally:
        tracing.disable()


def test_a_job_keeps_its_trace_context_through_the_wire() -> None:
    """The trace field round-trips; an empty one is not even encoded (no cost untraced)."""
    carrier = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    job = make_job("anthropic", "m", prompt="x", trace=carrier)
    assert decode_job(encode(job)).trace == carrier
    assert b'"trace"' not in encode(make_job("anthropic", "m", prompt="x"))


@given(
    carrier=st.dictionaries(
        st.text(min_size=0, max_size=80), st.text(max_size=1200), min_size=0, max_size=12
    )
)
def test_a_hostile_trace_carrier_is_a_clear_error(carrier: dict[str, str]) -> None:
    """Any carrier within the bounds (8 entries, keys 1-64, values up to 1024 characters)
    is accepted as is; any other is InvalidJob at the producer, never a crash."""
    fits = len(carrier) <= 8 and all(
        1 <= len(k) <= 64 and len(v) <= 1024 for k, v in carrier.items()
    )
    body = {"provider": "anthropic", "model": "m", "id": "j1", "request": {}, "trace": carrier}
    if fits:
        assert validate_job(body).trace == carrier
    else:
        with pytest.raises(InvalidJob):
            validate_job(body)
