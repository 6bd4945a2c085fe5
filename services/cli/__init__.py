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

import sys

#: Commands that talk to NATS briefly from one thread: they start with aiohttp deferred.
_BRIEF = frozenset(
    {"status", "watch", "outages", "submit", "result", "jobs", "dead", "pause", "resume"}
    | {"drain", "replay", "export", "import", "topology"}
)


def main(argv: list[str] | None = None) -> int:
    """The console script ``ridethrough`` (``services.cli:main``): run the app."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in _BRIEF:
        defer_aiohttp()
    from services.cli.app import main as run_app

    return run_app(args)


def defer_aiohttp() -> None:
    """Put a stand-in for aiohttp in ``sys.modules`` that imports it at its first use.

    nats-py imports aiohttp when it is imported, for its websocket transport; that was
    ~120 ms of the ~0.45 s of ``ridethrough status``, which never opens a websocket. A
    ``ws://`` URL still works: the transport's first ``aiohttp.<name>`` imports it then.
    (``importlib.util.LazyLoader`` does not serve: an ``import aiohttp`` statement reads
    the module's ``__spec__``, which loads it.) Only for the brief commands, which run one
    thread; the services import aiohttp themselves anyway.
    """
    import importlib.util
    import types

    if "aiohttp" in sys.modules:
        return
    spec = importlib.util.find_spec("aiohttp")
    if spec is None:
        return

    class _Deferred(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            if sys.modules.get("aiohttp") is self:
                del sys.modules["aiohttp"]
            real = importlib.import_module("aiohttp")
            return getattr(real, name)

    stand_in = _Deferred("aiohttp")
    stand_in.__spec__ = spec
    sys.modules["aiohttp"] = stand_in
