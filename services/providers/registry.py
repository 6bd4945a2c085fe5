"""Build the provider adapters the settings describe."""

from __future__ import annotations

import logging

from services.config import Settings
from services.errors import ConfigError
from services.providers.base import Provider
from services.secrets import register_settings

log = logging.getLogger("ridethrough.providers")


def build_provider(settings: Settings, name: str) -> Provider | None:
    """The adapter for provider ``name``, or ``None`` when it has no credentials.

    An OpenAI-compatible endpoint with a ``base_url`` (vLLM, Ollama, a local
    server) needs no real key; every other provider does.
    """
    if name not in settings.providers:
        raise ConfigError(f"unknown provider {name!r}; configured: {sorted(settings.providers)}")
    p = settings.providers[name]
    key = settings.provider_key(name)
    # Every process that calls a provider comes here: from now on its logs and
    # error messages hide this key, and every other secret the settings hold.
    register_settings(settings)
    if key is None:
        if p.kind == "openai" and p.base_url:
            key = "unused"
        else:
            return None
    adapter: type[Provider]
    if p.kind == "anthropic":
        from services.providers.anthropic import AnthropicProvider as adapter
    else:
        from services.providers.openai import OpenAIProvider as adapter
    return adapter(  # type: ignore[call-arg]  # both adapters take these keywords
        name,
        api_key=key,
        base_url=p.base_url,
        timeout_s=p.timeout_s,
        deadline_s=p.deadline_s,
        max_connections=p.max_connections,
    )


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
