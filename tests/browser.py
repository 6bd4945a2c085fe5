"""A real headless Chromium (Debian's ``chromium``) driven over the DevTools protocol:
just enough to open a page with extra headers, read its DOM and take a screenshot.

No driver package: the DevTools protocol over a websocket (aiohttp's client) is what
Playwright and Selenium speak underneath. One page per browser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import aiohttp


def chromium_path() -> str | None:
    """Debian's chromium, or another Chrome on PATH (``RIDETHROUGH_TEST_CHROMIUM``)."""
    named = os.environ.get("RIDETHROUGH_TEST_CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One tab of the browser, over its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self._ws = ws
        self._session = session_id
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call ``method`` on the page; its result (a protocol error raises)."""
        call_id = next(self._ids)
        await self._ws.send_str(
            json.dumps(
                {"id": call_id, "method": method, "params": params, "sessionId": self._session}
            )
        )
        while True:
            msg = await self._ws.receive_json()
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        got = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return got.get("result", {}).get("value")

    async def text(self) -> str:
        """The page's visible text (``document.body.innerText``; empty while loading)."""
        value = await self.evaluate("document.body ? document.body.innerText : ''")
        return value if isinstance(value, str) else ""

    async def goto(self, url: str, headers: dict[str, str] | None = None) -> None:
        """Open ``url``, every request of the page carrying ``headers``."""
        if headers:
            await self.send("Network.setExtraHTTPHeaders", headers=headers)
        await self.send("Page.navigate", url=url)

    async def screenshot(self) -> bytes:
        """The page as a PNG."""
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])


@contextlib.asynccontextmanager
async def open_page(width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """A headless Chromium with one page; closed (and its profile removed) on exit."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("no chromium on PATH: apt-get install chromium (.ci/run does)")
    profile = tempfile.mkdtemp(prefix="rt-chromium-")
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    drain: asyncio.Task[None] | None = None
    try:
        assert proc.stderr is not None
        url = await asyncio.wait_for(_devtools_url(proc.stderr), 60)
        # Keep reading its log, or a full pipe would stall the browser.
        drain = asyncio.create_task(_drain(proc.stderr))
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
            ids = itertools.count(1)

            async def browser(method: str, **params: Any) -> dict[str, Any]:
                call_id = next(ids) + 1_000_000
                await ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
                while True:
                    msg = await ws.receive_json()
                    if msg.get("id") == call_id:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        result: dict[str, Any] = msg.get("result", {})
                        return result

            target = await browser("Target.createTarget", url="about:blank")
            attached = await browser(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )
            page = Page(ws, attached["sessionId"])
            await page.send("Page.enable")
            await page.send("Network.enable")
            yield page
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()
        shutil.rmtree(profile, ignore_errors=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def _devtools_url(stderr: asyncio.StreamReader) -> str:
    """The browser's websocket, from its ``DevTools listening on ws://...`` line."""
    while line := await stderr.readline():
        found = re.search(r"DevTools listening on (ws://\S+)", line.decode(errors="replace"))
        if found:
            return found.group(1)
    raise RuntimeError("chromium exited before it listened for DevTools")
