"""The outcome rules, pure: every decision takes plain values and returns one (no clock, no I/O).

What a report means for a recipient, which status code a bounce carries, who gets a bounce, when the
next poll and the next bounce attempt are due, and which reports the relay may take as its own. Each is
tested with plain values (tests/test_outcomes_decide.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from relay.core.headers import find_field, fold_header, header_block_end, parse_header_fields
from relay.core.message import Prepared
from relay.core.profiles import DEFAULT as DEFAULT_PROFILE

if TYPE_CHECKING:
    from relay.outcomes.history import Attempted, Tracked

# A recipient's status, as `relay trace` and GET /messages say it.
QUEUED = "queued"  # the relay has it; Infobip has not taken it yet
SENT = "sent"  # Infobip took it; no final report yet
DELIVERED = "delivered"  # a report says delivered
BOUNCED = "bounced"  # a report says undeliverable, rejected or expired
FAILED = "failed"  # refused at the SMTP stage (by Infobip, for good)
EXPIRED = "expired"  # our own spool.max_age ran out
FINAL = frozenset({DELIVERED, BOUNCED, FAILED, EXPIRED})
BOUNCING = frozenset({BOUNCED, FAILED, EXPIRED})

REPORT_WINDOW = 48 * 3600.0  # Infobip keeps reports (and logs) this long: polling past it finds nothing
BULK_ID_HEADER = "X-IB-Bulk-Id"
NOTIFY_URL_HEADER = "X-IB-Notify-Url"
TRACKING_URL_HEADER = "X-IB-Tracking-Url"  # seed 002's header list; the events: seed 000 "Tracking notifications"


@dataclass(frozen=True, slots=True)
class Report:
    """One of Infobip's delivery reports (seed 004), reduced to what the relay uses."""

    message_id: str
    to: str
    group: str  # status.groupName: PENDING, DELIVERED, UNDELIVERABLE, EXPIRED, REJECTED, ...
    status_name: str
    status_description: str
    error_name: str
    error_description: str
    permanent: bool
    done_at: str
    bulk_id: str


def _text(value: Any) -> str:
    """A JSON string as either history engine can store it ("" for anything else): a lone surrogate, which
    UTF-8 cannot encode, becomes "?", and NUL, which PostgreSQL's text refuses, is dropped. One report the
    history refused would be kept and tried again each round, and nothing after it fetched."""
    if not isinstance(value, str):
        return ""
    if value.isascii() and "\0" not in value:
        return value
    return value.encode("utf-8", "replace").decode().replace("\0", "")


def parse_report(item: Any) -> Report | None:
    """A report from Infobip's JSON, or None when it lacks the two keys that say whose it is."""
    if (
        not isinstance(item, dict)
        or not (message_id := _text(item.get("messageId")))
        or not (to := _text(item.get("to")))
    ):
        return None
    status: dict[str, Any] = item["status"] if isinstance(item.get("status"), dict) else {}
    error: dict[str, Any] = item["error"] if isinstance(item.get("error"), dict) else {}
    return Report(
        message_id=message_id,
        to=to,
        group=_text(status.get("groupName")).upper(),
        status_name=_text(status.get("name")),
        status_description=_text(status.get("description")),
        error_name=_text(error.get("name")),
        error_description=_text(error.get("description")),
        permanent=error.get("permanent") is True,
        done_at=_text(item.get("doneAt")),
        bulk_id=_text(item.get("bulkId")),
    )


def read_json(body: bytes) -> Any:
    """A pulled or pushed body as JSON; ValueError if it is not JSON. A byte that is not UTF-8 (a server
    writing Latin-1) becomes U+FFFD rather than failing the whole body: a page of reports is handed out
    once, and Infobip would not send it again. Nesting too deep for the parser is not JSON either."""
    try:  # UTF-8 (with or without a BOM), UTF-16 or UTF-32, as json.loads(bytes) tells them apart
        return json.loads(body.decode(json.detect_encoding(body), "replace"))
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def parse_reports(payload: Any) -> tuple[list[Report], int]:
    """`{"results": [...]}` (pulled or pushed) -> the usable reports and how many were not."""
    results = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(results, list):
        return [], 1
    reports = [parse_report(item) for item in results]
    return [r for r in reports if r is not None], sum(r is None for r in reports)


def report_status(report: Report) -> str | None:
    """The recipient's status after this report, or None when it is not final (PENDING and the like)."""
    if report.group == "DELIVERED":
        return DELIVERED
    if report.group in ("UNDELIVERABLE", "REJECTED", "EXPIRED"):
        return BOUNCED
    return BOUNCED if report.permanent else None


def report_detail(report: Report) -> str:
    """Infobip's words for a report, for trace and for the bounce's Diagnostic-Code."""
    status = f"{report.group} {report.status_name}".strip()
    if report.error_name and report.error_name != "NO_ERROR":
        return f"{status}: {report.error_name} ({report.error_description})".strip()
    return f"{status} ({report.status_description})" if report.status_description else status


