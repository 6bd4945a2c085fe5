"""Large jobs' references (``services/bodies.py``): names nobody can guess that the schema
accepts for every job id and tenant, and fail-over copies that say which API a body is in."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from schemas.jobs import BodyRef, Job
from services import bodies
from services.producer import make_job

TOKENS = st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True)
KINDS = {"a": "anthropic", "b": "anthropic", "o": "openai"}


@given(job_id=TOKENS, tenant=st.none() | TOKENS)
def test_every_body_name_is_its_tenants_and_valid(job_id: str, tenant: str | None) -> None:
    """A body's name starts with its job's scope and id, ends in 32 random hex digits, and
    the schema takes it; two names for one job differ."""
    name = bodies.body_name(job_id, tenant)
    assert name.startswith(f"{tenant or '_'}.{job_id}.")
    ref = msgspec.convert({"name": name, "size": 1, "sha256": "0" * 64}, BodyRef)
    assert ref.name == name and len(name.rsplit(".", 1)[1]) == 32
    assert bodies.body_name(job_id, tenant) != name
    job = msgspec.structs.replace(
        make_job("a", "m", prompt="x", id=job_id, tenant=tenant), request={}, request_ref=ref
    )
    assert bodies._belongs(job, ref)


@given(
    src=st.sampled_from(sorted(KINDS)),
    dst=st.sampled_from(sorted(KINDS)),
    written=st.none() | st.sampled_from(["anthropic", "openai"]),
)
def test_a_fail_over_copy_names_the_api_its_body_is_in(
    src: str, dst: str, written: str | None
) -> None:
    """The copy keeps the body (same name, size, digest) and an empty request; its ``kind``
    is the body's API when the fallback speaks another, else nothing."""
    ref = BodyRef(name=f"_.j.{'a1' * 16}", size=9, sha256="b" * 64, kind=written)
    job = msgspec.structs.replace(make_job(src, "m", prompt="x"), request={}, request_ref=ref)
    moved = msgspec.structs.replace(job, provider=dst, request={"messages": ["mapped"]})
    copy = bodies.by_reference(moved, job, KINDS)
    assert isinstance(copy, Job) and copy.request == {} and copy.request_ref is not None
    body_api = written or KINDS[src]
    assert copy.request_ref.kind == (None if body_api == KINDS[dst] else body_api)
    assert (copy.request_ref.name, copy.request_ref.sha256) == (ref.name, ref.sha256)


def test_chunks_fit_the_server() -> None:
    """A chunk is at most 1 MiB and half the server's max_payload."""
    assert bodies.chunk_size(8 * 1024 * 1024) == 1024 * 1024
    assert bodies.chunk_size(1024 * 1024) == 512 * 1024
    assert bodies.chunk_size(0) == 128 * 1024
