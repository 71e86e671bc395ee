"""Issue 12 item 2: the relay reads the header block the way a receiving MTA and a mail client would, and
refuses what they could read differently.

Socket tests send each hostile shape through the real relay, with a rule that owns X-IB-Notify-Url and
X-IB-Callback-Data (`replace_existing = true`), and check the reply, the metric reason, and that nothing (or
exactly the app's bytes behind the policy's headers) reached the Infobip stand-in. The fuzz tests compare the
relay's reading of From: and X-IB-* with the standard library's (`email`, policy SMTP) on the same bytes.
"""

from __future__ import annotations

import os
import re
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from relay.config import ListenSettings, PolicyRule, PolicySettings
from relay.core.alignment import aligned, domain_of
from relay.core.headers import parse_header_fields
from relay.core.message import Received
from relay.core.prepare import from_address, prepare
from relay.core.replies import Rejection
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay

SENDER = "billing@erp.example.com"
RCPT = "customer@example.org"
NOTIFY = "https://hooks.example.com/ib/delivery"
CALLBACK = '{"app":"erp"}'
RULES = [{"headers": {"X-IB-Notify-Url": NOTIFY, "X-IB-Callback-Data": CALLBACK}, "replace_existing": True}]
POLICY_PREFIX = f"X-IB-Notify-Url: {NOTIFY}\r\nX-IB-Callback-Data: {CALLBACK}\r\n".encode()
TAIL = b"To: <customer@example.org>\r\nMessage-ID: <m@x>\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\nHi.\r\n"

BARE = "550 5.6.0 The header block has a bare CR or LF; end every header line with CRLF; nothing was sent"
CONTROL = "550 5.6.0 The header block has a control character (only tab is allowed there); nothing was sent"
MALFORMED = (
    "550 5.6.0 The From: header is malformed, so mail programs could read different senders from it;"
    " use From: App <app@example.com>"
)
NOT_ONE = (
    "550 5.6.0 The From: header must hold exactly one address (no lists or groups), such as From: App <app@example.com>"
)


def not_a_line(number: int) -> str:
    return (
        f"550 5.6.0 Header line {number} is neither a field (Name: value) nor a continuation (a space or tab, then"
        " text), so receivers would read the headers differently; nothing was sent"
    )


HOSTILE: dict[str, tuple[bytes, str]] = {
    # The repros: a second X-IB-Notify-Url hidden from replace_existing.
    "bare LF hides a field": (
        b"From: <billing@erp.example.com>\r\nX-Pad: a\nX-IB-Notify-Url: https://attacker.example/\r\n",
        BARE,
    ),
    "line without a colon hides a field": (
        b"From: <billing@erp.example.com>\r\nX-Junk-No-Colon\r\nX-IB-Notify-Url: https://attacker.example/\r\n",
        not_a_line(2),
    ),
    "bare CR hides a field": (
        b"From: <billing@erp.example.com>\r\nX-Pad: a\rX-IB-Callback-Data: {}\r\n",
        BARE,
    ),
    "form feed in a value": (b"From: <billing@erp.example.com>\r\nX-Pad: a\x0cX-IB-Notify-Url: x\r\n", CONTROL),
    "NUL in a value": (b"From: <billing@erp.example.com>\r\nSubject: a\x00b\r\n", CONTROL),
    "space before the colon": (
        b"From: <billing@erp.example.com>\r\nX-IB-Notify-Url : https://a.example/\r\n",
        not_a_line(2),
    ),
    "whitespace-only line": (
        b"From: <billing@erp.example.com>\r\n   \r\nX-IB-Notify-Url: https://a.example/\r\n",
        not_a_line(2),
    ),
    "continuation of nothing": (
        b" X-IB-Notify-Url: https://a.example/\r\nFrom: <billing@erp.example.com>\r\n",
        not_a_line(1),
    ),
    "mbox From_ line": (
        b"From billing@erp.example.com Sat Nov 21 10:00:00 2026\r\nFrom: <billing@erp.example.com>\r\n",
        not_a_line(1),
    ),
    "duplicate owned X-IB field": (
        b"From: <billing@erp.example.com>\r\nX-IB-Notify-Url: https://a.example/1\r\nx-ib-notify-url: https://a.example/2\r\n",
        "550 5.6.0 The message has 2 X-IB-Notify-Url fields, a header this relay's policy sets; send one",
    ),
    # From: as a mail client shows it.
    "two From fields": (
        b"From: <billing@erp.example.com>\r\nFrom: <ceo@evil.example>\r\n",
        "550 5.6.0 The message has 2 From: fields; it must have exactly one",
    ),
    "address as display name, unquoted": (b"From: billing@erp.example.com <ceo@evil.example>\r\n", MALFORMED),
    "address as display name, quoted": (
        b'From: "ceo@evil.example" <billing@erp.example.com>\r\n',
        "550 5.7.1 The From: display name shows an address at evil.example, which is not the sender's domain;"
        " give the sender's own address only",
    ),
    "several addresses": (b"From: billing@erp.example.com, ceo@evil.example\r\n", NOT_ONE),
    "several aligned addresses": (b"From: a@erp.example.com, b@erp.example.com\r\n", NOT_ONE),
    "group": (b"From: Team: billing@erp.example.com;\r\n", NOT_ONE),
    "two addresses without a comma": (b"From: billing@erp.example.com ceo@evil.example\r\n", MALFORMED),
    "text after the address": (b"From: ERP <billing@erp.example.com> <ceo@evil.example>\r\n", MALFORMED),
    "From over one line long": (b"From: " + b"x" * 1000 + b" <billing@erp.example.com>\r\n", MALFORMED),
}

