"""``ridethrough pause``, ``resume``, ``drain`` and ``replay``: an operator's hand on a
provider and its jobs. Each takes ``--json``; errors are one line with exit code 2."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated

import typer

from schemas import subjects as s
from services.cli.common import (
    JsonFlag,
    NatsUrl,
    check,
    fail,
    parse_duration,
    parse_time,
    print_json,
    settings_for,
    with_js,
)

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from services.ops.moves import MoveReport

ModelFilter = Annotated[
    str | None, typer.Option("--model", help="Only this model of the provider.")
]


def pause(
    provider: Annotated[str, typer.Argument(help="The provider to stop calling.")],
    reason: Annotated[str, typer.Option(help="Why (shown by status).")] = "paused by operator",
    model: ModelFilter = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Stop calling PROVIDER (or one --model of it): its jobs park, and no probe can end
    the pause."""
    from services.ops import control

    settings = settings_for(nats_url)
    check(control.check_provider, settings, provider)
    check(control.check_model, model)
    with_js(settings, lambda js: control.pause(js, provider, reason, model))
    if as_json:
        print_json({"provider": provider, "model": model, "paused": True, "reason": reason})
    else:
        flag = f" --model {model}" if model else ""
        typer.echo(
            f"{s.scope_label(provider, model)} paused: its jobs park until "
            f"`ridethrough resume {provider}{flag}`"
        )


def resume(
    provider: Annotated[str, typer.Argument(help="The provider to hand back to the breaker.")],
    model: ModelFilter = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """End a pause: the breaker decides again, and parked jobs replay at a slow start."""
    from services.ops import control

    settings = settings_for(nats_url)
    check(control.check_provider, settings, provider)
    check(control.check_model, model)
    was = with_js(settings, lambda js: control.resume(js, provider, model))
    scope = s.scope_label(provider, model)
    if as_json:
        print_json({"provider": provider, "model": model, "paused": False, "was_paused": was})
    else:
        typer.echo(f"{scope} resumed" if was else f"{scope} was not paused")


def _progress_runner(
    label: str, quiet: bool, work: Callable[[Callable[[int, int], None]], Awaitable[MoveReport]]
) -> Awaitable[MoveReport]:
    from rich.progress import Progress

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


def drain(
    provider: Annotated[str, typer.Argument(help="Whose waiting jobs to park.")],
    priority: Annotated[
        str | None, typer.Option(help="Only this priority (high, normal, low).")
    ] = None,
    older_than: Annotated[
        str | None, typer.Option(help="Only jobs older than this (30m, 2h).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many jobs.")] = None,
    model: ModelFilter = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would move; move nothing.")] = False,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Move waiting jobs of PROVIDER (or of one --model) from AI_JOBS to AI_PARKED (pause
    it first).

    Safe to interrupt: each job is removed from AI_JOBS only after its parked copy
    is stored; running it again continues where it stopped.
    """
    from services.ops import control, moves

    settings = settings_for(nats_url)
    check(control.check_provider, settings, provider)
    if priority is not None and priority not in s.PRIORITIES:
        fail(f"invalid priority {priority!r}: use high, normal or low")
    age = parse_duration(older_than) if older_than else None

    async def go(js: JetStreamContext) -> MoveReport:
        if not dry_run:
            await control.check_holding(js, settings, provider, model)
            if not as_json:
                typer.echo(
                    f"parking waiting jobs of {s.scope_label(provider, model)} "
                    f"(priority {priority or 'any'}, "
                    f"older than {older_than or 'any age'}, limit {limit or 'none'})"
                )
        return await _progress_runner(
            "draining", as_json,
            lambda cb: moves.drain(js, provider, priority=priority, older_than=age, limit=limit,
                                   dry_run=dry_run, progress=cb, model=model,
                                   count_only=not as_json),
        )  # fmt: skip

    _print_move(with_js(settings, go), as_json, "drain", dry_run)


def replay(
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
    to_model: Annotated[str | None, typer.Option(help="With this model instead.")] = None,
    model: ModelFilter = None,
    dry_run: Annotated[bool, typer.Option(help="Count what would move; move nothing.")] = False,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Put parked jobs or dead letters back in the queue (after a key rotation, say).

    Safe to interrupt: each job leaves its stream only after its new copy is stored;
    running it again continues and duplicates nothing.
    """
    from services.ops import control, moves

    settings = settings_for(nats_url)
    check(control.check_provider, settings, provider)
    check(control.check_provider, settings, to_provider)
    if source not in ("parked", "dead"):
        fail(f"--from must be parked or dead, not {source!r}")
    when = parse_time(since) if since else None

    async def go(js: JetStreamContext) -> MoveReport:
        if not dry_run and not as_json:
            typer.echo(
                f"replaying {source} jobs of {provider or 'every provider'}"
                + (f" (model {model})" if model else "")
                + (f" to {to_provider}" if to_provider else "")
                + (f" at most {rate:g}/s" if rate else "")
            )
        return await _progress_runner(
            "replaying", as_json,
            lambda cb: moves.replay(js, settings, provider, source=source, reason=reason,
                                    since=when, limit=limit, rate=rate, to_provider=to_provider,
                                    to_model=to_model, dry_run=dry_run, progress=cb,
                                    model=model, count_only=not as_json),
        )  # fmt: skip

    _print_move(with_js(settings, go), as_json, "replay", dry_run)
