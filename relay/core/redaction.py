"""Addresses out of logs and listings (privacy.redact): each becomes a keyed hash, stable for one key, so
ops can still follow one recipient across lines and commands without the log holding the address. The
key is secret (an HMAC, not a plain hash): a list of likely addresses cannot be hashed and matched.

A Subject never appears: a `subject` field is dropped, and so is what follows "Subject:" in any text.
"""

from __future__ import annotations

import hashlib
import hmac
import re

# Anything shaped like local@domain, in any text: an upstream reply echoing a recipient, a Message-ID
# (which may carry a name or a date of birth), an exception's message.
_ADDRESS = re.compile(r"[^\s<>()\[\]@,;:\"'\\]+@[^\s<>()\[\]@,;:\"'\\]+")
_SUBJECT = re.compile(r"(?i)(subject:)[^\r\n]*")
SUBJECT_KEYS = frozenset({"subject"})
REDACTED = "[redacted]"


class AddressHasher:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def address(self, address: str) -> str:
        """`h:` and 16 hex digits; the same address (in any letter case) always gives the same one."""
        digest = hmac.new(self._key, address.strip().lower().encode(), hashlib.sha256).hexdigest()
        return f"h:{digest[:16]}"

    def text(self, text: str) -> str:
        """`text` with every address in it hashed, and any Subject's text dropped."""
        if "@" in text:
            text = _ADDRESS.sub(lambda match: self.address(match.group(0)), text)
        if "ubject" in text or "UBJECT" in text:
            text = _SUBJECT.sub(rf"\1 {REDACTED}", text)
        return text

    def value(self, key: str, value: object) -> object:
        """One log field: strings (also inside lists, tuples and dicts, keys included) redacted."""
        if key.lower() in SUBJECT_KEYS:
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list | tuple):
            return [self.value(key, item) for item in value]
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(str(k), v) for k, v in value.items()}
        return value
