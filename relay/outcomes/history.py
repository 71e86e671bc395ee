"""The message history: what it records, and the small interface a store implements.

The rest of the relay knows only `HistoryStore` and these records, so a later store (PostgreSQL, for
replicas sharing one history) implements the same dozen methods. Methods are blocking; the async side
(relay/outcomes/writer.py) calls them off the event loop, one at a time, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.outcomes.decide import Report


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message the app handed us (written before its first attempt's outcome)."""

    queue_id: str
    message_id: str
    sender: str
    client_ip: str
    received_at: float
    size: int
    recipients: tuple[str, ...]
    bulk_id: str | None  # ours; None when the app (or a rule) set its own: its reports are not ours
    headers: bytes | None  # the header block as sent, kept only while bounces are on
    resumed: bool = False  # noted again after a restart (Outcomes.resumed): nothing is written if it is known


@dataclass(frozen=True, slots=True)
class Attempted:
    """One delivery attempt's outcome per recipient."""

    queue_id: str
    at: float
    attempt: int
    accepted: tuple[str, ...] = ()
    infobip_ids: tuple[str, ...] = ()
    deferred: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    dead: dict[str, tuple[str, str]] = field(default_factory=dict)  # recipient -> (failed | expired, reason)
    bounce: bool = False  # the app was told 250: dead recipients get a bounce


Change = MessageReceived | Attempted


@dataclass(frozen=True, slots=True)
class Outcome:
    """A recipient reaching a final status through a report (for the log line and the metrics)."""

    queue_id: str
    address: str
    infobip_id: str
    status: str
    detail: str
    seconds: float | None  # from Infobip's acceptance to this report
    bounce: bool  # a bounce was queued for it


@dataclass(slots=True)
class Applied:
    """What a batch of reports did."""

    outcomes: list[Outcome] = field(default_factory=list)
    pending: int = 0  # not final yet (PENDING), noted as events
    duplicates: int = 0  # the recipient already had its final status (pushed and pulled, say)
    unknown: int = 0  # no message of ours has that id and address


@dataclass(frozen=True, slots=True)
class Tracked:
    """One tracking notification Infobip pushed to our X-IB-Tracking-Url (seed 000: "Tracking notifications")."""

    event_id: str  # Infobip's eventId: the same event pushed twice is recorded once
    infobip_id: str  # messageId
    address: str  # recipient
    kind: str  # notificationType: OPENED | CLICKED | UNSUBSCRIBED | COMPLAINED | LATE_BOUNCE
    at: float  # when we received it
    detail: str  # e.g. the clicked URL; may be empty


@dataclass(frozen=True, slots=True)
class BounceRecipient:
    address: str
    status: str  # bounced | failed | expired
    dsn_status: str  # 5.x.x
    diagnostic: str  # Infobip's error name and description, or its SMTP reply
    infobip_id: str | None


@dataclass(frozen=True, slots=True)
class BounceJob:
    """A bounce due to be sent: one per message, all its bouncing recipients together."""

    bounce_id: int
    queue_id: str
    message_id: str
    sender: str
    received_at: float
    headers: bytes
    recipients: tuple[BounceRecipient, ...]
    attempts: int
    created_at: float
    action: str = "failed"  # failed | delayed
    claimed_at: float | None = None  # when due_bounces handed it out: its outcome is recorded only under this claim


@dataclass(frozen=True, slots=True)
class RecipientTrace:
    address: str
    status: str
    infobip_id: str | None
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str  # received | attempt | report | tracking | bounce | deleted
    address: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class MessageTrace:
    """Everything the history knows of one message."""

    queue_id: str
    message_id: str
    sender: str
    client_ip: str
    received_at: float
    size: int
    bulk_id: str | None
    recipients: list[RecipientTrace]
    events: list[Event]


class HistoryStore(Protocol):
    """A message history. Blocking calls, one at a time; each is one transaction."""

    def write(self, changes: Sequence[Change], bounces_on: bool) -> None:
        """Record received messages and attempts, in order."""

    def apply_reports(self, reports: Sequence[Report], source: str, at: float, bounces_on: bool) -> Applied:
        """Match reports to our recipients; a final one sets the status (once) and may queue a bounce."""

    def record_tracking(self, events: Sequence[Tracked]) -> int:
        """Add tracking events as `tracking` events of their recipients (once per event id); returns how
        many matched a recipient of ours. LATE_BOUNCE is recorded, never turned into a second bounce."""

    def pending_bulk_ids(self, since: float) -> list[str]:
        """Our bulk ids with recipients still waiting for a final report, accepted after `since`."""

    def due_bounces(self, now: float, limit: int) -> list[BounceJob]:
        """Bounces due by `now`, oldest first."""

    def bounce_done(
        self, bounce_id: int, at: float, outcome: str, detail: str, claimed_at: float | None = None
    ) -> bool:
        """A bounce was sent (`outcome` "sent") or given up ("dropped"); never offered again. With `claimed_at`
        (BounceJob's), only while that claim holds: once stale, another sender may have taken the bounce.
        False: nothing recorded (no such bounce, or the claim is lost)."""

    def bounce_retry(self, bounce_id: int, due: float, error: str, claimed_at: float | None = None) -> bool:
        """A bounce attempt failed: try again at `due` (with `claimed_at`, as bounce_done)."""

    def deleted(self, queue_ids: Sequence[str], at: float, detail: str) -> int:
        """`relay queue delete`: these messages' recipients still waiting end `failed` with `detail` (no bounce:
        the operator chose it, and no delay warning follows); returns how many recipients."""

    def delayed(self, received_before: float, at: float) -> int:
        """Queue one delay warning (Action: delayed) for each message still queued since before
        `received_before` that has had none; returns how many."""

    def lookup(self, query: str, limit: int) -> list[MessageTrace]:
        """Messages by queue id, Infobip id, Message-ID (with its angle brackets) or recipient address."""

    def rekey(self) -> int:
        """Every sealed value not under the current spool key sealed again under it; returns how many rows."""

    def prune(self, before: float) -> int:
        """Forget messages received before `before`; returns how many."""

    def meta(self, key: str, default: str) -> str:
        """A value kept with the history (the instance id, the push token), set to `default` if absent."""

    def passing(self, error: Exception) -> bool:
        """Whether a call that raised `error` may succeed if made again (a lock held, a full disk, a server
        away), rather than never (a value the store cannot take)."""

    def close(self) -> None: ...
