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


def check_model(model: str | None) -> None:
    """``ConfigError`` unless ``model`` is None or a name that can have a breaker of its own."""
    if model is not None and s.scope_model(model) is None:
        raise ConfigError(f"model {model!r} cannot have a breaker of its own (too long)")


async def pause(js: JetStreamContext, provider: str, reason: str, model: str | None = None) -> None:
    """Stop calling ``provider`` (or only its ``model``): its jobs park, and no probe can
    end the pause."""
    kv = await js.key_value(s.CONTROL_BUCKET)
    await kv.put(paused_key(provider, model), encode(Pause(reason=reason, by=operator())))
    filters = {"reason": reason, **({"model": model} if model else {})}
    await audit(js, "pause", provider=provider, filters=filters)


async def resume(js: JetStreamContext, provider: str, model: str | None = None) -> bool:
    """End a pause of ``provider`` (or of its ``model``): the breaker decides again;
    whether it was paused."""
    kv = await js.key_value(s.CONTROL_BUCKET)
    key = paused_key(provider, model)
    try:
        entry = await kv.get(key)
        was = bool(entry.value)
    except Exception:
        was = False
    if was:
        await kv.delete(key)
    filters = {"model": model} if model else {}
    await audit(js, "resume", provider=provider, filters=filters, counts={"was_paused": int(was)})
    return was


async def check_holding(
    js: JetStreamContext, settings: Settings, provider: str, model: str | None = None
) -> None:
    """``RidethroughError`` unless ``provider`` (or, with ``model``, the provider or that
    model) is paused or open: jobs drained in any other state would be replayed at once."""
    p = (await collect_status(js, settings))["providers"][provider]
    state = p["state"]
    if model is not None and state not in HOLDING_STATES:
        state = p["models"].get(model, {}).get("state", "closed")
    if state not in HOLDING_STATES:
        scope = s.scope_label(provider, model)
        flag = f" --model {model}" if model else ""
        raise RidethroughError(
            f"{scope} is {state}: drained jobs would be replayed at once; "
            f"run `ridethrough pause {provider}{flag}` first"
        )
