"""The Anthropic Messages API through a cloud's door: Amazon Bedrock and Google Vertex AI.

``BedrockProvider`` and ``VertexProvider`` are ``AnthropicProvider`` over the official
SDK's own clients (``AsyncAnthropicBedrock``, ``AsyncAnthropicVertex``), so a request
goes out as the SDK sends it to that cloud: the model in the path, ``anthropic_version``
in the body, AWS SigV4 or a Google bearer token. Their extra dependencies (``boto3`` /
``botocore``; ``google-auth``) are the package extras ``bedrock`` and ``vertex``, imported
only when such a provider is built.

Credentials, the way each cloud's users expect them:

* Bedrock: the AWS credential chain (environment, ``~/.aws``, a profile, the instance or
  pod role) and region, unless keys are given in the settings (or the secret key in a
  file); a Bedrock API key (bearer) in ``api_key`` / ``api_key_file`` instead.
* Vertex: Google application default credentials, project and region, unless an access
  token is given (``gcp_access_token``, or ``gcp_access_token_file``, read when the provider is
  built: a short-lived token suits drills and tests, ADC suits production).

Each door's errors are the SDK's exception classes with the cloud's own body: the
tables below read what the cloud says (``x-amzn-errortype``, a Google ``status``) before
the shared Anthropic rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import anthropic

from services.errors import ConfigError, PermanentError, ProviderError, RateLimited, TransientError
from services.providers.anthropic import TABLE as ANTHROPIC_TABLE
from services.providers.anthropic import AnthropicProvider
from services.providers.classify import Predicate, Table, classify_with


def _needs(module: str, extra: str, kind: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"provider kind {kind} needs the {extra!r} extra: pip install 'ridethrough[{extra}]'"
        )


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def _named(module: str, *names: str) -> Predicate:
    """An exception of class ``module.<name>`` (or a subclass), without importing
    ``module``: the cloud libraries are optional."""

    def match(exc: BaseException) -> bool:
        return any(c.__module__ == module and c.__name__ in names for c in type(exc).__mro__)

    return match


# -- Bedrock ----------------------------------------------------------------------------


def _aws_error(*names: str) -> Predicate:
    """An error response whose ``x-amzn-errortype`` names one of ``names``
    (``ThrottlingException:http://internal.amazon.com/coral/...``)."""

    def match(exc: BaseException) -> bool:
        if not isinstance(exc, anthropic.APIStatusError) or exc.status_code == 200:
            return False
        kind = exc.response.headers.get("x-amzn-errortype", "").split(":")[0]
        return kind in names

    return match


def _aws_midstream(*codes: str) -> Predicate:
    """An exception frame inside a Bedrock event stream: the SDK raises it as an ``error``
    event whose ``error.type`` is the frame's ``:exception-type`` (``throttlingException``)."""
    lowered = {c.lower() for c in codes}

    def match(exc: BaseException) -> bool:
        kind = getattr(exc, "type", None)
        return (
            isinstance(exc, anthropic.APIStatusError)
            and exc.status_code == 200
            and isinstance(kind, str)
            and kind.lower() in lowered
        )

    return match


_BOTO = "botocore.exceptions"

BEDROCK_TABLE: Table = (
    # when                                                          outcome         reason
    (_named(_BOTO, "NoCredentialsError", "PartialCredentialsError", "NoRegionError",
            "ProfileNotFound"),                                     PermanentError, "config"),
    (_named(_BOTO, "EndpointConnectionError", "ConnectionError"),   TransientError, "connection"),
    (_aws_error("ThrottlingException"),                             RateLimited,    "rate_limited"),
    # The model is being loaded (on-demand capacity): it will be, soon.
    (_aws_error("ModelNotReadyException"),                      TransientError, "model_not_ready"),
    (_aws_error("ServiceUnavailableException"),                     TransientError, "overloaded"),
    (_aws_error("ModelTimeoutException"),                           TransientError, "timeout"),
    (_aws_error("ModelErrorException", "InternalServerException"),  TransientError, "server_error"),
    (_aws_error("ServiceQuotaExceededException"),                   PermanentError, "quota"),
    (_aws_error("AccessDeniedException",
                "UnrecognizedClientException"),                     PermanentError, "auth"),
    (_aws_error("ResourceNotFoundException"),                       PermanentError, "not_found"),
    (_aws_error("ValidationException"),                         PermanentError, "invalid_request"),
    (_aws_midstream("throttlingException"),                         RateLimited,    "rate_limited"),
    (_aws_midstream("serviceUnavailableException"),                 TransientError, "overloaded"),
    (_aws_midstream("modelTimeoutException"),                       TransientError, "timeout"),
    (_aws_midstream("modelStreamErrorException",
                    "internalServerException"),                     TransientError, "server_error"),
    (_aws_midstream("validationException"),                     PermanentError, "invalid_request"),
    *ANTHROPIC_TABLE,
)  # fmt: skip


def classify_bedrock(exc: BaseException) -> ProviderError:
    """Translate an exception of the Bedrock client into a ``ProviderError``."""
    return classify_with(BEDROCK_TABLE, exc)


# -- Vertex -----------------------------------------------------------------------------


def _google_status(*statuses: str) -> Predicate:
    """An error response whose Google ``error.status`` is one of ``statuses``
    (``{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", ...}}``)."""

    def match(exc: BaseException) -> bool:
        if not isinstance(exc, anthropic.APIStatusError):
            return False
        body = exc.body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(body, list) and body and isinstance(body[0], dict):
            error = body[0].get("error")  # Vertex sometimes wraps it in a list
        return isinstance(error, dict) and error.get("status") in statuses

    return match


def _billing_disabled(exc: BaseException) -> bool:
    """A 403 saying billing is off for the project: a human must act."""
    if not isinstance(exc, anthropic.APIStatusError) or exc.status_code != 403:
        return False
    return "billing" in str(exc.body).lower()


_GAUTH = "google.auth.exceptions"

VERTEX_TABLE: Table = (
    # when                                                          outcome         reason
    (_named(_GAUTH, "DefaultCredentialsError"),                     PermanentError, "config"),
    (_named(_GAUTH, "TransportError"),                              TransientError, "connection"),
    # A token that could not be refreshed: the metadata server or the token endpoint away.
    (_named(_GAUTH, "RefreshError"),                                TransientError, "auth_refresh"),
    # Vertex's per-project quota (requests or tokens per minute): slow down, as a 429.
    (_google_status("RESOURCE_EXHAUSTED"),                          RateLimited,    "rate_limited"),
    (_billing_disabled,                                             PermanentError, "quota"),
    (_google_status("UNAVAILABLE"),                                 TransientError, "overloaded"),
    (_google_status("DEADLINE_EXCEEDED"),                           TransientError, "timeout"),
    (_google_status("PERMISSION_DENIED", "UNAUTHENTICATED"),        PermanentError, "auth"),
    (_google_status("NOT_FOUND"),                                   PermanentError, "not_found"),
    (_google_status("INVALID_ARGUMENT", "FAILED_PRECONDITION"), PermanentError, "invalid_request"),
    *ANTHROPIC_TABLE,
)  # fmt: skip


def classify_vertex(exc: BaseException) -> ProviderError:
    """Translate an exception of the Vertex client into a ``ProviderError``."""
    return classify_with(VERTEX_TABLE, exc)


# -- the adapters -----------------------------------------------------------------------


class BedrockProvider(AnthropicProvider):
    """The Messages API on Amazon Bedrock, through ``AsyncAnthropicBedrock``."""

    kind = "anthropic-bedrock"
    classify = staticmethod(classify_bedrock)

    def _make_client(self, **options: Any) -> Any:
        _needs("botocore", "bedrock", self.kind)
        from anthropic import AsyncAnthropicBedrock

        secret_file = options.pop("aws_secret_access_key_file", None)
        if secret_file is not None and options.get("aws_secret_key") is None:
            options["aws_secret_key"] = _read(secret_file, "aws_secret_access_key_file")
        return AsyncAnthropicBedrock(**options)


class VertexProvider(AnthropicProvider):
    """The Messages API on Google Vertex AI, through ``AsyncAnthropicVertex``."""

    kind = "anthropic-vertex"
    classify = staticmethod(classify_vertex)

    def _make_client(self, **options: Any) -> Any:
        options.pop("api_key", None)
        token_file = options.pop("access_token_file", None)
        if token_file is not None and options.get("access_token") is None:
            options["access_token"] = _read(token_file, "gcp_access_token_file")
        if options.get("access_token") is None:
            _needs("google.auth", "vertex", self.kind)  # application default credentials
        from anthropic import AsyncAnthropicVertex

        return AsyncAnthropicVertex(**options)
