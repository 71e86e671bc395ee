"""Inbound AUTH passwords stored as scrypt hashes, in one text form: `scrypt$N$r$p$<salt>$<hash>` (base64).

Pure: the caller brings the salt (`relay hash-password` draws it) and runs a check off the event loop (one costs
about 0.15 s and 32 MiB with the default N). A config that leaks then gives an attacker no password to try.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

SCRYPT_N = 2**15  # CPU and memory cost: 128 * N * r bytes (32 MiB)
SCRYPT_R = 8
SCRYPT_P = 1
MIN_N = 2**14  # weaker stored hashes are refused: they would be cheap to guess from a leaked config
_MAXMEM = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PasswordHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def __str__(self) -> str:
        salt, digest = (base64.b64encode(part).decode("ascii") for part in (self.salt, self.digest))
        return f"scrypt${self.n}${self.r}${self.p}${salt}${digest}"


def hash_password(password: str, salt: bytes, n: int = SCRYPT_N) -> str:
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM, dklen=32)
    return str(PasswordHash(n, SCRYPT_R, SCRYPT_P, salt, digest))


def parse_password_hash(text: str) -> PasswordHash:
    """The stored form, or ValueError saying what is wrong with it (never echoing it: it is a secret)."""
    parts = text.strip().split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a password hash from `relay hash-password` (scrypt$N$r$p$salt$hash)")
    try:
        n, r, p = (int(part) for part in parts[1:4])
        salt, digest = (base64.b64decode(part, validate=True) for part in parts[4:6])
    except (ValueError, binascii.Error):
        raise ValueError("a malformed scrypt hash: make a new one with `relay hash-password`") from None
    if n < MIN_N or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or len(salt) < 16 or len(digest) < 16:
        raise ValueError(f"scrypt parameters too weak or invalid (N is a power of 2 of at least {MIN_N})")
    if 128 * n * r > _MAXMEM:
        raise ValueError("scrypt parameters need more memory than the relay allows (256 MiB)")
    return PasswordHash(n, r, p, salt, digest)


def password_matches(stored: PasswordHash, password: bytes) -> bool:
    """In constant time for a given hash."""
    computed = hashlib.scrypt(
        password, salt=stored.salt, n=stored.n, r=stored.r, p=stored.p, maxmem=_MAXMEM, dklen=len(stored.digest)
    )
    return hmac.compare_digest(computed, stored.digest)
