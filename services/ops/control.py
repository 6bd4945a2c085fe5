"""An operator's hand on a provider: pause and resume it (KV ``ai_control``), and the
checks made before acting on a provider.

A pause is a key in the control bucket; the breaker reads it like an open state that
no probe can end. Both actions are written to ``ai.events.ops``.
"""

from __future__ import annotations

from nats.js import JetStreamContext

from schemas import subjects as s
from schemas.codec import encode
from schemas.health import Pause
from services.breaker import paused_key
from services.config import Settings
from services.errors import ConfigError, RidethroughError
from services.ops.audit import audit, operator
from services.ops.status import collect_status

#: The breaker states in which a provider's jobs stay parked once drained.
HOLDING_STATES = ("paused", "open")


def check_provider(settings: Settings, provider: str | None) -> None:
    """``ConfigError`` unless ``provider`` is None or one of the configured providers."""
    if provider is not None and provider not in settings.providers:
        raise ConfigError(
            f"unknown provider {provider!r}; configured: {', '.join(sorted(settings.providers))}"
        )


async def pause(js: JetStreamContext, provider: str, reason: str) -> None:
    """Stop calling ``provider``: its jobs park, and no probe can end the pause."""
    kv = await js.key_value(s.CONTROL_BUCKET)
    await kv.put(paused_key(provider), encode(Pause(reason=reason, by=operator())))
    await audit(js, "pause", provider=provider, filters={"reason": reason})


async def resume(js: JetStreamContext, provider: str) -> bool:
    """End a pause of ``provider`` (the breaker decides again); whether it was paused."""
    kv = await js.key_value(s.CONTROL_BUCKET)
    try:
        entry = await kv.get(paused_key(provider))
        was = bool(entry.value)
    except Exception:
        was = False
    if was:
        await kv.delete(paused_key(provider))
    await audit(js, "resume", provider=provider, counts={"was_paused": int(was)})
    return was


async def check_holding(js: JetStreamContext, settings: Settings, provider: str) -> None:
    """``RidethroughError`` unless ``provider`` is paused or open: jobs drained from a
    provider in any other state would be replayed at once."""
    state = (await collect_status(js, settings))["providers"][provider]["state"]
    if state not in HOLDING_STATES:
        raise RidethroughError(
            f"{provider} is {state}: drained jobs would be replayed at once; "
            f"run `ridethrough pause {provider}` first"
        )
