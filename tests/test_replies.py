"""relay.core.replies: the replies we send, and enhanced status codes on aiosmtpd's stock replies."""

from __future__ import annotations

import inspect
import re

import aiosmtpd.smtp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.replies import Rejection, Reply, with_enhanced_code

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")

# aiosmtpd 1.4.6's own reply lines (aiosmtpd/smtp.py), with what the client must see instead.
STOCK_REWRITES = [
    ("500 Error: bad syntax", "500 5.5.2 Syntax error: empty or malformed command line"),
    ("500 Command line too long", "500 5.5.6 Command line too long"),
    ("500 Line too long (see RFC5321 4.5.3.1.6)", "500 5.5.6 A message line is longer than this relay accepts"),
    ("500 Error: strict ASCII mode", "500 5.6.7 Non-ASCII command or address: SMTPUTF8 is not supported"),
    (
        "552 Error: message size exceeds fixed maximum message size",
        "552 5.3.4 Message too big for this relay (SIZE= is over the limit)",
    ),
    ("552 Error: Too much mail data", "552 5.3.4 Message too big for this relay; nothing was sent"),
    ("503 Error: send HELO first", "503 5.5.1 Send EHLO (or HELO) first"),
    ("503 Error: send EHLO first", "503 5.5.1 Send EHLO first"),
    ("503 Error: need MAIL command", "503 5.5.1 Send MAIL FROM first"),
    ("503 Error: need RCPT command", "503 5.5.1 Send RCPT TO first: the message has no recipient"),
    ("503 Error: nested MAIL command", "503 5.5.1 MAIL FROM already given; send RSET to start over"),
    ("553 5.1.3 Error: malformed address", "553 5.1.3 Malformed address; use <user@example.com>"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("250 OK", "250 2.0.0 OK"),
]

# Stock replies without a specific rewrite get the default enhanced code for their basic code.
STOCK_DEFAULTS = [
    ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
    ("501 Syntax: RCPT TO: <address>", "501 5.5.4 Syntax: RCPT TO: <address>"),
    ("501 Syntax: EHLO hostname", "501 5.5.4 Syntax: EHLO hostname"),
    ("501 Syntax: DATA", "501 5.5.4 Syntax: DATA"),
    ('500 Error: command "FOO" not recognized', '500 5.5.2 Error: command "FOO" not recognized'),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ("502 Could not VRFY bob", "502 5.5.1 Could not VRFY bob"),
    ("454 TLS not available", "454 4.7.0 TLS not available"),
    ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
    ("503 Already authenticated", "503 5.5.1 Already authenticated"),
    ("501 Error: SMTPUTF8 disabled", "501 5.5.4 Error: SMTPUTF8 disabled"),
    (
        "555 MAIL FROM parameters not recognized or not implemented",
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
    ),
    (
        "252 Cannot VRFY user, but will accept message and attempt delivery",
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
    ),
    ("421 Service closing", "421 4.3.0 Service closing"),
    ("451 Local error", "451 4.3.0 Local error"),
    ("452 Too many", "452 4.3.1 Too many"),
    ("550 Refused", "550 5.0.0 Refused"),
    ("554 Refused", "554 5.0.0 Refused"),
]

# Lines that must go out exactly as they are.
LEFT_ALONE = [
    "220 relay.example.internal ESMTP Python SMTP 1.4.6",  # greeting
    "220 Ready to start TLS",
    "354 End data with <CR><LF>.<CR><LF>",
    "334 VXNlcm5hbWU6",  # AUTH challenge
    "334 ",
    "250-relay.example.internal",  # EHLO-style continuation lines
    "250-SIZE 20971520",
    "250-8BITMIME",
    "250-PIPELINING",
    "250-ENHANCEDSTATUSCODES",
    "214-Help text",
    # Already carrying an enhanced code: never a second one.
    "250 2.1.0 Sender <app@example.com> OK",
    "250 2.6.0 Message queued as abc",
    "421 4.7.0 EHLO sent too many times",
    "502 5.5.1 Too many unrecognized commands, goodbye.",
    "530 5.7.0 Authentication required",
    "538 5.7.11 Encryption required for requested authentication mechanism",
    "501 5.5.2 Can't decode base64",
    "235 2.7.0 Authentication successful",
    "535 5.7.8 Authentication credentials invalid",
    "554 5.7.1 Client address 192.0.2.1 is not allowed to relay through this server",
    "550 5.1.10 Recipient address has null MX",
    "250 2.0.0",
    # Codes we have no default for, and things that are not replies.
    "599 Strange",
    "250",
    "",
    "hello",
]


def test_the_stock_lines_are_the_ones_aiosmtpd_sends() -> None:
    # If aiosmtpd changes its wording, the rewrite table silently stops matching: catch that here.
    source = inspect.getsource(aiosmtpd.smtp)
    for line, _ in STOCK_REWRITES:
        wording = line.replace("send HELO first", "send {helo} first").replace("send EHLO first", "send {helo} first")
        wording = wording.replace("fixed maximum message size", "fixed maximum message ")
        assert wording in source, line


@pytest.mark.parametrize(("line", "expected"), STOCK_REWRITES)
def test_stock_replies_are_rewritten(line: str, expected: str) -> None:
    assert with_enhanced_code(line) == expected


@pytest.mark.parametrize(("line", "expected"), STOCK_DEFAULTS)
def test_stock_replies_get_the_default_code(line: str, expected: str) -> None:
    assert with_enhanced_code(line) == expected


@pytest.mark.parametrize("line", LEFT_ALONE)
def test_lines_left_alone(line: str) -> None:
    assert with_enhanced_code(line) == line


@pytest.mark.parametrize("line", [line for pair in STOCK_REWRITES + STOCK_DEFAULTS for line in pair] + LEFT_ALONE)
def test_never_adds_a_second_code(line: str) -> None:
    once = with_enhanced_code(line)
    assert with_enhanced_code(once) == once
    rest = once[4:]
    if ENHANCED.match(rest):
        assert not ENHANCED.match(rest.split(" ", 1)[1] if " " in rest else "")


@settings(max_examples=300, deadline=None)
@given(
    code=st.sampled_from(["211", "214", "221", "235", "250", "251", "252", "421", "450", "451", "452", "454"])
    | st.sampled_from(["500", "501", "502", "503", "504", "530", "535", "550", "552", "553", "554", "555"])
    | st.from_regex(r"[0-9]{3}", fullmatch=True),
    sep=st.sampled_from([" ", "-", ""]),
    text=st.text(max_size=40),
)
def test_any_line_ends_with_at_most_one_code(code: str, sep: str, text: str) -> None:
    line = f"{code}{sep}{text}"
    rest = line[4:]
    result = with_enhanced_code(line)
    assert with_enhanced_code(result) == result
    if any(line.startswith(prefix) for prefix, _ in STOCK_REWRITES):
        return
    if line[3:4] != " " or ENHANCED.match(rest):
        assert result == line
    elif result != line:
        assert ENHANCED.match(result[4:])
        assert result == f"{code} {result[4:].split(' ', 1)[0]} {rest}"  # the text itself is kept


def test_reply_str_and_permanence() -> None:
    reply = Reply(550, "5.7.1", "Sender domain example.net is not allowed")
    assert str(reply) == "550 5.7.1 Sender domain example.net is not allowed"
    assert reply.is_permanent is True
    assert Reply(451, "4.4.2", "later").is_permanent is False
    assert Reply(250, "2.0.0", "OK").is_permanent is False


def test_rejection_carries_its_reply() -> None:
    reply = Reply(550, "5.6.0", "no From")
    rejection = Rejection(reply)
    assert rejection.reply is reply
    assert str(rejection) == "550 5.6.0 no From"
    with pytest.raises(Rejection, match=r"^550 5\.6\.0 no From$"):
        raise rejection
