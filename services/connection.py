"""Connecting to NATS with the configured servers and credentials."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
from nats.aio.client import Client

from services.config import Settings
from services.errors import NatsUnavailable


def connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` built from the settings (credentials included)."""
    n = settings.nats
    opts: dict[str, Any] = {
        "servers": settings.nats_servers,
        "connect_timeout": n.connect_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
    }
    if n.user is not None:
        opts["user"] = n.user
    if n.password is not None:
        opts["password"] = n.password.get_secret_value()
    if n.token is not None:
        opts["token"] = n.token.get_secret_value()
    if n.creds_file is not None:
        opts["user_credentials"] = str(n.creds_file)
    return opts


async def connect(settings: Settings, *, name: str = "ridethrough", **extra: Any) -> Client:
    """Connect to NATS, failing fast with ``NatsUnavailable`` if no server answers.

    The first connection does not retry forever (a producer must learn that NATS
    is down); once connected, the client reconnects without limit.
    """

    async def _quiet(_: Exception) -> None:
        # nats-py logs every reconnect failure itself; the caller decides what to say.
        return None

    opts = connect_options(settings) | {"name": name, "error_cb": _quiet} | extra
    # With unlimited reconnects nats-py would retry a first connection forever too.
    budget = settings.nats.connect_timeout_s * len(opts["servers"]) + 1.0
    try:
        nc: Client = await asyncio.wait_for(nats.connect(**opts), budget)
    except TimeoutError:
        servers = ", ".join(settings.nats_servers)
        raise NatsUnavailable(
            f"cannot connect to NATS at {servers}: no answer within {budget:.0f}s"
        ) from None
    except Exception as exc:  # nats-py raises several unrelated classes here
        servers = ", ".join(settings.nats_servers)
        raise NatsUnavailable(
            f"cannot connect to NATS at {servers}: {exc or type(exc).__name__}"
        ) from exc
    return nc
