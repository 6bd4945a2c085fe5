"""The alive file: a heartbeat file for container probes (``deploy/``), liveness and
readiness with no port. ("Health" in ridethrough is the providers': the breaker board.)

While a service's event loop runs, ``alive_file`` rewrites one small file every
``interval_s`` seconds: ``ready`` while its NATS connection is up, ``not-ready``
while it is not. A probe reads the file's age (liveness: the event loop is not
stuck) and its content (readiness: connected to NATS). The file is removed when
the service stops. Enabled with ``--alive-file PATH`` or ``RIDETHROUGH_ALIVE_FILE``
(``--health-file`` and ``RIDETHROUGH_HEALTH_FILE``, the names before, still work).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

READY = "ready"
NOT_READY = "not-ready"


def write_status(path: Path, connected: bool) -> None:
    """Replace ``path`` atomically with ``ready`` or ``not-ready`` (its mtime is the beat)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{READY if connected else NOT_READY}\n")
    os.replace(tmp, path)


async def _beat(path: Path, connected: Callable[[], bool], interval_s: float) -> None:
    while True:
        # A full or read-only disk must not stop the service; the probe will say so.
        with contextlib.suppress(OSError):
            write_status(path, connected())
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def alive_file(
    path: Path | None, connected: Callable[[], bool], interval_s: float = 5.0
) -> AsyncIterator[None]:
    """Keep ``path`` beating while the block runs (nothing at all when ``path`` is None)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    task = asyncio.create_task(_beat(path, connected, interval_s))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):
            os.unlink(path)  # a stopped service is neither alive nor ready


def nats_connected(client: Any) -> bool:
    """Whether a nats-py client, or a FastStream NATS broker, is connected now."""
    with contextlib.suppress(Exception):
        if hasattr(client, "config"):  # a FastStream broker: its nats-py client
            client = client.config.connection_state.connection
        return bool(client.is_connected)
    return False
