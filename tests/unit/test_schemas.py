"""Wire schemas: validation names the field, JSON Schema files match the Structs."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import subjects as s
from schemas.codec import encode
from schemas.generate import OUT, SCHEMAS, render
from schemas.jobs import Job, decode_job
from schemas.results import JobResult, decode_result, response_text
from services.errors import InvalidJob
from services.producer import job_id_for_key, make_job
from services.producer.client import validate_job


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_files_match_the_structs(name: str) -> None:
    """schemas/json/*.json are what the Structs generate (`python -m schemas.generate`)."""
    assert (OUT / name).read_text() == render(SCHEMAS[name])


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"id": "a.b"}, "$.id"),
        ({"provider": "open ai"}, "$.provider"),
        ({"model": ""}, "$.model"),
        ({"priority": "urgent"}, "$.priority"),
        ({"on_outage": "retry"}, "$.on_outage"),
        ({"deadline": "2026-01-01T00:00:00"}, "$.deadline"),
        ({"request": []}, "$.request"),
        ({"fallbacks": [{"model": "gpt-4o"}]}, "$.fallbacks[0]"),
    ],
)
def test_validation_error_names_the_offending_field(patch: dict[str, object], field: str) -> None:
    """Each kind of bad field is reported with its JSON path."""
    body = {"id": "j1", "provider": "anthropic", "model": "m", "request": {}} | patch
    with pytest.raises(InvalidJob) as info:
        validate_job(body)
    assert field in str(info.value)


def test_job_defaults_and_round_trip() -> None:
    """A minimal job gets its defaults and survives encode/decode unchanged."""
    job = make_job("anthropic", "claude", prompt="hi", max_tokens=5)
    assert job.priority == "normal" and job.on_outage == "park" and job.fallbacks == []
    assert job.created_at.tzinfo is not None
    assert decode_job(encode(job)) == job
    assert job.request == {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@given(st.text(min_size=1, max_size=300))
def test_idempotency_key_always_maps_to_the_same_valid_job_id(key: str) -> None:
    """Any key gives one stable job id that is a valid subject token."""
    first = job_id_for_key(key)
    assert first == job_id_for_key(key)
    validate_job({"id": first, "provider": "p", "model": "m", "request": {}})


def test_result_round_trip_and_text() -> None:
    """Results decode back equal; response_text reads both wire shapes."""
    r = JobResult(
        job_id="j",
        status="succeeded",
        provider="anthropic",
        model="m",
        response={"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        finished_at=datetime(2026, 3, 2, tzinfo=UTC),
    )
    assert decode_result(encode(r)) == r
    assert response_text(r.response) == "ab"
    assert response_text({"choices": [{"message": {"content": "c"}}]}) == "c"
    assert response_text(None) == ""


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    """A job from a newer producer (extra fields) still decodes."""
    data = b'{"id":"j","provider":"p","model":"m","request":{},"new_field":1}'
    assert decode_job(data).id == "j"
    with pytest.raises(msgspec.ValidationError):
        decode_job(b'{"id":"j"}')


def test_make_job_needs_exactly_one_of_prompt_or_request() -> None:
    """make_job refuses both or neither of prompt and request."""
    with pytest.raises(InvalidJob):
        make_job("p", "m")
    with pytest.raises(InvalidJob):
        make_job("p", "m", prompt="a", request={})
    assert isinstance(make_job("p", "m", request={"messages": []}), Job)


@given(st.text(min_size=1, max_size=10))  # 10 four-byte characters: 120 of the 128
def test_a_model_token_is_a_subject_token_and_gives_its_model_back(model: str) -> None:
    token = s.model_token(model)
    assert s.is_token(token) and "." not in token
    assert s.model_from_token(token) == model


@pytest.mark.parametrize(
    ("model", "token"),
    [
        ("claude-sonnet-4-5", "claude-sonnet-4-5"),
        ("claude-3.5-sonnet", "claude-3_2E5-sonnet"),
        ("anthropic.claude-v1:0", "anthropic_2Eclaude-v1_3A0"),
        ("a_b", "a_5Fb"),
    ],
)
def test_model_tokens_read_as_expected(model: str, token: str) -> None:
    assert s.model_token(model) == token


@pytest.mark.parametrize("bad", ["", "a.b", "a_2e", "a_5", "a_ZZ", "a_41", "x" * 129, "a_FF"])
def test_what_model_token_never_writes_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="token"):
        s.model_from_token(bad)


@given(st.text(min_size=1, max_size=40), st.sampled_from(["high", "normal", "low"]))
def test_a_parked_subject_names_its_provider_priority_and_model(model: str, prio: str) -> None:
    """``parked_place`` reads back what ``parked_subject`` wrote, for any model name (None
    for one too long to have a scope); the scope key of a model reads back its pair."""
    subject = s.parked_subject("anthropic", prio, model)
    place = s.parked_place(subject)
    scoped = s.scope_model(model)
    assert scoped in (model, None)
    assert place is not None and not place.legacy
    assert (place.provider, place.priority, place.model) == ("anthropic", prio, scoped)
    assert s.scope_of_key(s.scope_key("anthropic", model)) == ("anthropic", scoped)


def test_a_model_too_long_for_a_token_follows_its_provider() -> None:
    """A model whose token would pass 128 characters has no scope: its key is the
    provider's, and its jobs park under the ``_`` token."""
    long = "x" * 200
    assert s.scope_model(long) is None
    assert s.scope_key("anthropic", long) == "anthropic"
    assert s.parked_subject("anthropic", "low", long) == "ai.parked.anthropic.low._"
    assert s.parked_place("ai.parked.anthropic.low._") == ("anthropic", "low", None, False)


@pytest.mark.parametrize(
    "subject",
    ["ai.parked.anthropic", "ai.parked.anthropic.urgent.m", "ai.parked.a.low.m_zz", "x.y.z.w"],
)
def test_what_is_no_parked_subject_is_refused(subject: str) -> None:
    """Unknown priorities, tokens ``model_token`` never writes and other subjects parse
    to None (never a crash)."""
    assert s.parked_place(subject) is None


@given(st.one_of(st.text(max_size=60), st.from_regex(r"\Aanthropic\.[A-Za-z0-9_.:-]{0,20}\Z")))
def test_any_key_is_a_scope_or_none_never_a_crash(key: str) -> None:
    """Whatever key a client writes to ai_health, the board reads it as a scope it can spell
    back exactly, or skips it: ``scope_of_key`` never raises."""
    scope = s.scope_of_key(key)
    if scope is not None:
        assert s.scope_key(*scope) == key
