"""``ridethrough submit``, ``result`` and ``jobs show``: one job from a shell."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from schemas.results import response_text
from services.cli.common import (
    EXIT_JOB_FAILED,
    EXIT_OK,
    JsonFlag,
    NatsUrl,
    Tenant,
    fail,
    print_json,
    run,
    settings_for,
    with_js,
)

if TYPE_CHECKING:
    from schemas.results import JobResult


def _show(result: JobResult, as_json: bool) -> int:
    if as_json:
        print_json(result)
    elif result.status == "succeeded":
        typer.echo(response_text(result.response))
    else:
        err = result.error
        typer.echo(
            f"job {result.job_id} {result.status}: {err.type} {err.message}"
            if err
            else f"job {result.job_id} {result.status}"
        )
    return EXIT_OK if result.status == "succeeded" else EXIT_JOB_FAILED


def submit(
    provider: Annotated[str, typer.Option(help="Provider name, e.g. anthropic or openai.")],
    model: Annotated[str, typer.Option(help="Model name as the provider knows it.")],
    prompt: Annotated[str, typer.Option(help="The user message.")],
    max_tokens: Annotated[int, typer.Option(min=1)] = 1024,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Same key, same job: re-submits create nothing.")
    ] = None,
    on_outage: Annotated[str, typer.Option(help="park, failover or fail.")] = "park",
    stream: Annotated[
        bool, typer.Option(help="Ask the provider to stream; the result holds the whole message.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait for the result and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait with --wait.", min=0)] = 120.0,
    tenant: Tenant = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Submit one job (a single user message); print its id, or with --wait its result."""
    from services.producer import Producer, make_job, prompt_request

    settings = settings_for(nats_url, tenant)
    request = prompt_request(
        settings, provider, prompt, max_tokens=max_tokens, system=system, stream=stream
    )

    async def go() -> int:
        job = make_job(provider, model, request=request, priority=priority, on_outage=on_outage)
        async with await Producer.connect(settings) as producer:
            job_id = await producer.submit(job, idempotency_key=idempotency_key)
            if not wait:
                if as_json:
                    print_json({"job_id": job_id})
                else:
                    typer.echo(job_id)
                return EXIT_OK
            return _show(await producer.result(job_id, timeout), as_json)

    raise typer.Exit(run(go()))


def result(
    job_id: Annotated[str, typer.Argument(help="The job id submit printed.")],
    wait: Annotated[
        float | None, typer.Option(help="Seconds to wait for the result to arrive.", min=0)
    ] = None,
    tenant: Tenant = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Print a job's result (exit 1 if it failed, or is not there within --wait)."""
    from services.producer import Producer

    settings = settings_for(nats_url, tenant)

    async def go() -> int:
        async with await Producer.connect(settings) as producer:
            if wait is None:
                found = await producer.peek_result(job_id)
                if found is None:
                    fail(f"no result for job {job_id} yet", EXIT_JOB_FAILED)
                return _show(found, as_json)
            return _show(await producer.result(job_id, wait), as_json)

    raise typer.Exit(run(go()))


def show(
    job_id: Annotated[str, typer.Argument(help="The job id.")],
    tenant: Tenant = None,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Where a job is now (waiting, in flight, parked, dead, done), its attempts and history."""
    from services.ops.inspect import locate_job

    settings = settings_for(nats_url, tenant)
    found = with_js(settings, lambda js: locate_job(js, job_id, settings.tenant))
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