# Infobip's error names, by keyword, to RFC 3463 codes; the first match wins (domain before mailbox).
_REPORT_CODES = (
    (("EXPIRED", "TIMEOUT", "TIMED_OUT"), "5.4.7"),
    (("MAILBOX_FULL", "QUOTA", "OVER_QUOTA", "INSUFFICIENT_STORAGE"), "5.2.2"),
    (("DOMAIN", "DNS", "_MX", "NO_ROUTE"), "5.1.2"),
    (("DOES_NOT_EXIST", "UNKNOWN", "NO_SUCH", "INVALID", "UNAVAILABLE", "MAILBOX", "USER"), "5.1.1"),
    (("TOO_LARGE", "SIZE"), "5.3.4"),
    (("SPAM", "BLOCK", "BLACKLIST", "POLICY", "REJECT", "COMPLAIN", "SUPPRESS"), "5.7.1"),
)
_ENHANCED_RE = re.compile(r"^\d{3}[ -]([245])\.(\d{1,3})\.(\d{1,3})\b")


def report_dsn_status(report: Report) -> str:
    """The Status: of a bounce made from a report (always 5.x.x: the report is final)."""
    words = f"{report.group} {report.error_name}".upper()
    for keywords, code in _REPORT_CODES:
        if any(keyword in words for keyword in keywords):
            return code
    return "5.0.0"


def reply_dsn_status(reply: str, status: str) -> str:
    """The Status: of a bounce for a recipient refused or expired at the SMTP stage: Infobip's own
    enhanced code when it gave a 5.x.x, 5.4.7 for our own expiry, else 5.0.0."""
    if status == EXPIRED:
        return "5.4.7"
    found = _ENHANCED_RE.match(reply)
    return ".".join(found.groups()) if found and found.group(1) == "5" else "5.0.0"


def dead_status(reason: str) -> str:
    """A dead-lettered recipient's status: relay.core.retry.next_step words our own expiry this way."""
    return EXPIRED if reason.startswith("expired after") else FAILED


def bounce_address(sender: str, fixed_to: str) -> str | None:
    """Who gets the bounce: `bounces.to` if set, else the envelope sender; None for the null sender
    (a bounce of a bounce would loop) or an address no mail server could route."""
    if not sender or sender == "<>":
        return None
    address = fixed_to or sender
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c in address for c in " <>\r\n"):
        return None
    return address


BOUNCE_DELAYS = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)  # then hourly
BOUNCE_LIFETIME = 5 * 86400.0  # as Postfix's bounce_queue_lifetime


def next_bounce_attempt(attempts: int, created_at: float, now: float) -> float | None:
    """When to try a bounce again after `attempts` failed tries, or None once it is too old to matter."""
    delay = BOUNCE_DELAYS[min(attempts, len(BOUNCE_DELAYS)) - 1] if attempts > 0 else 0.0
    due = now + delay
    return None if due - created_at > BOUNCE_LIFETIME else due


def poll_delay(interval: float, failures: int, retry_after: float | None = None) -> float:
    """Seconds until the next poll: `interval`, doubled per consecutive failure (429 included) up to ten
    minutes, and never sooner than Infobip's Retry-After."""
    delay = interval if failures <= 0 else min(max(interval, 600.0), interval * 2.0**failures)
    return max(delay, retry_after or 0.0)