REASONS = {"550 5.7.1": "bad_headers", "550 5.6.0": "bad_headers", "552 5.3.4": "bad_headers"}


def rejected(relay: Any, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": reason})
    return value or 0.0


async def send(port: int, data: bytes, mail_from: str = SENDER) -> str:
    dialog = await Dialog.open(port)
    await dialog.hello()
    try:
        reply = await dialog.mail(mail_from, [RCPT], data)
        assert await dialog.send("NOOP") == "250 2.0.0 OK"  # the session goes on
        return reply
    finally:
        await dialog.close()


@pytest.mark.parametrize(("head", "expected"), HOSTILE.values(), ids=HOSTILE.keys())
async def test_an_ambiguous_header_block_is_refused_and_nothing_is_sent(
    standin: InfobipStandIn, start_relay: StartRelay, head: bytes, expected: str
) -> None:
    relay = await start_relay(policy={"rules": RULES})
    reply = await send(relay.port, head + TAIL)
    assert reply == expected
    assert standin.messages == [] and standin.connections == []
    assert rejected(relay, "bad_headers") == 1


FINE: dict[str, bytes] = {
    "plain": b"From: <billing@erp.example.com>\r\n",
    "quoted name with a comma": b'From: "Billing, ERP" <billing@erp.example.com>\r\n',
    "comment": b"From: billing@erp.example.com (Billing)\r\n",
    "own address as display name": b'From: "billing@erp.example.com" <billing@erp.example.com>\r\n',
    "aligned address in the name": b'From: "Billing via mail.erp.example.com" <billing@erp.example.com>\r\n',
    "obsolete phrase": b"From: John Q. Public <billing@erp.example.com>\r\n",
    "encoded word": b"From: =?utf-8?q?Caf=C3=A9?= <billing@erp.example.com>\r\n",
    "8-bit subject, folded From": "Subject: caf\u00e9\r\nFrom: Billing\r\n\t<billing@erp.example.com>\r\n".encode(),
    "the app's own X-IB field, once": b"From: <billing@erp.example.com>\r\nX-IB-Notify-Url: https://a.example/\r\n",
    "empty value": b"From: <billing@erp.example.com>\r\nX-Empty:\r\n",
}


@pytest.mark.parametrize("head", FINE.values(), ids=FINE.keys())
async def test_a_clear_header_block_goes_out_byte_for_byte_behind_the_policy_headers(
    standin: InfobipStandIn, start_relay: StartRelay, head: bytes
) -> None:
    relay = await start_relay(policy={"rules": RULES})
    data = head + TAIL
    reply = await send(relay.port, data)
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    own = re.search(rb"X-IB-Notify-Url: [^\r]*\r\n", data)
    assert got.data == POLICY_PREFIX + (data.replace(own.group(), b"") if own else data)
    sent = BytesParser(policy=SMTP).parsebytes(got.data)
    assert sent.get_all("X-IB-Notify-Url") == [NOTIFY] and sent.get_all("X-IB-Callback-Data") == [CALLBACK]


@pytest.mark.parametrize("limit", ["max_header_fields", "max_header_bytes"])
async def test_a_header_block_over_its_caps_is_refused_with_552(
    standin: InfobipStandIn, start_relay: StartRelay, limit: str
) -> None:
    relay = await start_relay(listen={"max_header_fields": 50, "max_header_bytes": 4000})
    head = b"From: <billing@erp.example.com>\r\n"
    at_cap = head + (b"a: b\r\n" * 45 if limit == "max_header_fields" else b"X-Long: " + b"v" * 3800 + b"\r\n")
    assert (await send(relay.port, at_cap + TAIL)).startswith("250 2.6.0 ")
    over = head + (b"a: b\r\n" * 51 if limit == "max_header_fields" else b"X-Long: " + b"v" * 4000 + b"\r\n")
    reply = await send(relay.port, over + TAIL)
    assert reply == (
        "552 5.3.4 The message has over 50 header fields, more than this relay reads; nothing was sent"
        if limit == "max_header_fields"
        else "552 5.3.4 The header block is over 4000 bytes, more than this relay reads; nothing was sent"
    )
    assert len(standin.messages) == 1 and rejected(relay, "bad_headers") == 1


# --- the same rules on plain values ---------------------------------------------------------------


def received(data: bytes, mail_from: str = SENDER) -> Received:
    from datetime import UTC, datetime

    return Received("q1", "10.0.0.1", mail_from, (RCPT,), data, datetime(2026, 11, 21, tzinfo=UTC), "relay.test")


POLICY = PolicySettings(rules=[PolicyRule(**rule) for rule in RULES])


@pytest.mark.parametrize(("head", "expected"), HOSTILE.values(), ids=HOSTILE.keys())
def test_prepare_refuses_each_hostile_shape_as_bad_headers(head: bytes, expected: str) -> None:
    with pytest.raises(Rejection) as info:
        prepare(received(head + TAIL), POLICY)
    assert (str(info.value.reply), info.value.reason) == (expected, "bad_headers")


def test_a_20_mb_block_of_tiny_fields_is_refused_without_reading_it() -> None:
    data = b"From: <billing@erp.example.com>\r\n" + b"a:\r\n" * 5_000_000 + b"\r\nbody\r\n"
    with pytest.raises(Rejection) as info:
        prepare(received(data), POLICY)
    assert info.value.reply.code == 552 and info.value.reason == "bad_headers"


def test_the_caps_default_to_what_a_legitimate_message_never_reaches() -> None:
    listen = ListenSettings()
    assert (listen.max_header_fields, listen.max_header_bytes) == (1000, 262144)


# --- fuzz: the relay's reading against the standard library's --------------------------------------
# A few hundred examples on every run; RELAY_FUZZ_EXAMPLES=20000 for a long run (SECURITY.md gives the last).
FUZZ = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "250"))

