"""A whole ridethrough on one machine: embedded NATS, fake provider, worker.

Used by ``ridethrough dev`` and ``ridethrough demo``. Providers without an API
key are pointed at the fake provider, so the stack works with no key at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faststream import FastStream
from pydantic import SecretStr

from services.config import ProviderSettings, Settings
from services.connection import connect
from services.prober import Prober
from services.replayer import Replayer
from services.devstack import NatsServer, port_in_use
from services.errors import ConfigError
from services.providers.registry import build_providers
from services.worker.app import Worker, build_app

log = logging.getLogger("ridethrough.stack")

FAKE_KEY = "fake-key-not-secret"


def providers_without_keys(settings: Settings) -> list[str]:
    """Configured providers that have no credentials and no local endpoint."""
    return [
        name
        for name, p in sorted(settings.providers.items())
        if settings.provider_key(name) is None and not (p.kind == "openai" and p.base_url)
    ]


def pointed_at_fake(settings: Settings, fake_url: str, names: list[str]) -> Settings:
    """Settings whose providers ``names`` call the fake provider at ``fake_url``."""
    providers: dict[str, ProviderSettings] = dict(settings.providers)
    for name in names:
        base = fake_url if providers[name].kind == "anthropic" else f"{fake_url}/v1"
        providers[name] = providers[name].model_copy(
            update={"base_url": base, "api_key": SecretStr(FAKE_KEY), "api_key_file": None}
        )
    return settings.with_changes(providers=providers)


@dataclass
class Stack:
    """What ``local_stack`` started; ``settings`` point at all of it."""

    settings: Settings
    nats: NatsServer | None = None
    fake: Any = None
    fake_providers: list[str] = field(default_factory=list)


@contextlib.contextmanager
def local_stack(
    settings: Settings,
    *,
    nats_url: str | None = None,
    port: int | None = None,
    data_dir: Path | None = None,
    fake_config: Any = None,
) -> Any:
    """Start embedded NATS (unless ``nats_url``) and the fake provider (for providers
    without keys); yield a ``Stack``; stop them on exit."""
    nats: NatsServer | None = None
    fake = None
    try:
        if nats_url is None:
            if port is not None and port_in_use(port):
                raise ConfigError(
                    f"port {port} is already in use: "
                    "pass --port N, or --nats-url to use that server"
                )
            nats = NatsServer(port=port, data_dir=data_dir).start()
            settings = settings.with_changes(nats_url=nats.url)
        else:
            settings = settings.with_changes(nats_url=nats_url)
        missing = providers_without_keys(settings)
        if missing:
            from services.providers import fake as fake_mod

            fake = fake_mod.run_in_thread(fake_config or fake_mod.FaultConfig())
            settings = pointed_at_fake(settings, fake.url, missing)
        yield Stack(settings=settings, nats=nats, fake=fake, fake_providers=missing)
    finally:
        if fake is not None:
            fake.stop()
        if nats is not None:
            if data_dir is None:
                nats.cleanup()
            else:
                nats.stop()


def service_owner(role: str) -> str:
    """An id for a prober or replayer replica: role, host and process."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@contextlib.asynccontextmanager
async def running_recovery(settings: Settings) -> AsyncIterator[tuple[Prober, Replayer]]:
    """A prober and a replayer started in this event loop, stopped on exit."""
    nc = await connect(settings, name="ridethrough-recovery")
    js = nc.jetstream()
    prober = await Prober(
        js, build_providers(settings), settings, owner=service_owner("prober")
    ).start()
    replayer = await Replayer(js, settings, owner=service_owner("replayer")).start()
    try:
        yield prober, replayer
    finally:
        await replayer.stop()
        await prober.stop()
        for provider in prober.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()
        await nc.close()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[tuple[FastStream, Worker]]:
    """A worker started in this event loop (topology applied first), stopped on exit."""
    app, worker = build_app(settings, build_providers(settings))
    await app.start()
    try:
        yield app, worker
    finally:
        await app.stop()
