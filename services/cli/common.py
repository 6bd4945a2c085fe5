"""What every ``ridethrough`` command shares: exit codes, option types, one-line errors,
settings, running a coroutine (on a JetStream connection), printing JSON and tables,
durations and times.

Nothing here knows the app or any command: the command modules import this module,
never the other way round.

Imports are cheap here and in every command module: a command imports what only it
needs (NATS, the ops, rich, the runner, the SDKs) inside its function, so
``ridethrough status`` does not pay for the worker's faststream or the providers' SDKs
(tests/unit/test_cli_imports.py holds that).
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, ParamSpec, TypeVar

import msgspec
import typer

from services.errors import ConfigError, ResultTimeout, RidethroughError

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from rich.console import Console

    from services.config import Settings

T = TypeVar("T")
P = ParamSpec("P")

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2

NatsUrl = Annotated[
    str | None,
    typer.Option("--nats-url", envvar="NATS_URL", help="NATS server URL(s), comma-separated."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
Tenant = Annotated[
    str | None,
    typer.Option(
        "--tenant",
        envvar="RIDETHROUGH_TENANT",
        help="The tenant the job belongs to (its result is on ai.results.tenant.<tenant>.<id>).",
    ),
]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line to stderr and exit with ``code``."""
    typer.echo(f"ridethrough: {message}", err=True)
    raise typer.Exit(code)


def settings_for(nats_url: str | None, tenant: str | None = None) -> Settings:
    """Settings from the environment, with ``--nats-url`` (and ``--tenant``) on top."""
    from services.config import load_settings

    overrides = {k: v for k, v in (("nats_url", nats_url), ("tenant", tenant)) if v is not None}
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc))


def check(validate: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call ``validate`` (a check made before anything connects), turning its error
    into a one-line exit 2."""
    try:
        return validate(*args, **kwargs)
    except RidethroughError as exc:
        fail(str(exc))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning our errors into one-line exits."""
    # Ctrl-C must interrupt every command safely, even when the parent started us with
    # SIGINT ignored (a background job): asyncio.run only handles it if it is the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(coro)
    except ResultTimeout as exc:
        fail(str(exc), EXIT_JOB_FAILED)
    except RidethroughError as exc:
        fail(str(exc))


def with_js(
    settings: Settings,
    work: Callable[[JetStreamContext], Awaitable[T]],
    *,
    name: str = "ridethrough-ops",
) -> T:
    """``run`` ``work`` on a JetStream connection of its own, closed after."""
    from services.jetstream.connection import jetstream

    async def go() -> T:
        async with jetstream(settings, name=name) as js:
            return await work(js)

    return run(go())


def print_json(obj: Any) -> None:
    """Print ``obj`` (a Struct, dict or list) as one line of JSON."""
    typer.echo(msgspec.json.encode(obj).decode())


def console() -> Console:
    """A console as wide as the terminal, and wide enough for the tables when piped."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90``, ``45s``, ``30m``, ``2h``, ``7d`` → a timedelta (one-line error otherwise)."""
    m = _DURATION.match(text.strip())
    if not m:
        fail(f"invalid duration {text!r}: use e.g. 90s, 30m, 2h or 7d")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def parse_time(text: str) -> datetime:
    """An RFC 3339 time, or a duration meaning that long ago."""
    if _DURATION.match(text.strip()):
        return datetime.now(UTC) - parse_duration(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail(f"invalid time {text!r}: use RFC 3339 (2026-03-02T09:00:00Z) or a duration (2h)")
    return when if when.tzinfo else when.replace(tzinfo=UTC)
