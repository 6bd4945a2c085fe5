"""Doors: the Bedrock and Vertex classification tables over every exception class, the
per-door feature list, betas, model_map, and same-shape failover in ``decide``.

Status errors are built by the door's own SDK client from a response in that cloud's
shape (``_make_status_error_from_response``), so each case proves which class it becomes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anthropic
import botocore.exceptions
import google.auth.exceptions
import httpx2
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.codec import encode
from schemas.jobs import Job, Target
from services.config import ProviderSettings, WorkerSettings
from services.errors import PermanentError, ProviderError, RateLimited, TransientError, Unmappable
from services.lifecycle.decide import FailOver, Park, Policy, Situation, decide
from services.providers.clouds import classify_bedrock, classify_vertex
from services.providers.doors import check_door, dropped_note, shape, split_betas
from tests.unit.test_classify import COMMON_CASES, Expected, anthropic_midstream

BEDROCK_URL = "https://bedrock-runtime.us-east-1.amazonaws.com/model/m/invoke"
VERTEX_URL = "https://us-east5-aiplatform.googleapis.com/v1/projects/p/locations/us-east5/x"

_bedrock = anthropic.AsyncAnthropicBedrock(
    aws_region="us-east-1", aws_access_key="AKIDTEST", aws_secret_key="test", max_retries=0
)
_vertex = anthropic.AsyncAnthropicVertex(
    region="us-east5", project_id="p", access_token="test", max_retries=0
)


def bedrock_status(status: int, name: str, message: str = "boom") -> anthropic.APIStatusError:
    """What the Bedrock client raises for Bedrock's error of ``name`` under ``status``."""
    headers = {"x-amzn-errortype": f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    response = httpx2.Response(
        status,
        headers=headers,
        json={"message": message},
        request=httpx2.Request("POST", BEDROCK_URL),
    )
    return _bedrock._make_status_error_from_response(response)


def bedrock_midstream(code: str) -> anthropic.APIStatusError:
    """What the Bedrock client raises for an exception frame inside a stream."""
    body = {"type": "error", "error": {"type": code, "message": "boom"}}
    response = httpx2.Response(200, request=httpx2.Request("POST", BEDROCK_URL))
    return _bedrock._make_status_error(str(body), body=body, response=response)


def vertex_status(
    status: int, google: str | None, message: str = "boom", headers: dict[str, str] | None = None
) -> anthropic.APIStatusError:
    """What the Vertex client raises for Google's error ``google`` (None: Anthropic's
    overloaded body, which Vertex passes on for a 529)."""
    body: Any = (
        {"error": {"code": status, "message": message, "status": google}}
        if google is not None
        else {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    )
    response = httpx2.Response(
        status, headers=headers, json=body, request=httpx2.Request("POST", VERTEX_URL)
    )
    return _vertex._make_status_error_from_response(response)


BEDROCK_CASES: list[tuple[BaseException, type[BaseException], Expected]] = [
    (bedrock_status(429, "ThrottlingException"), anthropic.RateLimitError,
        (RateLimited, "rate_limited", 429, None)),
    (bedrock_status(429, "ModelNotReadyException"), anthropic.RateLimitError,
        (TransientError, "model_not_ready", 429, None)),
    (bedrock_status(503, "ServiceUnavailableException"), anthropic.ServiceUnavailableError,
        (TransientError, "overloaded", 503, None)),
    (bedrock_status(408, "ModelTimeoutException"), anthropic.RequestTimeoutError,
        (TransientError, "timeout", 408, None)),
    (bedrock_status(424, "ModelErrorException"), anthropic.APIStatusError,
        (TransientError, "server_error", 424, None)),
    (bedrock_status(500, "InternalServerException"), anthropic.InternalServerError,
        (TransientError, "server_error", 500, None)),
    (bedrock_status(400, "ServiceQuotaExceededException"), anthropic.BadRequestError,
        (PermanentError, "quota", 400, None)),
    (bedrock_status(403, "AccessDeniedException"), anthropic.PermissionDeniedError,
        (PermanentError, "auth", 403, None)),
    (bedrock_status(403, "UnrecognizedClientException"), anthropic.PermissionDeniedError,
        (PermanentError, "auth", 403, None)),
    (bedrock_status(404, "ResourceNotFoundException"), anthropic.NotFoundError,
        (PermanentError, "not_found", 404, None)),
    (bedrock_status(400, "ValidationException"), anthropic.BadRequestError,
        (PermanentError, "invalid_request", 400, None)),
    # An error type Bedrock may add later: the status decides, as for the first party.
    (bedrock_status(502, "SomeNewException"), anthropic.InternalServerError,
        (TransientError, "server_error", 502, None)),
    (bedrock_midstream("throttlingException"), anthropic.APIStatusError,
        (RateLimited, "rate_limited", 200, None)),
    (bedrock_midstream("serviceUnavailableException"), anthropic.APIStatusError,
        (TransientError, "overloaded", 200, None)),
    (bedrock_midstream("modelTimeoutException"), anthropic.APIStatusError,
        (TransientError, "timeout", 200, None)),
    (bedrock_midstream("modelStreamErrorException"), anthropic.APIStatusError,
        (TransientError, "server_error", 200, None)),
    (bedrock_midstream("internalServerException"), anthropic.APIStatusError,
        (TransientError, "server_error", 200, None)),
    (bedrock_midstream("validationException"), anthropic.APIStatusError,
        (PermanentError, "invalid_request", 200, None)),
    (botocore.exceptions.NoCredentialsError(), botocore.exceptions.NoCredentialsError,
        (PermanentError, "config", None, None)),
    (botocore.exceptions.PartialCredentialsError(provider="env", cred_var="AWS_SECRET"),
        botocore.exceptions.PartialCredentialsError, (PermanentError, "config", None, None)),
    (botocore.exceptions.NoRegionError(), botocore.exceptions.NoRegionError,
        (PermanentError, "config", None, None)),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="https://x"),
        botocore.exceptions.EndpointConnectionError, (TransientError, "connection", None, None)),
]  # fmt: skip

