"""Operator commands: status, watch, pause, resume, drain, replay, dead, jobs, outages,
export and import. Each takes ``--json``; errors are one line with exit code 2."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from nats.js import JetStreamContext
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from schemas import subjects as s
from services.cli import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    JsonFlag,
    NatsUrl,
    Tenant,
    app,
    check,
    fail,
    print_json,
    run,
    settings_for,
)
from services.config import Settings
from services.connection import jetstream
from services.ops import control
from services.ops.backup import export_results, import_results
from services.ops.inspect import (
    count_dead,
    dead_letters,
    find_dead,
    locate_job,
    outage_timeline,
    purge_dead,
)
from services.ops.moves import MoveReport, drain, replay
from services.ops.status import collect_status

T = TypeVar("T")

dead_app = typer.Typer(help="Dead letters: list, show, purge.", no_args_is_help=True)
jobs_app = typer.Typer(help="Look up one job.", no_args_is_help=True)
export_app = typer.Typer(help="Back up AI-generated output.", no_args_is_help=True)
app.add_typer(dead_app, name="dead")
app.add_typer(jobs_app, name="jobs")
app.add_typer(export_app, name="export")

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


def _console() -> Console:
    """A console as wide as the terminal, and wide enough for the tables when piped."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _check_provider(settings: Settings, provider: str | None) -> None:
    check(control.check_provider, settings, provider)


def _with_js(settings: Settings, work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    async def go() -> T:
        async with jetstream(settings, name="ridethrough-ops") as js:
            return await work(js)

    return run(go())


# -- status ------------------------------------------------------------------------------


def _status_table(status: dict[str, Any]) -> Table:
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
            (p["reason"] or "")[:60],
        )
    t.caption = f"{len(status['workers'])} worker(s) online: " + ", ".join(
        w["id"] for w in status["workers"]
    )
    return t


@app.command()
def status(as_json: JsonFlag = False, nats_url: NatsUrl = None) -> None:
    """Per provider: breaker state and since when, failure rate, jobs waiting, in flight,
    parked and dead, replay progress; and the workers online."""
    settings = settings_for(nats_url)
    snapshot = _with_js(settings, lambda js: collect_status(js, settings))
    if as_json:
        print_json(snapshot)
    else:
        _console().print(_status_table(snapshot))


@app.command()
def watch(
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    nats_url: NatsUrl = None,
) -> None:
    """The status as a live dashboard (Ctrl-C to leave)."""
    settings = settings_for(nats_url)

    async def go(js: JetStreamContext) -> None:
        first = _status_table(await collect_status(js, settings))
        with Live(first, console=_console(), refresh_per_second=4) as live:
            while True:
                await asyncio.sleep(interval)
                live.update(_status_table(await collect_status(js, settings)))

    try:
        _with_js(settings, go)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


# -- pause / resume ------------------------------------------------------------------------


