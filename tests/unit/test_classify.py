"""The classification tables of both adapters, over real SDK exceptions.

Status errors are built the way the SDKs build them from a response
(``client._make_status_error_from_response``), so each case also proves which
SDK class that response really becomes.
"""

from __future__ import annotations

import email.utils
import json
import math
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from anthropic.types import ChangeOutcomeUnknownError, CompactionUnavailableError
from anthropic.types.shared import (
    ContractSpendLimitReachedError,
    EnforcedSpendLimitReachedError,
    LinkedOrganizationBillingUnavailableError,
    LinkedOrganizationSpendLimitReachedError,
    RampLimitExceededError,
)
from hypothesis import given
from hypothesis import strategies as st
from openai._exceptions import SubjectTokenProviderError
from openai.types.chat import ChatCompletion

from services.errors import PermanentError, ProviderError, RateLimited, TransientError
from services.providers import anthropic as anthropic_adapter
from services.providers import openai as openai_adapter
from services.providers.base import Provider
from services.providers.classify import MalformedResponse, message_of, parse_retry_after, scrub

ANTHROPIC_URL = "https://api.anthropic.com/v1/messages"
OPENAI_URL = "https://api.openai.com/v1/chat/completions"
SECRET = "sk-ant-api03-SECRETSECRETSECRET"

_anthropic_client = anthropic.AsyncAnthropic(api_key=SECRET, max_retries=0)
_openai_client = openai.AsyncOpenAI(api_key=SECRET, max_retries=0)

Expected = tuple[type[ProviderError], str, int | None, float | None]


def _response(
    url: str, status: int, body: object = None, headers: dict[str, str] | None = None
) -> httpx2.Response:
    request = httpx2.Request("POST", url)
    if body is None:
        return httpx2.Response(status, headers=headers, request=request)
    return httpx2.Response(status, headers=headers, json=body, request=request)