VERTEX_CASES: list[tuple[BaseException, type[BaseException], Expected]] = [
    (vertex_status(429, "RESOURCE_EXHAUSTED", "Quota exceeded for aiplatform.googleapis.com/"
                   "online_prediction_requests_per_base_model", {"retry-after": "4"}),
        anthropic.RateLimitError, (RateLimited, "rate_limited", 429, 4.0)),
    (vertex_status(429, None), anthropic.RateLimitError, (RateLimited, "rate_limited", 429, None)),
    (vertex_status(529, None), anthropic.OverloadedError,
        (TransientError, "overloaded", 529, None)),
    (vertex_status(503, "UNAVAILABLE"), anthropic.ServiceUnavailableError,
        (TransientError, "overloaded", 503, None)),
    (vertex_status(504, "DEADLINE_EXCEEDED"), anthropic.GatewayTimeoutError,
        (TransientError, "timeout", 504, None)),
    (vertex_status(500, "INTERNAL"), anthropic.InternalServerError,
        (TransientError, "server_error", 500, None)),
    (vertex_status(403, "PERMISSION_DENIED", "Billing is disabled for project p"),
        anthropic.PermissionDeniedError, (PermanentError, "quota", 403, None)),
    (vertex_status(403, "PERMISSION_DENIED"), anthropic.PermissionDeniedError,
        (PermanentError, "auth", 403, None)),
    (vertex_status(401, "UNAUTHENTICATED"), anthropic.AuthenticationError,
        (PermanentError, "auth", 401, None)),
    (vertex_status(404, "NOT_FOUND"), anthropic.NotFoundError,
        (PermanentError, "not_found", 404, None)),
    (vertex_status(400, "INVALID_ARGUMENT"), anthropic.BadRequestError,
        (PermanentError, "invalid_request", 400, None)),
    (vertex_status(400, "FAILED_PRECONDITION"), anthropic.BadRequestError,
        (PermanentError, "invalid_request", 400, None)),
    (google.auth.exceptions.DefaultCredentialsError("no ADC"),
        google.auth.exceptions.DefaultCredentialsError, (PermanentError, "config", None, None)),
    (google.auth.exceptions.TransportError("metadata server away"),
        google.auth.exceptions.TransportError, (TransientError, "connection", None, None)),
    (google.auth.exceptions.RefreshError("token endpoint 503"),
        google.auth.exceptions.RefreshError, (TransientError, "auth_refresh", None, None)),
]  # fmt: skip


def _assert(error: ProviderError, expected: Expected) -> None:
    kind, reason, status, retry_after = expected
    assert type(error) is kind
    assert (error.reason, error.status, error.retry_after) == (reason, status, retry_after)


def _id(case: tuple[Any, ...]) -> str:
    exc = case[0]
    return "-".join(
        str(p)
        for p in (type(exc).__name__, getattr(exc, "status_code", None), getattr(exc, "type", None))
        if p is not None
    )


