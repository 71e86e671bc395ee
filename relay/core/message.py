"""The message through the stages: what the inbound session collected (`Received`), the exact envelope and
bytes to send upstream (`Prepared`), and the envelope the store keeps beside them (`Envelope`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the store keeps beside the bytes: the first line of a stored message."""

    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str
    client_ip: str
    received_at: float  # epoch seconds
    size: int
    profile: str = "default"  # which profile's credentials and connections it goes out with

    def line(self) -> bytes:
        """The JSON line that starts a stored message (dataclasses.asdict is slow: it deep-copies)."""
        fields = {
            "queue_id": self.queue_id,
            "mail_from": self.mail_from,
            "recipients": self.recipients,
            "message_id": self.message_id,
            "client_ip": self.client_ip,
            "received_at": self.received_at,
            "size": self.size,
            "profile": self.profile,
        }
        return json.dumps(fields, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Envelope:
        fields = json.loads(line)
        fields["recipients"] = tuple(fields["recipients"])
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Received:
    """A message as the inbound session collected it."""

    queue_id: str
    client_ip: str
    mail_from: str
    recipients: tuple[str, ...]
    data: bytes  # as received, dot-unstuffed, CRLF line endings
    received_at: datetime  # timezone-aware
    hostname: str  # ours, for a Message-ID we have to add
    # The allowlist this client is held to (its AUTH user's, else policy.allowed_sender_domains); empty: any.
    # It must hold for the sender actually sent upstream, which alignment = "rewrite" may change.
    allowed_sender_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Prepared:
    """The exact envelope and bytes to send upstream."""

    queue_id: str
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str
    prefix: bytes  # new header lines
    original: bytes
    dropped: tuple[tuple[int, int], ...] = field(default=())  # byte ranges of `original` left out

    def segments(self) -> Iterator[memoryview]:
        """The message as a few views over existing buffers: nothing is copied."""
        yield memoryview(self.prefix)
        view = memoryview(self.original)
        pos = 0
        for start, end in self.dropped:
            yield view[pos:start]
            pos = end
        yield view[pos:]

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.original) - sum(end - start for start, end in self.dropped)

    def as_bytes(self) -> bytes:
        return b"".join(self.segments())
