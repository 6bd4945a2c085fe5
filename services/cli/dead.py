"""``ridethrough dead list``, ``show`` and ``purge``: the dead letters."""

from __future__ import annotations

import sys
from typing import Annotated

import msgspec
import typer

from schemas import subjects as s
from services.cli.common import (
    EXIT_JOB_FAILED,
    JsonFlag,
    NatsUrl,
    check,
    console,
    fail,
    print_json,
    settings_for,
    with_js,
)


def list_letters(
    provider: Annotated[str | None, typer.Option(help="Only this provider.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Dead letters, oldest first: job, reason, last error."""
    from rich.table import Table

    from services.ops.inspect import dead_letters

    settings = settings_for(nats_url)
    letters = with_js(settings, lambda js: dead_letters(js, provider, reason, limit))
    if as_json:
        print_json([h.to_builtins() for h in letters])
        return
    t = Table(title=f"dead letters ({len(letters)} shown)")
    for col in ("seq", "job", "reason", "attempts", "dead at", "last error"):
        t.add_column(col)
    for h in letters:
        L = h.letter
        t.add_row(str(h.seq), L.job_id or "(unreadable)", L.reason, str(L.attempts),
                  L.dead_at.isoformat()[:19], L.error.message[:80])  # fmt: skip
    console().print(t)


def show(
    key: Annotated[str, typer.Argument(help="A job id, or the dead letter's sequence.")],
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """One dead letter in full."""
    from rich.console import Console

    from services.ops.inspect import find_dead

    settings = settings_for(nats_url)
    held = with_js(settings, lambda js: find_dead(js, key))
    if held is None:
        fail(f"no dead letter for {key}", EXIT_JOB_FAILED)
    if as_json:
        print_json(held.to_builtins())
    else:
        Console().print_json(msgspec.json.encode(held.to_builtins()).decode())


def purge(
    provider: Annotated[str | None, typer.Option(help="Only this provider.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Delete dead letters for good (asks first unless --yes)."""
    from services.ops.control import check_provider
    from services.ops.inspect import count_dead, purge_dead

    settings = settings_for(nats_url)
    check(check_provider, settings, provider)
    n = with_js(settings, lambda js: count_dead(js, provider, reason))
    if not yes and not sys.stdin.isatty():
        fail(f"refusing to delete {n} dead letter(s) without confirmation: pass --yes")
    question = f"delete {n} dead letter(s) on {s.dead_filter(provider, reason)} for good?"
    if not yes and not typer.confirm(question, default=False):
        fail("purge cancelled; nothing deleted", EXIT_JOB_FAILED)
    purged = with_js(settings, lambda js: purge_dead(js, provider, reason))
    if as_json:
        print_json({"purged": purged})
    else:
        typer.echo(f"purged {purged} dead letter(s)")
