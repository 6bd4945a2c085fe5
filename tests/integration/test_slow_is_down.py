"""Slow is down too: calls over a model's latency budget open the breaker like 529s do,
while each slow call still gives its job the answer it paid for."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from schemas.events import decode_health_event
from services.breaker import transition
from services.config import Settings
from services.producer import Producer, make_job
from services.tools.stack import running_recovery, running_worker
from tests.conftest import make_settings
from tests.support import count_outcomes, fault_request, read_stream, wait_until

pytestmark = pytest.mark.integration


def _budgeted(nats_url: str, fake_url: str, **budget: Any) -> Settings:
    base = make_settings(nats_url, fake_url, breaker={"consecutive_failures": 3})
    anthropic = base.providers["anthropic"].model_copy(update=budget)
    return base.with_changes(providers={**base.providers, "anthropic": anthropic})


async def test_calls_over_the_latency_budget_open_the_breaker_and_keep_their_answers(
    nats_server: Any, js: Any, fake_provider: Any
) -> None:
    """Every call of the sick model takes 300 ms against a 50 ms budget: after three its
    breaker opens (last error says slow), those three jobs succeeded, the rest park; the
    other model, under no budget of its own beyond the provider's, is not the point here."""
    settings = _budgeted(nats_server.url, fake_provider.url, model_latency_budget_s={"sick": 0.05})
    slow = fault_request("fault:slow:300")
    async with running_worker(settings), await Producer.connect(settings) as producer:
        ids = []
        for _ in range(3):  # one at a time: each is a whole slow call
            ids.append(await producer.submit(make_job("anthropic", "sick", request=slow)))
            await producer.result(ids[-1], timeout=30)
        await wait_until(lambda: _open(js, "sick"), timeout=10)
        later = [
            await producer.submit(make_job("anthropic", "sick", request=slow)) for _ in range(5)
        ]

        async def parked() -> bool:
            return (await js.stream_info(s.PARKED_STREAM)).state.messages == len(later)

        await wait_until(parked, timeout=30)
        results = await producer.results(ids, timeout=5)
    assert {r.status for r in results.values()} == {"succeeded"}
    counts = await count_outcomes(js)
    assert counts["results"] == 3 and counts["dead"] == 0  # 3 answered + 5 parked = 8 sent
    (event,) = [decode_health_event(m.data) for m in await read_stream(js, s.EVENTS_STREAM)]
    assert event.state == "open" and event.last_error.startswith("slow:")
    assert fake_provider.counters()["normal"] == 3  # parked jobs cost no call


async def test_a_model_within_its_budget_does_not_count_as_slow(
    nats_server: Any, js: Any, fake_provider: Any
) -> None:
    """The same 300 ms calls under a budget of 5 s for that model (the provider's 0.05 s
    is overridden): the breaker stays closed."""
    settings = _budgeted(
        nats_server.url,
        fake_provider.url,
        latency_budget_s=0.05,
        model_latency_budget_s={"patient": 5.0},
    )
    slow = fault_request("fault:slow:300")
    async with running_worker(settings), await Producer.connect(settings) as producer:
        for _ in range(4):
            job_id = await producer.submit(make_job("anthropic", "patient", request=slow))
            assert (await producer.result(job_id, timeout=30)).status == "succeeded"
    assert not await _open(js) and not await _open(js, "patient")
    assert (await js.stream_info(s.PARKED_STREAM)).state.messages == 0


async def _open(js: Any, model: str | None = None) -> bool:
    """Whether the breaker of anthropic (or of its ``model``) is open."""
    try:
        entry = await (await js.key_value(s.HEALTH_BUCKET)).get(s.scope_key("anthropic", model))
    except Exception:
        return False
    return b'"open"' in (entry.value or b"")


@pytest.mark.parametrize(("budget", "half_opens"), [(0.05, False), (5.0, True)])
async def test_a_probe_over_its_budget_does_not_half_open(
    nats_server: Any, js: Any, fake_provider: Any, budget: float, half_opens: bool
) -> None:
    """Probes of an open provider answer in 300 ms: over a 50 ms budget they are failed
    probes and the breaker stays open; under a 5 s budget two of them half-open it."""
    settings = _budgeted(
        nats_server.url,
        fake_provider.url,
        model_latency_budget_s={"sick": budget},
        probe_model="sick",
        probe_request=fault_request("fault:slow:300", "ping", max_tokens=1),
    )
    await transition(
        js, await js.key_value(s.HEALTH_BUCKET), "anthropic", to="open",
        allowed_from=("closed",), by="test",
    )  # fmt: skip
    async with running_recovery(settings) as (prober, _):

        async def settled() -> bool:  # half-opened, or four probes without it
            return not await _open(js) or prober.probes["anthropic"] >= 4

        await wait_until(settled, timeout=30)
    assert await _open(js) is not half_opens