@pytest.mark.parametrize(
    ("exc", "cls", "expected"), BEDROCK_CASES, ids=[_id(c) for c in BEDROCK_CASES]
)
def test_bedrock_table(exc: BaseException, cls: type, expected: Expected) -> None:
    """Each Bedrock error becomes its documented outcome."""
    assert type(exc) is cls
    _assert(classify_bedrock(exc), expected)


@pytest.mark.parametrize(
    ("exc", "cls", "expected"), VERTEX_CASES, ids=[_id(c) for c in VERTEX_CASES]
)
def test_vertex_table(exc: BaseException, cls: type, expected: Expected) -> None:
    """Each Vertex error becomes its documented outcome."""
    assert type(exc) is cls
    _assert(classify_vertex(exc), expected)


@pytest.mark.parametrize("classify", [classify_bedrock, classify_vertex])
@pytest.mark.parametrize(("exc", "expected"), COMMON_CASES, ids=[_id(c) for c in COMMON_CASES])
def test_cloud_tables_keep_the_common_rows(
    classify: Any, exc: BaseException, expected: Expected
) -> None:
    """Transport failures, malformed bodies and refusals classify as in every table."""
    _assert(classify(exc), expected)


@pytest.mark.parametrize("classify", [classify_bedrock, classify_vertex])
def test_cloud_tables_keep_the_first_party_midstream_rows(classify: Any) -> None:
    """An Anthropic ``error`` event inside a cloud's stream reads as the first party's."""
    _assert(
        classify(anthropic_midstream("overloaded_error")), (TransientError, "overloaded", 200, None)
    )
    _assert(
        classify(anthropic_midstream("rate_limit_error")), (RateLimited, "rate_limited", 200, None)
    )


# -- the door list, betas, model_map -----------------------------------------------------


def _image(source: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image", "source": source}]}


@pytest.mark.parametrize(
    ("request_", "where"),
    [
        ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
        ({"container": "c_1"}, "container"),
        ({"messages": [_image({"type": "file", "file_id": "f"})]},
            "messages[0].content[0].source"),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "document", "source": {"type": "file", "file_id": "f"}}]}]}]},
            "messages[0].content[0].content[0].source",
        ),
    ],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["anthropic-bedrock", "anthropic-vertex"])
def test_a_cloud_door_refuses_what_it_does_not_serve(
    request_: dict[str, Any], where: str, kind: str
) -> None:
    """The short list: the MCP connector, containers, Files API ids; the first party takes all."""
    with pytest.raises(Unmappable) as caught:
        check_door(request_, kind)
    assert caught.value.field == where
    check_door(request_, "anthropic")


def test_a_cloud_door_takes_images_documents_tools_and_cache_control() -> None:
    request = {
        "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "t", "input_schema": {"type": "object"}}],
        "messages": [_image({"type": "base64", "media_type": "image/png", "data": "AA=="}),
                     _image({"type": "url", "url": "https://x/y.png"})],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }  # fmt: skip
    for kind in ("anthropic-bedrock", "anthropic-vertex"):
        check_door(request, kind)


_BETA = st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True)
_KNOWN = st.sampled_from(
    ["files-api-2025-04-14", "mcp-client-2025-04-04", "prompt-caching-2024-07-31"]
)


_KINDS = st.sampled_from(["anthropic", "anthropic-bedrock", "anthropic-vertex", "openai"])


@given(betas=st.lists(st.one_of(_BETA, _KNOWN), max_size=8), kind=_KINDS)
def test_split_betas_partitions_in_order(betas: list[str], kind: str) -> None:
    """Kept and dropped make up the list, each in the job's order; the first party keeps
    all, OpenAI none, the clouds all but the Files API and MCP connector ones."""
    kept, dropped = split_betas(betas, kind)
    assert sorted(kept + dropped) == sorted(betas)
    assert kept == [b for b in betas if b in kept] and dropped == [b for b in betas if b in dropped]
    if kind == "anthropic":
        assert kept == betas
    elif kind == "openai":
        assert kept == []
    else:
        assert all(not b.startswith(("files-api-", "mcp-client-")) for b in kept)
        assert all(b.startswith(("files-api-", "mcp-client-")) for b in dropped)
    if dropped:
        assert all(b in dropped_note(dropped, "p") for b in dropped)


_MODEL = st.from_regex(r"[a-z][a-z0-9.:@-]{0,40}", fullmatch=True)


