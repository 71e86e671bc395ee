"""Hostile clients against the real relay over real sockets (issue 5), and property tests for the pure code.

Every socket test checks both sides: the exact replies the client saw, and what did (or did not) reach the
Infobip stand-in. The stand-in records messages after its own dot-unstuffing; `upstream_wire` records the
exact (decrypted) bytes the relay wrote to it, for the smuggling checks.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import os
import random
import re
import ssl
import string
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trustme
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relay.app import Relay
from relay.config import PolicyRule
from relay.core.alignment import check_alignment
from relay.core.headers import (
    MAX_LINE,
    HeaderError,
    fold_header,
    header_block_end,
    parse_header_fields,
    validate_header_value,
)
from relay.core.policy import PLACEHOLDERS, MessageFacts, expand, header_actions
from relay.inbound.server import RelaySMTP
from relay.testing.standin import InfobipStandIn, StandInMessage
from tests.conftest import Dialog, StartRelay, message, record_wire, relay_settings

SENDER = "billing@erp.example.com"
RCPT = "customer@example.org"
DATE = "Sat, 21 Nov 2026 10:00:00 +0000"
ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")
BUDGET_REPLY = "451 4.3.2 The relay holds too much message data right now; try again shortly"


# --- helpers ------------------------------------------------------------------------------------


def enhanced(reply: str) -> str:
    """The reply, after checking it is one line with a basic and an enhanced status code."""
    assert "\n" not in reply and ENHANCED.match(reply), repr(reply)
    return reply


def mail_data(tag: str, to: str = RCPT, body: bytes | None = None) -> bytes:
    """A complete message (Message-ID and Date set, so the relay adds nothing in front of it)."""
    return message(to=to, body=body if body is not None else f"{tag}\r\n".encode(), Message_ID=f"<{tag}@x>", Date=DATE)


async def session(port: int, local_addr: str | None = None) -> Dialog:
    dialog = await Dialog.open(port, local_addr=local_addr)
    assert (await dialog.reply()).startswith("220 relay.test ")
    assert (await dialog.send("EHLO app.test")).startswith("250-relay.test\n")
    return dialog


async def normal_message(dialog: Dialog, standin: InfobipStandIn, tag: str, to: str = RCPT) -> StandInMessage:
    """A well-behaved transaction on `dialog`; checks the reply and that Infobip got exactly these bytes."""
    before = len(standin.messages)
    data = mail_data(tag, to)
    reply = await dialog.mail(SENDER, [to], data)
    assert len(standin.messages) == before + 1, reply
    got = standin.messages[-1]
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert (got.mail_from, got.rcpt_tos, got.data) == (SENDER, [to], data)
    return got


async def read_to_eof(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything the server still sends, and the seconds until it closed; fails if it stays open."""
    started = time.monotonic()
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), within - (time.monotonic() - started)):
            received += chunk
    return bytes(received), time.monotonic() - started


async def until(condition: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def rejected(relay: Relay, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": reason})
    return value or 0.0


@pytest.fixture
def upstream_wire(monkeypatch: pytest.MonkeyPatch) -> dict[int, bytearray]:
    """Stand-in connection ident -> every byte the relay wrote on it (after TLS decryption)."""
    return record_wire(monkeypatch)


# --- SMTP smuggling ------------------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<evil@attacker.example>\r\n"
    b"RCPT TO:<victim@example.net>\r\n"
    b"DATA\r\n"
    b"From: <evil@attacker.example>\r\nTo: <victim@example.net>\r\nSubject: smuggled\r\n\r\nowned\r\n"
)
BARE_ENDS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CRLF.CR": b"\r\n.\r",
}
# A dot line next to a bare LF is refused at once and the connection closed (tests/test_data_framing.py); the
# bare-CR shapes are content, and must still make one message.
ONE_MESSAGE = {name: BARE_ENDS[name] for name in ("CR.CRLF", "CRLF.CR")}


