"""Build the provider adapters the settings describe."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import SecretStr

from services.config import ProviderSettings, Settings
from services.errors import ConfigError
from services.providers.base import Provider
from services.secrets import register_settings

log = logging.getLogger("ridethrough.providers")


def build_provider(settings: Settings, name: str) -> Provider | None:
    """The adapter for provider ``name``, or ``None`` when it has no credentials.

    An endpoint with a ``base_url`` of kind ``openai`` or ``anthropic`` (vLLM, Ollama, an
    in-house server) needs no real key; a Bedrock or Vertex door finds its cloud's
    credentials itself (``services.providers.clouds``); every other provider needs a key.
    """
    if name not in settings.providers:
        raise ConfigError(f"unknown provider {name!r}; configured: {sorted(settings.providers)}")
    p = settings.providers[name]
    key = settings.provider_key(name)
    # Every process that calls a provider comes here: from now on its logs and
    # error messages hide this key, and every other secret the settings hold.
    register_settings(settings)
    common: dict[str, Any] = {
        "base_url": p.base_url,
        "timeout_s": p.timeout_s,
        "deadline_s": p.deadline_s,
        "max_connections": p.max_connections,
        "model_map": p.model_map,
    }
    if p.kind in ("anthropic-bedrock", "anthropic-vertex"):
        return _cloud(name, p, key, common)
    if key is None:
        if p.base_url:
            key = "unused"
        else:
            return None
    adapter: type[Provider]
    if p.kind == "anthropic":
        from services.providers.anthropic import AnthropicProvider as adapter
    else:
        from services.providers.openai import OpenAIProvider as adapter
    return adapter(name, api_key=key, **common)  # type: ignore[call-arg]  # both take these


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _cloud(name: str, p: ProviderSettings, key: str | None, common: dict[str, Any]) -> Provider:
    """A Bedrock or Vertex door (its client finds the cloud's credentials)."""
    from services.providers.clouds import BedrockProvider, VertexProvider

    try:
        if p.kind == "anthropic-bedrock":
            return BedrockProvider(
                name,
                api_key=key,  # a Bedrock API key (bearer), if given; else SigV4
                aws_region=p.aws_region,
                aws_profile=p.aws_profile,
                aws_access_key=_secret(p.aws_access_key_id),
                aws_secret_key=_secret(p.aws_secret_access_key),
                aws_secret_access_key_file=p.aws_secret_access_key_file,
                aws_session_token=_secret(p.aws_session_token),
                **common,
            )
        options: dict[str, Any] = {
            "access_token": _secret(p.gcp_access_token),
            "access_token_file": p.gcp_access_token_file,
        }
        if p.gcp_region is not None:
            options["region"] = p.gcp_region
        if p.gcp_project_id is not None:
            options["project_id"] = p.gcp_project_id
        return VertexProvider(name, api_key=None, **options, **common)
    except ValueError as exc:  # the SDK's own refusals: no region, no project, both creds
        raise ConfigError(f"provider of kind {p.kind}: {exc}") from exc


def build_providers(settings: Settings, only: list[str] | None = None) -> dict[str, Provider]:
    """Adapters for every configured provider that has credentials (or those in ``only``).

    Raises ``ConfigError`` when none is usable: a worker with nothing to call is a mistake.
    """
    names = only or sorted(settings.providers)
    out: dict[str, Provider] = {}
    for name in names:
        provider = build_provider(settings, name)
        if provider is None:
            log.warning("provider %s has no API key; this worker will not serve it", name)
            continue
        out[name] = provider
    if not out:
        raise ConfigError(
            "no provider has credentials: set ANTHROPIC_API_KEY or OPENAI_API_KEY "
            "(or run `ridethrough dev`, which starts the fake provider)"
        )
    return out