DOMAINS = ["erp.example.com", "mail.erp.example.com", "ERP.example.com", "evil.example", "example.co.uk"]
LOCALS = ["billing", "ceo", "a.b", "x+y", "a..b", ".a", "\u00e9"]
address = st.builds(lambda local, domain: f"{local}@{domain}", st.sampled_from(LOCALS), st.sampled_from(DOMAINS))
name = st.one_of(
    st.sampled_from(["", "ERP", "John Q. Public", "O'Brien", "Caf\u00e9", "=?utf-8?q?x?=", "Team:"]),
    address,
    st.builds(lambda a: f'"{a}"', address),
    st.text(st.sampled_from("ab <>\"(),;:@.\\'-[]"), max_size=12),
)
from_value = st.one_of(
    address,
    st.builds(lambda n, a: f"{n} <{a}>", name, address),
    st.builds(lambda a, b: f"{a}, {b}", address, address),
    st.builds(lambda n, a: f"{n}: {a};", name, address),
    st.builds(lambda a, c: f"{a} ({c})", address, name),
    st.builds(lambda n, a, rest: f"{n} <{a}>{rest}", name, address, name),
)
benign_line = st.sampled_from(
    [
        "Subject: hi",
        "To: <customer@example.org>",
        "X-IB-Notify-Url: https://attacker.example/",
        'x-ib-callback-data: {"evil":1}',
        "X-IB-Bulk-Id: b1",
        "Received: from a by b; Sat, 21 Nov 2026 10:00:00 +0000",
    ]
)
hostile_line = st.sampled_from(
    [
        "Subject :hi",
        " folded",
        "\tfolded",
        "X-Junk-No-Colon",
        "   ",
        "From billing@erp.example.com",
        ":",
        "X-Pad: a\nX-IB-Notify-Url: https://attacker.example/",
        "X-Pad: a\rX-IB-Notify-Url: https://attacker.example/",
        "X-Pad: a\x0bX-IB-Notify-Url: https://attacker.example/",
    ]
)
from_line = st.builds(lambda v: f"From: {v}", from_value)
other_line = st.one_of(*[benign_line] * 6, hostile_line, from_line)
separator = st.sampled_from(["\r\n"] * 20 + ["\n", "\r"])
header_block = st.builds(
    lambda others, at, first: [*others[:at], first, *others[at:]],
    st.lists(st.tuples(other_line, separator), max_size=4),
    st.integers(0, 4),
    st.tuples(from_line, separator),
)


