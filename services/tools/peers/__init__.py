"""Peers of ridethrough's worker, for ``ridethrough bench -s peers``.

    taskiq_peer.py      taskiq with taskiq-nats (its pull-based JetStream broker), run by
                        ``taskiq worker``
    faststream_peer.py  a FastStream NATS pull subscriber, run by ``faststream run``

Each program is what a user of that library would write, following its docs, to do what
ridethrough's worker does with a job: make the job's anthropic SDK call (to the bench's
fake provider) and store the answer on AI_RESULTS. Neither imports ridethrough: they run
in an environment of their own (``ensure_env``: a venv under
``~/.cache/ridethrough/bench-peers/`` with pinned versions, never the project's
dependencies), configured by ``PEER_*`` environment variables (``child_env``). Each also
loads its own jobs in its own wire format (``load_command``) before its worker starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from services.errors import BenchError

#: The peers, by the name the bench reports them under.
PEERS: Final = ("taskiq", "faststream")
#: What the peers' environment holds (pinned: a figure names its versions).
PINS: Final = (
    "taskiq==0.13.0",
    "taskiq-nats==0.7.0",
    "faststream[nats,cli]==0.7.8",
    "nats-py==2.16.0",
    "anthropic[aiohttp]==2.14.0",
)
#: The streams the peers' jobs wait in (the bench deletes them before each run).
STREAMS: Final = {"taskiq": "PEERS_TASKIQ", "faststream": "PEERS_FASTSTREAM"}
HERE: Final = Path(__file__).resolve().parent
_PIP_TIMEOUT_S: Final = 900.0


def default_env_root() -> Path:
    """Where the peers' environments live unless told: ``~/.cache/ridethrough/bench-peers``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ridethrough" / "bench-peers"


def env_dir(root: Path) -> Path:
    """The environment for this Python and these pins, under ``root``."""
    key = hashlib.sha256("\n".join((sys.version, *PINS)).encode()).hexdigest()[:12]
    return root / f"py{sys.version_info.major}{sys.version_info.minor}-{key}"


def ensure_env(root: Path) -> Path:
    """The Python of the peers' environment under ``root``, built first if missing
    (``python -m venv`` and ``pip install`` of ``PINS``: it needs the package index).

    Raises ``BenchError`` (one line) when it cannot be built; a half-built one is removed.
    """
    where = env_dir(root)
    python = where / "bin" / "python"
    if (where / "ready").exists() and python.exists():
        return python
    shutil.rmtree(where, ignore_errors=True)
    steps = (
        [sys.executable, "-m", "venv", str(where)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS],
    )
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
            if proc.returncode != 0:
                raise BenchError(
                    f"cannot build the peers' environment in {where}: "
                    f"`{' '.join(step[1:4])}` failed ({_last_line(proc.stderr or proc.stdout)}); "
                    "it needs the package index (or pass --peers-python)"
                )
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(where, ignore_errors=True)
        raise BenchError(f"cannot build the peers' environment in {where}: {exc}") from exc
    except BenchError:
        shutil.rmtree(where, ignore_errors=True)
        raise
    (where / "ready").write_text("\n".join(PINS) + "\n")
    return python


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def child_env(
    *,
    nats_url: str,
    fake_url: str | None,
    api_key: str,
    results_prefix: str,
    in_flight: int,
    batch: int,
    canned: Mapping[str, Any],
) -> dict[str, str]:
    """The environment of a peer's processes (``fake_url`` None: the queue-only run)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RIDETHROUGH_", "ANTHROPIC_", "PEER_", "FASTSTREAM_"))
    }
    env.update(
        PEER_NATS_URL=nats_url,
        PEER_FAKE_URL=fake_url or "",
        PEER_API_KEY=api_key,
        PEER_RESULTS=results_prefix,
        PEER_IN_FLIGHT=str(in_flight),
        PEER_BATCH=str(batch),
        PEER_CANNED=json.dumps(dict(canned)),
        PYTHONPATH=str(HERE),
    )
    return env


def load_command(peer: str, python: Path, jobs_file: Path) -> list[str]:
    """The command that puts the jobs of ``jobs_file`` (one JSON job a line) on ``peer``'s
    queue, in its own wire format."""
    return [str(python), str(HERE / f"{peer}_peer.py"), "load", str(jobs_file)]


def worker_command(peer: str, python: Path, in_flight: int) -> list[str]:
    """The command that runs ``peer``'s worker (one process), as its docs run it."""
    if peer == "taskiq":
        return [
            str(python), "-m", "taskiq", "worker", "taskiq_peer:broker",
            "--app-dir", str(HERE), "--workers", "1", "--max-async-tasks", str(in_flight),
            "--ack-type", "when_saved", "--log-level", "WARNING",
        ]  # fmt: skip
    if peer == "faststream":
        return [
            # No --log-level: it would also raise the per-message lines to that level.
            str(python), "-m", "faststream", "run", "faststream_peer:app",
            "--app-dir", str(HERE),
        ]  # fmt: skip
    raise BenchError(f"unknown peer {peer!r} (known: {', '.join(PEERS)})")


__all__ = [
    "PEERS",
    "PINS",
    "STREAMS",
    "child_env",
    "default_env_root",
    "ensure_env",
    "env_dir",
    "load_command",
    "worker_command",
]
