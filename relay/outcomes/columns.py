"""How the history's sensitive columns are stored: each value as bytes, sealed with the spool's keys when
`spool.encryption_key_file` is set, and beside an address or a Message-ID the key it is searched by.

Every stored value starts with one byte that says what follows:

    p | the text as UTF-8                                            (no spool key: in the clear)
    s | key id (4) | nonce (12, fresh random bytes from os.urandom) | AES-256-GCM ciphertext and tag (16)

The associated data is the value's first 17 bytes, its column ("recipients.address") and its message's
queue id, so a value copied into another column or another message's row does not open. The keys and their
ids are the spool's (relay/core/keys.py; AESGCM from `cryptography`, as relay/store/sealing.py uses): a
value names the key that sealed it, so after a rotation the old key in `spool.old_key_files` still reads it.

A sealed address or Message-ID is found by a search key: `h` and 32 hex digits of HMAC-SHA256 under a key
derived from the spool key (an address lower-cased first). The same text always gives the same search key
under one spool key, and without the key a list of likely addresses cannot be hashed and matched. After a
rotation a lookup asks for the key under every configured key, and the text itself (a value written before
encryption was turned on).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.core.keys import derive, key_id_bytes
from relay.store.sealing import MissingKeyError, SealError, UnknownKeyError

PLAIN, SEALED = b"p", b"s"
NONCE = 12
HEAD = 1 + 4 + NONCE  # the kind byte, the key id, the nonce
ADDRESS, MESSAGE_ID = "address", "message-id"  # what a search key is of


class Columns:
    """The codec the store passes every sensitive value through: in the clear (no spool key)."""

    width = 1  # how many keys `searches` gives
    key_ids: tuple[str, ...] = ()

    def seal(self, column: str, identity: str, value: bytes) -> bytes:
        """`value` as stored in `column` of the row(s) of message `identity`."""
        return PLAIN + value

    def open(self, column: str, identity: str, stored: bytes) -> bytes:
        if stored[:1] == PLAIN:
            return bytes(stored[1:])
        raise self.unknown(stored)

    def seal_text(self, column: str, identity: str, value: str) -> bytes:
        """A text that UTF-8 cannot carry (a lone surrogate: a server's reply in another charset, decoded with
        surrogateescape) is stored with "?" there, rather than never."""
        return self.seal(column, identity, value.encode("utf-8", "replace"))

    def open_text(self, column: str, identity: str, stored: bytes | None) -> str:
        return "" if stored is None else self.open(column, identity, stored).decode()

    def search(self, kind: str, text: str) -> str:
        """The search key written beside a new value."""
        return text.lower() if kind == ADDRESS else text

    def searches(self, kind: str, text: str) -> tuple[str, ...]:
        """Every search key a stored value of `text` may carry."""
        return (self.search(kind, text),)

    def key_id(self, stored: bytes) -> str | None:
        """The id of the key that sealed a stored value (None: in the clear); SealError if damaged."""
        if stored[:1] == PLAIN:
            return None
        if stored[:1] != SEALED or len(stored) < HEAD + 16:
            raise SealError("a history value that is neither plain nor sealed: damaged")
        return bytes(stored[1:5]).hex()

    def is_current(self, stored: bytes | None) -> bool:
        """Whether a stored value is as this codec would write it now (`queue rekey` leaves it)."""
        return stored is None or stored[:1] == PLAIN

    def unknown(self, stored: bytes) -> SealError:
        key = self.key_id(stored)
        return UnknownKeyError(key) if key else SealError("damaged")

    def check(self, found: Sequence[bytes]) -> None:
        """MissingKeyError (a config error) naming each key id among `found` values that is not configured."""
        missing = sorted({key for value in found if (key := self.key_id(value)) and key not in self.key_ids})
        if missing:
            held = f"the keys configured ({', '.join(self.key_ids)})" if self.key_ids else "no spool key"
            raise MissingKeyError(
                f"spool.encryption_key_file: the message history holds values sealed with key id {', '.join(missing)}"
                f", and there is {held}; add the key file with that id to spool.old_key_files"
            )


class SealedColumns(Columns):
    """Values sealed with the current spool key; any configured key opens a value that names it."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        self._current = key_id_bytes(keys[0])
        self._aead = {key_id_bytes(key): AESGCM(key) for key in keys}
        # HMAC-SHA256 under each key, its key schedule done once (a copy per hash is a third cheaper)
        self._search = [hmac.new(derive(key, "history search"), digestmod=hashlib.sha256) for key in keys]
        self.key_ids = tuple(key_id_bytes(key).hex() for key in keys)
        self.width = len(keys) + 1
        self._sealing, self._head, self._nonces = self._aead[self._current], SEALED + self._current, b""

    def seal(self, column: str, identity: str, value: bytes) -> bytes:
        if len(self._nonces) < NONCE:  # drawn from the OS in bulk: one system call per 256 values, not per value
            self._nonces = os.urandom(NONCE * 256)
        nonce, self._nonces = self._nonces[:NONCE], self._nonces[NONCE:]
        head = self._head + nonce
        return head + self._sealing.encrypt(nonce, value, head + _column(column) + identity.encode())

    def open(self, column: str, identity: str, stored: bytes) -> bytes:
        if stored[:1] == PLAIN:
            return bytes(stored[1:])  # written before encryption was turned on
        key = self.key_id(stored)
        aead = self._aead.get(bytes.fromhex(key or ""))
        if aead is None:
            raise self.unknown(stored)
        head = bytes(stored[:HEAD])
        try:
            return aead.decrypt(head[5:], bytes(stored[HEAD:]), head + _column(column) + identity.encode())
        except InvalidTag:
            raise SealError(f"{column} of {identity}: authentication failed (damaged or tampered with)") from None

    def search(self, kind: str, text: str) -> str:
        return _hash(self._search[0], kind, text)

    def searches(self, kind: str, text: str) -> tuple[str, ...]:
        return (*(_hash(key, kind, text) for key in self._search), super().search(kind, text))

    def is_current(self, stored: bytes | None) -> bool:
        return stored is None or (stored[:1] == SEALED and bytes(stored[1:5]) == self._current)


@functools.cache
def _column(column: str) -> bytes:
    """The column's part of the associated data (after the value's head, before the queue id)."""
    return b"\0" + column.encode() + b"\0"


def _hash(keyed: hmac.HMAC, kind: str, text: str) -> str:
    mac = keyed.copy()
    mac.update(f"{kind}\0{text.lower() if kind == ADDRESS else text}".encode())
    return "h" + mac.digest()[:16].hex()


def columns_for(keys: Sequence[bytes]) -> Columns:
    """The codec for the spool keys given (current first); none: values in the clear."""
    return SealedColumns(keys) if keys else Columns()
