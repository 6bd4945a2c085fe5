"""The replayer: parked jobs back to AI_JOBS once their provider recovers, at a safe pace."""

from services.replayer.replayer import Replayer

__all__ = ["Replayer"]
