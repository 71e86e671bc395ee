"""The outcome rules with plain values: reports, status codes, who gets a bounce, schedules, the bulk id."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.core.message import Prepared
from relay.outcomes.decide import (
    BOUNCE_LIFETIME,
    BOUNCED,
    DELIVERED,
    EXPIRED,
    FAILED,
    bounce_address,
    bounce_headers,
    bulk_id,
    bulk_id_of,
    claim_reports,
    dead_status,
    header_block,
    next_bounce_attempt,
    parse_reports,
    poll_delay,
    read_json,
    reply_dsn_status,
    report_dsn_status,
    report_status,
)


def report(group: str, error: str = "NO_ERROR", permanent: bool = False, **extra: object) -> dict[str, object]:
    return {
        "messageId": "m1",
        "to": "a@example.org",
        "status": {"groupName": group, "name": f"{group}_X", "description": "words"},
        "error": {"name": error, "description": "why", "permanent": permanent},
        **extra,
    }


def one(item: dict[str, object]):  # type: ignore[no-untyped-def]
    [parsed], bad = parse_reports({"results": [item]})
    assert bad == 0
    return parsed


@pytest.mark.parametrize(
    ("group", "permanent", "status"),
    [
        ("DELIVERED", False, DELIVERED),
        ("UNDELIVERABLE", True, BOUNCED),
        ("REJECTED", False, BOUNCED),
        ("EXPIRED", False, BOUNCED),
        ("PENDING", False, None),
        ("SOMETHING_NEW", False, None),
        ("SOMETHING_NEW", True, BOUNCED),
    ],
)
def test_report_status(group: str, permanent: bool, status: str | None) -> None:
    assert report_status(one(report(group, permanent=permanent))) == status


def test_unusable_reports_are_counted_not_guessed() -> None:
    reports, bad = parse_reports({"results": [report("DELIVERED"), {"to": "x@y"}, "junk", {"messageId": "m"}]})
    assert len(reports) == 1 and bad == 3
    assert parse_reports({"nothing": []}) == ([], 1)
    assert parse_reports([1, 2]) == ([], 1)


def test_a_body_is_read_as_json_whatever_its_unicode_encoding() -> None:
    """A byte that is not UTF-8 reads as U+FFFD (a page is handed out once); a BOM, UTF-16 and UTF-32 read as
    json.loads(bytes) reads them; nesting past the parser's depth is not JSON."""
    text = '{"results": [{"to": "d\u00e9j\u00e0@example.org"}]}'
    expected = {"results": [{"to": "d\u00e9j\u00e0@example.org"}]}
    for body in (text.encode("utf-8-sig"), text.encode("utf-16"), text.encode("utf-32"), text.encode()):
        assert read_json(body) == expected
    assert read_json(text.encode("latin-1")) == {"results": [{"to": "d\ufffdj\ufffd@example.org"}]}
    for bad in (b"[" * 100_000, b"not json", b""):
        with pytest.raises(ValueError):
            read_json(bad)


def test_report_text_is_what_either_history_can_store() -> None:
    """A lone surrogate (UTF-8 cannot encode it) and NUL (PostgreSQL's text refuses it), in any field: one report
    the history refused would be tried again every round, and nothing after it fetched."""
    item = report("DELIVERED")
    item["messageId"] += "\x00"
    item["status"] = {**item["status"], "description": "delivered \ud800 to\x00 handset"}
    [parsed] = parse_reports({"results": [item]})[0]
    assert parsed.message_id == item["messageId"][:-1]
    assert parsed.status_description == "delivered ? to handset"
    assert (parsed.status_description + parsed.message_id).encode()  # UTF-8, no surrogate left


@pytest.mark.parametrize(
    ("group", "error", "code"),
    [
        ("UNDELIVERABLE", "EC_MAILBOX_DOES_NOT_EXIST", "5.1.1"),
        ("UNDELIVERABLE", "EC_INVALID_DOMAIN", "5.1.2"),
        ("UNDELIVERABLE", "EC_MAILBOX_FULL", "5.2.2"),
        ("REJECTED", "EC_SPAM_BLOCKED", "5.7.1"),
        ("EXPIRED", "EC_UNKNOWN", "5.4.7"),
        ("UNDELIVERABLE", "EC_MESSAGE_TOO_LARGE", "5.3.4"),
        ("UNDELIVERABLE", "SOMETHING", "5.0.0"),
    ],
)
def test_report_dsn_status(group: str, error: str, code: str) -> None:
    assert report_dsn_status(one(report(group, error, permanent=True))) == code


def test_reply_dsn_status() -> None:
    assert reply_dsn_status("550 5.1.1 No such user", FAILED) == "5.1.1"
    assert reply_dsn_status("554 Rejected", FAILED) == "5.0.0"
    assert reply_dsn_status("451 4.3.0 Try later", FAILED) == "5.0.0"  # a bounce is never 4.x.x
    assert reply_dsn_status("expired after 9 attempts over 432000 s; last reply: 451 4.3.0", EXPIRED) == "5.4.7"


def test_dead_status_tells_our_expiry_from_a_refusal() -> None:
    assert dead_status("expired after 3 attempts over 432100 s; last reply: 451 4.3.0 later") == EXPIRED
    assert dead_status("550 5.1.1 No such user") == FAILED


