"""``ridethrough export results`` and ``import``: backing up AI-generated output."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from services.cli.common import (
    JsonFlag,
    NatsUrl,
    fail,
    parse_time,
    print_json,
    settings_for,
    with_js,
)

if TYPE_CHECKING:
    from nats.js import JetStreamContext


def export_results(
    out: Annotated[Path, typer.Option("--out", help="The JSON Lines file to write.")],
    since: Annotated[
        str | None, typer.Option(help="Only results finished since (RFC 3339 or 2h).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Only results finished before.")] = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Back up AI-generated results to a JSON Lines file."""
    from rich.progress import Progress

    from services.ops import backup

    settings = settings_for(nats_url)
    lo = parse_time(since) if since else None
    hi = parse_time(until) if until else None

    async def go(js: JetStreamContext) -> int:
        if as_json:
            return await backup.export_results(js, out, since=lo, until=hi)
        with Progress(transient=True) as bar:
            task = bar.add_task("exporting", total=None)
            return await backup.export_results(
                js, out, since=lo, until=hi,
                progress=lambda d, t: bar.update(task, completed=d, total=max(t, d)),
            )  # fmt: skip

    n = with_js(settings, go)
    if as_json:
        print_json({"results": n, "out": str(out)})
    else:
        typer.echo(f"wrote {n} result(s) to {out}")


def import_results(
    path: Annotated[Path, typer.Argument(help="A JSON Lines file written by export results.")],
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Restore results into AI_RESULTS; jobs that already have a result keep theirs."""
    from services.ops import backup

    settings = settings_for(nats_url)
    if not path.is_file():
        fail(f"no such file: {path}")
    counts = with_js(settings, lambda js: backup.import_results(js, path))
    if as_json:
        print_json(counts)
    else:
        typer.echo(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
