"""The command line is a package whose imports go one way: ``app`` → the command
modules → ``common``. Nothing imports ``app`` back except the package's ``main``.

And a command starts with what it needs only: ``status`` loads neither the provider SDKs
nor faststream, and runs from an app of that one command (same help, same errors)."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from tests.support import ROOT

PACKAGE = "services.cli"
CLI_DIR = ROOT / "services" / "cli"


def _module_name(path: Path) -> str:
    return PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"


def _package_imports(path: Path) -> set[str]:
    """The modules of the package that ``path`` imports, anywhere in it (a function's
    lazy import too). ``from services.cli import x`` is ``services.cli.x`` when ``x`` is
    a submodule, else the package itself (its ``__init__``)."""
    package = PACKAGE.split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: every module here is directly in the package
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base != PACKAGE:
                found.add(base)
                continue
            for alias in node.names:
                is_submodule = (CLI_DIR / f"{alias.name}.py").exists()
                found.add(f"{PACKAGE}.{alias.name}" if is_submodule else PACKAGE)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _graph() -> dict[str, set[str]]:
    modules = sorted(p for p in CLI_DIR.glob("*.py") if p.stem != "__main__")
    return {_module_name(p): _package_imports(p) - {_module_name(p)} for p in modules}


def test_the_package_has_the_modules_the_walk_expects() -> None:
    """A sanity check of the walk itself: it sees the app importing the command modules."""
    graph = _graph()
    assert {"services.cli.app", "services.cli.common", "services.cli.jobs"} <= set(graph)
    assert {"services.cli.jobs", "services.cli.queues", "services.cli.common"} <= graph[
        "services.cli.app"
    ]
    assert graph[PACKAGE] == {"services.cli.app"}  # main's lazy import


def test_only_the_package_main_imports_the_app() -> None:
    """No command module (nor common) imports the module that assembles the app, or the
    package itself (whose main imports the app)."""
    for module, imports in _graph().items():
        if module == PACKAGE:
            continue
        assert not imports & {"services.cli.app", PACKAGE}, f"{module} imports the app back"


def test_common_imports_no_other_module_of_the_package() -> None:
    assert _graph()["services.cli.common"] == set()


def test_the_imports_have_no_cycle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join([*path, module])
        if module in done:
            return
        for dep in sorted(graph.get(module, set())):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def test_each_module_imports_first_in_a_clean_interpreter() -> None:
    """Each module imported before any other of the package, then the app built: with a
    cycle, whichever module is first would meet a partially initialised one."""
    names = [_module_name(p) for p in sorted(CLI_DIR.glob("*.py")) if p.stem != "__main__"]
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m == 'services.cli'"
        " or m.startswith('services.cli.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "    if name == 'services.cli.common':\n"
        "        assert 'services.cli.app' not in sys.modules, 'common built the app'\n"
        "from services.cli.app import app\n"
        "import typer.main\n"
        "assert 'submit' in typer.main.get_command(app).commands\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


# What only some commands need: the workers' and the providers' libraries.
HEAVY = ("anthropic", "openai", "faststream", "hypothesis", "services.runner", "services.worker")


def _loaded_after(argv: list[str], env: dict[str, str] | None = None) -> set[str]:
    """The top modules (and ours) in ``sys.modules`` after ``main(argv)`` ran in a fresh
    interpreter, whatever its exit code."""
    script = (
        "import json, sys\n"
        "from services.cli import main\n"
        "main(json.loads(sys.argv[1]))\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    modules: list[str] = json.loads(proc.stderr.strip().splitlines()[-1])
    return set(modules)


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


def test_status_imports_neither_the_sdks_nor_faststream() -> None:
    """`ridethrough status` (here against no server, so it fails fast on connecting) loads
    no provider SDK, no faststream, no worker: a command imports what it needs."""
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1"}
    loaded = _loaded_after(["status", "--json"], env)
    assert "services.ops.status" in loaded  # it did get as far as the command
    assert _heavy(loaded) == set()


def test_status_help_imports_neither_the_sdks_nor_faststream() -> None:
    """Building the whole app (every command registered) loads none of them either."""
    loaded = _loaded_after(["status", "--help"])
    assert "services.cli.app" in loaded
    assert _heavy(loaded) == set()


def test_each_command_alone_reads_as_in_the_whole_app(capsys: pytest.CaptureFixture[str]) -> None:
    """main runs a plain command from an app of that command alone: its help is the same
    as the whole app's, and the whole app still runs groups and unknown names."""
    from services.cli.app import _app_for, app

    def help_of(runner: typer.Typer, name: str) -> str:
        with contextlib.suppress(SystemExit):
            runner(args=[name, "--help"], standalone_mode=False, prog_name="ridethrough")
        return capsys.readouterr().out

    names = [c.name for c in app.registered_commands if c.name]
    assert "status" in names
    for name in names:
        alone = _app_for([name, "--json"])
        assert alone is not app
        assert help_of(alone, name) == help_of(app, name), name
    assert _app_for(["dead", "list"]) is app
    assert _app_for(["statu"]) is app
    assert _app_for([]) is app


def test_status_defers_aiohttp_until_its_first_use() -> None:
    """nats-py imports aiohttp for its websocket transport; a brief command starts with a
    stand-in, so aiohttp itself is never loaded over ``nats://`` (it cost ~120 ms)."""
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1"}
    loaded = _loaded_after(["status", "--json"], env)
    assert "nats.aio.transport" in loaded  # nats-py was imported, with the stand-in
    assert "aiohttp.client" not in loaded


def test_the_stand_in_is_aiohttp_at_first_use() -> None:
    """After ``defer_aiohttp``, an ``import aiohttp`` and a name read from it give the real
    module's objects, and a submodule imports; nothing was loaded before that first use."""
    script = (
        "import sys\n"
        "from services.cli import defer_aiohttp\n"
        "defer_aiohttp()\n"
        "import nats, aiohttp\n"
        "assert 'aiohttp.client' not in sys.modules\n"
        "session_type = aiohttp.ClientSession\n"
        "from aiohttp import web\n"
        "real = sys.modules['aiohttp']\n"
        "assert real is not aiohttp and session_type is real.ClientSession\n"
        "assert aiohttp.WSMsgType.BINARY is real.WSMsgType.BINARY\n"
        "assert web.Application is sys.modules['aiohttp.web'].Application\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
