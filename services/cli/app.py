"""The one ``ridethrough`` app: every command registered under its name, and ``main``.

Exit codes: 0 ok; 1 the job failed, expired or timed out; 2 usage, settings or
connection error. Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import sys

import typer
from typer.exceptions import TyperException

from services.cli import backup, bench, dead, jobs, queues, serve, status
from services.cli.common import EXIT_OK, EXIT_USAGE

app = typer.Typer(
    name="ridethrough",
    help="A durable queue for AI jobs on NATS JetStream that rides through provider outages.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# In the order `ridethrough --help` lists them (the groups below come after).
app.command("bench")(bench.bench)
app.command("bench-child", hidden=True)(bench.bench_child)
app.command("submit")(jobs.submit)
app.command("result")(jobs.result)
app.command("topology")(serve.topology)
app.command("status")(status.status)
app.command("watch")(status.watch)
app.command("pause")(queues.pause)
app.command("resume")(queues.resume)
app.command("drain")(queues.drain)
app.command("replay")(queues.replay)
app.command("outages")(status.outages)
app.command("import")(backup.import_results)
app.command("worker")(serve.worker)
app.command("prober")(serve.prober)
app.command("replayer")(serve.replayer)
app.command("notifier")(serve.notifier)
app.command("gateway")(serve.gateway)
app.command("fake-provider")(serve.fake_provider)
app.command("dev")(serve.dev)
app.command("demo")(serve.demo)

dead_app = typer.Typer(help="Dead letters: list, show, purge.", no_args_is_help=True)
dead_app.command("list")(dead.list_letters)
dead_app.command("show")(dead.show)
dead_app.command("purge")(dead.purge)
app.add_typer(dead_app, name="dead")

jobs_app = typer.Typer(help="Look up one job.", no_args_is_help=True)
jobs_app.command("show")(jobs.show)
app.add_typer(jobs_app, name="jobs")

export_app = typer.Typer(help="Back up AI-generated output.", no_args_is_help=True)
export_app.command("results")(backup.export_results)
app.add_typer(export_app, name="export")


def _app_for(argv: list[str]) -> typer.Typer:
    """The app that runs ``argv``: for a plain command (``status``, ``submit``...), an app
    of that command alone, otherwise the whole app.

    Typer turns every registered command into a click command on each start (reading
    each signature and its types); for two dozen commands that was ~50 ms of the ~0.4 s
    of ``ridethrough status``, to run one of them. The usage, help and errors read the same.
    """
    name = argv[0] if argv else None
    chosen = [c for c in app.registered_commands if name is not None and c.name == name]
    if len(chosen) != 1:
        return app
    one = typer.Typer(name="ridethrough", pretty_exceptions_enable=False, add_completion=False)
    one.registered_commands.append(chosen[0])

    @one.callback()
    def _group() -> None:
        """A durable queue for AI jobs on NATS JetStream that rides through provider outages."""

    return one


def main(argv: list[str] | None = None) -> int:
    """Run the app on ``argv`` (default: the command line); return the exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = _app_for(args)(args=args, standalone_mode=False, prog_name="ridethrough")
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