async def smuggle(relay: Relay, bare_end: bytes) -> tuple[str, bytes]:
    """One transaction whose body hides a second one behind a bare end-of-data; the attacker does not stuff."""
    data = mail_data("smuggle", body=b"Line one" + bare_end + SMUGGLED)
    dialog = await session(relay.port)
    assert enhanced(await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert enhanced(await dialog.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await dialog.send("DATA")).startswith("354 ")
    reply = await dialog.send(data + b".\r\n")
    # Nothing after it was taken for a command: the very next reply is NOOP's.
    assert await dialog.send("NOOP") == "250 2.0.0 OK"
    await dialog.close()
    return reply, data


@pytest.mark.parametrize("bare_end", ONE_MESSAGE.values(), ids=ONE_MESSAGE.keys())
async def test_smuggling_cannot_split_one_message(
    standin: InfobipStandIn, start_relay: StartRelay, bare_end: bytes
) -> None:
    relay = await start_relay()
    reply, _ = await smuggle(relay, bare_end)

    [got] = standin.messages  # one message at Infobip, never two
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert (got.mail_from, got.rcpt_tos) == (SENDER, [RCPT])
    assert b"MAIL FROM:<evil@attacker.example>\r\n" in got.data and got.data.endswith(b"\r\n\r\nowned\r\n")
    assert b"Line one" in got.data
    assert [c.commands.count("MAIL") for c in standin.connections] == [1]
    assert all(c.commands.count("DATA") <= 1 for c in standin.connections)
    assert rejected(relay, "protocol") == 0


def lenient_ends(body: bytes) -> list[int]:
    """Offsets of every dot between line breaks of any kind (CR, LF or CRLF): what a lenient server may
    take for the end of data."""
    return [m.start() for m in re.finditer(rb"(?=[\r\n]\.[\r\n])", b"\n" + body)]


def body_on_wire(wire: bytes) -> bytes:
    """The bytes between the pipelined DATA command and the end of the connection's only message."""
    start = wire.index(b"\r\nDATA\r\n") + len(b"\r\nDATA\r\n")
    return wire[start:]


@pytest.mark.parametrize(
    "bare_end",
    [pytest.param(value) for value in ONE_MESSAGE.values()],
    ids=ONE_MESSAGE.keys(),
)
async def test_upstream_wire_has_no_bare_end_of_data(
    standin: InfobipStandIn, start_relay: StartRelay, upstream_wire: dict[int, bytearray], bare_end: bytes
) -> None:
    relay = await start_relay()
    reply, _ = await smuggle(relay, bare_end)
    [got] = standin.messages
    assert reply.startswith("250 2.6.0 ")
    body = body_on_wire(bytes(upstream_wire[got.connection]))
    assert body.endswith(b"\r\n.\r\n")
    # The only dot between line breaks is the real end of data, whichever way a server splits lines.
    assert lenient_ends(body) == [len(body) - 3], body


# --- protocol abuse: every command gets a reply with an enhanced code, and the session goes on ------


ABUSE: dict[str, tuple[list[bytes], list[str]]] = {
    "nul in a verb": ([b"NO\x00OP\r\n"], [r'500 5\.5\.2 Error: command "NO.OP" not recognized']),
    "nul in an address": (
        [b"MAIL FROM:<bill\x00ing@erp.example.com>\r\n"],
        [r"553 5\.1\.7 Sender address must look like user@example\.com"],
    ),
    "10 KB command line": ([b"NOOP " + b"x" * 10240 + b"\r\n"], [r"500 5\.5\.6 Command line too long"]),
    "10 KB address": (
        [b"MAIL FROM:<" + b"a" * 10240 + b"@erp.example.com>\r\n"],
        [r"500 5\.5\.6 Command line too long"],
    ),
    "unknown command": ([b"XYZZY plugh\r\n"], [r'500 5\.5\.2 Error: command "XYZZY" not recognized']),
    "help": (
        [b"HELP\r\n"],
        [r"250 2\.0\.0 Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"],
    ),
    "data before mail": ([b"DATA\r\n"], [r"503 5\.5\.1 Send MAIL FROM first"]),
    "data after a refused mail": (
        [b"MAIL FROM:<a b@example.com>\r\n", b"DATA\r\n"],
        [r"553 5\.1\.7 Sender address must look like user@example\.com", r"503 5\.5\.1 Send MAIL FROM first"],
    ),
    "data before rcpt": (
        [f"MAIL FROM:<{SENDER}>\r\n".encode(), b"DATA\r\n", b"RSET\r\n"],
        [r"250 2\.1\.0 Sender .*", r"503 5\.5\.1 Send RCPT TO first: the message has no recipient", r"250 2\.0\.0 OK"],
    ),
    "rcpt before mail": ([b"RCPT TO:<x@example.org>\r\n"], [r"503 5\.5\.1 Send MAIL FROM first"]),
    "mail twice": (
        [f"MAIL FROM:<{SENDER}>\r\n".encode(), f"MAIL FROM:<{SENDER}>\r\n".encode(), b"RSET\r\n"],
        [
            rf"250 2\.1\.0 Sender <{re.escape(SENDER)}> OK",
            r"503 5\.5\.1 MAIL FROM already given; send RSET to start over",
            r"250 2\.0\.0 OK",
        ],
    ),
    "non-ascii sender": (
        ["MAIL FROM:<bïlling@erp.example.com>\r\n".encode()],
        [r"500 5\.6\.7 Non-ASCII command or address: SMTPUTF8 is not supported"],
    ),
    "empty lines": (
        [b"\r\n", b"\n", b"   \r\n"],
        [r"500 5\.5\.2 Syntax error: empty or malformed command line"] * 2
        + [r'500 5\.5\.2 Error: command "" not recognized'],
    ),
    "lower-case and padded": ([b"noop\r\n", b"rset   \r\n"], [r"250 2\.0\.0 OK"] * 2),
}


@pytest.mark.parametrize("lines,expected", ABUSE.values(), ids=ABUSE.keys())
async def test_each_abusive_command_gets_an_enhanced_reply_and_the_session_goes_on(
    standin: InfobipStandIn, start_relay: StartRelay, lines: list[bytes], expected: list[str]
) -> None:
    relay = await start_relay()
    dialog = await session(relay.port)
    for line, pattern in zip(lines, expected, strict=True):
        dialog.writer.write(line)
        reply = enhanced(await dialog.reply())
        assert re.fullmatch(pattern, reply), reply
    assert standin.messages == []
    await normal_message(dialog, standin, "after-abuse")
    await dialog.close()
    assert len(standin.messages) == 1


async def test_commands_before_ehlo_are_refused_with_enhanced_codes(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    dialog = await Dialog.open(relay.port)
    await dialog.reply()
    for line in (f"MAIL FROM:<{SENDER}>", f"RCPT TO:<{RCPT}>", "DATA"):
        assert await dialog.send(line) == "503 5.5.1 Send EHLO (or HELO) first"
    assert (await dialog.send("EHLO app.test")).startswith("250-")
    await normal_message(dialog, standin, "after-ehlo")
    await dialog.close()


async def test_nul_bytes_in_data_are_answered_and_passed_on_untouched(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    dialog = await session(relay.port)
    data = mail_data("nul", body=b"before\x00after\r\n\x00\r\n")
    reply = await dialog.mail(SENDER, [RCPT], data)
    [got] = standin.messages
    assert enhanced(reply) == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert got.data == data
    await normal_message(dialog, standin, "after-nul")
    await dialog.close()


async def two_mb_line_then_end(dialog: Dialog) -> str:
    assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await dialog.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await dialog.send("DATA")).startswith("354 ")
    dialog.writer.write(mail_data("long")[:-2] + b"y" * (2 * 1024 * 1024) + b"\r\nafter the long line\r\n.\r\n")
    return await dialog.reply()


async def test_two_mb_line_in_data_is_refused_and_nothing_is_sent(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    dialog = await session(relay.port)
    with structlog.testing.capture_logs() as logs:
        reply = await two_mb_line_then_end(dialog)
    assert reply == "500 5.5.6 A message line is longer than this relay accepts; nothing was sent"
    [line] = [e for e in logs if e["event"] == "message_rejected"]  # ops can tell an app why
    assert line["reply"] == reply and line["reason"] == "too_long" and line["size"] > 2 * 1024 * 1024
    assert standin.messages == []
    assert await dialog.send("RSET") == "250 2.0.0 OK"
    await normal_message(dialog, standin, "after-long-line")
    await dialog.close()
    assert len(standin.messages) == 1


@pytest.mark.parametrize("problem", ["too_long", "too_big", "memory_budget"])
async def test_the_transaction_is_over_after_a_refused_end_of_data(
    standin: InfobipStandIn, start_relay: StartRelay, problem: str
) -> None:
    relay = await start_relay(
        listen={"max_message_size": 200_000} if problem == "too_big" else {},
        limits={"memory_budget": 50_000} if problem == "memory_budget" else {},
    )
    dialog = await session(relay.port)
    if problem == "too_long":
        assert (await two_mb_line_then_end(dialog)).startswith("500 5.5.6 ")
    else:
        body = b"z" * 998 + b"\r\n"
        reply = await dialog.mail(SENDER, [RCPT], mail_data("big", body=body * 300))
        assert reply.startswith("552 5.3.4 " if problem == "too_big" else "451 4.3.2 ")
    assert standin.messages == []
    assert rejections(relay) == {problem: 1}
    # Straight on to the next transaction, as RFC 5321 allows after any reply to the end of data.
    await normal_message(dialog, standin, f"after-{problem}")
    await dialog.close()


async def test_replies_never_echo_control_characters(start_relay: StartRelay) -> None:
    relay = await start_relay()
    dialog = await session(relay.port)
    for line in (b"NO\x00OP\r\n", b"FOO\rBAR\r\n", b"VRFY <\x01\r\n", b"VRFY <a\x1b[31m\r\n", b"X\x7f\r\n"):
        dialog.writer.write(line)
        reply = enhanced(await dialog.reply())
        assert not re.search(r"[\x00-\x1f\x7f]", reply), (line, reply)
    await dialog.close()


@pytest.mark.parametrize("line", ["MAIL FROM:noreply@", "VRFY x@"])
async def test_an_address_with_an_empty_domain_is_refused_for_good(
    standin: InfobipStandIn, start_relay: StartRelay, line: str
) -> None:
    relay = await start_relay()
    dialog = await session(relay.port)
    reply = enhanced(await dialog.send(line))
    assert reply[:1] == "5", reply
    await normal_message(dialog, standin, "after-empty-domain")
    await dialog.close()


@pytest.mark.parametrize("verb", ["EHLO", "HELO"])
async def test_ehlo_or_helo_without_a_name_gets_an_enhanced_501(start_relay: StartRelay, verb: str) -> None:
    relay = await start_relay()
    dialog = await Dialog.open(relay.port)
    await dialog.reply()
    reply = await dialog.send(verb)
    await dialog.close()
    assert enhanced(reply).startswith("501 5.5.4 ")


# --- what each refusal counts as ------------------------------------------------------------------


def rejections(relay: Relay) -> dict[str, float]:
    """relay_messages_rejected_total by reason, leaving out reasons never counted."""
    [family] = [m for m in relay.metrics.registry.collect() if m.name == "relay_messages_rejected"]
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total") and s.value}


async def test_each_refusal_is_counted_under_its_own_reason(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(
        listen={"max_recipients": 1, "max_message_size": 100_000},
        policy={"allowed_sender_domains": ["erp.example.com"]},
    )
    dialog = await Dialog.open(relay.port)
    await dialog.reply()
    assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("503 5.5.1 ")  # aiosmtpd's: protocol
    assert (await dialog.send("EHLO app.test")).startswith("250-")
    assert (await dialog.send(f"MAIL FROM:<{SENDER}> SIZE=200000")).startswith("552 5.3.4 ")  # aiosmtpd's: size
    assert (await dialog.send("MAIL FROM:<x@other.example>")).startswith("550 5.7.1 ")  # sender
    assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await dialog.send("RCPT TO:<a@exa_mple.org>")).startswith("553 5.1.3 ")  # recipient
    assert (await dialog.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await dialog.send("RCPT TO:<b@example.org>")).startswith("452 4.5.3 ")  # too_many_recipients
    assert (await dialog.send("DATA")).startswith("354 ")
    assert (await dialog.send(message(sender="x@other.example") + b".\r\n")).startswith("550 5.7.1 ")  # misaligned
    assert (await dialog.mail(SENDER, [RCPT], b"Subject: no From\r\n\r\nHi\r\n")).startswith("550 5.6.0 ")
    assert (await dialog.mail(SENDER, [RCPT], mail_data("big", body=b"b" * 998 + b"\r\n") * 101)).startswith("552 ")
    await dialog.close()
    assert rejections(relay) == {
        "protocol": 1,
        "size": 1,
        "sender": 1,
        "recipient": 1,
        "too_many_recipients": 1,
        "misaligned": 1,
        "bad_headers": 1,
        "too_big": 1,
    }
    assert standin.messages == []


async def test_a_client_outside_the_allowed_networks_counts_as_client_refused(start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"allowed_networks": ["10.0.0.0/8"]})
    dialog = await Dialog.open(relay.port)
    assert await dialog.reply() == "554 5.7.1 Client address 127.0.0.1 is not allowed to relay through this server"
    await dialog.close()
    assert rejections(relay) == {"client_refused": 1}


# --- a socket-level fuzzer -----------------------------------------------------------------------

FUZZ_SEED = 20261122
FUZZ_LINES = 10_000
# The SMTP verbs, weighted so that transactions sometimes get as far as DATA, and verbs this relay lacks.
VERBS = {"EHLO": 8, "HELO": 3, "MAIL": 12, "RCPT": 12, "DATA": 6, "RSET": 4, "NOOP": 4, "QUIT": 1, "VRFY": 3}
VERBS |= {"EXPN": 2, "HELP": 2, "STARTTLS": 2, "AUTH": 3}
OTHER_VERBS = [
    b"BDAT",
    b"TURN",
    b"ETRN",
    b"ATRN",
    b"XCLIENT",
    b"XFORWARD",
    b"PROXY",
    b"SEND",
    b"X",
    b"GET",
    b"\x16\x03",
]
KNOWN_VERBS = {name.removeprefix("smtp_") for name in dir(RelaySMTP) if name.startswith("smtp_")}
SYNC_VERBS = {"DATA", "AUTH", "STARTTLS", "QUIT"}  # may change the dialog's mode: sent alone
BOGUS_LIMIT = 5  # aiosmtpd closes after this many unknown verbs on one connection
COMMAND_LIMIT = 512  # aiosmtpd's limit for a line with an unknown verb


ADDRESSES = [f"<{SENDER}>", f"<{RCPT}>", "<>", "<a@b>", "<@x:a@b>", "<a@[127.0.0.1]>", "<ümlaut@x.de>", "<a b@c>"]
PARAMETERS = [b"", b"", b" SIZE=10", b" SIZE=999999999999", b" BODY=8BITMIME", b" BODY=BINARY", b" X=Y", b" SIZE"]


def fuzz_argument(rng: random.Random, verb: bytes) -> bytes:
    pick = rng.random()
    if verb.upper() in (b"MAIL", b"RCPT") and pick < 0.6:
        keyword = {b"MAIL": b"FROM:", b"RCPT": b"TO:"}[verb.upper()] if rng.random() < 0.9 else b"TO:"
        return keyword + rng.choice(ADDRESSES).encode() + rng.choice(PARAMETERS)
    if pick < 0.15:
        return b""
    if pick < 0.45:
        return "".join(rng.choice(string.printable[:-5]) for _ in range(rng.randint(1, 40))).encode()
    if pick < 0.70:
        return bytes(rng.choice([0, 1, 7, 8, 9, 11, 12, 13, 27, 127, 0x41, 0x20]) for _ in range(rng.randint(1, 20)))
    if pick < 0.80:
        return bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(1, 20)))
    if pick < 0.90:
        return b"A" * rng.randint(400, 12_000)
    return b"PLAIN " + base64.b64encode(b"\0user\0password") if rng.random() < 0.5 else b"LOGIN"