def test_who_gets_the_bounce() -> None:
    assert bounce_address("app@example.com", "") == "app@example.com"
    assert bounce_address("app@example.com", "bounces@example.com") == "bounces@example.com"
    assert bounce_address("", "") is None  # the null sender: a bounce of a bounce would loop
    assert bounce_address("", "bounces@example.com") is None
    assert bounce_address("no-domain", "") is None
    assert bounce_address("a b@example.com", "") is None


def test_bounce_retry_schedule_tries_again_within_a_minute_then_slows_and_gives_up() -> None:
    assert next_bounce_attempt(0, 0.0, 0.0) == 0.0
    assert next_bounce_attempt(1, 0.0, 10.0) == 40.0
    assert next_bounce_attempt(2, 0.0, 40.0) == 100.0
    assert next_bounce_attempt(20, 0.0, 1000.0) == 4600.0  # hourly
    assert next_bounce_attempt(20, 0.0, BOUNCE_LIFETIME - 10) is None


def test_poll_delay_doubles_on_failure_and_respects_retry_after() -> None:
    assert poll_delay(30, 0) == 30
    assert poll_delay(30, 1) == 60
    assert poll_delay(30, 3) == 240
    assert poll_delay(30, 10) == 600  # at most ten minutes
    assert poll_delay(30, 1, retry_after=120) == 120
    assert poll_delay(30, 0, retry_after=5) == 30
    assert poll_delay(900, 2) == 900  # an interval over ten minutes is not shortened


def test_bulk_id_is_one_per_instance_and_hour() -> None:
    at = datetime(2026, 11, 22, 13, 59, tzinfo=UTC).timestamp()
    assert bulk_id("ab12cd34", at) == "relay-ab12cd34-2026112213"
    assert bulk_id("ab12cd34", at + 60) == "relay-ab12cd34-2026112214"


def prepared(original: bytes, prefix: bytes = b"", dropped: tuple[tuple[int, int], ...] = ()) -> Prepared:
    return Prepared("q1", "app@example.com", ("a@example.org",), "<m@x>", prefix, original, dropped)


def test_header_block_is_what_was_sent_without_the_body() -> None:
    original = b"From: a@example.com\r\nX-Drop: 1\r\nSubject: s\r\n\r\nBody\r\n"
    start = original.index(b"X-Drop")
    message = prepared(original, b"X-IB-Tracking-Url: u\r\n", ((start, start + len(b"X-Drop: 1\r\n")),))
    assert header_block(message) == b"X-IB-Tracking-Url: u\r\nFrom: a@example.com\r\nSubject: s\r\n\r\n"


def test_a_bounce_quotes_the_header_block_without_the_push_token() -> None:
    message = prepared(b"From: a@example.com\r\n\r\nBody\r\n", b"X-IB-Notify-Url: https://h.example/ib/s3cret\r\n")
    assert (
        bounce_headers(message, "s3cret")
        == b"X-IB-Notify-Url: https://h.example/ib/<token>\r\nFrom: a@example.com\r\n\r\n"
    )
    assert bounce_headers(message, "") == header_block(message)  # no token yet: nothing to take out


def test_claim_reports_adds_our_bulk_id_and_notify_url() -> None:
    message = prepared(b"From: a@example.com\r\n\r\nx-ib-bulk-id: only in the body\r\n", b"X-Policy: 1\r\n")
    claimed, owned = claim_reports(message, "relay-1-2026112213", "https://relay.example/ib/tok")
    assert owned
    assert claimed.prefix == (
        b"X-Policy: 1\r\nX-IB-Bulk-Id: relay-1-2026112213\r\nX-IB-Notify-Url: https://relay.example/ib/tok\r\n"
    )
    assert claimed.original is message.original and claimed.size == message.size + len(claimed.prefix) - 13


@pytest.mark.parametrize(
    ("prefix", "original"),
    [
        (b"", b"From: a@example.com\r\nX-IB-Bulk-Id: app-7\r\n\r\n"),
        (b"", b"From: a@example.com\r\nx-ib-notify-url: https://app/ib\r\n\r\n"),
        (b"X-IB-Bulk-Id: from-a-rule\r\n", b"From: a@example.com\r\n\r\n"),
    ],
)
def test_the_apps_own_bulk_id_or_notify_url_means_the_reports_are_the_apps(prefix: bytes, original: bytes) -> None:
    message = prepared(original, prefix)
    assert claim_reports(message, "relay-1-2026112213", None) == (message, False)


@pytest.mark.parametrize(
    ("stored", "ours"),
    [
        (b"X-IB-Bulk-Id: relay-ab12-2026112213\r\nFrom: a@example.com\r\n\r\nx", "relay-ab12-2026112213"),
        (b"x-ib-bulk-id:  relay-ab12-2026112213-billing\r\n\r\nx", "relay-ab12-2026112213-billing"),
        (b"X-IB-Bulk-Id: relay-ffff-2026112213\r\n\r\nx", None),  # another instance's
        (b"X-IB-Bulk-Id: app-7\r\n\r\nx", None),  # the app's own
        (b"From: a@example.com\r\n\r\nX-IB-Bulk-Id: relay-ab12-2026112213\r\n", None),  # in the body
    ],
)
def test_a_message_read_back_from_the_spool_is_ours_only_by_our_own_bulk_id(stored: bytes, ours: str | None) -> None:
    assert bulk_id_of(prepared(stored), "ab12") == ours
