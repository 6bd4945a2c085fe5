"""The gateway's status page in a real headless Chromium: behind an operator key, it
reloads itself and shows an outage as it happens (breaker open, jobs parked), then its
summary; model names from producers' jobs are shown as text, never as markup."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from schemas import subjects as s
from services.config import GatewaySettings, Settings
from services.gateway import key_digest, running_gateway
from services.producer import Producer, make_job
from services.tools.stack import running_recovery, running_worker
from tests.browser import chromium_path, open_page
from tests.support import count_outcomes, stream_state, wait_until

pytestmark = pytest.mark.integration

OPERATOR_KEY = "op-key-for-tests"
#: A model name a hostile producer might send: markup, if the page did not escape it.
HOSTILE = 'claude-<img src=x onerror="document.title=1">'


def _operator_settings(settings: Settings) -> Settings:
    return settings.with_changes(
        gateway=GatewaySettings(operator_keys=[key_digest(OPERATOR_KEY)], status_refresh_s=1)
    )


def _save(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"operator:{key}".encode()).decode()


async def test_status_needs_an_operator_key(settings: Settings, js: Any) -> None:
    """No key, a wrong key, or a tenant's gateway key: 401 asking for Basic auth; the
    operator key (Basic password or bearer) opens the page and its JSON."""
    op = _operator_settings(settings)
    gw = op.with_changes(
        gateway=op.gateway.model_copy(update={"keys": {key_digest("tenant-key"): "acme"}})
    )
    async with running_gateway(gw, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        for headers in (
            {},
            {"authorization": _basic("wrong")},
            {"authorization": "Basic !!!not-base64"},
            {"x-api-key": "tenant-key"},
            {"authorization": "Bearer tenant-key"},
        ):
            async with http.get(f"{url}/status", headers=headers) as resp:
                assert resp.status == 401, headers
                assert resp.headers["www-authenticate"].startswith("Basic ")
        async with http.get(f"{url}/status", headers={"authorization": _basic(OPERATOR_KEY)}) as r:
            assert r.status == 200
            assert "ridethrough status" in await r.text()
        async with http.get(
            f"{url}/status.json", headers={"authorization": f"Bearer {OPERATOR_KEY}"}
        ) as r:
            assert r.status == 200
            body = await r.json()
    assert set(body["providers"]) == set(settings.providers)
    assert body["providers"]["anthropic"]["parked_by_priority"] == dict.fromkeys(s.PRIORITIES, 0)


@pytest.mark.skipif(chromium_path() is None, reason="no chromium (.ci/run installs it)")
async def test_the_page_follows_an_outage_in_a_real_browser(
    settings: Settings, js: Any, fake_provider: Any, tmp_path: Path
) -> None:
    """Chromium opens /status once; without being told, the page shows the model's breaker
    open and its jobs parked, then, after recovery, the outage's summary; the hostile model
    name is text (no <img> in the DOM). Every job ends succeeded."""
    op = _operator_settings(settings)
    shots = Path(os.environ.get("RIDETHROUGH_SCREENSHOT_DIR", tmp_path))
    async with (
        running_gateway(op, "127.0.0.1", 0) as url,
        running_worker(op),
        running_recovery(op),
        await Producer.connect(op) as producer,
        open_page() as page,
    ):
        await page.goto(f"{url}/status", headers={"authorization": _basic(OPERATOR_KEY)})

        async def loaded() -> bool:
            return "Breakers" in await page.text()

        await wait_until(loaded, timeout=60)
        assert "open" not in (await page.evaluate(
            "[...document.querySelectorAll('.state')].map(e => e.textContent).join(' ')"
        ) or "")  # fmt: skip
        fake_provider.start_outage(529, models=[HOSTILE])
        jobs = [make_job("anthropic", HOSTILE, prompt=f"h{i}", max_tokens=8) for i in range(8)]
        for job in jobs:
            await producer.submit(job)

        async def shows_open_and_parked() -> bool:
            states = await page.evaluate(
                "[...document.querySelectorAll('#breakers tr')].map(r => r.innerText)"
            )
            rows = [r for r in states or [] if HOSTILE in r]
            parked = (await stream_state(js, s.PARKED_STREAM)).messages
            return bool(rows) and "open" in rows[0] and parked == len(jobs)

        await wait_until(shows_open_and_parked, timeout=90)

        async def page_counts_parked() -> bool:
            cells = await page.evaluate(
                "[...document.querySelectorAll('#queues tr')].map(r => r.innerText)"
            )
            return any(str(len(jobs)) in row and "anthropic" in row for row in cells or [])

        await wait_until(page_counts_parked, timeout=30)
        png = await page.screenshot()
        _save(shots / "status-during-outage.png", png)
        assert await page.evaluate("document.querySelectorAll('img').length") == 0
        assert await page.evaluate("document.title") == "ridethrough status"
        fake_provider.stop_outage()
        results = [await producer.result(j.id, timeout=90) for j in jobs]

        async def summary_shown() -> bool:
            rows = await page.evaluate(
                "[...document.querySelectorAll('#outages tr')].map(r => r.innerText)"
            )
            return any(HOSTILE in r and "ongoing" not in r for r in rows or [])

        await wait_until(summary_shown, timeout=60)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r.status for r in results] == ["succeeded"] * len(jobs)
    counts = await count_outcomes(js)
    assert (counts["succeeded"], counts["result_writes"], counts["dead"]) == (8, 8, 0)
