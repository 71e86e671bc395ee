"""relay.core.prepare: from what the client sent to exactly what goes upstream, or a rejection."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relay.config import PolicyRule, PolicySettings
from relay.core.headers import find_field, parse_header_fields
from relay.core.message import Prepared, Received
from relay.core.prepare import from_address, is_safe_address, prepare, within_smtp_limits
from relay.core.replies import Rejection, Reply

QUEUE_ID = "0190abcdef0123456789a"
RECEIVED_AT = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
DESIGN_CALLBACK = '{"app":"erp","queue_id":"{queue_id}"}'

BODY = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"caf\xc3\xa9 8-bit, trailing spaces   \r\n"
    b"bare LF\nbare CR\r and NUL\x00 \r\n"
    b"From: not-a-header@evil.example.net\r\n"
)


def msg(*headers: str, body: bytes = BODY) -> bytes:
    return "".join(f"{h}\r\n" for h in headers).encode() + body


FULL = msg(
    "DKIM-Signature: v=1; a=rsa-sha256; d=erp.example.com; s=s1;\r\n\th=from:to:subject; b=abc",
    "From: ERP <billing@erp.example.com>",
    "To: customer@example.org",
    "Subject: Invoice 42",
    "Message-ID: <inv-42@erp.example.com>",
    "Date: Sat, 21 Nov 2026 09:59:00 +0000",
)


def received(data: bytes = FULL, **changes: Any) -> Received:
    values: dict[str, Any] = {
        "queue_id": QUEUE_ID,
        "client_ip": "10.1.2.3",
        "mail_from": "billing@erp.example.com",
        "recipients": ("customer@example.org", "audit@example.net"),
        "data": data,
        "received_at": RECEIVED_AT,
        "hostname": "relay.example.internal",
    }
    values.update(changes)
    return Received(**values)


def policy(alignment: str = "reject", rules: list[dict[str, Any]] | None = None) -> PolicySettings:
    return PolicySettings(alignment=alignment, rules=[PolicyRule(**r) for r in rules or []])


def rejected(message: Received, settings: PolicySettings) -> Reply:
    with pytest.raises(Rejection) as info:
        prepare(message, settings)
    assert str(info.value) == str(info.value.reply)
    return info.value.reply


# --- byte-for-byte preservation -----------------------------------------------------------------


def test_complete_message_without_rules_goes_out_unchanged() -> None:
    prepared = prepare(received(), policy())
    assert prepared == Prepared(
        queue_id=QUEUE_ID,
        mail_from="billing@erp.example.com",
        recipients=("customer@example.org", "audit@example.net"),
        message_id="<inv-42@erp.example.com>",
        prefix=b"",
        original=FULL,
        dropped=(),
    )
    assert prepared.as_bytes() == FULL
    assert prepared.size == len(FULL)


def test_policy_headers_go_before_the_original_bytes_which_stay_exact() -> None:
    rules = [
        {
            "sender_domain": "erp.example.com",
            "headers": {
                "X-IB-Tracking-Url": "https://hooks.example.com/ib/track",
                "X-IB-Callback-Data": DESIGN_CALLBACK,
            },
        }
    ]
    prepared = prepare(received(), policy(rules=rules))
    expected_prefix = (
        b"X-IB-Tracking-Url: https://hooks.example.com/ib/track\r\n"
        b'X-IB-Callback-Data: {"app":"erp","queue_id":"0190abcdef0123456789a"}\r\n'
    )
    assert prepared.prefix == expected_prefix
    assert prepared.original is FULL
    assert prepared.as_bytes() == expected_prefix + FULL
    assert prepared.size == len(expected_prefix) + len(FULL)


def test_segments_are_views_over_the_existing_buffers() -> None:
    prepared = prepare(received(), policy(rules=[{"headers": {"X-A": "1"}}]))
    segments = list(prepared.segments())
    assert all(isinstance(s, memoryview) for s in segments)
    assert [bytes(s) for s in segments] == [b"X-A: 1\r\n", FULL]
    assert segments[1].obj is FULL


# --- Message-ID and Date ------------------------------------------------------------------------


def test_message_id_and_date_added_when_missing() -> None:
    data = msg("From: <billing@erp.example.com>", "Subject: x")
    prepared = prepare(received(data), policy())
    assert prepared.prefix == (
        b"Message-ID: <0190abcdef0123456789a@relay.example.internal>\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
    )
    assert prepared.message_id == "<0190abcdef0123456789a@relay.example.internal>"
    assert prepared.as_bytes() == prepared.prefix + data


def test_date_uses_the_received_time_zone() -> None:
    data = msg("From: <billing@erp.example.com>", "Message-ID: <a@b>")
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert prepare(received(data, received_at=at), policy()).prefix == b"Date: Fri, 02 Jan 2026 03:04:05 +0200\r\n"


def test_only_the_missing_one_is_added() -> None:
    with_date = msg("From: <billing@erp.example.com>", "date: Sat, 21 Nov 2026 09:00:00 +0000")
    assert prepare(received(with_date), policy()).prefix == (
        b"Message-ID: <0190abcdef0123456789a@relay.example.internal>\r\n"
    )
    with_id = msg("From: <billing@erp.example.com>", "MESSAGE-ID: <x@y>")
    prepared = prepare(received(with_id), policy())
    assert prepared.prefix == b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
    assert prepared.message_id == "<x@y>"


def test_fields_in_the_body_do_not_count() -> None:
    data = b"From: <billing@erp.example.com>\r\n\r\nMessage-ID: <body@x>\r\nDate: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
    prepared = prepare(received(data), policy())
    assert prepared.prefix.count(b"\r\n") == 2
    assert prepared.prefix.startswith(b"Message-ID: <0190abcdef0123456789a@relay.example.internal>\r\n")


def test_new_header_order_is_message_id_date_then_policy() -> None:
    data = msg("From: <billing@erp.example.com>")
    prepared = prepare(received(data), policy(rules=[{"headers": {"X-IB-Bulk-Id": "{message_id}"}}]))
    assert prepared.prefix == (
        b"Message-ID: <0190abcdef0123456789a@relay.example.internal>\r\n"
        b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
        b"X-IB-Bulk-Id: <0190abcdef0123456789a@relay.example.internal>\r\n"
    )


# --- replace_existing ---------------------------------------------------------------------------


def test_replace_existing_false_keeps_the_apps_header() -> None:
    data = msg("From: <billing@erp.example.com>", "Message-ID: <a@b>", "Date: x", "X-IB-Tracking-Url: https://app/own")
    rules = [{"headers": {"X-IB-Tracking-Url": "https://policy/url", "X-IB-Bulk-Id": "7"}}]
    prepared = prepare(received(data), policy(rules=rules))
    assert prepared.prefix == b"X-IB-Bulk-Id: 7\r\n"
    assert prepared.dropped == ()
    assert prepared.as_bytes() == b"X-IB-Bulk-Id: 7\r\n" + data


def test_replace_existing_true_drops_the_apps_field_including_folded_lines() -> None:
    data = (
        b"From: <billing@erp.example.com>\r\n"
        b"x-ib-tracking-url: https://app/two\r\n"
        b"\tcontinued\r\n"
        b"Message-ID: <a@b>\r\nDate: x\r\n\r\nX-IB-Tracking-Url: body text stays\r\n"
    )
    rules = [{"headers": {"X-IB-Tracking-Url": "https://policy/url"}, "replace_existing": True}]
    prepared = prepare(received(data), policy(rules=rules))
    assert prepared.prefix == b"X-IB-Tracking-Url: https://policy/url\r\n"
    assert prepared.dropped == ((33, 81),)
    assert prepared.as_bytes() == (
        b"X-IB-Tracking-Url: https://policy/url\r\n"
        b"From: <billing@erp.example.com>\r\n"
        b"Message-ID: <a@b>\r\nDate: x\r\n\r\nX-IB-Tracking-Url: body text stays\r\n"
    )
    assert prepared.size == len(prepared.as_bytes())
    # Two copies of a header a rule sets: which would Infobip read? Refused (tests/test_header_block.py).
    with pytest.raises(Rejection):
        prepare(received(b"X-IB-Tracking-Url: https://app/one\r\n" + data), policy(rules=rules))


def test_a_rule_for_message_id_or_date_never_makes_a_second_one() -> None:
    data = msg("From: <billing@erp.example.com>")
    headers = {"Message-ID": "<{queue_id}@policy.example.com>", "Date": "Thu, 01 Jan 2026 00:00:00 +0000"}
    kept = prepare(received(data), policy(rules=[{"headers": headers}]))
    assert kept.prefix == (
        b"Message-ID: <0190abcdef0123456789a@relay.example.internal>\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
    )
    assert kept.message_id == "<0190abcdef0123456789a@relay.example.internal>"
    replaced = prepare(received(data), policy(rules=[{"headers": headers, "replace_existing": True}]))
    assert replaced.prefix == (
        b"Message-ID: <0190abcdef0123456789a@policy.example.com>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    )
    assert replaced.message_id == "<0190abcdef0123456789a@policy.example.com>"  # the one that is sent
    assert replaced.as_bytes() == replaced.prefix + data


def test_replacing_the_apps_message_id_reports_the_new_one() -> None:
    rules = [{"headers": {"Message-ID": "<{queue_id}@policy.example.com>"}, "replace_existing": True}]
    prepared = prepare(received(), policy(rules=rules))
    assert prepared.message_id == "<0190abcdef0123456789a@policy.example.com>"
    assert prepared.prefix == b"Message-ID: <0190abcdef0123456789a@policy.example.com>\r\n"
    assert b"<inv-42@erp.example.com>" not in prepared.as_bytes()
    assert prepared.as_bytes().count(b"Message-ID:") == 1


def test_replace_existing_true_without_an_existing_header_just_adds() -> None:
    rules = [{"headers": {"X-IB-Bulk-Id": "7"}, "replace_existing": True}]
    prepared = prepare(received(), policy(rules=rules))
    assert (prepared.prefix, prepared.dropped) == (b"X-IB-Bulk-Id: 7\r\n", ())
    assert prepared.as_bytes() == b"X-IB-Bulk-Id: 7\r\n" + FULL


# --- From and alignment -------------------------------------------------------------------------

NO_FROM = Reply(550, "5.6.0", "The message has no valid From: header; add one such as From: <app@example.com>")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\nFrom: <billing@erp.example.com>\r\n",  # only in the body
        msg("To: customer@example.org", "Subject: no from"),
        msg("From: undisclosed-recipients:;"),
        msg("From: "),
        msg("From: Billing Department"),
        msg("From: <billing at erp.example.com>"),
    ],
)
def test_no_parseable_from_is_550_5_6_0(data: bytes) -> None:
    assert rejected(received(data), policy()) == NO_FROM


def test_a_line_that_is_not_a_field_is_refused_not_taken_for_the_body() -> None:
    data = b"Subject: x\r\nthis ends the headers\r\nFrom: <billing@erp.example.com>\r\n\r\n"
    assert rejected(received(data), policy()).text.startswith("Header line 2 is neither a field")


def test_misaligned_is_550_5_7_1_naming_both_domains() -> None:
    data = msg("From: <app@example.com>", "Message-ID: <a@b>", "Date: x")
    reply = rejected(received(data, mail_from="bounce@other.example.org"), policy("reject"))
    assert reply == Reply(
        550,
        "5.7.1",
        "Envelope sender domain other.example.org and header From domain example.com are not aligned; "
        "Infobip requires the same organizational domain",
    )


def test_aligned_by_organizational_domain_passes_in_reject_mode() -> None:
    data = msg("From: App <app@example.co.uk>", "Message-ID: <a@b>", "Date: x")
    prepared = prepare(received(data, mail_from="bounce@mail.example.co.uk"), policy("reject"))
    assert prepared.mail_from == "bounce@mail.example.co.uk"


def test_rewrite_mode_sets_the_envelope_sender_to_the_header_from() -> None:
    data = msg("From: App <app@example.com>", "Message-ID: <a@b>", "Date: x")
    rules = [{"sender_domain": "example.com", "headers": {"X-Sender": "{sender} {sender_domain}"}}]
    prepared = prepare(received(data, mail_from="bounce@other.example.org"), policy("rewrite", rules))
    assert prepared.mail_from == "app@example.com"
    assert prepared.prefix == b"X-Sender: app@example.com example.com\r\n"  # rules see the rewritten sender
    assert prepared.as_bytes() == prepared.prefix + data


def test_rewrite_mode_keeps_an_aligned_sender() -> None:
    data = msg("From: App <app@example.com>", "Message-ID: <a@b>", "Date: x")
    prepared = prepare(received(data, mail_from="bounce@mail.example.com"), policy("rewrite"))
    assert prepared.mail_from == "bounce@mail.example.com"


def test_off_mode_sends_misaligned_mail_as_is() -> None:
    data = msg("From: App <app@example.com>", "Message-ID: <a@b>", "Date: x")
    prepared = prepare(received(data, mail_from="bounce@other.example.org"), policy("off"))
    assert (prepared.mail_from, prepared.prefix, prepared.original) == ("bounce@other.example.org", b"", data)


def test_off_mode_still_requires_a_from() -> None:
    assert rejected(received(msg("Subject: x")), policy("off")) == NO_FROM


def test_the_from_address_is_the_one_a_mail_client_shows() -> None:
    assert from_address('"Billing, ERP" <billing@erp.example.com>') == "billing@erp.example.com"
    assert from_address("billing@erp.example.com") == "billing@erp.example.com"
    assert from_address("billing@erp.example.com (Billing)") == "billing@erp.example.com"
    for several in ('"Billing, ERP" <billing@erp.example.com>, other@example.net', "Team: a@example.com;"):
        with pytest.raises(Rejection):  # several addresses, or a group: tests/test_header_block.py
            from_address(several)


@pytest.mark.parametrize(
    ("address", "safe"),
    [
        ("app@example.com", True),
        ("first.last+tag@sub.example.co.uk", True),
        ("a@[192.0.2.1]", True),
        ("", False),
        ("no-at-sign", False),
        ("a b@example.com", False),
        ("a@exa mple.com", False),
        ("<a@example.com>", False),
        ("a@example.com\r\nRCPT TO:<x@y>", False),
        ("a@example.com>", False),
        ("app@b\u00fccher.de", False),
    ],
)
def test_is_safe_address(address: str, safe: bool) -> None:
    assert is_safe_address(address) is safe


@pytest.mark.parametrize(
    ("address", "within"),
    [
        ("app@example.com", True),
        ("a@[192.0.2.1]", True),
        ("l" * 64 + "@example.com", True),
        ("l" * 65 + "@example.com", False),  # RFC 5321: a local part of 64 octets at most
        ("a@" + "d" * 63 + ".example", True),
        ("a@" + "d" * 64 + ".example", False),  # a label of 63 at most
        ("a@" + ".".join(["d" * 63] * 4), True),
        ("a@" + ".".join(["d" * 50] * 6), False),  # a domain of 255 at most
        ("a@-bad-.com", False),
        ("a@example..com", False),
        ("a@example.com.", False),
    ],
)
def test_a_recipient_within_smtp_limits(address: str, within: bool) -> None:
    assert within_smtp_limits(address) is within
    assert is_safe_address(address)  # the limits are RCPT's alone: what an older relay queued still goes


# --- placeholders and injection ------------------------------------------------------------------


def test_placeholders_use_the_apps_message_id_and_the_client_ip() -> None:
    rules = [{"headers": {"X-IB-Callback-Data": '{"id":"{message_id}","ip":"{client_ip}","q":"{queue_id}"}'}}]
    prepared = prepare(received(), policy(rules=rules))
    assert prepared.prefix == (
        b'X-IB-Callback-Data: {"id":"<inv-42@erp.example.com>","ip":"10.1.2.3","q":"0190abcdef0123456789a"}\r\n'
    )


def test_a_hostile_message_id_cannot_add_a_header_line() -> None:
    rules = [{"headers": {"X-IB-Bulk-Id": "{message_id}"}}]
    # Line breaks and controls never get as far as a placeholder: the header block itself is refused.
    data = b"From: <billing@erp.example.com>\r\nDate: x\r\nMessage-ID: <a@b>\nBcc: victim@example.org\x0b\r\n\r\n"
    assert rejected(received(data), policy(rules=rules)).enhanced == "5.6.0"
    data = "From: <billing@erp.example.com>\r\nDate: x\r\nMessage-ID: <a@b>\u2028Bcc: v@example.org\r\n\r\n".encode()
    prepared = prepare(received(data), policy(rules=rules))
    assert prepared.prefix == b"X-IB-Bulk-Id: <a@b>\\u2028Bcc: v@example.org\r\n"  # JSON-escaped: one line


def test_a_policy_header_that_cannot_be_folded_is_554() -> None:
    data = msg("From: <billing@erp.example.com>", "Date: x", "Message-ID: <" + "a" * 990 + "@x>")
    rules = [{"headers": {"X-IB-Bulk-Id": "{message_id}"}}]
    reply = rejected(received(data), policy(rules=rules))
    assert (reply.code, reply.enhanced) == (554, "5.6.0")
    assert reply.text.startswith("Cannot add a policy header: header 'X-IB-Bulk-Id': the value has a run of more")


def test_recipients_and_queue_id_pass_through() -> None:
    prepared = prepare(received(recipients=("a@example.org",), queue_id="q1"), policy())
    assert (prepared.queue_id, prepared.recipients) == ("q1", ("a@example.org",))


# --- property: never anything but a result or a Rejection, and never an injected line ------------

RULES: list[dict[str, Any]] = [
    {"headers": {"X-IB-Callback-Data": DESIGN_CALLBACK + " {message_id} {sender} {sender_domain} {client_ip}"}},
    {"headers": {"X-IB-Tracking-Url": "https://hooks.example.com/{sender_domain}"}, "replace_existing": True},
    {"sender_domain": "example.com", "headers": {"X-IB-Bulk-Id": "{queue_id}"}},
]

text = st.text(max_size=80)
header_lines = st.lists(
    st.one_of(
        st.builds(lambda v: f"From: {v}", text),
        st.builds(lambda v: f"Message-ID: {v}", text),
        st.builds(lambda v: f"X-IB-Tracking-Url: {v}", text),
        st.just("Date: Sat, 21 Nov 2026 09:59:00 +0000"),
        st.just(" folded continuation"),
        text,
    ),
    max_size=6,
)


def _with_from(lines: list[str], at: int, tail: bytes) -> bytes:
    lines.insert(at % (len(lines) + 1), "From: App <app@example.com>")
    return "\r\n".join(lines).encode("utf-8", "surrogatepass") + tail


messages = st.one_of(
    st.binary(max_size=400),
    st.builds(
        lambda lines, tail: "\r\n".join(lines).encode("utf-8", "surrogatepass") + tail, header_lines, st.binary()
    ),
    st.builds(_with_from, header_lines, st.integers(0, 6), st.binary(max_size=100)),
    st.builds(_with_from, header_lines, st.integers(0, 6), st.sampled_from([b"", b"\r\n", b"\r\n\r\nbody\r\n"])),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=messages,
    mail_from=st.one_of(text, st.sampled_from(["app@example.com", "bounce@mail.example.com", "x@example.org"])),
    client_ip=st.one_of(text, st.just("10.0.0.1")),
    alignment=st.sampled_from(["reject", "rewrite", "off"]),
    date_rule=st.sampled_from([None, False, True]),  # a rule that sets Date, with this replace_existing
)
def test_prepare_returns_or_rejects_and_never_injects_a_line(
    data: bytes, mail_from: str, client_ip: str, alignment: str, date_rule: bool | None
) -> None:
    rules = RULES if date_rule is None else [*RULES, {"headers": {"Date": "{queue_id}"}, "replace_existing": date_rule}]
    try:
        prepared = prepare(received(data, mail_from=mail_from, client_ip=client_ip), policy(alignment, rules))
    except Rejection as rejection:
        assert rejection.reply.code in (550, 554)
        event(f"rejected {rejection.reply.code} {rejection.reply.enhanced}")
        if is_safe_address(mail_from):  # inbound lets no other sender through
            assert "\r" not in str(rejection.reply) and "\n" not in str(rejection.reply)
        return
    event("prepared")

    fields = parse_header_fields(data)
    present = {f.name.lower() for f in fields}
    expected = [name for name in ("message-id", "date") if name not in present]
    if "x-ib-callback-data" not in present:
        expected.append("x-ib-callback-data")
    expected.append("x-ib-tracking-url")  # replace_existing: always written
    if prepared.mail_from.rpartition("@")[2].lower() == "example.com" and "x-ib-bulk-id" not in present:
        expected.append("x-ib-bulk-id")
    if date_rule and "date" in present:
        expected.append("date")  # else it takes the place of the Date we add, or is not written

    lines = prepared.prefix.split(b"\r\n")
    assert lines[-1] == b""  # the prefix is whole lines
    lines = lines[:-1]
    starts = [line for line in lines if line[:1] not in (b" ", b"\t")]
    assert [line.split(b":", 1)[0].decode().lower() for line in starts] == expected
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert all(line.strip(b" \t") and len(line) <= 998 for line in lines)
    # The original stays byte for byte, minus only whole fields a replace_existing rule removed.
    replaced = {"x-ib-tracking-url", "date"} if date_rule else {"x-ib-tracking-url"}
    dropped = [f for f in fields if f.name.lower() in replaced]
    assert list(prepared.dropped) == [(f.start, f.end) for f in dropped]
    kept = bytearray(data)
    for field in reversed(dropped):
        del kept[field.start : field.end]
    assert prepared.as_bytes() == prepared.prefix + bytes(kept)
    assert prepared.size == len(prepared.as_bytes())
    # Never a second Message-ID or Date where the app sent none, or after a rule replaced them.
    sent = [f.name.lower() for f in parse_header_fields(prepared.as_bytes())]
    assert sent.count("message-id") == max(1, [f.name.lower() for f in fields].count("message-id"))
    assert sent.count("date") == (1 if date_rule else max(1, [f.name.lower() for f in fields].count("date")))
    if alignment != "rewrite":
        assert prepared.mail_from == mail_from
    from_field = find_field(fields, "From")
    assert from_field is not None and from_address(from_field.value)