def stdlib_from(data: bytes) -> str | None:
    """The one From: address the standard library reads, or None when it reads none or several."""
    try:
        message = BytesParser(policy=SMTP).parsebytes(data)
        froms = message.get_all("From") or []
        addresses = [a for field in froms for a in field.addresses]
        if len(froms) != 1 or len(addresses) != 1:
            return None
        return str(addresses[0].addr_spec)
    except Exception:  # its parser gives up on some inputs: then it reads no sender
        return None


def stdlib_x_ib(data: bytes) -> dict[str, list[str]]:
    message: EmailMessage = BytesParser(policy=SMTP).parsebytes(data)  # type: ignore[assignment]
    return {key: [str(v) for v in message.get_all(key) or []] for key in ("X-IB-Notify-Url", "X-IB-Callback-Data")}


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=header_block, mail_from=st.sampled_from([SENDER, "bounce@mail.erp.example.com", "x@evil.example"]))
def test_no_message_is_aligned_to_one_reader_and_misaligned_to_the_other(
    lines: list[tuple[str, str]], mail_from: str
) -> None:
    data = "".join(text + sep for text, sep in lines).encode("utf-8") + b"\r\nbody\r\n"
    ours = stdlib_from(data)
    stdlib_aligned = ours is not None and aligned(domain_of(mail_from), domain_of(ours))
    try:
        prepared = prepare(received(data, mail_from), POLICY)
    except Rejection as rejection:
        event(f"refused: {rejection.reason} {rejection.reply.text[:45]}")
        if rejection.reason == "misaligned":
            assert not stdlib_aligned, (data, ours)
        return
    event("accepted")
    # The relay calls it aligned: so does the standard library, reading the same sender ...
    assert stdlib_aligned, (data, ours)
    froms = [f for f in parse_header_fields(data) if f.name.lower() == "from"]
    assert [from_address(f.value) for f in froms] == [ours]
    # ... the same fields in the same order ...
    assert [f.name for f in parse_header_fields(data)] == BytesParser(policy=SMTP).parsebytes(data).keys()
    # ... and in what goes upstream, exactly the policy's X-IB fields and the same one sender.
    sent = prepared.as_bytes()
    assert stdlib_x_ib(sent) == {"X-IB-Notify-Url": [NOTIFY], "X-IB-Callback-Data": [CALLBACK]}
    assert stdlib_from(sent) == ours and prepared.mail_from == mail_from


@settings(max_examples=FUZZ, deadline=None)
@given(value=from_value)
def test_a_from_value_the_relay_reads_is_read_the_same_by_the_standard_library(value: str) -> None:
    try:
        ours = from_address(value)
    except Rejection:
        return
    header = SMTP.header_factory("From", value)
    assert [a.addr_spec for a in header.addresses] == [ours], value
    assert [g.display_name for g in header.groups] == [None]
    assert all(type(d).__name__ == "ObsoleteHeaderDefect" for d in header.defects), (value, header.defects)
