"""The ``ridethrough`` command line.

    app.py     the one Typer app: every command registered under its name; ``main``
    common.py  what commands share: exit codes, option types, one-line errors, run
    jobs.py    submit, result, jobs show: one job from a shell
    status.py  status, watch, outages: what is happening and what happened
    queues.py  pause, resume, drain, replay: an operator's hand on a provider's jobs
    dead.py    dead list, show, purge
    backup.py  export results, import
    serve.py   topology, worker, prober, replayer, fake-provider, dev, demo
    bench.py   bench (and its hidden bench-child)

Imports go one way: ``app`` → the command modules → ``common``. A command module
parses options, calls one function of ``services.ops`` (or the producer, the
runner...), and prints. This ``__init__`` imports none of them, so importing
``services.cli.common`` does not build the app.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The console script ``ridethrough`` (``services.cli:main``): run the app."""
    from services.cli.app import main as run_app

    return run_app(argv)