@given(mapping=st.dictionaries(_MODEL, _MODEL, max_size=6), model=_MODEL)
def test_model_map_names_the_door_id_or_passes_the_model(
    mapping: dict[str, str], model: str
) -> None:
    p = ProviderSettings(kind="anthropic-bedrock", model_map=mapping)
    assert p.map_model(model) == mapping.get(model, model)


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "anthropic", "aws_region": "us-east-1"},
        {"kind": "anthropic-bedrock", "gcp_project_id": "p"},
        {"kind": "anthropic-bedrock", "aws_access_key_id": "AKID"},
        {"kind": "openai", "model_map": {"": "x"}},
    ],
)
def test_door_settings_refuse_what_does_not_belong(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ProviderSettings(**bad)


def test_shapes() -> None:
    assert {shape(k) for k in ("anthropic", "anthropic-bedrock", "anthropic-vertex")} == {
        "anthropic"
    }
    assert shape("openai") == "openai"


# -- same-shape failover in decide -------------------------------------------------------

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
KINDS = {
    "a": "anthropic",
    "a2": "anthropic",
    "br": "anthropic-bedrock",
    "vx": "anthropic-vertex",
    "o": "openai",
}
POLICY = Policy(worker=WorkerSettings(), kinds=KINDS)  # type: ignore[arg-type]


class OpenA:
    """Provider ``a`` is open; every other scope closed."""

    def state(self, provider: str, model: str | None = None) -> str:
        return "open" if provider == "a" else "closed"

    def blocked(self, provider: str, model: str | None = None) -> bool:
        return provider == "a"

    def outage_id(self, provider: str, model: str | None = None) -> str:
        return "a-outage" if provider == "a" else ""


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
_REQUEST = st.dictionaries(
    st.text(max_size=12).filter(lambda k: k not in ("mcp_servers", "container", "messages")),
    _JSON,
    max_size=6,
)


@given(request=_REQUEST, door=st.sampled_from(["br", "vx", "a2"]),
       betas=st.lists(st.one_of(_BETA, _KNOWN), max_size=4))  # fmt: skip
def test_same_shape_failover_keeps_the_request_byte_for_byte(
    request: dict[str, Any], door: str, betas: list[str]
) -> None:
    """Whatever the request holds (outside the door's short list), it moves unchanged; a
    target without a model takes the job's; betas the door drops are recorded."""
    job = Job(id="j", provider="a", model="claude-x", request=request, on_outage="failover",
              fallbacks=[Target(provider=door)], betas=betas)  # fmt: skip
    outcome = decide(Situation(job, 1, NOW), POLICY, OpenA())
    assert isinstance(outcome, FailOver)
    moved = outcome.job
    assert encode(moved.request) == encode(job.request)
    assert (moved.provider, moved.model) == (door, "claude-x")
    kept, dropped = split_betas(betas, KINDS[door])
    assert moved.betas == kept
    assert moved.metadata.get("betas_dropped", "") == ",".join(dropped)
    assert moved.metadata["failover_from"] == "a/claude-x"


def test_a_feature_the_door_does_not_serve_parks_the_job() -> None:
    job = Job(id="j", provider="a", model="m", on_outage="failover",
              request={"max_tokens": 8, "container": "c", "messages": []},
              fallbacks=[Target(provider="br"), Target(provider="vx")])  # fmt: skip
    assert isinstance(decide(Situation(job, 1, NOW), POLICY, OpenA()), Park)
    to_first_party = msgspec.structs.replace(job, fallbacks=[Target(provider="a2")])
    outcome = decide(Situation(to_first_party, 1, NOW), POLICY, OpenA())
    assert isinstance(outcome, FailOver) and outcome.job.request == job.request


def test_failover_across_shapes_still_maps_and_drops_every_beta() -> None:
    job = Job(id="j", provider="br", model="m", on_outage="failover", betas=["b1"],
              request={"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
              fallbacks=[Target(provider="o", model="gpt")])  # fmt: skip

    class OpenBr(OpenA):
        def state(self, provider: str, model: str | None = None) -> str:
            return "open" if provider == "br" else "closed"

        def blocked(self, provider: str, model: str | None = None) -> bool:
            return provider == "br"

    outcome = decide(Situation(job, 1, NOW), POLICY, OpenBr())
    assert isinstance(outcome, FailOver)
    assert outcome.job.request == {
        "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8,
    }  # fmt: skip
    assert outcome.job.betas == [] and outcome.job.metadata["betas_dropped"] == "b1"


# -- building the doors ------------------------------------------------------------------


async def test_an_anthropic_server_of_our_own_needs_no_key() -> None:
    """An ``anthropic`` kind with a base_url and no key (vLLM, Ollama) is a valid provider."""
    from services.config import Settings
    from services.providers.registry import build_provider

    settings = Settings(
        providers={"inhouse": ProviderSettings(kind="anthropic", base_url="http://127.0.0.1:9")}
    )
    provider = build_provider(settings, "inhouse")
    assert provider is not None
    await provider.aclose()


def test_a_bedrock_door_without_a_region_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from services.config import Settings
    from services.errors import ConfigError
    from services.providers.registry import build_provider

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    settings = Settings(providers={"br": ProviderSettings(kind="anthropic-bedrock")})
    with pytest.raises(ConfigError, match="region"):
        build_provider(settings, "br")


def test_cloud_credentials_never_print(tmp_path: Any) -> None:
    """A door's secret key, session token and access token (or their files) are scrubbed."""
    from services.config import Settings
    from services.secrets import Secrets, register_settings

    token_file = tmp_path / "token"
    token_file.write_text("ya29.FILETOKENFILETOKEN\n")
    settings = Settings(
        providers={
            "br": ProviderSettings(
                kind="anthropic-bedrock",
                aws_access_key_id="AKIDEXAMPLE",
                aws_secret_access_key="wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET",
                aws_session_token="FwoGZXIvYXdzEXAMPLESESSIONTOKEN",
            ),
            "vx": ProviderSettings(kind="anthropic-vertex", gcp_access_token_file=token_file),
        }
    )
    known = Secrets()
    register_settings(settings, into=known)
    secrets = (
        "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRET",
        "FwoGZXIvYXdzEXAMPLESESSIONTOKEN",
        "ya29.FILETOKENFILETOKEN",
    )
    scrubbed = known.scrub("a log line: " + " and ".join(secrets))
    assert scrubbed.startswith("a log line: ")
    for secret in secrets:
        assert secret not in scrubbed


# -- the fake's doors ----------------------------------------------------------------------


@given(events=st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=4),
                       min_size=1, max_size=5))  # fmt: skip
