"""The message as every stage after DATA sees it: its envelope (who, to whom, when, how big) and its
exact outbound bytes. One shape from the inbound session to the journal, queue/ and Infobip."""

from __future__ import annotations

import json
from dataclasses import dataclass


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
