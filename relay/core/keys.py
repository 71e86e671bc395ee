"""Spool keys as the operator holds them: one line of base64 for 32 random bytes, named by a short id.

The id is derived from the key (a hash, not the key), so a record can say which key sealed it and a
relay started with the wrong key can name the one it is missing without ever printing a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

KEY_BYTES = 32  # AES-256
KEY_ID_BYTES = 4  # 8 hex digits: enough to tell an operator's handful of keys apart


def parse_key(text: str) -> bytes:
    """The 32 bytes of a key file's base64 line; ValueError saying what is wrong (never the key)."""
    line = text.strip()
    try:
        key = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64 (generate a key with `relay keygen`)") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"holds {len(key)} bytes, not {KEY_BYTES} (generate a key with `relay keygen`)")
    return key


def encode_key(key: bytes) -> str:
    """What `relay keygen` prints: one line of base64."""
    return base64.b64encode(key).decode()


def key_id_bytes(key: bytes) -> bytes:
    """The id stored with every record the key seals."""
    return hashlib.sha256(b"relay spool key id\0" + key).digest()[:KEY_ID_BYTES]


def key_id(key: bytes) -> str:
    """The id as logs and errors show it (8 hex digits)."""
    return key_id_bytes(key).hex()


def derive(key: bytes, purpose: str) -> bytes:
    """A separate key for another purpose (the address hash), so one secret never serves two uses."""
    return hmac.new(key, b"relay derive\0" + purpose.encode(), hashlib.sha256).digest()
