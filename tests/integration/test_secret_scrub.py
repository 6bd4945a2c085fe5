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
from services.config import NotifySettings, ProviderSettings, Settings
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


async def test_the_notifiers_urls_and_keys_never_reach_its_logs_or_notifications(
    settings: Settings, scrubbed_caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    """Sink URLs (with a token in them) and keys read from files, of no recognisable shape:
    a webhook that always fails, a Slack that cannot be reached, PagerDuty. Neither the
    debug logs (retries, give-ups) nor the notifications themselves carry them, even when a
    breaker's last error quotes one."""
    from services.breaker.board import transition
    from services.jetstream.connection import connect
    from services.jetstream.topology import ensure_topology
    from services.notifier import Notifier
    from services.notifier.sinks import build_sinks
    from services.tools.receiver import Receiver
    from tests.support import wait_until

    receiver = await Receiver(secret="").start()
    token = f"Tk7_{secrets.token_hex(10)}"
    hook_key = f"Hm4.{secrets.token_hex(10)}"
    pd_key = f"Rk2+{secrets.token_hex(10)}"
    files = {
        "webhook_url_file": f"{receiver.url}/fail?token={token}",
        "webhook_secret_file": hook_key,
        "slack_webhook_url_file": f"http://127.0.0.1:9/services/{token}x",
        "pagerduty_routing_key_file": pd_key,
    }
    notify: dict[str, Any] = {"pagerduty_url": f"{receiver.url}/pagerduty", "max_attempts": 2,
                              "retry_base_s": 0.01, "flap_window_s": 0.0}  # fmt: skip
    for name, value in files.items():
        path = tmp_path / name
        path.write_text(value + "\n")
        notify[name] = path
    settings = settings.with_changes(notify=NotifySettings(**notify))
    nc = await connect(settings, name="test")  # registers the settings' secrets, as services do
    js = nc.jetstream()
    await ensure_topology(js, settings)
    notifier = await Notifier(js, settings, build_sinks(settings), owner="n1").start()
    try:
        kv = await js.key_value(s.HEALTH_BUCKET)
        await transition(
            js, kv, "anthropic", to="open", allowed_from=("closed",), by="test",
            last_error=f"upstream said: routing key {pd_key} refused",
        )  # fmt: skip

        async def given_up() -> bool:
            return notifier.given_up >= 2 and len(receiver.of("pagerduty")) >= 1

        await wait_until(given_up, timeout=30)
    finally:
        await notifier.stop()
        await nc.close()
        await receiver.stop()
    log_text = scrubbed_caplog.text
    assert "given up after 2 attempts" in log_text  # the failures were logged
    sent = [r.body for r in receiver.requests]
    assert len(sent) == 3  # two webhook attempts, one PagerDuty trigger
    for secret in (token, hook_key, pd_key, *files.values()):
        assert secret not in log_text
        assert all(secret not in r.getMessage() for r in scrubbed_caplog.records)
    for secret in (token, hook_key):
        assert all(secret not in str(body) for body in sent)
    webhook = [r.body for r in receiver.of("fail")]
    assert "***" in webhook[0]["data"]["last_error"] and pd_key not in str(webhook)
