"""Gateway API keys: who is calling, as a tenant.

A key is never kept in clear: the settings and the keys file hold its SHA-256 hex digest,
and a presented key is hashed and looked up. Make a digest with
``printf %s "$KEY" | sha256sum``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from schemas.subjects import is_token
from services.config import GatewaySettings
from services.errors import ConfigError


def key_digest(key: str) -> str:
    """The SHA-256 hex digest a gateway key is stored as."""
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys_file(path: Path) -> dict[str, str]:
    """Digest -> tenant from a file of ``<sha256-hex> <tenant>`` lines (blank lines and
    ``#`` comments skipped). ``ConfigError`` names the first bad line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the gateway keys file {path}: {exc}") from exc
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        digest = parts[0].lower()
        if (
            len(parts) != 2
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
            or not is_token(parts[1])
        ):
            raise ConfigError(
                f"{path}:{number}: expected '<sha256-hex> <tenant>' (the key's digest, never "
                "the key), the tenant a subject token"
            )
        keys[digest] = parts[1]
    return keys


class KeyRing:
    """The gateway's keys: a presented key's tenant, or none."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._tenants = dict(digests)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> KeyRing:
        """The keys of ``settings.keys`` and of ``settings.keys_file`` (the file wins)."""
        keys = dict(settings.keys)
        if settings.keys_file is not None:
            keys.update(read_keys_file(settings.keys_file))
        return cls(keys)

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant(self, key: str | None) -> str | None:
        """The tenant of ``key``, or ``None`` for a missing or unknown key."""
        if not key:
            return None
        # A dict lookup of the digest: what timing could reveal is the digest's prefix,
        # which says nothing usable about any key.
        return self._tenants.get(key_digest(key))