def bulk_id(instance: str, now: float, profile: str = DEFAULT_PROFILE) -> str:
    """The relay's own X-IB-Bulk-Id: one per instance, hour and profile, so one request polls an hour of
    one account's mail, the filter can only ever match messages this relay sent, and the poller knows
    from the id alone whose API key fetches it (`bulk_profile`). The default profile's id has no suffix."""
    return _bulk_id(instance, int(now // 3600), profile)


@functools.lru_cache(maxsize=64)
def _bulk_id(instance: str, hour: int, profile: str) -> str:
    base = f"relay-{instance}-{datetime.fromtimestamp(hour * 3600, UTC):%Y%m%d%H}"
    return base if profile == DEFAULT_PROFILE else f"{base}-{profile}"


_BULK_RE = re.compile(r"relay-[0-9a-f]+-\d{10}(?:-([A-Za-z0-9_.-]+))?")


def bulk_profile(bulk: str) -> str:
    """The profile whose messages carry the relay's bulk id `bulk` (the reverse of `bulk_id`)."""
    found = _BULK_RE.fullmatch(bulk)
    return found.group(1) if found and found.group(1) else DEFAULT_PROFILE


@functools.lru_cache(maxsize=64)
def _claim_lines(bulk: str | None, notify_url: str | None, tracking_url: str | None) -> bytes:
    lines = fold_header(BULK_ID_HEADER, bulk) if bulk else b""
    lines += fold_header(NOTIFY_URL_HEADER, notify_url) if bulk and notify_url else b""
    return lines + fold_header(TRACKING_URL_HEADER, tracking_url) if tracking_url else lines


def header_block(prepared: Prepared) -> bytes:
    """The header block exactly as sent upstream (our lines, then the app's, minus any a rule removed),
    for the bounce's text/rfc822-headers part. No body."""
    original = prepared.original
    end = header_block_end(original)
    parts = [prepared.prefix]
    pos = 0
    for start, stop in prepared.dropped:
        parts.append(original[pos:start])
        pos = stop
    parts.append(original[pos:end])
    return b"".join(parts)


def bounce_headers(prepared: Prepared, secret: str) -> bytes:
    """The header block a bounce quotes (text/rfc822-headers), less `secret`: the push token, in the
    X-IB-Notify-Url and X-IB-Tracking-Url the relay added. Whoever reads the sender's mailbox must not be able
    to post reports (and so bounces) as Infobip."""
    block = header_block(prepared)
    return block.replace(secret.encode(), b"<token>") if secret else block


def bulk_id_of(prepared: Prepared, instance: str) -> str | None:
    """The relay's own X-IB-Bulk-Id in a message as sent (read back from the spool), else None: the app's
    bulk id, or none at all, means its reports are not ours."""
    block = header_block(prepared)
    if b"x-ib-bulk-id" not in block.lower():
        return None
    found = find_field(parse_header_fields(block), "X-IB-Bulk-Id")
    value = found.value.strip() if found else ""
    return value if value.startswith(f"relay-{instance}-") and _BULK_RE.fullmatch(value) else None


_OWNER_HEADERS = (b"x-ib-bulk-id", b"x-ib-notify-url")


def claim_reports(
    prepared: Prepared, bulk: str, notify_url: str | None, tracking_url: str | None = None
) -> tuple[Prepared, bool]:
    """Add the relay's X-IB-Bulk-Id (and X-IB-Notify-Url when push is on) unless the app or a policy rule
    set either one: then the reports are theirs and the relay never takes them. X-IB-Tracking-Url (push
    on) likewise, on its own: one the app or a rule set keeps its events. Returns the message to send and
    whether its reports are the relay's."""
    block = header_block(prepared)
    head = block.lower()
    names: set[str] = set()
    # The tracking header matters only when push is on: a policy rule that always sets it (as the bench's
    # does) must not send every message through the parser for nothing.
    wanted = (b"x-ib-bulk-id", b"x-ib-notify-url", b"x-ib-tracking-url") if tracking_url else _OWNER_HEADERS
    if any(name in head for name in wanted):
        names = {f.name.lower() for f in parse_header_fields(block)}  # the cheap test first; the parser decides
    owned = not {"x-ib-bulk-id", "x-ib-notify-url"} & names
    tracking = tracking_url if "x-ib-tracking-url" not in names else None
    lines = _claim_lines(bulk if owned else None, notify_url, tracking)
    return (dataclasses.replace(prepared, prefix=prepared.prefix + lines) if lines else prepared), owned


def attempt_words(a: Attempted) -> str:
    """One attempt in plain words, for the history's timeline (both stores write it)."""
    parts = [f"attempt {a.attempt}:"]
    if a.accepted:
        parts.append(f"Infobip took {len(a.accepted)} recipient(s) as {','.join(a.infobip_ids) or '?'};")
    if a.deferred:
        parts.append(f"{len(a.deferred)} deferred ({next(iter(a.deferred.values()))});")
    if a.dead:
        status, reason = next(iter(a.dead.values()))
        told = "a bounce follows" if a.bounce else "the app was told at once"
        parts.append(f"{len(a.dead)} {status} ({reason}); {told};")
    return " ".join(parts).rstrip(";")


def diagnostic(report: Report) -> str:
    """Infobip's error name and description, for the bounce's Diagnostic-Code."""
    name = report.error_name if report.error_name and report.error_name != "NO_ERROR" else report.group
    words = report.error_description or report.status_description
    return f"{name} ({words})" if words else name


_KIND_RE = re.compile(r"[A-Z][A-Z_]{0,31}")


def parse_tracking(payload: Any, at: float) -> tuple[list[Tracked], int]:
    """Tracking notifications (seed 000: one JSON object per event; a list of them, or `{"results": [...]}`
    as reports come, is taken too) -> the usable events and how many were not. An event needs its
    notificationType, eventId (the same event twice is recorded once), messageId and recipient; `url`
    (a click) is its detail. A type the seeds do not name is kept as it is, for the history."""
    from relay.outcomes.history import Tracked  # history imports this module

    items = payload.get("results", [payload]) if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        return [], 1
    events: list[Tracked] = []
    for item in items:
        fields = item if isinstance(item, dict) else {}
        kind = _text(fields.get("notificationType")).upper()
        keys = (_text(fields.get("eventId")), _text(fields.get("messageId")), _text(fields.get("recipient")))
        if _KIND_RE.fullmatch(kind) and all(keys):
            events.append(Tracked(*keys, kind=kind, at=at, detail=_text(fields.get("url"))))
    return events, len(items) - len(events)
