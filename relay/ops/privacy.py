"""The process's privacy.redact in force: the log processor and `relay queue list` show addresses through
it. One process-wide setting, as the logging configuration itself is; each Relay (and each reload) sets it."""

from __future__ import annotations

from relay.config import Settings
from relay.core.redaction import AddressHasher

_hasher: AddressHasher | None = None


def configure(settings: Settings) -> None:
    global _hasher
    key = settings.address_hash_key() if settings.privacy.redact else None
    _hasher = AddressHasher(key) if key is not None else None


def hasher() -> AddressHasher | None:
    """The hasher while privacy.redact is on, else None."""
    return _hasher


def shown(address: str) -> str:
    """An address as logs and listings may show it."""
    return _hasher.address(address) if _hasher is not None and address else address
