"""The job locator (``ai_locator``): written by the settle path, read by ``jobs show`` and
``dead show``; a hint that is only believed once the message it names is read."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import subjects as s
from schemas.parking import DeadLetter, ParkRecord, decode_location
from schemas.results import ErrorInfo
from services.config import Settings
from services.jetstream.topology import ensure_topology
from services.lifecycle import locator
from services.lifecycle.settle import Settler
from services.ops import moves
from services.ops.inspect import find_dead, locate_job
from services.producer import Producer, make_job

pytestmark = pytest.mark.integration


async def _entry(js: Any, job_id: str, tenant: str | None = None) -> tuple[str, int]:
    raw = await js.get_last_msg(f"KV_{s.LOCATOR_BUCKET}", s.locator_subject(job_id, tenant))
    where = decode_location(raw.data)
    return where.stream, where.seq


async def _count(js: Any, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def test_a_job_is_found_wherever_it_went(settings: Settings, js: Any) -> None:
    """Submitted (waiting), drained (parked), replayed (waiting again), parked again,
    dead-lettered: each lookup says where the job is now, however stale the index."""
    async with await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many(
            [make_job("anthropic", "m", prompt=f"p {i}", max_tokens=4) for i in range(50)]
        )
    ids = [o.job_id for o in outcomes]
    assert (await locate_job(js, ids[7]))["where"] == "waiting"
    assert (await moves.drain(js, "anthropic")).moved == 50
    first = await _entry(js, ids[7])
    assert first[0] == s.PARKED_STREAM
    shown = await locate_job(js, ids[7])
    assert shown["where"] == "parked" and shown["parked"]["reason"] == "drained"

    assert (await moves.replay(js, settings, "anthropic")).moved == 50
    assert await _entry(js, ids[7]) == first  # left behind: a hint, not the truth
    assert (await locate_job(js, ids[7]))["where"] == "waiting"

    assert (await moves.drain(js, "anthropic")).moved == 50
    again = await _entry(js, ids[7])
    assert again[0] == s.PARKED_STREAM and again[1] > first[1]
    assert (await locate_job(js, ids[7]))["where"] == "parked"

    # Dead-lettered by the settle path (as the replayer does with a job it cannot send).
    settler = Settler(js)
    held = await js.get_msg(s.PARKED_STREAM, again[1])
    job = (await locate_job(js, ids[7]))["parked"]
    assert job is not None
    letter = DeadLetter(
        reason="invalid",
        error=ErrorInfo(type="invalid", message="no"),
        job_id=ids[7],
        job={"id": ids[7], "provider": "anthropic"},
        subject=held.subject,
    )
    await settler.dead_letter(
        letter, provider="anthropic", original=held.data, stream=s.PARKED_STREAM, seq=again[1]
    )
    await js.delete_msg(s.PARKED_STREAM, again[1])
    shown = await locate_job(js, ids[7])
    assert shown["where"] == "dead" and shown["dead"]["reason"] == "invalid"
    found = await find_dead(js, ids[7])
    assert found is not None and found.letter.job_id == ids[7]
    assert await find_dead(js, ids[8]) is None  # parked, not dead
    assert (await locate_job(js, ids[8]))["where"] == "parked"


async def test_a_repeated_park_points_at_the_first_copy(settings: Settings, js: Any) -> None:
    """A worker that crashed after parking and before writing the location parks again on
    redelivery: the dedup window drops the copy, its PubAck names the first one's
    sequence, and that is what the index gets."""
    job = make_job("anthropic", "m", prompt="x", max_tokens=4)
    settler = Settler(js)
    record = ParkRecord(reason="provider_open", attempts=1)
    assert await settler.park(job, record, stream=s.JOBS_STREAM, seq=41)
    stored = await _entry(js, job.id)
    await js.purge_stream(f"KV_{s.LOCATOR_BUCKET}")  # as if the crash came before the entry
    assert await settler.park(job, record, stream=s.JOBS_STREAM, seq=41)
    assert await _count(js, s.PARKED_STREAM) == 1
    assert await _entry(js, job.id) == stored
    assert (await locate_job(js, job.id))["where"] == "parked"


async def test_tenants_jobs_of_one_id_are_told_apart(settings: Settings, js: Any) -> None:
    """Two tenants' jobs with one id are two entries; a tenant's lookup sees its own job
    only, an operator's (no tenant) names the other tenants."""
    settler = Settler(js)
    record = ParkRecord(reason="provider_open", attempts=1)
    for n, tenant in enumerate(("acme", "globex")):
        job = make_job("anthropic", "m", prompt=tenant, id="same-id", tenant=tenant)
        assert await settler.park(job, record, stream=s.JOBS_STREAM, seq=100 + n)
    acme = await locate_job(js, "same-id", "acme")
    globex = await locate_job(js, "same-id", "globex")
    assert acme["where"] == globex["where"] == "parked"
    assert "tenant" not in acme and "also_tenants" not in acme
    assert (await locate_job(js, "same-id", "initech"))["where"] == "unknown"
    operator = await locate_job(js, "same-id")
    assert operator["where"] == "parked"
    assert operator["tenant"] == "acme" and operator["also_tenants"] == ["globex"]
    # A forged entry pointing at the other tenant's copy is not believed.
    globex_seq = (await _entry(js, "same-id", "globex"))[1]
    await locator.record(js, "same-id", "initech", s.PARKED_STREAM, globex_seq)
    assert (await locate_job(js, "same-id", "initech"))["where"] == "unknown"


async def test_topology_indexes_what_was_parked_before_the_index(
    settings: Settings, js: Any
) -> None:
    """An upgrade: jobs parked and dead-lettered before the bucket existed are indexed when
    ``ridethrough topology`` creates it."""
    async with await Producer.connect(settings) as producer:
        outcomes = await producer.submit_many(
            [make_job("anthropic", "m", prompt=f"p {i}", max_tokens=4) for i in range(20)]
        )
    ids = [o.job_id for o in outcomes]
    assert (await moves.drain(js, "anthropic")).moved == 20
    await js.delete_key_value(s.LOCATOR_BUCKET)
    assert (await locate_job(js, ids[3]))["where"] == "unknown"
    report = await ensure_topology(js, settings)
    assert s.LOCATOR_BUCKET in report.created
    assert f"{s.LOCATOR_BUCKET}: 20 jobs indexed" in report.updated
    assert (await locate_job(js, ids[3]))["where"] == "parked"
    again = await ensure_topology(js, settings)  # no second backfill
    assert not any(u.startswith(s.LOCATOR_BUCKET) for u in again.updated)


async def test_without_the_bucket_a_park_still_holds_the_job(settings: Settings, js: Any) -> None:
    """Workers of this release started before the topology made the index: the job is
    parked all the same (the index is a lookup aid, never a condition of holding a job)."""
    await js.delete_key_value(s.LOCATOR_BUCKET)
    job = make_job("anthropic", "m", prompt="x", max_tokens=4)
    settler = Settler(js)
    assert await settler.park(job, ParkRecord(reason="provider_open"), stream=s.JOBS_STREAM, seq=9)
    assert await _count(js, s.PARKED_STREAM) == 1
