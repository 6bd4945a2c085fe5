"""The compose stack of tests/deploy: docker compose commands, container state, the fake's
admin API and NATS connections from the host.

One project (``rtdeploy``) runs ``compose.yaml`` with ``compose.test.yaml`` over it and an
env file made from ``deploy/compose/demo.env`` whose provider key is ``CANARY_KEY``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "rtdeploy"
OVERRIDE = Path(__file__).with_name("compose.test.yaml")
#: The provider key the stack runs with: it must show in no container's log.
CANARY_KEY = "sk-ant-deploytest-CANARY-7f3a9c"
#: Long-running services (one-shot topology and submit aside).
SERVICES = ("nats-1", "nats-2", "nats-3", "worker", "prober", "replayer", "fake-provider")
NATS_NODES = ("nats-1", "nats-2", "nats-3")
UID = "10001"


def run(
    args: Sequence[str],
    timeout: float = 300,
    check: bool = True,
    env_extra: dict[str, str] | None = None,
) -> str:
    """Run a command, return its stdout; fail with its output when it fails."""
    env = os.environ | (env_extra or {})
    proc = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc.stdout


def docker_ready() -> bool:
    """Whether docker, the compose plugin and an engine are all there."""
    if shutil.which("docker") is None:
        return False
    ok = subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0
    return (
        ok
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 1.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)


class Stack:
    """The compose project of the deploy tests."""

    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file
        self.passwords: dict[str, str] = {}
        for line in env_file.read_text().splitlines():
            if line.startswith("RIDETHROUGH_") and "_PASSWORD=" in line:
                name, _, value = line.partition("=")
                self.passwords[name] = value

    @classmethod
    def make(cls, tmp: Path) -> Stack:
        """An env file from demo.env with the canary key, and the stack using it."""
        demo = (ROOT / "deploy/compose/demo.env").read_text()
        env_file = tmp / "deploy.env"
        env_file.write_text(demo.replace("demo-not-secret", CANARY_KEY))
        return cls(env_file)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        base = ["docker", "compose", "-p", PROJECT, "-f", "compose.yaml", "-f", str(OVERRIDE)]
        base += ["--env-file", str(self.env_file), "--profile", "demo"]
        return run([*base, *args], timeout=timeout, check=check)

    def up(self, *extra: str) -> None:
        """Start every service but the demo's one-shot submit; the topology step is run
        again when it failed (a cluster still electing its meta leader)."""
        args = ("up", "-d", "--no-build", *extra, "topology", *SERVICES)
        try:
            self.compose(*args, timeout=600)
        except AssertionError:
            self.compose(*args, timeout=600)

    def down(self) -> None:
        self.compose("down", "-v", "--timeout", "5", timeout=600, check=False)

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        args = ["ps", "-q"] + (["-a"] if all_states else []) + ([service] if service else [])
        return self.compose(*args).split()

    def port(self, service: str, port: int) -> int:
        out = self.compose("port", service, str(port)).strip()
        return int(out.rsplit(":", 1)[1])

    def kill(self, container: str) -> None:
        """SIGKILL a container; when that fails, say what state the stack is in."""
        try:
            run(["docker", "kill", container])
        except AssertionError as exc:
            state = self.inspect(container)["State"]
            raise AssertionError(
                f"{exc}\nstate: {state}\n{self.compose('ps', '-a')}\n{self.logs(container)[-4000:]}"
            ) from None

    # ---- per container

    @staticmethod
    def inspect(container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(run(["docker", "inspect", container]))
        return data[0]

    @classmethod
    def health(cls, container: str) -> str:
        state = cls.inspect(container)["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))

    @staticmethod
    def service_of(container: str) -> str:
        fmt = '{{index .Config.Labels "com.docker.compose.service"}}'
        return run(["docker", "inspect", "--format", fmt, container]).strip()

    @staticmethod
    def logs(container: str) -> str:
        """Everything the container wrote, stdout and stderr."""
        proc = subprocess.run(
            ["docker", "logs", container], capture_output=True, text=True, check=False
        )
        return proc.stdout + proc.stderr

    @staticmethod
    def exec_python(container: str, code: str, check: bool = True) -> str:
        return run(["docker", "exec", container, "python", "-c", code], timeout=60, check=check)

    def all_healthy(self) -> bool:
        cs = self.containers()
        return len(cs) >= len(SERVICES) and all(self.health(c) == "healthy" for c in cs)

    def wait_healthy(self, timeout: float = 300) -> None:
        wait_for("every service healthy", self.all_healthy, timeout, interval=2)

    # ---- from the host

    def settings(self, user: str) -> Settings:
        """Settings for a NATS user of the stack, over all three nodes' host ports."""
        urls = ",".join(f"nats://127.0.0.1:{self.port(n, 4222)}" for n in NATS_NODES)
        password = self.passwords[f"RIDETHROUGH_{user.upper()}_PASSWORD"]
        nats = {"user": user, "password": password, "inbox_prefix": f"_INBOX.{user}"}
        if user == "operator":
            nats["inbox_prefix"] = "_INBOX"
        return Settings(nats_url=urls, nats=nats)

    def fake(self, method: str, path: str, body: Any = None) -> Any:
        """Call the fake provider's admin API from the host."""
        url = f"http://127.0.0.1:{self.port('fake-provider', 8787)}{path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("content-type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:  # loopback only
            return json.loads(resp.read())
