"""A notification receiver on loopback: what ``ridethrough demo --notify`` prints from, and
what the notifier's tests check against. It is a real HTTP server (aiohttp) with one path
per sink:

    POST /webhook     the generic webhook: checks the signature, dedupes by CloudEvents id
    POST /slack       a Slack incoming webhook
    POST /pagerduty   PagerDuty Events v2 (answers 202, like PagerDuty)
    POST /fail        answers 500, always (a sink that is down)

Each request is kept in ``requests`` (sink, headers, JSON body, whether its signature
verified); ``webhook_events`` holds each CloudEvent once, by id, as a deduping receiver
would. ``hold`` makes the webhook path wait before answering (a delivery in mid-flight).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from services.notifier.sinks import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify


@dataclass(slots=True)
class Received:
    """One request the receiver got."""

    sink: str
    headers: dict[str, str]
    body: dict[str, Any]
    signed: bool | None = None  # the webhook's: whether the signature verified


@dataclass
class Receiver:
    """The loopback receiver; ``secret`` verifies the webhook's signatures."""

    secret: str = ""
    on_notice: Callable[[Received], None] | None = None
    requests: list[Received] = field(default_factory=list)
    webhook_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    hold: asyncio.Event | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Receiver:
        """Serve on ``host``:``port`` (0: a free one); ``url`` is where."""
        app = web.Application()
        for sink in ("webhook", "slack", "pagerduty", "fail"):
            app.router.add_post(f"/{sink}", self._handler(sink))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{host}:{bound}"
        return self

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    def of(self, sink: str) -> list[Received]:
        """The requests one sink's path got, in order."""
        return [r for r in self.requests if r.sink == sink]

    def _handler(self, sink: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                return web.Response(status=400, text="not JSON")
            got = Received(sink, dict(request.headers), body)
            if sink == "webhook":
                got.signed = verify(
                    self.secret,
                    raw,
                    request.headers.get(TIMESTAMP_HEADER, ""),
                    request.headers.get(SIGNATURE_HEADER, ""),
                )
            self.requests.append(got)
            self.arrived.set()
            if sink == "fail":
                return web.Response(status=500, text="down")
            if sink == "webhook":
                if not got.signed:
                    return web.Response(status=401, text="bad signature")
                if self.hold is not None:
                    await self.hold.wait()
                event_id = request.headers.get(ID_HEADER) or str(body.get("id"))
                if event_id in self.webhook_events:
                    return web.Response(status=200, text="duplicate")
                self.webhook_events[event_id] = body
            if self.on_notice is not None:
                self.on_notice(got)
            return web.Response(status=202 if sink == "pagerduty" else 200, text="ok")

        return handle
