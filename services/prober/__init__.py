"""The prober: health probes for providers that are not closed, and open → half_open."""

from services.prober.prober import Prober, default_probe

__all__ = ["Prober", "default_probe"]
