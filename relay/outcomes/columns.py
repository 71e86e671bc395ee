"""How the history's sensitive columns are stored: each value as bytes, and beside an address or a
Message-ID the key it is searched by.

Every stored value starts with one byte that says what follows: `p` and the text as UTF-8. Search keys are
the text itself (an address lower-cased: addresses compare without case).
"""

from __future__ import annotations

PLAIN = b"p"
ADDRESS, MESSAGE_ID = "address", "message-id"  # what a search key is of


class Columns:
    """The codec the store passes every sensitive value through."""

    width = 1  # how many keys `searches` gives

    def seal(self, column: str, identity: str, value: bytes) -> bytes:
        """`value` as stored in `column` of the row(s) of message `identity`."""
        return PLAIN + value

    def open(self, column: str, identity: str, stored: bytes) -> bytes:
        return bytes(stored[1:])

    def seal_text(self, column: str, identity: str, value: str) -> bytes:
        return self.seal(column, identity, value.encode())

    def open_text(self, column: str, identity: str, stored: bytes | None) -> str:
        return "" if stored is None else self.open(column, identity, stored).decode()

    def search(self, kind: str, text: str) -> str:
        """The search key written beside a new value."""
        return text.lower() if kind == ADDRESS else text

    def searches(self, kind: str, text: str) -> tuple[str, ...]:
        """Every key a stored value of `text` may carry."""
        return (self.search(kind, text),)
