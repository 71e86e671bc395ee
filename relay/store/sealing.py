"""Encryption at rest: AES-256-GCM (the `cryptography` package) around every record the spool writes that
carries message data, so a copied disk, backup or volume snapshot shows no address, header or body.

A sealed blob is a 28-byte header and the ciphertext (with GCM's 16-byte tag):

    magic "RSL1" | key id (4) | nonce (12, fresh from os.urandom for every blob) | ciphertext length (4)
    | crc32 of the 24 bytes before it

The header is authenticated too (it is part of the associated data), and so is the record's identity:
its kind (envelope, body, state, dead) and its queue id. A blob moved to another message or to another
kind of record does not open. The header's crc32 tells a damaged header (reported like any damaged
record) from a key id that is really not configured (a config error at start-up, naming the id).

A message is two blobs, its envelope and its body, so listing the queue or scanning it at start-up opens
the small envelope and never decrypts a body.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.config import ConfigError, SpoolSettings
from relay.core.keys import KEY_BYTES, encode_key, key_id_bytes

MAGIC = b"RSL1"
HEADER = struct.Struct(">4s4s12sII")  # magic, key id, nonce, ciphertext length, crc32 of the rest
NONCE_BYTES = 12
TAG_BYTES = 16
ENVELOPE, BODY, STATE, DEAD_STATE = b"envelope", b"body", b"state", b"dead"


class SealError(ValueError):
    """A sealed record that does not open: damaged or tampered with (or sealed for another queue id)."""


class UnknownKeyError(SealError):
    """Sealed with a key this relay was not given."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"sealed with key id {key_id}, which is not configured")
        self.key_id = key_id


class MissingKeyError(ConfigError):
    """The spool holds records sealed with keys the config does not name: start-up stops before touching it."""


@dataclass(frozen=True, slots=True)
class BlobHead:
    key_id: str
    end: int  # offset just past the blob


def is_sealed(data: bytes | memoryview) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def peek(data: bytes | memoryview, offset: int = 0) -> BlobHead:
    """The key id and extent of the blob whose header is at `offset` (only the header need be there),
    without decrypting; SealError if the header is damaged."""
    if len(data) < offset + HEADER.size:
        raise SealError("truncated header")
    magic, key, _, length, crc = HEADER.unpack_from(data, offset)
    if magic != MAGIC or zlib.crc32(data[offset : offset + HEADER.size - 4]) != crc:
        raise SealError("damaged header")
    return BlobHead(bytes(key).hex(), offset + HEADER.size + length)


def _identity(kind: bytes, queue_id: str) -> bytes:
    return b"\0" + kind + b"\0" + queue_id.encode()


class Sealer:
    """The configured keys: new blobs are sealed with the first (current) one; any of them opens a blob
    that names it. One instance is shared by the event loop's threads (AESGCM objects are stateless)."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key")
        self._current = key_id_bytes(keys[0])
        self._aead = {key_id_bytes(key): AESGCM(key) for key in reversed(keys)}
        self.current_id = self._current.hex()
        self.key_ids = tuple(key_id_bytes(key).hex() for key in keys)

    def seal(self, kind: bytes, queue_id: str, data: bytes | memoryview) -> tuple[bytes, bytes]:
        """(header, ciphertext) of one blob: written one after the other, they are the blob."""
        nonce = os.urandom(NONCE_BYTES)
        first = struct.pack(">4s4s12sI", MAGIC, self._current, nonce, len(data) + TAG_BYTES)
        head = first + struct.pack(">I", zlib.crc32(first))
        return head, self._aead[self._current].encrypt(nonce, data, head + _identity(kind, queue_id))

    def open(self, kind: bytes, queue_id: str, data: bytes | memoryview, offset: int = 0) -> tuple[bytes, int]:
        """The plaintext of the blob at `offset` and the offset after it. SealError if it does not open."""
        head = peek(data, offset)
        if len(data) < head.end:
            raise SealError("truncated")
        aead = self._aead.get(bytes.fromhex(head.key_id))
        if aead is None:
            raise UnknownKeyError(head.key_id)
        header = bytes(data[offset : offset + HEADER.size])
        try:
            plain = aead.decrypt(
                header[8:20], data[offset + HEADER.size : head.end], header + _identity(kind, queue_id)
            )
        except InvalidTag:
            raise SealError("authentication failed: the record was damaged or tampered with") from None
        return plain, head.end

    def seal_message(self, queue_id: str, envelope_line: bytes, body: Sequence[bytes | memoryview]) -> list[bytes]:
        """A stored message: the envelope blob, then the body blob (four parts to write in order)."""
        data = body[0] if len(body) == 1 else b"".join(body)
        return [*self.seal(ENVELOPE, queue_id, envelope_line), *self.seal(BODY, queue_id, data)]

    def open_envelope(self, queue_id: str, data: bytes | memoryview, offset: int = 0) -> tuple[bytes, int]:
        return self.open(ENVELOPE, queue_id, data, offset)

    def open_message(self, queue_id: str, data: bytes | memoryview, offset: int = 0) -> tuple[bytes, bytes]:
        """(envelope line, body) of a stored message."""
        line, end = self.open(ENVELOPE, queue_id, data, offset)
        body, _ = self.open(BODY, queue_id, data, end)
        return line, body


def new_key() -> str:
    """What `relay keygen` prints: 32 bytes from the OS's CSPRNG, as one line of base64."""
    return encode_key(os.urandom(KEY_BYTES))


def sealer_for(settings: SpoolSettings) -> Sealer | None:
    """The spool's sealer, or None when spool.encryption_key_file is not set."""
    keys = settings.encryption_keys
    return Sealer(keys) if keys else None