@app.command()
def pause(
    provider: Annotated[str, typer.Argument(help="The provider to stop calling.")],
    reason: Annotated[str, typer.Option(help="Why (shown by status).")] = "paused by operator",
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Stop calling PROVIDER: its jobs park, and no probe can end the pause."""
    settings = settings_for(nats_url)
    _check_provider(settings, provider)

    _with_js(settings, lambda js: control.pause(js, provider, reason))
    if as_json:
        print_json({"provider": provider, "paused": True, "reason": reason})
    else:
        typer.echo(f"{provider} paused: its jobs park until `ridethrough resume {provider}`")


@app.command()
def resume(
    provider: Annotated[str, typer.Argument(help="The provider to hand back to the breaker.")],
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """End a pause: the breaker decides again, and parked jobs replay at a slow start."""
    settings = settings_for(nats_url)
    _check_provider(settings, provider)

    was = _with_js(settings, lambda js: control.resume(js, provider))
    if as_json:
        print_json({"provider": provider, "paused": False, "was_paused": was})
    else:
        typer.echo(f"{provider} resumed" if was else f"{provider} was not paused")


# -- drain / replay ------------------------------------------------------------------------


def _progress_runner(
    label: str, quiet: bool, work: Callable[[Callable[[int, int], None]], Awaitable[MoveReport]]
) -> Awaitable[MoveReport]:
    async def go() -> MoveReport:
        if quiet:
            return await work(lambda done, total: None)
        with Progress(transient=True) as bar:
            task = bar.add_task(label, total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=max(total, done))

            return await work(advance)

    return go()


def _print_move(report: MoveReport, as_json: bool, verb: str, dry_run: bool) -> None:
    if as_json:
        print_json(
            {
                **report.counts(),
                "dry_run": dry_run,
                "job_ids": report.job_ids,
                "notes": report.notes,
            }
        )
        return
    if dry_run:
        typer.echo(f"dry run: would {verb} {report.matched} job(s) ({report.examined} examined)")
    else:
        typer.echo(
            f"{verb}: {report.moved} job(s) moved, {report.skipped} skipped, "
            f"{report.examined} examined"
        )
    for note in report.notes[:20]:
        typer.echo(f"  {note}")


@app.command("drain")
def drain_cmd(
    provider: Annotated[str, typer.Argument(help="Whose waiting jobs to park.")],
    priority: Annotated[
        str | None, typer.Option(help="Only this priority (high, normal, low).")
    ] = None,
    older_than: Annotated[
        str | None, typer.Option(help="Only jobs older than this (30m, 2h).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many jobs.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would move; move nothing.")] = False,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Move waiting jobs of PROVIDER from AI_JOBS to AI_PARKED (pause it first).

    Safe to interrupt: each job is removed from AI_JOBS only after its parked copy
    is stored; running it again continues where it stopped.
    """
    settings = settings_for(nats_url)
    _check_provider(settings, provider)
    if priority is not None and priority not in s.PRIORITIES:
        fail(f"invalid priority {priority!r}: use high, normal or low")
    age = parse_duration(older_than) if older_than else None

    async def go(js: JetStreamContext) -> MoveReport:
        if not dry_run:
            await control.check_holding(js, settings, provider)
            if not as_json:
                typer.echo(
                    f"parking waiting jobs of {provider} (priority {priority or 'any'}, "
                    f"older than {older_than or 'any age'}, limit {limit or 'none'})"
                )
        return await _progress_runner(
            "draining", as_json,
            lambda cb: drain(js, provider, priority=priority, older_than=age, limit=limit,
                             dry_run=dry_run, progress=cb),
        )  # fmt: skip

    _print_move(_with_js(settings, go), as_json, "drain", dry_run)


@app.command("replay")
def replay_cmd(
    provider: Annotated[str | None, typer.Argument(help="Only this provider's jobs.")] = None,
    source: Annotated[str, typer.Option("--from", help="parked or dead.")] = "parked",
    reason: Annotated[
        str | None, typer.Option(help="Only jobs parked or dead for this reason.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only jobs held since (RFC 3339 or 2h).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many jobs.")] = None,
    rate: Annotated[float | None, typer.Option(min=0.01, help="At most this many jobs/s.")] = None,
    to_provider: Annotated[
        str | None, typer.Option(help="Send them to this provider instead.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="With this model instead.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would move; move nothing.")] = False,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Put parked jobs or dead letters back in the queue (after a key rotation, say).

    Safe to interrupt: each job leaves its stream only after its new copy is stored;
    running it again continues and duplicates nothing.
    """
    settings = settings_for(nats_url)
    _check_provider(settings, provider)
    _check_provider(settings, to_provider)
    if source not in ("parked", "dead"):
        fail(f"--from must be parked or dead, not {source!r}")
    when = parse_time(since) if since else None

    async def go(js: JetStreamContext) -> MoveReport:
        if not dry_run and not as_json:
            typer.echo(
                f"replaying {source} jobs of {provider or 'every provider'}"
                + (f" to {to_provider}" if to_provider else "")
                + (f" at most {rate:g}/s" if rate else "")
            )
        return await _progress_runner(
            "replaying", as_json,
            lambda cb: replay(js, settings, provider, source=source, reason=reason, since=when,
                              limit=limit, rate=rate, to_provider=to_provider, model=model,
                              dry_run=dry_run, progress=cb),
        )  # fmt: skip

    _print_move(_with_js(settings, go), as_json, "replay", dry_run)


# -- dead letters ---------------------------------------------------------------------------


@dead_app.command("list")
def dead_list(
    provider: Annotated[str | None, typer.Option(help="Only this provider.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Dead letters, oldest first: job, reason, last error."""
    settings = settings_for(nats_url)
    letters = _with_js(settings, lambda js: dead_letters(js, provider, reason, limit))
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
    _console().print(t)


@dead_app.command("show")
def dead_show(
    key: Annotated[str, typer.Argument(help="A job id, or the dead letter's sequence.")],
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """One dead letter in full."""
    settings = settings_for(nats_url)
    held = _with_js(settings, lambda js: find_dead(js, key))
    if held is None:
        fail(f"no dead letter for {key}", EXIT_JOB_FAILED)
    if as_json:
        print_json(held.to_builtins())
    else:
        Console().print_json(msgspec.json.encode(held.to_builtins()).decode())


@dead_app.command("purge")
def dead_purge(
    provider: Annotated[str | None, typer.Option(help="Only this provider.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Delete dead letters for good (asks first unless --yes)."""
    settings = settings_for(nats_url)
    _check_provider(settings, provider)
    subject = s.dead_filter(provider, reason)

    n = _with_js(settings, lambda js: count_dead(js, provider, reason))
    if not yes and not sys.stdin.isatty():
        fail(f"refusing to delete {n} dead letter(s) without confirmation: pass --yes")
    question = f"delete {n} dead letter(s) on {subject} for good?"
    if not yes and not typer.confirm(question, default=False):
        fail("purge cancelled; nothing deleted", EXIT_JOB_FAILED)

    purged = _with_js(settings, lambda js: purge_dead(js, provider, reason))
    if as_json:
        print_json({"purged": purged})
    else:
        typer.echo(f"purged {purged} dead letter(s)")


# -- jobs, outages ---------------------------------------------------------------------------


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    tenant: Tenant = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Where a job is now (waiting, in flight, parked, dead, done), its attempts and history."""
    settings = settings_for(nats_url, tenant)
    found = _with_js(settings, lambda js: locate_job(js, job_id, settings.tenant))
    if as_json:
        print_json(found)
    else:
        typer.echo(
            f"job {job_id}: {found['where']}"
                   + (f" ({found['status']})" if "status" in found else "")
                   + (f", attempts {found['attempts']}" if found.get("attempts") else "")
        )  # fmt: skip
        for e in found["history"]:
            typer.echo(f"  {e['at'][:19]}  {e['event']}" + (f"  by {e['by']}" if "by" in e else ""))
    if found["where"] == "unknown":
        raise typer.Exit(EXIT_JOB_FAILED)


@app.command()
def outages(
    last: Annotated[int | None, typer.Option(min=1, help="Only the last N outages.")] = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """The outage timeline: provider, start, end, duration, jobs parked and replayed."""
    settings = settings_for(nats_url)
    rows = _with_js(settings, lambda js: outage_timeline(js, last))
    if as_json:
        print_json(rows)
        return
    t = Table(title="outages")
    for col in (
        "provider",
        "start",
        "end",
        "duration",
        "re-opened",
        "parked",
        "replayed",
        "calls saved ≥",
    ):
        t.add_column(col)
    for o in rows:
        t.add_row(o["provider"], (o["start"] or "-")[:19], (o["end"] or "ongoing")[:19],
                  "-" if o["duration_s"] is None else f"{o['duration_s']:.1f}s",
                  str(o["reopened"]), str(o["parked"]), str(o["replayed"]),
                  str(o["calls_saved"]))  # fmt: skip
    _console().print(t)


# -- export / import -------------------------------------------------------------------------


@export_app.command("results")
def export_results_cmd(
    out: Annotated[Path, typer.Option("--out", help="The JSON Lines file to write.")],
    since: Annotated[
        str | None, typer.Option(help="Only results finished since (RFC 3339 or 2h).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Only results finished before.")] = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Back up AI-generated results to a JSON Lines file."""
    settings = settings_for(nats_url)
    lo = parse_time(since) if since else None
    hi = parse_time(until) if until else None

    async def go(js: JetStreamContext) -> int:
        if as_json:
            return await export_results(js, out, since=lo, until=hi)
        with Progress(transient=True) as bar:
            task = bar.add_task("exporting", total=None)
            return await export_results(
                js, out, since=lo, until=hi,
                progress=lambda d, t: bar.update(task, completed=d, total=max(t, d)),
            )  # fmt: skip

    n = _with_js(settings, go)
    if as_json:
        print_json({"results": n, "out": str(out)})
    else:
        typer.echo(f"wrote {n} result(s) to {out}")


@app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="A JSON Lines file written by export results.")],
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Restore results into AI_RESULTS; jobs that already have a result keep theirs."""
    settings = settings_for(nats_url)
    if not path.is_file():
        fail(f"no such file: {path}")
    counts = _with_js(settings, lambda js: import_results(js, path))
    if as_json:
        print_json(counts)
    else:
        typer.echo(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
