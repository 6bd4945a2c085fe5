"""A whole ridethrough on one machine: embedded NATS, fake provider, worker.

Used by ``ridethrough dev`` and ``ridethrough demo``. Providers without an API
key are pointed at the fake provider, so the stack works with no key at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faststream import FastStream
from pydantic import SecretStr

from services.breaker.recovery import service_owner
from services.config import ProviderSettings, Settings
from services.errors import ConfigError
from services.jetstream.connection import connect
from services.prober import Prober
from services.providers.registry import build_providers
from services.replayer import Replayer
from services.tools.devstack import NatsServer, port_in_use
from services.worker.app import Worker, build_app

log = logging.getLogger("ridethrough.stack")

FAKE_KEY = "fake-key-not-secret"


#: The fake's dummy cloud credentials: SigV4 is computed with them (the fake ignores it);
#: Vertex gets a static access token.
FAKE_AWS_KEY_ID = "AKIDFAKENOTSECRET"
FAKE_REGION = "us-east-1"
FAKE_PROJECT = "fake-project"


def _cloud_credentials(p: ProviderSettings) -> bool:
    """Whether a Bedrock or Vertex door names a credential or an endpoint of its own (one
    that names none would find the cloud's credentials itself: in ``ridethrough dev`` and
    the drills it is pointed at the fake instead)."""
    given = (
        p.base_url, p.api_key, p.api_key_file, p.aws_profile, p.aws_access_key_id,
        p.gcp_access_token, p.gcp_access_token_file,
    )  # fmt: skip
    return any(v is not None for v in given)


def providers_without_keys(settings: Settings) -> list[str]:
    """Configured providers that have no credentials and no local endpoint."""
    out = []
    for name, p in sorted(settings.providers.items()):
        if p.kind in ("anthropic-bedrock", "anthropic-vertex"):
            if not _cloud_credentials(p):
                out.append(name)
        elif settings.provider_key(name) is None and not p.base_url:
            out.append(name)
    return out


def pointed_at_fake(settings: Settings, fake_url: str, names: list[str]) -> Settings:
    """Settings whose providers ``names`` call the fake provider at ``fake_url`` (a cloud
    door at the fake's door of that cloud, with dummy credentials)."""
    providers: dict[str, ProviderSettings] = dict(settings.providers)
    for name in names:
        kind = providers[name].kind
        update: dict[str, Any]
        if kind == "anthropic-bedrock":
            update = {
                "base_url": fake_url,
                "aws_region": providers[name].aws_region or FAKE_REGION,
                "aws_access_key_id": SecretStr(FAKE_AWS_KEY_ID),
                "aws_secret_access_key": SecretStr(FAKE_KEY),
            }
        elif kind == "anthropic-vertex":
            update = {
                "base_url": f"{fake_url}/v1",
                "gcp_region": providers[name].gcp_region or FAKE_REGION,
                "gcp_project_id": providers[name].gcp_project_id or FAKE_PROJECT,
                "gcp_access_token": SecretStr(FAKE_KEY),
            }
        else:
            base = fake_url if kind == "anthropic" else f"{fake_url}/v1"
            update = {"base_url": base, "api_key": SecretStr(FAKE_KEY), "api_key_file": None}
        providers[name] = providers[name].model_copy(update=update)
    return settings.with_changes(providers=providers)


@dataclass
class Stack:
    """What ``local_stack`` started; ``settings`` point at all of it."""

    settings: Settings
    nats: NatsServer | None = None
    fake: Any = None
    fake_providers: list[str] = field(default_factory=list)


def dev_nats_url(
    flag_url: str | None, env_url: str | None, *, port_given: bool, data_dir_given: bool
) -> str | None:
    """The NATS URL ``ridethrough dev`` connects to, or ``None`` for its embedded server.

    An explicit ``--port`` or ``--data-dir`` means the embedded server, even with
    ``NATS_URL`` set in the environment; with ``--nats-url`` too it is a contradiction.
    Otherwise ``--nats-url``, then ``NATS_URL``, then the embedded server.
    """
    if port_given or data_dir_given:
        if flag_url is not None:
            given = "--port" if port_given else "--data-dir"
            raise ConfigError(
                f"--nats-url and {given} contradict each other: --nats-url uses a running "
                f"server, {given} starts the embedded one; pass one of them"
            )
        return None
    return flag_url if flag_url is not None else env_url


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
    without keys); yield a ``Stack``; stop them on exit.

    ``port`` and ``data_dir`` are the embedded server's: passing them with ``nats_url``
    is a ``ConfigError``, not a silent choice of one.
    """
    if nats_url is not None and (port is not None or data_dir is not None):
        raise ConfigError("a NATS URL and an embedded server's port or store exclude each other")
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
            from services.tools import fake as fake_mod

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


def child_env(settings: Settings) -> dict[str, str]:
    """Environment that rebuilds ``settings`` in a child process (provider keys included;
    the child is ours, on this machine)."""
    providers = {}
    for name, p in settings.providers.items():
        d = p.model_dump(mode="json", exclude_none=True)
        key = settings.provider_key(name)
        if key is not None:
            d["api_key"] = key
        for secret in (
            "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "gcp_access_token",
        ):  # fmt: skip
            value = getattr(p, secret)
            if value is not None:
                d[secret] = value.get_secret_value()
        providers[name] = d
    drop = ("NATS_URL", "ANTHROPIC_API_KEY", "OPENAI_API_KEY")
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RIDETHROUGH_")
    }
    env.update(
        {
            "NATS_URL": ",".join(settings.nats_servers),
            "RIDETHROUGH_PROVIDERS": json.dumps(providers),
            "RIDETHROUGH_WORKER": settings.worker.model_dump_json(),
            "RIDETHROUGH_BREAKER": settings.breaker.model_dump_json(),
            "RIDETHROUGH_REPLAY": settings.replay.model_dump_json(),
            "RIDETHROUGH_GATEWAY": settings.gateway.model_dump_json(),
            "RIDETHROUGH_BODIES": settings.bodies.model_dump_json(),
            "RIDETHROUGH_TRACING": settings.tracing.model_dump_json(),
            "RIDETHROUGH_NATS": settings.nats.model_dump_json(exclude={"password", "token"}),
        }
    )
    n = settings.nats
    if n.password is not None:
        env["RIDETHROUGH_NATS__PASSWORD"] = n.password.get_secret_value()
    if n.token is not None:
        env["RIDETHROUGH_NATS__TOKEN"] = n.token.get_secret_value()
    if settings.tenant is not None:
        env["RIDETHROUGH_TENANT"] = settings.tenant
    notify = settings.notify.model_dump(mode="json", exclude_none=True)
    for name, value in settings.notify:
        if isinstance(value, SecretStr):
            notify[name] = value.get_secret_value()
    env["RIDETHROUGH_NOTIFY"] = json.dumps(notify)
    return env


class ServiceProcess:
    """``ridethrough <role>`` (worker, prober, replayer) in a child process."""

    def __init__(
        self, settings: Settings, role: str, *args: str, log_path: Path | None = None
    ) -> None:
        self.settings = settings
        self.role = role
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Start the child (its output goes to ``log_path``, or nowhere)."""
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = child_env(self.settings)
        root = str(Path(__file__).resolve().parents[2])  # the checkout, above services/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services", self.role, *self.args],
            env=env,
            stdout=out,
            stderr=out,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to settle anything."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def stop(self) -> None:
        """Make sure the child is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def worker_id(self) -> str:
        """The id a worker child writes into its results and beats (``Worker.worker_id``)."""
        return f"{socket.gethostname()}-{self.pid}"


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