def test_bedrock_frames_decode_with_botocore(events: list[dict[str, str]]) -> None:
    """The fake's event-stream frames (prelude, headers, CRC32s) read back through
    botocore's own decoder, one chunk per event, payload ``{"bytes": base64(event)}``."""
    import base64

    from botocore.eventstream import EventStreamBuffer

    from services.tools.fake import cloud_wire

    raw = [msgspec.json.encode({"type": "x", **e}) for e in events]
    buffer = EventStreamBuffer()
    buffer.add_data(b"".join(cloud_wire.chunk(r) for r in raw))
    decoded = list(buffer)
    assert len(decoded) == len(raw)
    for message, sent in zip(decoded, raw, strict=True):
        assert message.headers[":event-type"] == "chunk"
        assert base64.b64decode(msgspec.json.decode(message.payload)["bytes"]) == sent


def test_a_corrupted_frame_is_refused_by_botocore() -> None:
    from botocore.eventstream import ChecksumMismatch, EventStreamBuffer

    from services.tools.fake import cloud_wire

    frame = bytearray(cloud_wire.chunk(b'{"type": "ping"}'))
    frame[-6] ^= 0xFF  # a payload byte: the message CRC no longer matches
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(frame))
    with pytest.raises(ChecksumMismatch):
        list(buffer)


def test_an_outage_of_an_unknown_door_is_refused() -> None:
    from services.tools.fake import FaultConfig, Outage
    from services.tools.fake.faults import Faults

    with pytest.raises(ValueError, match="unknown door"):
        Faults(FaultConfig()).start_outage(529, doors=["azure"])
    with pytest.raises(ValueError, match="unknown door"):
        Outage(start_s=0, duration_s=1, doors=["azure"])
    faults = Faults(FaultConfig())
    faults.start_outage(529, doors=["anthropic"])
    assert faults.choose(None, "m", False, "anthropic")[1] == "outage"
    assert faults.choose(None, "m", False, "bedrock") == (None, None)


def test_results_stored_before_doors_still_decode() -> None:
    from schemas.results import decode_result

    old = b'{"job_id":"j","status":"succeeded","provider":"anthropic","model":"m"}'
    result = decode_result(old)
    assert result.served_by is None and result.provider_usage is None and result.notes == []
