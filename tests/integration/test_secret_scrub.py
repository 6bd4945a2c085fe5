"""A provider key of no recognisable shape, echoed back by the provider, reaches no dead
letter, no ``failed`` result and no log line: secrets are scrubbed by value."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from schemas import subjects as s
from schemas.parking import decode_dead_letter
from services.config import ProviderSettings, Settings
from services.producer import Producer, make_job
from services.secrets import ScrubFilter, scrub_logs
from services.tools.stack import running_worker
from tests.support import read_stream

pytestmark = pytest.mark.integration


@pytest.fixture
def scrubbed_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at DEBUG, its handler filtered as the services' logging setup filters theirs."""
    caplog.set_level(logging.DEBUG)
    scrub_logs()
    yield caplog
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, ScrubFilter)]:
            handler.removeFilter(f)


async def test_an_echoed_key_of_any_shape_never_leaves_the_worker(
    settings: Settings, js: Any, scrubbed_caplog: pytest.LogCaptureFixture
) -> None:
    """Both providers answer 401 quoting a key that does not look like ``sk-...``; the dead
    letters, the failed results and the debug logs carry ``***`` instead."""
    key = f"Zq9-Xx_4444-abcd.efgh+{secrets.token_hex(8)}"
    providers = {
        name: p.model_copy(update={"api_key": SecretStr(key)})
        for name, p in settings.providers.items()
    }
    settings = settings.with_changes(providers=providers)
    assert all(isinstance(p, ProviderSettings) for p in providers.values())
    anthropic_request: dict[str, Any] = {
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}],
        "metadata": {"user_id": "fault:echo_key"},
    }
    openai_request: dict[str, Any] = {
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "x"}],
        "user": "fault:echo_key",
    }
    async with running_worker(settings), await Producer.connect(settings) as producer:
        ids = [
            await producer.submit(make_job("anthropic", "m", request=anthropic_request)),
            await producer.submit(make_job("openai", "m", request=openai_request)),
        ]
        results = await producer.results(ids, timeout=30)

    dead = await read_stream(js, s.DEAD_STREAM)
    stored_results = await read_stream(js, s.RESULTS_STREAM)
    assert sorted(m.subject for m in dead) == ["ai.dead.anthropic.auth", "ai.dead.openai.auth"]
    for job_id in ids:
        result = results[job_id]
        assert result.status == "failed" and result.error is not None
        assert result.error.type == "auth"
        # The provider did quote the key: what it quoted is now the mask.
        assert "invalid credential" in result.error.message and "***" in result.error.message
        assert key not in result.error.message
    for m in dead:
        letter = decode_dead_letter(m.data)
        assert "***" in letter.error.message and key not in letter.error.message
    stored = [m.data for m in dead + stored_results]
    assert len(stored) == 4 and all(key.encode() not in data for data in stored)

    log_text = scrubbed_caplog.text
    assert "dead-lettered (auth)" in log_text  # the worker did log the failure
    assert key not in log_text
    assert all(key not in r.getMessage() for r in scrubbed_caplog.records)
