"""The fake LLM provider: a real HTTP server speaking the Anthropic and OpenAI wire protocols
(``server.py``), for drills (``ridethrough fake-provider``) and tests."""

from services.tools.fake.server import (
    DEFAULT_MODELS,
    PROVIDER_KEY,
    FakeProvider,
    FakeProviderThread,
    FaultConfig,
    OutageStatus,
    build_app,
    config_from_options,
    parse_error_mix,
    parse_outage,
    run_in_thread,
    serve,
)

__all__ = [
    "DEFAULT_MODELS",
    "PROVIDER_KEY",
    "FakeProvider",
    "FakeProviderThread",
    "FaultConfig",
    "OutageStatus",
    "build_app",
    "config_from_options",
    "parse_error_mix",
    "parse_outage",
    "run_in_thread",
    "serve",
]
