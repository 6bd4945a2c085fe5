"""The ``ridethrough`` command line.

Exit codes: 0 ok; 1 the job failed, expired or timed out; 2 usage, settings or
connection error. Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import msgspec
import typer
from typer.exceptions import TyperException

from services.config import Settings, load_settings
from services.errors import ConfigError, ResultTimeout, RidethroughError

T = TypeVar("T")
P = ParamSpec("P")

app = typer.Typer(
    name="ridethrough",
    help="A durable queue for AI jobs on NATS JetStream that rides through provider outages.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

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


def print_json(obj: Any) -> None:
    """Print ``obj`` (a Struct, dict or list) as one line of JSON."""
    typer.echo(msgspec.json.encode(obj).decode())


# Sub-command modules register themselves on ``app``.
from services import cli_bench as _cli_bench  # noqa: E402, F401
from services import cli_jobs as _cli_jobs  # noqa: E402, F401
from services import cli_ops as _cli_ops  # noqa: E402, F401
from services import cli_services as _cli_services  # noqa: E402, F401


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="ridethrough")
    except typer.Abort:
        typer.echo("ridethrough: aborted", err=True)
        return 130
    except TyperException as exc:  # usage errors: bad option, missing argument, bad value
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if not text.strip():  # no arguments at all: the help was printed
            return int(getattr(exc, "exit_code", EXIT_USAGE))
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"ridethrough: {text}{hint}", err=True)
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # last resort: still one line, and say it is a bug
        typer.echo(f"ridethrough: internal error: {type(exc).__name__}: {exc}", err=True)
        return EXIT_USAGE
    return rv if isinstance(rv, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
