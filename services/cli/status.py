"""``ridethrough status``, ``watch`` and ``outages``: what is happening, and what happened."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import typer

from services.cli.common import (
    EXIT_OK,
    JsonFlag,
    NatsUrl,
    check,
    console,
    print_json,
    settings_for,
    with_js,
)

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from rich.table import Table


def _status_table(status: dict[str, Any]) -> Table:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="ridethrough status")
    for col in (
        "provider",
        "state",
        "since",
        "fail rate",
        "waiting",
        "in flight",
        "parked",
        "dead",
        "replay",
        "reason",
        "status page",
    ):
        t.add_column(col)
    for name, p in status["providers"].items():
        rate = (
            "-"
            if p["failure_rate"] is None
            else f"{p['failure_rate']:.0%} of {p['calls_in_window']}"
        )
        replay = "-"
        if p["replay"]:
            r = p["replay"]
            replay = (
                f"{r.get('rate', 0)}/s, {r.get('replayed', 0)} done, {r.get('backlog', 0)} left"
            )
        t.add_row(
            name,
            p["state"],
            (p["since"] or "-")[:19],
            rate,
            str(p["waiting"]),
            str(p["in_flight"]),
            str(p["parked"]),
            str(p["dead"]),
            replay,
            escape((p["reason"] or "")[:60]),
            escape(_page_cell(p.get("evidence"))),
        )
        for model, m in p.get("models", {}).items():
            rate = (
                "-"
                if m["failure_rate"] is None
                else f"{m['failure_rate']:.0%} of {m['calls_in_window']}"
            )
            t.add_row(
                f"  └ {model}",
                m["state"],
                (m["since"] or "-")[:19],
                rate,
                "",
                "",
                str(m["parked"]),
                "",
                "",
                (m["reason"] or "")[:60],
            )
    t.caption = f"{len(status['workers'])} worker(s) online: " + ", ".join(
        w["id"] for w in status["workers"]
    )
    return t


def _page_cell(evidence: dict[str, Any] | None) -> str:
    """What the status page says, in a table cell (evidence, never proof)."""
    if not evidence:
        return "-"
    text = str(evidence["summary"])
    if evidence["stale"]:
        text += f" (page unreadable, {evidence['failed_reads']} reads)"
    return text[:80]


def status(as_json: JsonFlag = False, nats_url: NatsUrl = None) -> None:
    """Per provider, and per model under it: breaker state and since when, failure rate,
    jobs waiting, in flight, parked and dead, replay progress, what its status page says;
    and the workers online."""
    from services.ops.status import collect_status

    settings = settings_for(nats_url)
    snapshot = with_js(settings, lambda js: collect_status(js, settings))
    if as_json:
        print_json(snapshot)
    else:
        console().print(_status_table(snapshot))


def watch(
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    nats_url: NatsUrl = None,
) -> None:
    """The status as a live dashboard (Ctrl-C to leave)."""
    from rich.live import Live

    from services.ops.status import collect_status

    settings = settings_for(nats_url)

    async def go(js: JetStreamContext) -> None:
        first = _status_table(await collect_status(js, settings))
        with Live(first, console=console(), refresh_per_second=4) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(_status_table(await collect_status(js, settings)))

    try:
        with_js(settings, go)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


def outages(
    provider: Annotated[str | None, typer.Argument(help="Only this provider's.")] = None,
    last: Annotated[int | None, typer.Option(min=1, help="Only the last N outages.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Only this model's (and its provider's).")
    ] = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """The outage timeline, per scope (a provider, or one model): start, end, duration,
    jobs parked and replayed, and what the provider's status page said meanwhile."""
    from rich.markup import escape
    from rich.table import Table

    from services.ops.control import check_provider
    from services.ops.inspect import outage_timeline

    settings = settings_for(nats_url)
    check(check_provider, settings, provider)
    rows = with_js(settings, lambda js: outage_timeline(js, last, provider=provider, model=model))
    if as_json:
        print_json(rows)
        return
    t = Table(title="outages")
    for col in (
        "scope",
        "start",
        "end",
        "duration",
        "re-opened",
        "parked",
        "replayed",
        "calls saved ≥",
        "status page said",
    ):
        t.add_column(col)
    for o in rows:
        scope = o["provider"] + (f"/{o['model']}" if o["model"] else "")
        said = [e["summary"] for e in o.get("status_page", [])]
        page = "; ".join(dict.fromkeys(x for x in said if x != "operational")) or (
            "operational" if said else "-"
        )
        t.add_row(scope, (o["start"] or "-")[:19], (o["end"] or "ongoing")[:19],
                  "-" if o["duration_s"] is None else f"{o['duration_s']:.1f}s",
                  str(o["reopened"]), str(o["parked"]), str(o["replayed"]),
                  str(o["calls_saved"]), escape(page[:80]))  # fmt: skip
    console().print(t)
