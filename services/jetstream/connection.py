"""Connecting to NATS with the configured servers, credentials and TLS.

``connect_options`` is the one place settings become connection options: nats-py
connections take them as they are, and the worker's FastStream broker takes the
same options through ``broker_options`` (credentials and TLS as a ``security=``
object, the form FastStream wants).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.config import NatsSettings, Settings
from services.errors import ConfigError, NatsUnavailable
from services.secrets import register_settings

log = logging.getLogger("ridethrough.nats")


#: Seconds a closing client waits for its subscriptions to drain. Every ridethrough
#: client has settled its work (acks, PubAcks) before it closes; after a JetStream leader
#: change a pull subscription can keep status messages nothing reads, and nats-py's
#: default (30 s) would then hold the process past its container's termination grace.
DRAIN_TIMEOUT_S = 5

#: ``scheme://userinfo@`` of a server URL: a password or token may stand there.
_USERINFO = re.compile(r"(?P<scheme>[a-z]+://)(?P<userinfo>[^@/]*)@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any credentials in it replaced by ``***`` (for logs and errors)."""

    def hide(m: re.Match[str]) -> str:
        user, sep, _ = m.group("userinfo").partition(":")
        return f"{m.group('scheme')}{user}:***@" if sep else f"{m.group('scheme')}***@"

    return _USERINFO.sub(hide, url)


async def report_refusal(exc: Exception) -> None:
    """nats-py error callback: say so when the server refused an operation.

    A publish or subscribe outside the user's permissions is not answered at all
    (the caller only sees a timeout); the server's ``Permissions Violation`` names
    the subject, which is what an operator needs to fix the account.
    """
    if "permissions violation" in str(exc).lower():
        log.warning("NATS refused an operation for this user: %s", exc)


def tls_context(n: NatsSettings) -> ssl.SSLContext | None:
    """The TLS context the settings ask for (CA to verify servers, client cert), or None."""
    if not n.tls:
        return None
    ca = _readable(n.tls_ca_file, "tls_ca_file") if n.tls_ca_file is not None else None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if n.tls_cert_file is not None and n.tls_key_file is not None:
            ctx.load_cert_chain(
                _readable(n.tls_cert_file, "tls_cert_file"),
                _readable(n.tls_key_file, "tls_key_file"),
            )
    except ssl.SSLError as exc:
        # The message names the files, never their contents.
        files = ", ".join(str(f) for f in (n.tls_ca_file, n.tls_cert_file, n.tls_key_file) if f)
        raise ConfigError(f"cannot load the NATS TLS files ({files}): {exc}") from exc
    return ctx


def _readable(path: Any, what: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read the NATS {what} {path}: {exc.strerror}") from exc
    return str(path)


def connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` built from the settings (credentials included)."""
    n = settings.nats
    # Every NATS client and broker is built from these options: from now on this
    # process's logs and error messages hide the settings' secrets.
    register_settings(settings)
    opts: dict[str, Any] = {
        "servers": settings.nats_servers,
        "connect_timeout": n.connect_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "drain_timeout": DRAIN_TIMEOUT_S,
    }
    if n.inbox_prefix != "_INBOX":
        opts["inbox_prefix"] = n.inbox_prefix
    if n.user is not None:
        opts["user"] = n.user
    if n.password is not None:
        opts["password"] = n.password.get_secret_value()
    if n.token is not None:
        opts["token"] = n.token.get_secret_value()
    if n.creds_file is not None:
        opts["user_credentials"] = _readable(n.creds_file, "creds_file")
    if n.nkey_seed_file is not None:
        opts["nkeys_seed"] = _readable(n.nkey_seed_file, "nkey_seed_file")
    tls = tls_context(n)
    if tls is not None:
        opts["tls"] = tls
    if n.tls_hostname is not None:
        opts["tls_hostname"] = n.tls_hostname
    return opts


def broker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for FastStream's ``NatsBroker``: the same options as
    ``connect_options``, with credentials and TLS folded into one ``security`` object."""
    from faststream.nats.security import (
        NatsCredentials,
        NatsNKey,
        NatsSecurity,
        NatsToken,
        NatsUserPassword,
    )

    opts = connect_options(settings)
    opts.pop("connect_timeout", None)
    tls: dict[str, Any] = {
        "ssl_context": opts.pop("tls", None),
        "tls_hostname": opts.pop("tls_hostname", None),
    }
    security: NatsSecurity | None = None
    if "user" in opts:
        security = NatsUserPassword(opts.pop("user"), opts.pop("password", ""), **tls)
    elif "token" in opts:
        security = NatsToken(opts.pop("token"), **tls)
    elif "user_credentials" in opts:
        security = NatsCredentials(opts.pop("user_credentials"), **tls)
    elif "nkeys_seed" in opts:
        security = NatsNKey(opts.pop("nkeys_seed"), **tls)
    elif tls["ssl_context"] is not None or tls["tls_hostname"] is not None:
        security = NatsSecurity(**tls)
    if security is not None:
        opts["security"] = security
    opts["error_cb"] = report_refusal
    return opts


async def connect(settings: Settings, *, name: str = "ridethrough", **extra: Any) -> Client:
    """Connect to NATS, failing fast with ``NatsUnavailable`` if no server answers.

    The first connection does not retry forever (a producer must learn that NATS
    is down); once connected, the client reconnects without limit.
    """

    errors: list[Exception] = []

    async def _quiet(exc: Exception) -> None:
        # nats-py logs every reconnect failure itself; the caller decides what to say.
        # The last one explains a first connection that never succeeds (say, bad credentials).
        errors[:] = [exc]
        await report_refusal(exc)

    opts = connect_options(settings) | {"name": name, "error_cb": _quiet} | extra
    # With unlimited reconnects nats-py would retry a first connection forever too.
    budget = settings.nats.connect_timeout_s * len(opts["servers"]) + 1.0
    try:
        nc: Client = await asyncio.wait_for(nats.connect(**opts), budget)
    except TimeoutError:
        servers = ", ".join(redact_url(u) for u in settings.nats_servers)
        last = f" (last error: {errors[0]})" if errors and str(errors[0]) else ""
        raise NatsUnavailable(
            f"cannot connect to NATS at {servers}: no answer within {budget:.0f}s{last}"
        ) from None
    except Exception as exc:  # nats-py raises several unrelated classes here
        servers = ", ".join(redact_url(u) for u in settings.nats_servers)
        raise NatsUnavailable(
            f"cannot connect to NATS at {servers}: {exc or type(exc).__name__}"
        ) from exc
    return nc


def client(js: JetStreamContext) -> Client:
    """The connection a JetStream context publishes on (nats-py keeps it private)."""
    nc: Client = js._nc
    return nc


def max_payload(js: JetStreamContext) -> int:
    """The largest message the server ``js`` is connected to accepts (0: unknown)."""
    return int(client(js).max_payload or 0)


@asynccontextmanager
async def jetstream(settings: Settings, *, name: str) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on a connection of its own (named ``name``), closed on exit:
    for one short piece of work, such as an operator command."""
    nc = await connect(settings, name=name)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()