def _anthropic_body(kind: str, message: str = "boom", code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code is not None:
        error["details"] = {"error_code": code}
    return {"type": "error", "error": error}


def anthropic_status(
    status: int,
    kind: str = "api_error",
    message: str = "boom",
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> anthropic.APIStatusError:
    """The error the anthropic SDK raises for this HTTP response."""
    response = _response(ANTHROPIC_URL, status, _anthropic_body(kind, message, code), headers)
    return _anthropic_client._make_status_error_from_response(response)


def anthropic_midstream(kind: str | None) -> anthropic.APIStatusError:
    """The error the anthropic SDK raises for an ``event: error`` inside a 200 stream."""
    body: object = _anthropic_body(kind) if kind is not None else "not json"
    return _anthropic_client._make_status_error(
        f"{body}", body=body, response=_response(ANTHROPIC_URL, 200)
    )


def openai_status(
    status: int,
    kind: str | None = None,
    code: str | None = None,
    message: str = "boom",
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError:
    """The error the openai SDK raises for this HTTP response."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return _openai_client._make_status_error_from_response(
        _response(OPENAI_URL, status, body, headers)
    )


def openai_midstream(kind: str | None, code: str | None = None) -> openai.APIError:
    """The error the openai SDK raises for an ``{"error": ...}`` chunk inside a 200 stream."""
    body = {"message": "boom", "type": kind, "param": None, "code": code}
    return openai.APIError("boom", httpx2.Request("POST", OPENAI_URL), body=body)


def _assert_outcome(error: ProviderError, expected: Expected) -> None:
    kind, reason, status, retry_after = expected
    assert type(error) is kind
    assert (error.reason, error.status, error.retry_after) == (reason, status, retry_after)
    assert error.retryable is issubclass(kind, TransientError)


_A_REQUEST = httpx2.Request("POST", ANTHROPIC_URL)
_O_REQUEST = httpx2.Request("POST", OPENAI_URL)
_RETRY = {"retry-after": "3"}
_BOTH_RETRY_HEADERS = {"retry-after-ms": "1500", "retry-after": "7"}

# (exception, the SDK class it must be, expected outcome)
ANTHROPIC_CASES: list[tuple[BaseException, type[BaseException], Expected]] = [
    (anthropic_status(400, "invalid_request_error"), anthropic.BadRequestError,
        (PermanentError, "invalid_request", 400, None)),
    (anthropic_status(401, "authentication_error"), anthropic.AuthenticationError,
        (PermanentError, "auth", 401, None)),
    (anthropic_status(402, "billing_error"), anthropic.PaymentRequiredError,
        (PermanentError, "quota", 402, None)),
    (anthropic_status(403, "permission_error"), anthropic.PermissionDeniedError,
        (PermanentError, "auth", 403, None)),
    (anthropic_status(404, "not_found_error"), anthropic.NotFoundError,
        (PermanentError, "not_found", 404, None)),
    (anthropic_status(408, "timeout_error"), anthropic.RequestTimeoutError,
        (TransientError, "timeout", 408, None)),
    (anthropic_status(409, "conflict_error"), anthropic.ConflictError,
        (TransientError, "conflict", 409, None)),
    (anthropic_status(412, "invalid_request_error"), anthropic.PreconditionFailedError,
        (TransientError, "unknown", 412, None)),
    (anthropic_status(413, "request_too_large"), anthropic.ContentTooLargeError,
        (PermanentError, "too_large", 413, None)),
    (anthropic_status(422, "invalid_request_error"), anthropic.UnprocessableEntityError,
        (PermanentError, "invalid_request", 422, None)),
    (anthropic_status(429, "rate_limit_error", headers=_RETRY), anthropic.RateLimitError,
        (RateLimited, "rate_limited", 429, 3.0)),
    (anthropic_status(431, "invalid_request_error"), anthropic.RequestHeaderFieldsTooLargeError,
        (PermanentError, "too_large", 431, None)),
    (anthropic_status(499, "api_error"), anthropic.ClientClosedRequestError,
        (TransientError, "connection", 499, None)),
    (anthropic_status(500, "api_error"), anthropic.InternalServerError,
        (TransientError, "server_error", 500, None)),
    (anthropic_status(501, "api_error"), anthropic.HTTPNotImplementedError,
        (TransientError, "server_error", 501, None)),
    (anthropic_status(503, "api_error", headers=_RETRY), anthropic.ServiceUnavailableError,
        (TransientError, "server_error", 503, 3.0)),
    (anthropic_status(504, "timeout_error"), anthropic.GatewayTimeoutError,
        (TransientError, "server_error", 504, None)),
    (anthropic_status(529, "overloaded_error"), anthropic.OverloadedError,
        (TransientError, "overloaded", 529, None)),
    (anthropic_status(418, "invalid_request_error"), anthropic.APIStatusError,
        (TransientError, "unknown", 418, None)),
    # error_code subclasses: spend limits are quota, a ramp limit is a rate limit
    (anthropic_status(429, "rate_limit_error", code="enforced_spend_limit_reached"),
        EnforcedSpendLimitReachedError, (PermanentError, "quota", 429, None)),
    (anthropic_status(429, "rate_limit_error", code="contract_spend_limit_reached"),
        ContractSpendLimitReachedError, (PermanentError, "quota", 429, None)),
    (anthropic_status(429, "rate_limit_error", code="ramp_limit_exceeded", headers=_RETRY),
        RampLimitExceededError, (RateLimited, "rate_limited", 429, 3.0)),
    (anthropic_status(402, "billing_error", code="linked_organization_spend_limit_reached"),
        LinkedOrganizationSpendLimitReachedError,
        (PermanentError, "quota", 402, None)),
    (anthropic_status(402, "billing_error", code="linked_organization_billing_unavailable"),
        LinkedOrganizationBillingUnavailableError,
        (PermanentError, "quota", 402, None)),
    (anthropic_status(503, "api_error", code="change_outcome_unknown"),
        ChangeOutcomeUnknownError, (TransientError, "server_error", 503, None)),
    (anthropic_status(529, "overloaded_error", code="compaction_unavailable"),
        CompactionUnavailableError, (TransientError, "overloaded", 529, None)),
    # billing by type or by message
    (anthropic_status(400, "billing_error", "Your credit balance is too low"),
        anthropic.BadRequestError, (PermanentError, "quota", 400, None)),
    (anthropic_status(400, "invalid_request_error", "Your credit balance is too low to access"),
        anthropic.BadRequestError, (PermanentError, "quota", 400, None)),
    (anthropic_status(403, "permission_error", "This workspace has reached its spend limit"),
        anthropic.PermissionDeniedError, (PermanentError, "quota", 403, None)),
    (anthropic_status(400, "invalid_request_error", "You have reached your API usage limits"),
        anthropic.BadRequestError, (PermanentError, "quota", 400, None)),
    # no response at all
    (anthropic.APITimeoutError(_A_REQUEST), anthropic.APITimeoutError,
        (TransientError, "timeout", None, None)),
    (anthropic.APIConnectionError(request=_A_REQUEST), anthropic.APIConnectionError,
        (TransientError, "connection", None, None)),
    (anthropic.APIResponseValidationError(_response(ANTHROPIC_URL, 200), body=None),
        anthropic.APIResponseValidationError, (TransientError, "bad_response", 200, None)),
    # raised without sending
    (anthropic.RetryableError("middleware asks for a retry"), anthropic.RetryableError,
        (TransientError, "unknown", None, None)),
    (anthropic.CredentialsError("no credentials"), anthropic.CredentialsError,
        (PermanentError, "refused", None, None)),
    (anthropic.AnthropicError("The api_key client option must be set"), anthropic.AnthropicError,
        (PermanentError, "refused", None, None)),
]  # fmt: skip

OPENAI_CASES: list[tuple[BaseException, type[BaseException], Expected]] = [
    (openai_status(400, "invalid_request_error"), openai.BadRequestError,
        (PermanentError, "invalid_request", 400, None)),
    (openai_status(401, "invalid_request_error", "invalid_api_key"), openai.AuthenticationError,
        (PermanentError, "auth", 401, None)),
    (openai.OAuthError(response=_response(OPENAI_URL, 401), body={"error": "invalid_token"}),
        openai.OAuthError, (PermanentError, "auth", 401, None)),
    (openai_status(402), openai.APIStatusError, (PermanentError, "quota", 402, None)),
    (openai_status(403, "permission_error"), openai.PermissionDeniedError,
        (PermanentError, "auth", 403, None)),
    (openai_status(404, "invalid_request_error", "model_not_found"), openai.NotFoundError,
        (PermanentError, "not_found", 404, None)),
    (openai_status(408), openai.APIStatusError, (TransientError, "timeout", 408, None)),
    (openai_status(409), openai.ConflictError, (TransientError, "conflict", 409, None)),
    (openai_status(413, "invalid_request_error"), openai.APIStatusError,
        (PermanentError, "too_large", 413, None)),
    (openai_status(422), openai.UnprocessableEntityError,
        (PermanentError, "invalid_request", 422, None)),
    (openai_status(429, "requests", "rate_limit_exceeded", headers=_RETRY), openai.RateLimitError,
        (RateLimited, "rate_limited", 429, 3.0)),
    (openai_status(500, "server_error"), openai.InternalServerError,
        (TransientError, "server_error", 500, None)),
    (openai_status(503, "server_error", headers=_RETRY), openai.InternalServerError,
        (TransientError, "server_error", 503, 3.0)),
    (openai_status(529, "server_error", "overloaded"), openai.InternalServerError,
        (TransientError, "overloaded", 529, None)),
    (openai_status(418), openai.APIStatusError, (TransientError, "unknown", 418, None)),
    # quota codes, whatever the status
    (openai_status(429, "insufficient_quota", "insufficient_quota"), openai.RateLimitError,
        (PermanentError, "quota", 429, None)),
    (openai_status(429, "insufficient_quota", None), openai.RateLimitError,
        (PermanentError, "quota", 429, None)),
    (openai_status(400, "invalid_request_error", "billing_hard_limit_reached"),
        openai.BadRequestError, (PermanentError, "quota", 400, None)),
    (openai_status(429, "billing_not_active", "billing_not_active"), openai.RateLimitError,
        (PermanentError, "quota", 429, None)),
    # no response at all
    (openai.APITimeoutError(_O_REQUEST), openai.APITimeoutError,
        (TransientError, "timeout", None, None)),
    (openai.APIConnectionError(request=_O_REQUEST), openai.APIConnectionError,
        (TransientError, "connection", None, None)),
    (openai.APIResponseValidationError(_response(OPENAI_URL, 200), body=None),
        openai.APIResponseValidationError, (TransientError, "bad_response", 200, None)),
    # raised by the parse helpers, or without sending
    (openai.LengthFinishReasonError(completion=ChatCompletion.construct(usage=None)),
        openai.LengthFinishReasonError, (PermanentError, "length", None, None)),
    (openai.ContentFilterFinishReasonError(), openai.ContentFilterFinishReasonError,
        (PermanentError, "content_filter", None, None)),
    (openai.OpenAIError("The api_key client option must be set"), openai.OpenAIError,
        (PermanentError, "refused", None, None)),
    (SubjectTokenProviderError("no token"), SubjectTokenProviderError,
        (PermanentError, "refused", None, None)),
]  # fmt: skip

# Failures below the SDKs, and our own, classified the same by both tables.
COMMON_CASES: list[tuple[BaseException, Expected]] = [
    (httpx2.ReadTimeout("read timed out"), (TransientError, "timeout", None, None)),
    (httpx2.ConnectTimeout("connect timed out"), (TransientError, "timeout", None, None)),
    (httpx2.PoolTimeout("pool timed out"), (TransientError, "timeout", None, None)),
    (httpx2.ReadError("reset"), (TransientError, "connection", None, None)),
    (httpx2.ConnectError("refused"), (TransientError, "connection", None, None)),
    (httpx2.RemoteProtocolError("peer closed"), (TransientError, "connection", None, None)),
    (httpx2.DecodingError("bad gzip"), (TransientError, "bad_response", None, None)),
    (aiohttp.ClientPayloadError("truncated"), (TransientError, "connection", None, None)),
    (aiohttp.ServerDisconnectedError(), (TransientError, "connection", None, None)),
    (aiohttp.SocketTimeoutError(), (TransientError, "timeout", None, None)),
    (TimeoutError(), (TransientError, "timeout", None, None)),
    (ConnectionResetError(104, "Connection reset by peer"),
        (TransientError, "connection", None, None)),
    (MalformedResponse("the stream ended early"), (TransientError, "bad_response", None, None)),
    (json.JSONDecodeError("Expecting value", "<html>", 0),
        (TransientError, "bad_response", None, None)),
    (TypeError("create() missing 1 required keyword-only argument: 'max_tokens'"),
        (PermanentError, "refused", None, None)),
    (ValueError("Streaming is required for operations that may take longer than 10 minutes"),
        (PermanentError, "refused", None, None)),
    (RuntimeError("something new"), (TransientError, "unknown", None, None)),
    (Exception("something new"), (TransientError, "unknown", None, None)),
]  # fmt: skip


def _case_id(case: tuple[Any, ...]) -> str:
    exc = case[0]
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "error_code", None) or getattr(exc, "code", None)
    return "-".join(str(p) for p in (type(exc).__name__, status, code) if p is not None)


@pytest.mark.parametrize(
    ("exc", "sdk_class", "expected"), ANTHROPIC_CASES, ids=[_case_id(c) for c in ANTHROPIC_CASES]
)
def test_anthropic_table(exc: BaseException, sdk_class: type, expected: Expected) -> None:
    """Each anthropic SDK exception becomes its documented outcome."""
    assert type(exc) is sdk_class
    _assert_outcome(anthropic_adapter.classify(exc), expected)


@pytest.mark.parametrize(
    ("exc", "sdk_class", "expected"), OPENAI_CASES, ids=[_case_id(c) for c in OPENAI_CASES]
)
def test_openai_table(exc: BaseException, sdk_class: type, expected: Expected) -> None:
    """Each openai SDK exception becomes its documented outcome."""
    assert type(exc) is sdk_class
    _assert_outcome(openai_adapter.classify(exc), expected)


@pytest.mark.parametrize("classify", [anthropic_adapter.classify, openai_adapter.classify])
@pytest.mark.parametrize(("exc", "expected"), COMMON_CASES, ids=[_case_id(c) for c in COMMON_CASES])
def test_common_rows(classify: Any, exc: BaseException, expected: Expected) -> None:
    """Transport failures, malformed bodies and refused requests classify alike in both tables."""
    _assert_outcome(classify(exc), expected)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("overloaded_error", (TransientError, "overloaded", 200, None)),
        ("api_error", (TransientError, "server_error", 200, None)),
        ("timeout_error", (TransientError, "timeout", 200, None)),
        ("rate_limit_error", (RateLimited, "rate_limited", 200, None)),
        ("billing_error", (PermanentError, "quota", 200, None)),
        ("invalid_request_error", (PermanentError, "invalid_request", 200, None)),
        ("authentication_error", (PermanentError, "auth", 200, None)),
        ("permission_error", (PermanentError, "auth", 200, None)),
        ("not_found_error", (PermanentError, "not_found", 200, None)),
        ("request_too_large", (PermanentError, "too_large", 200, None)),
        ("some_future_error", (PermanentError, "invalid_request", 200, None)),
        (None, (TransientError, "unknown", 200, None)),
    ],
)
def test_anthropic_midstream(kind: str | None, expected: Expected) -> None:
    """An error event inside a 200 stream is classified by its error.type."""
    exc = anthropic_midstream(kind)
    assert type(exc) is anthropic.APIStatusError
    assert exc.status_code == 200
    _assert_outcome(anthropic_adapter.classify(exc), expected)


@pytest.mark.parametrize(
    ("kind", "code", "expected"),
    [
        ("server_error", None, (TransientError, "server_error", None, None)),
        ("api_error", None, (TransientError, "server_error", None, None)),
        ("overloaded_error", None, (TransientError, "overloaded", None, None)),
        ("server_error", "overloaded", (TransientError, "overloaded", None, None)),
        ("requests", "rate_limit_exceeded", (RateLimited, "rate_limited", None, None)),
        ("insufficient_quota", "insufficient_quota", (PermanentError, "quota", None, None)),
        ("invalid_request_error", None, (PermanentError, "invalid_request", None, None)),
        ("timeout", None, (TransientError, "timeout", None, None)),
        ("something_new", None, (TransientError, "unknown", None, None)),
        (None, None, (TransientError, "unknown", None, None)),
    ],
)
def test_openai_midstream(kind: str | None, code: str | None, expected: Expected) -> None:
    """An error chunk inside a 200 stream is classified by its type or code, most specific first."""
    _assert_outcome(openai_adapter.classify(openai_midstream(kind, code)), expected)


def test_openai_reset_reported_as_timeout_is_a_connection_error() -> None:
    """A reset the openai transport mislabels ConnectTimeout is classified as a connection error."""
    reset = aiohttp.ClientOSError(104, "Connection reset by peer")
    mapped = httpx2.ConnectTimeout(str(reset))
    mapped.__cause__ = reset
    exc = openai.APITimeoutError(_O_REQUEST)
    exc.__cause__ = mapped
    _assert_outcome(openai_adapter.classify(exc), (TransientError, "connection", None, None))


def test_openai_real_timeout_stays_a_timeout() -> None:
    """A socket read timeout behind APITimeoutError stays a timeout."""
    cause = aiohttp.SocketTimeoutError("Timeout on reading data from socket")
    mapped = httpx2.ReadTimeout(str(cause))
    mapped.__cause__ = cause
    exc = openai.APITimeoutError(_O_REQUEST)
    exc.__cause__ = mapped
    _assert_outcome(openai_adapter.classify(exc), (TransientError, "timeout", None, None))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500", "retry-after": "7"}, 1.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "soon", "retry-after": "7"}, 7.0),
        ({"retry-after-ms": "nan", "retry-after": "7"}, 7.0),
        ({"retry-after-ms": "-5", "retry-after": "7"}, 7.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "inf"}, None),
        ({}, None),
    ],
)
def test_retry_after_headers(headers: dict[str, str], expected: float | None) -> None:
    """retry-after-ms wins over retry-after; junk, negative and non-finite values are ignored."""
    assert parse_retry_after(httpx2.Headers(headers)) == expected


def test_retry_after_http_date() -> None:
    """An HTTP-date retry-after is the seconds from now until that date."""
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(httpx2.Headers({"retry-after": date}), now=now) == 90.0


def test_retry_after_http_date_in_the_past() -> None:
    """An HTTP-date retry-after in the past means retry now."""
    now = 1_800_000_000.0
    date = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(httpx2.Headers({"retry-after": date}), now=now) == 0.0


@pytest.mark.parametrize(
    "exc",
    [
        anthropic_status(429, "rate_limit_error", headers={"retry-after": "Wed, 01 Jan 2somethin"}),
        openai_status(429, "requests", "rate_limit_exceeded", headers={"retry-after": "later"}),
    ],
)
def test_unparseable_retry_after_still_rate_limited(exc: BaseException) -> None:
    """A 429 with an unreadable retry-after is still RateLimited, with no delay."""
    error = (anthropic_adapter if isinstance(exc, anthropic.APIError) else openai_adapter).classify(
        exc
    )
    _assert_outcome(error, (RateLimited, "rate_limited", 429, None))


@pytest.mark.parametrize(
    "exc",
    [
        anthropic_status(429, "rate_limit_error", headers=_BOTH_RETRY_HEADERS),
        openai_status(429, "requests", "rate_limit_exceeded", headers=_BOTH_RETRY_HEADERS),
    ],
)
def test_retry_after_ms_wins_through_classify(exc: BaseException) -> None:
    """The adapters take retry-after-ms over retry-after from the real response headers."""
    module = anthropic_adapter if isinstance(exc, anthropic.APIError) else openai_adapter
    _assert_outcome(module.classify(exc), (RateLimited, "rate_limited", 429, 1.5))


def test_future_http_date_through_classify() -> None:
    """An HTTP-date retry-after on a 529 becomes a positive delay no longer than asked."""
    date = email.utils.formatdate(4_000_000_000, usegmt=True)
    error = anthropic_adapter.classify(
        anthropic_status(529, "overloaded_error", headers={"retry-after": date})
    )
    assert type(error) is TransientError
    assert error.retry_after is not None
    assert 0 < error.retry_after <= 4_000_000_000


@pytest.mark.parametrize(
    "exc",
    [
        anthropic_status(401, "authentication_error", f"invalid x-api-key {SECRET}"),
        openai_status(401, "invalid_request_error", "invalid_api_key", f"Incorrect key {SECRET}"),
        anthropic.APIConnectionError(message=f"{{'x-api-key': '{SECRET}'}}", request=_A_REQUEST),
        RuntimeError(f"Authorization: Bearer {SECRET}"),
    ],
)  # fmt: skip
def test_message_never_carries_the_key(exc: BaseException) -> None:
    """A key echoed back in an error never reaches the ProviderError message."""
    for classify in (anthropic_adapter.classify, openai_adapter.classify):
        error = classify(exc)
        assert SECRET not in error.message
        assert SECRET not in str(error)
        assert "SECRETSECRET" not in str(error)


def test_message_is_bounded_and_one_line() -> None:
    """A huge multi-line error body becomes one bounded line naming the SDK class."""
    exc = anthropic_status(400, "invalid_request_error", "line\n" * 1000)
    error = anthropic_adapter.classify(exc)
    assert error.message.startswith("BadRequestError: ")
    assert "\n" not in error.message
    assert len(error.message) <= 500


def test_scrub_leaves_ordinary_text_alone() -> None:
    """Scrubbing keeps error text that merely names a header."""
    assert scrub("invalid x-api-key") == "invalid x-api-key"
    assert message_of(ValueError("x-api-key header is missing")) == (
        "ValueError: x-api-key header is missing"
    )


@given(status=st.integers(500, 599).filter(lambda s: s != 529))
def test_any_5xx_is_transient(status: int) -> None:
    """Any 5xx but 529, from either SDK, is a transient server_error keeping its status."""
    for error in (
        anthropic_adapter.classify(anthropic_status(status, "api_error")),
        openai_adapter.classify(openai_status(status, "server_error")),
    ):
        _assert_outcome(error, (TransientError, "server_error", status, None))


@given(
    ms=st.one_of(st.none(), st.text(max_size=12), st.floats().map(str)),
    seconds=st.one_of(st.none(), st.text(max_size=40), st.floats().map(str)),
)
def test_retry_after_is_never_negative_or_infinite(ms: str | None, seconds: str | None) -> None:
    """Whatever the headers say, retry_after is None or a finite number >= 0."""
    headers = {k: v for k, v in (("retry-after-ms", ms), ("retry-after", seconds)) if v is not None}
    try:
        built = httpx2.Headers(headers)
    except (UnicodeEncodeError, ValueError):
        return
    delay = parse_retry_after(built)
    assert delay is None or (math.isfinite(delay) and delay >= 0)


async def test_missing_required_argument_is_refused_before_sending() -> None:
    """A request the anthropic SDK cannot bind is refused without a connection attempt."""
    provider = anthropic_adapter.AnthropicProvider(
        "a", api_key=SECRET, base_url="http://127.0.0.1:9"
    )
    try:
        with pytest.raises(PermanentError) as caught:
            await provider.call("claude-x", {"messages": [{"role": "user", "content": "hi"}]})
    finally:
        await provider.aclose()
    assert caught.value.reason == "refused"
    assert isinstance(caught.value.__cause__, TypeError)


async def test_openai_missing_required_argument_is_refused_before_sending() -> None:
    """A request the openai SDK cannot bind is refused without a connection attempt."""
    provider = openai_adapter.OpenAIProvider("o", api_key=SECRET, base_url="http://127.0.0.1:9/v1")
    try:
        with pytest.raises(PermanentError) as caught:
            await provider.call("gpt-x", {"max_tokens": 5}, probe=True)
    finally:
        await provider.aclose()
    assert caught.value.reason == "refused"
    assert isinstance(caught.value.__cause__, TypeError)


async def test_nonstreaming_request_too_long_for_the_sdk_is_refused() -> None:
    """A non-streaming request the anthropic SDK says needs streaming is refused before sending."""
    provider = anthropic_adapter.AnthropicProvider(
        "a", api_key=SECRET, base_url="http://127.0.0.1:9"
    )
    request = {"max_tokens": 128_000, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with pytest.raises(PermanentError) as caught:
            await provider.call("claude-x", request)
    finally:
        await provider.aclose()
    assert caught.value.reason == "refused"
    assert isinstance(caught.value.__cause__, ValueError)


async def test_unreachable_server_is_a_connection_error() -> None:
    """A refused TCP connection is a transient connection error for both adapters."""
    providers: list[Provider] = [
        anthropic_adapter.AnthropicProvider("a", api_key=SECRET, base_url="http://127.0.0.1:9"),
        openai_adapter.OpenAIProvider("o", api_key=SECRET, base_url="http://127.0.0.1:9/v1"),
    ]
    request = {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for provider in providers:
        try:
            with pytest.raises(TransientError) as caught:
                await provider.call("m", request)
        finally:
            await provider.aclose()
        assert caught.value.reason == "connection"
        assert SECRET not in str(caught.value)