def fuzz_line(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.03:
        line = b""
    elif pick < 0.06:
        line = bytes(rng.randrange(256) for _ in range(rng.randint(1, 80)))
    else:
        if rng.random() < 0.92:
            verb = rng.choices(list(VERBS), weights=list(VERBS.values()))[0].encode()
        else:
            verb = rng.choice(OTHER_VERBS)
        if rng.random() < 0.1:
            verb = verb.lower()
        line = verb + (b" " + fuzz_argument(rng, verb) if rng.random() < 0.85 else b"")
    line = line.replace(b"\n", b" ")  # one generated line is one protocol line
    return line + (b"\r\n" if rng.random() < 0.9 else b"\n")


def server_verb(line: bytes) -> str:
    """The verb as aiosmtpd reads it ('' for an empty line, '?' when it is not ASCII)."""
    stripped = line.rstrip(b"\r\n")
    try:
        return stripped.partition(b" ")[0].upper().decode("ascii")
    except UnicodeDecodeError:
        return "?"


def is_bogus(line: bytes) -> bool:
    """Does this line use up one of aiosmtpd's unknown-command allowances?"""
    stripped = line.rstrip(b"\r\n")
    return (
        bool(stripped)
        and stripped.isascii()
        and len(stripped) <= COMMAND_LIMIT
        and (server_verb(line) not in KNOWN_VERBS)
    )


def check_reply(lines: list[bytes], sent: bytes, seed: int) -> int:
    """Assert one reply is well formed for the line it answers; return its code."""
    where = f"seed {seed}: reply {lines!r} to {sent[:120]!r}"
    code = lines[0][:3]
    assert code.isdigit(), where
    for line in lines[:-1]:
        assert line.startswith(code + b"-"), where
    assert lines[-1].startswith(code + b" "), where
    verb = server_verb(sent)
    exempt = (verb in ("EHLO", "HELO") and code == b"250") or (verb, code) in (("DATA", b"354"), ("AUTH", b"334"))
    if not exempt:
        assert len(lines) == 1 and ENHANCED.match(lines[0].decode("ascii", "replace")), where
    return int(code)


class FuzzClient:
    """Sends the fuzzer's lines in pipelined batches; reconnects when the server hangs up."""

    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.seed = seed
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.bogus = 0  # unknown verbs sent on this connection
        self.last = b""  # the last reply line on this connection
        self.connections = 0
        self.codes: collections.Counter[int] = collections.Counter()

    async def connect(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**20)
        self.connections += 1
        self.bogus = 0
        greeting = await self.read_reply()
        assert greeting is not None and greeting[0].startswith(b"220 relay.test "), (self.seed, greeting)
        self.last = greeting[-1]

    async def read_reply(self) -> list[bytes] | None:
        assert self.reader is not None
        lines: list[bytes] = []
        while True:
            try:
                raw = await asyncio.wait_for(self.reader.readline(), 10)
            except ConnectionResetError:
                raw = b""
            if not raw:
                assert not lines, f"seed {self.seed}: closed in the middle of a reply {lines!r}"
                return None
            assert raw.endswith(b"\r\n"), f"seed {self.seed}: reply line without CRLF {raw!r}"
            lines.append(raw[:-2])
            if raw[3:4] != b"-":
                return lines

    def closing(self) -> bool:
        """Did the last reply announce a hang-up (QUIT's 221, or a 421/5xx that ends the session)?"""
        return self.last.startswith((b"221 ", b"421 ")) or self.last.startswith(b"502 5.5.1 Too many")

    async def exchange(self, batch: list[bytes]) -> int:
        """Send a batch and check one reply per line; returns how many lines were answered."""
        assert self.writer is not None
        with contextlib.suppress(ConnectionResetError):
            self.writer.write(b"".join(batch))
        for index, line in enumerate(batch):
            reply = await self.read_reply()
            if reply is None:
                assert self.last[:1] == b"5" or self.closing(), (
                    f"seed {self.seed}: closed after {self.last!r} without a 421/5xx, before {line[:80]!r}"
                )
                return index
            code = check_reply(reply, line, self.seed)
            self.codes[code] += 1
            self.last = reply[-1]
            if code == 354:  # a fuzzed transaction got this far: end it with an empty message
                self.writer.write(b".\r\n")
                end = await self.read_reply()
                assert end is not None, f"seed {self.seed}: closed after the end of data"
                assert enhanced(end[0].decode()).startswith("550 5.6.0 "), (self.seed, end)
                self.last = end[-1]
            elif code == 334:  # an AUTH challenge: cancel it
                self.writer.write(b"*\r\n")
                cancelled = await self.read_reply()
                assert cancelled is not None and cancelled[0].startswith(b"501 "), (self.seed, cancelled)
                self.last = cancelled[-1]
            elif code == 220:  # STARTTLS accepted: this client does not do TLS, so it starts over
                assert server_verb(line) == "STARTTLS", (self.seed, line)
                self.last = b"221 "
                return index + 1
        return len(batch)

    async def run(self, lines: list[bytes]) -> None:
        await self.connect()
        pending = collections.deque(lines)
        while pending:
            batch: list[bytes] = []
            bogus = self.bogus
            while pending and len(batch) < 200:
                line = pending[0]
                if server_verb(line) in SYNC_VERBS and batch:
                    break  # sent alone, in the next batch
                batch.append(pending.popleft())
                bogus += is_bogus(line)
                if bogus >= BOGUS_LIMIT or server_verb(line) in SYNC_VERBS:
                    break  # the server may hang up after this one: nothing may follow it in the pipe
            answered = await self.exchange(batch)
            self.bogus = bogus
            pending.extendleft(reversed(batch[answered:]))  # unanswered after a hang-up: sent again
            if answered < len(batch) or self.closing():
                await self.connect()
        assert self.writer is not None
        self.writer.close()


async def test_fuzzed_command_lines_all_get_replies_while_others_are_served(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    seed = int(os.environ.get("RELAY_FUZZ_SEED", FUZZ_SEED))  # set it to explore other sequences
    print(f"fuzz seed {seed}")
    rng = random.Random(seed)
    lines = [fuzz_line(rng) for _ in range(FUZZ_LINES)]
    fuzzer = FuzzClient(relay.port, seed)
    fuzzing = asyncio.ensure_future(fuzzer.run(lines))
    served = 0
    try:
        while not fuzzing.done() or served == 0:
            dialog = await session(relay.port)
            await normal_message(dialog, standin, f"meanwhile-{served}")
            await dialog.close()
            served += 1
    finally:
        if not fuzzing.done():
            fuzzing.cancel()
    await fuzzing  # re-raises the fuzzer's failure, with its seed
    assert served >= 2
    assert len(standin.messages) == served  # nothing the fuzzer sent reached Infobip
    assert fuzzer.connections > 10 and fuzzer.codes[250] > 100 and fuzzer.codes[500] > 100, fuzzer.codes
    print(f"fuzz: {fuzzer.connections} connections, {served} served meanwhile, codes {sorted(fuzzer.codes.items())}")


# --- limits --------------------------------------------------------------------------------------


async def test_connections_over_the_cap_get_421_and_a_freed_slot_is_served(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(listen={"max_connections": 2, "max_connections_per_client": 0})  # the total cap
    first = await session(relay.port)
    second = await session(relay.port)
    third = await Dialog.open(relay.port)
    assert await third.reply() == "421 4.7.0 Too many connections to this relay; try again later"
    assert (await read_to_eof(third.reader, 5))[0] == b""
    await third.close()
    await first.close()
    await until(lambda: len(relay.sessions.live) == 1)
    fourth = await session(relay.port)
    await normal_message(fourth, standin, "fourth")
    await normal_message(second, standin, "second")
    await fourth.close()
    await second.close()
    assert rejected(relay, "too_many_connections") == 1


async def test_client_messages_per_minute(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"host": "0.0.0.0"}, limits={"client_messages_per_minute": 3})
    dialog = await session(relay.port)
    for n in range(3):
        await normal_message(dialog, standin, f"m{n}")
    assert await dialog.send(f"MAIL FROM:<{SENDER}>") == (
        "451 4.7.0 Rate limit: 127.0.0.1 sent more than 3 messages a minute; try again later"
    )
    assert await dialog.send(f"RCPT TO:<{RCPT}>") == "503 5.5.1 Send MAIL FROM first"
    await dialog.close()
    assert len(standin.messages) == 3
    other = await session(relay.port, local_addr="127.0.0.2")  # another client has its own allowance
    await normal_message(other, standin, "other-client")
    await other.close()
    assert rejected(relay, "rate_limit") == 1


async def test_global_messages_per_minute(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"host": "0.0.0.0"}, limits={"messages_per_minute": 3})
    one = await session(relay.port)
    two = await session(relay.port, local_addr="127.0.0.2")
    await normal_message(one, standin, "g1")
    await normal_message(two, standin, "g2")
    await normal_message(one, standin, "g3")
    refusal = "451 4.7.0 Rate limit: this relay takes at most 3 messages a minute; try again later"
    assert await two.send(f"MAIL FROM:<{SENDER}>") == refusal
    assert await one.send(f"MAIL FROM:<{SENDER}>") == refusal
    await one.close()
    await two.close()
    assert len(standin.messages) == 3
    assert rejected(relay, "rate_limit") == 2


async def test_client_recipients_per_hour(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(limits={"client_recipients_per_hour": 5})
    dialog = await session(relay.port)
    assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 2.1.0 ")
    recipients = [f"r{n}@example.org" for n in range(6)]
    replies = [await dialog.send(f"RCPT TO:<{r}>") for r in recipients]
    assert replies[:5] == [f"250 2.1.5 Recipient <{r}> OK" for r in recipients[:5]]
    assert replies[5] == "451 4.7.0 Rate limit: 127.0.0.1 sent to more than 5 recipients an hour; try again later"
    assert (await dialog.send("DATA")).startswith("354 ")
    data = mail_data("five")
    reply = await dialog.send(data + b".\r\n")
    await dialog.close()
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert got.rcpt_tos == recipients[:5] and got.data == data


async def test_memory_budget_refuses_a_message_larger_than_it(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(limits={"memory_budget": 50_000})
    dialog = await session(relay.port)
    reply = await dialog.mail(SENDER, [RCPT], mail_data("huge", body=(b"h" * 98 + b"\r\n") * 600))
    assert reply == BUDGET_REPLY
    assert standin.messages == []
    assert relay.handler.budget.used == 0
    await dialog.close()
    small = await session(relay.port)
    await normal_message(small, standin, "small")
    await small.close()
    assert rejected(relay, "memory_budget") == 1


async def test_memory_budget_held_by_one_upload_refuses_another_data_before_354(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    budget = 50_000
    relay = await start_relay(limits={"memory_budget": budget})
    head = mail_data("holder", body=b"")
    filler = budget - len(head)
    body = (b"f" * 98 + b"\r\n") * (filler // 100) + b"g" * (filler % 100 - 2) + b"\r\n"
    holder_data = head + body
    assert len(holder_data) == budget

    holder = await session(relay.port)
    assert (await holder.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await holder.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await holder.send("DATA")).startswith("354 ")
    holder.writer.write(holder_data)  # everything but the end of data
    await until(lambda: relay.handler.budget.used == budget)

    other = await session(relay.port)
    assert (await other.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await other.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert await other.send("DATA") == BUDGET_REPLY  # before 354: no bytes are taken in

    reply = await holder.send(b".\r\n")
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}" and got.data == holder_data
    assert relay.handler.budget.used == 0
    data = mail_data("other")
    assert (await other.send("DATA")).startswith("354 ")
    assert (await other.send(data + b".\r\n")).startswith("250 2.6.0 ")
    assert standin.messages[-1].data == data
    await holder.close()
    await other.close()


# --- timeouts ------------------------------------------------------------------------------------


async def test_a_silent_client_is_disconnected(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"timeout": 0.5})
    dialog = await Dialog.open(relay.port)
    assert (await dialog.reply()).startswith("220 ")
    rest, seconds = await read_to_eof(dialog.reader, 3)
    assert rest == b"" and 0.3 < seconds < 2.0
    await dialog.close()


async def test_half_a_command_line_is_disconnected(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"timeout": 0.5})
    dialog = await session(relay.port)
    dialog.writer.write(b"MAIL FROM:<billing@erp.exa")
    rest, seconds = await read_to_eof(dialog.reader, 3)
    assert rest == b"" and 0.3 < seconds < 2.0
    await dialog.close()
    assert standin.connections == []


async def start_trickle(dialog: Dialog, interval: float) -> asyncio.Task[None]:
    """Open a transaction and send one short header line every `interval` seconds, never ending it."""
    assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await dialog.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await dialog.send("DATA")).startswith("354 ")
    dialog.writer.write(mail_data("slow")[:-2].split(b"\r\n\r\n")[0] + b"\r\n")

    async def trickle() -> None:
        with contextlib.suppress(OSError):
            for n in range(100):
                dialog.writer.write(f"X-Slow-{n}: still here\r\n".encode())
                await dialog.writer.drain()
                await asyncio.sleep(interval)  # the pace is what is under test

    return asyncio.ensure_future(trickle())


@pytest.mark.parametrize("idle_timeout", [0.6, 1.5])
async def test_a_client_trickling_data_is_dropped_at_the_data_timeout(
    standin: InfobipStandIn, start_relay: StartRelay, idle_timeout: float
) -> None:
    relay = await start_relay(listen={"timeout": idle_timeout, "data_timeout": 1.0})
    dialog = await session(relay.port)
    trickling = await start_trickle(dialog, 0.3)
    rest, seconds = await read_to_eof(dialog.reader, 5)
    trickling.cancel()
    await dialog.close()
    # Lines keep coming faster than the idle timeout: the whole-DATA limit cut it, about on time.
    assert rest == b"" and 0.9 <= seconds < 2.5
    assert standin.messages == []
    await until(lambda: relay.sessions.in_data == 0)


async def test_a_slow_steady_upload_is_not_cut_by_the_idle_timeout(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(listen={"timeout": 0.5, "data_timeout": 10})
    dialog = await session(relay.port)
    data = mail_data("steady", body=b"".join(f"{n:05d} ".encode() + b"s" * 92 + b"\r\n" for n in range(2000)))
    assert len(data) > 200_000
    assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await dialog.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await dialog.send("DATA")).startswith("354 ")
    started = time.monotonic()
    chunk = len(data) // 30 + 1
    for offset in range(0, len(data), chunk):
        dialog.writer.write(data[offset : offset + chunk])
        await dialog.writer.drain()
        await asyncio.sleep(0.05)  # the pace is what is under test: ~1.5 s in all
    assert time.monotonic() - started > 1.2
    reply = await dialog.send(b".\r\n")
    await dialog.close()
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert got.data == data


# --- inbound STARTTLS and AUTH -------------------------------------------------------------------

CLIENT_PASSWORD = "client-pass-4711"


@pytest.fixture
def inbound_tls(tmp_path: Path) -> tuple[dict[str, Any], ssl.SSLContext]:
    """listen settings for STARTTLS with a trustme certificate and one AUTH user, and a client context."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "relay.crt", tmp_path / "relay.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    listen = {
        "tls_cert_file": str(cert_file),
        "tls_key_file": str(key_file),
        "auth_required": True,
        "users": [{"username": "erp", "password": CLIENT_PASSWORD, "allowed_sender_domains": ["erp.example.com"]}],
        "auth_failure_delay": 0.01,  # tests/test_auth_guessing.py covers the delay
    }
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return listen, context


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_starttls_then_auth_with_per_user_sender_domains(
    standin: InfobipStandIn, start_relay: StartRelay, inbound_tls: tuple[dict[str, Any], ssl.SSLContext]
) -> None:
    listen, context = inbound_tls
    relay = await start_relay(listen=listen, policy={"rules": [{"headers": {"X-Client": "{client_ip}"}}]})
    dialog = await Dialog.open(relay.port)
    await dialog.reply()
    ehlo = (await dialog.send("EHLO app.test")).split("\n")
    assert "250-STARTTLS" in ehlo and not any("AUTH" in line for line in ehlo)
    assert await dialog.send(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"
    assert (await dialog.send(f"AUTH PLAIN {plain('erp', CLIENT_PASSWORD)}")).startswith("538 5.7.11 ")
    assert await dialog.send("DATA") == "530 5.7.0 Authentication required"

    assert (await dialog.send("STARTTLS")).startswith("220 ")
    await dialog.writer.start_tls(context, server_hostname="localhost")
    ehlo = (await dialog.send("EHLO app.test")).split("\n")
    assert "250-AUTH PLAIN LOGIN" in ehlo and "250-STARTTLS" not in ehlo
    assert await dialog.send(f"MAIL FROM:<{SENDER}>") == "530 5.7.0 Authentication required"

    assert (await dialog.send("AUTH LOGIN")).startswith("334 ")
    assert (await dialog.send(base64.b64encode(b"erp").decode())).startswith("334 ")
    assert await dialog.send(base64.b64encode(b"wrong").decode()) == "535 5.7.8 Authentication credentials invalid"
    assert await dialog.send(f"AUTH PLAIN {plain('nobody', CLIENT_PASSWORD)}") == (
        "535 5.7.8 Authentication credentials invalid"
    )
    assert await dialog.send(f"AUTH PLAIN {plain('erp', CLIENT_PASSWORD)}") == "235 2.7.0 Authentication successful"
    assert await dialog.send("MAIL FROM:<someone@other.example>") == (
        "550 5.7.1 Sender domain other.example is not allowed to send through this relay"
    )
    data = mail_data("authenticated")
    reply = await dialog.mail(SENDER, [RCPT], data)
    await dialog.close()
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    # The session after STARTTLS still knows its client (for rules, rate limits and logs).
    assert got.data == b"X-Client: 127.0.0.1\r\n" + data
    assert rejected(relay, "auth_failed") == 2


async def test_garbage_instead_of_a_tls_handshake_closes_only_that_connection(
    standin: InfobipStandIn, start_relay: StartRelay, inbound_tls: tuple[dict[str, Any], ssl.SSLContext]
) -> None:
    listen, _ = inbound_tls
    relay = await start_relay(listen={**listen, "auth_required": False})
    victim = await session(relay.port)  # a session in progress on the same relay
    dialog = await session(relay.port)
    assert (await dialog.send("STARTTLS")).startswith("220 ")
    dialog.writer.write(b"MAIL FROM:<evil@attacker.example>\r\n" + bytes(range(256)) * 8)
    rest, _ = await read_to_eof(dialog.reader, 5)
    assert b"250" not in rest and b"MAIL" not in rest
    await dialog.close()
    await normal_message(victim, standin, "victim")
    fresh = await session(relay.port)
    await normal_message(fresh, standin, "fresh")
    await victim.close()
    await fresh.close()
    assert [m.mail_from for m in standin.messages] == [SENDER, SENDER]


async def test_starttls_inside_tls_is_refused_and_the_session_goes_on(
    standin: InfobipStandIn, start_relay: StartRelay, inbound_tls: tuple[dict[str, Any], ssl.SSLContext]
) -> None:
    listen, context = inbound_tls
    relay = await start_relay(listen={**listen, "auth_required": False})
    dialog = await session(relay.port)
    assert (await dialog.send("STARTTLS")).startswith("220 ")
    await dialog.writer.start_tls(context, server_hostname="localhost")
    assert (await dialog.send("EHLO app.test")).startswith("250-relay.test\n")
    try:
        assert enhanced(await dialog.send("STARTTLS"))[:1] == "5"
        await normal_message(dialog, standin, "after-second-starttls")
    finally:
        dialog.writer.transport.abort()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "after-starttls"])
async def test_a_client_still_connected_at_shutdown_hears_421(
    standin: InfobipStandIn, inbound_tls: tuple[dict[str, Any], ssl.SSLContext], tls: bool
) -> None:
    listen, context = inbound_tls
    relay = Relay(relay_settings(standin, listen={**listen, "auth_required": False}))
    await relay.start()
    try:
        dialog = await session(relay.port)
        if tls:
            assert (await dialog.send("STARTTLS")).startswith("220 ")
            await dialog.writer.start_tls(context, server_hostname="localhost")
            assert (await dialog.send("EHLO app.test")).startswith("250-")
        assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    finally:
        await relay.stop(grace=0.0)
    assert await dialog.reply() == "421 4.3.2 The relay is shutting down; try again shortly"
    assert (await read_to_eof(dialog.reader, 5))[0] == b""
    await dialog.close()


# --- PROXY protocol ------------------------------------------------------------------------------


async def test_proxy_protocol_source_is_the_client_for_every_check(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    rule = {"headers": {"X-Client": "{client_ip}"}}
    relay = await start_relay(
        listen={"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"], "allowed_networks": ["127.0.0.0/8"]},
        policy={"rules": [rule]},
    )
    outsider = await Dialog.open(relay.port)
    outsider.writer.write(b"PROXY TCP4 10.9.9.9 127.0.0.1 5555 25\r\n")
    assert await outsider.reply() == "554 5.7.1 Client address 10.9.9.9 is not allowed to relay through this server"
    assert (await read_to_eof(outsider.reader, 5))[0] == b""
    await outsider.close()

    no_header = await Dialog.open(relay.port)
    no_header.writer.write(b"EHLO app.test\r\n")
    assert (await read_to_eof(no_header.reader, 5))[0] == b""  # no greeting: nothing is served
    await no_header.close()

    inside = await Dialog.open(relay.port)
    inside.writer.write(b"PROXY TCP4 127.0.0.7 127.0.0.1 5555 25\r\n")
    assert (await inside.reply()).startswith("220 relay.test ")
    assert (await inside.send("EHLO app.test")).startswith("250-")
    data = mail_data("proxied")
    reply = await inside.mail(SENDER, [RCPT], data)
    await inside.close()
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert got.data == b"X-Client: 127.0.0.7\r\n" + data


# --- property tests for the pure code ------------------------------------------------------------

ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
header_names = st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True)
templates = st.lists(
    st.one_of(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
        st.sampled_from([f"{{{name}}}" for name in PLACEHOLDERS]),
        st.just('{"app":"erp","queue_id":"{queue_id}"}'),
    ),
    max_size=6,
).map("".join)
rules = st.lists(
    st.builds(
        lambda domain, network, headers, replace: PolicyRule(
            sender_domain=domain, client_network=network, headers=headers, replace_existing=replace
        ),
        st.none() | st.sampled_from(["erp.example.com", "example.com"]),
        st.none() | st.sampled_from(["10.0.0.0/8", "127.0.0.0/8", "::1/128"]),
        st.dictionaries(header_names, templates, max_size=3),
        st.booleans(),
    ),
    max_size=3,
)
hostile_text = st.one_of(
    st.text(max_size=80),
    st.text(st.sampled_from('\r\n\t\x00\x0b\x0c\x1b\x7f\x85\u2028\u2029 <>@.:;"{}ab'), max_size=40),
    st.ip_addresses().map(str),
)


def facts_of(sender: str, message_id: str, client_ip: str, recipients: list[str]) -> MessageFacts:
    return MessageFacts(
        queue_id="0190abcdef0123456789a",
        message_id=message_id,
        sender=sender,
        client_ip=client_ip,
        recipients=recipients,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=rules,
    sender=hostile_text,
    message_id=hostile_text,
    client_ip=hostile_text,
    recipients=st.lists(hostile_text, max_size=3),
)
def test_policy_header_values_never_carry_line_breaks_or_controls(
    rules: list[PolicyRule], sender: str, message_id: str, client_ip: str, recipients: list[str]
) -> None:
    facts = facts_of(sender, message_id, client_ip, recipients)
    everything = " ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    for value in [expand(everything, facts), *(a.value for a in header_actions(rules, facts))]:
        assert not ASCII_CONTROL.search(value), repr(value)
        assert not [c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")], repr(value)
    for action in header_actions(rules, facts):
        lines = fold_header(action.name, action.value)[:-2].split(b"\r\n")
        assert all(line[:1] in (b" ", b"\t") for line in lines[1:])


@pytest.mark.parametrize("char", ["\x85", "\x9b", "\u2028", "\u2029"])
def test_expanded_values_carry_no_unicode_controls_or_line_separators(char: str) -> None:
    value = expand("{message_id}", facts_of(SENDER, f"<a{char}b@x>", "10.0.0.1", [RCPT]))
    assert not [c for c in value if unicodedata.category(c) in ("Cc", "Zl", "Zp")], repr(value)


@settings(max_examples=400, deadline=None)
@given(
    name=st.from_regex(r"[\x21-\x39\x3b-\x7e]{1,30}", fullmatch=True),
    value=st.one_of(
        st.text(max_size=300),
        st.text(st.sampled_from(" \t\r\nab\x00"), max_size=200),
        st.lists(st.text(st.sampled_from("xyz"), min_size=1, max_size=120), max_size=30).map(" ".join),
    ),
)
def test_fold_header_always_makes_exactly_one_field(name: str, value: str) -> None:
    try:
        validate_header_value(name, value)
    except HeaderError:
        assume(False)
    folded = fold_header(name, value)
    assert folded.endswith(b"\r\n") and not folded.endswith(b"\r\n\r\n")
    lines = folded[:-2].split(b"\r\n")
    assert lines[0].startswith(name.encode() + b":")
    assert all(line[:1] in (b" ", b"\t") and line.strip(b" \t") for line in lines[1:])
    assert all(b"\r" not in line and b"\n" not in line and len(line) <= MAX_LINE for line in lines)
    assert len(parse_header_fields(folded + b"\r\nbody\r\n")) == 1


domains = st.lists(
    st.one_of(
        st.from_regex(r"[a-z0-9-]{0,70}", fullmatch=True),
        st.sampled_from(["co", "uk", "com", "github", "io", "xn--", "xn--bcher-kva", "[127", "0]", "*", ""]),
        st.text(max_size=10),
    ),
    max_size=6,
).map(".".join)
addresses = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda local, domain, dot: f"{local}@{domain}{dot}", st.text(max_size=10), domains, st.sampled_from(["", "."])
    ),
    st.builds(lambda ip: f"a@[{ip}]", st.ip_addresses().map(str)),
)


@settings(max_examples=400, deadline=None)
@given(mail_from=addresses, header_from=addresses)
def test_check_alignment_never_raises(mail_from: str, header_from: str) -> None:
    off = check_alignment("off", mail_from, header_from)
    assert (off.mail_from, off.misaligned) == (mail_from, False)
    reject = check_alignment("reject", mail_from, header_from)
    rewrite = check_alignment("rewrite", mail_from, header_from)
    assert reject.mail_from == mail_from
    assert rewrite.misaligned is False
    assert rewrite.mail_from == (header_from if reject.misaligned else mail_from)


header_bytes = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from([b"From: a@b", b" folded", b"\tfolded", b"X-A:", b"Bad Name: x", b":", b"", b".", b"\xff:"]),
        st.builds(lambda n, v: n + b":" + v, st.binary(min_size=1, max_size=10), st.binary(max_size=20)),
    ),
    max_size=12,
)


@settings(max_examples=500, deadline=None)
@given(parts=header_bytes, separators=st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n"]), max_size=12))
def test_parse_header_fields_never_raises_and_offsets_stay_in_order(
    parts: list[bytes], separators: list[bytes]
) -> None:
    data = b"".join(part + (separators[i] if i < len(separators) else b"\r\n") for i, part in enumerate(parts))
    fields = parse_header_fields(data)
    previous = 0
    for field in fields:
        assert previous <= field.start < field.end <= header_block_end(data) <= len(data)
        assert data[field.start :].startswith(field.name.encode("ascii"))
        previous = field.end


PROXY_VARIANTS = {
    "ipv4-mapped ipv6 inside": (b"PROXY TCP6 ::ffff:127.0.0.9 ::1 5555 25\r\n", "127.0.0.9"),
    "ipv6 outside": (b"PROXY TCP6 ::1 ::1 5555 25\r\n", "554 5.7.1 Client address ::1 is not allowed"),
    "ipv4-mapped ipv6 outside": (
        b"PROXY TCP6 ::ffff:10.9.9.9 ::1 5555 25\r\n",
        "554 5.7.1 Client address 10.9.9.9 is not allowed",
    ),
    "malformed address": (b"PROXY TCP4 127.0.0.300 127.0.0.1 5555 25\r\n", ""),
    "unknown source": (b"PROXY UNKNOWN\r\n", ""),
    "v2 signature and garbage": (b"\r\n\r\n\x00\r\nQUIT\n" + bytes(range(64)), ""),
}


@pytest.mark.parametrize("header,outcome", PROXY_VARIANTS.values(), ids=PROXY_VARIANTS.keys())
async def test_proxy_header_variants(
    standin: InfobipStandIn, start_relay: StartRelay, header: bytes, outcome: str
) -> None:
    """An address is served with that address as the client; anything else is refused or dropped unserved."""
    rule = {"headers": {"X-Client": "{client_ip}"}}
    relay = await start_relay(
        listen={"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"], "allowed_networks": ["127.0.0.0/8"]},
        policy={"rules": [rule]},
    )
    dialog = await Dialog.open(relay.port)
    dialog.writer.write(header)
    if outcome.startswith("5"):
        assert (await dialog.reply()).startswith(outcome)
    if not outcome or outcome.startswith("5"):
        assert (await read_to_eof(dialog.reader, 5))[0] == b""
        await dialog.close()
        assert standin.messages == []
        return
    assert (await dialog.reply()).startswith("220 relay.test ")
    assert (await dialog.send("EHLO app.test")).startswith("250-")
    data = mail_data("proxied")
    assert (await dialog.mail(SENDER, [RCPT], data)).startswith("250 2.6.0 ")
    await dialog.close()
    assert standin.messages[0].data == f"X-Client: {outcome}\r\n".encode() + data
