"""relay.core.smtp_client: SMTP client-side rules over plain bytes (reply lines, EHLO, commands, dot-stuffing)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.smtp_client import (
    CHUNK,
    ReplyReader,
    ReplySyntaxError,
    ServerReply,
    ehlo_extensions,
    parse_reply_line,
    queued_id,
    stuffed_chunks,
    transaction_commands,
)

# The EHLO reply in seed 002 (Infobip's SMTP API documentation), as lines on the wire.
INFOBIP_EHLO = [
    b"250-smtp.email-messaging.com\r\n",
    b"250-8BITMIME\r\n",
    b"250-SIZE 20971520\r\n",
    b"250-STARTTLS\r\n",
    b"250-AUTH LOGIN PLAIN\r\n",
    b"250-ENHANCEDSTATUSCODES\r\n",
    b"250-PIPELINING\r\n",
    b"250 OK\r\n",
]


def read_reply(lines: Iterable[bytes]) -> ServerReply:
    """What the upstream connection does with parse_reply_line, without the socket."""
    texts: list[str] = []
    for raw in lines:
        code, last, text = parse_reply_line(raw)
        texts.append(text)
        if last:
            return ServerReply(code, "\n".join(texts))
    raise AssertionError("no last line")


def stuff(data: bytes | list[bytes], chunk: int = CHUNK) -> bytes:
    segments = [data] if isinstance(data, bytes) else data
    return b"".join(stuffed_chunks([memoryview(s) for s in segments], chunk))


def unstuff(wire: bytes) -> bytes:
    """The receiving side, per RFC 5321 4.5.2: read CRLF lines up to the lone ".", dropping one leading dot."""
    assert wire.endswith(b".\r\n")
    lines: list[bytes] = []
    for line in wire.split(b"\r\n"):
        if line == b".":
            return b"".join(part + b"\r\n" for part in lines)
        lines.append(line[1:] if line.startswith(b".") else line)
    raise AssertionError("no end of data")


# --- reply lines --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"250 2.6.0 Message queued as <abc>\r\n", (250, True, "2.6.0 Message queued as <abc>")),
        (b"250-PIPELINING\r\n", (250, False, "PIPELINING")),
        (b"354 End data with <CR><LF>.<CR><LF>\r\n", (354, True, "End data with <CR><LF>.<CR><LF>")),
        (b"421\r\n", (421, True, "")),
        (b"250\n", (250, True, "")),  # a bare LF ending is tolerated
        (b"550 5.7.1 Recipient <x@y> not allowed", (550, True, "5.7.1 Recipient <x@y> not allowed")),
        (b"220-\r\n", (220, False, "")),
        (b"250 caf\xc3\xa9 \xff\r\n", (250, True, "caf\u00e9 \ufffd")),
    ],
)
def test_parse_reply_line(line: bytes, expected: tuple[int, bool, str]) -> None:
    assert parse_reply_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [b"", b"\r\n", b"25\r\n", b"25x OK\r\n", b"OK 250\r\n", b"2500 OK\r\n", b"250_OK\r\n", b" 250 OK\r\n", b"abc\r\n"],
)
def test_parse_reply_line_rejects_what_is_not_a_reply(line: bytes) -> None:
    with pytest.raises(ReplySyntaxError, match="not an SMTP reply"):
        parse_reply_line(line)


def test_multi_line_reply() -> None:
    reply = read_reply(INFOBIP_EHLO)
    assert reply.code == 250
    assert reply.text.split("\n") == [
        "smtp.email-messaging.com",
        "8BITMIME",
        "SIZE 20971520",
        "STARTTLS",
        "AUTH LOGIN PLAIN",
        "ENHANCEDSTATUSCODES",
        "PIPELINING",
        "OK",
    ]
    assert reply.first_line == "smtp.email-messaging.com"
    assert str(reply) == "250 smtp.email-messaging.com"


# --- replies out of bytes as they arrive ----------------------------------------------------------

# A pipelined flight's answers as Infobip words them (seed 002): MAIL, three RCPTs, DATA.
FLIGHT_REPLIES = (
    b"250 2.1.0 Sender <sender_address> OK\r\n"
    b"250 2.1.5 Recipient <recipient_address> OK\r\n"
    b"550 5.7.1 Recipient <blacklisted_address> not allowed\r\n"
    b"501 5.1.7 Bad recipient address <invalid_address>\r\n"
    b"354 End data with <CR><LF>.<CR><LF>\r\n"
)
FLIGHT_PARSED = [
    ServerReply(250, "2.1.0 Sender <sender_address> OK"),
    ServerReply(250, "2.1.5 Recipient <recipient_address> OK"),
    ServerReply(550, "5.7.1 Recipient <blacklisted_address> not allowed"),
    ServerReply(501, "5.1.7 Bad recipient address <invalid_address>"),
    ServerReply(354, "End data with <CR><LF>.<CR><LF>"),
]


def test_a_flight_answered_in_one_piece_gives_every_reply_in_order() -> None:
    reader = ReplyReader()
    assert reader.feed(FLIGHT_REPLIES) == FLIGHT_PARSED
    assert not reader.pending


def test_a_multi_line_reply_is_one_reply_and_nothing_comes_out_before_its_last_line() -> None:
    reader = ReplyReader()
    assert reader.feed(b"".join(INFOBIP_EHLO[:-1])) == []
    assert reader.pending
    assert reader.feed(INFOBIP_EHLO[-1] + b"220 2.0.0 Ready") == [read_reply(INFOBIP_EHLO)]
    assert reader.pending  # the half line behind it
    assert reader.feed(b" to start TLS\r\n") == [ServerReply(220, "2.0.0 Ready to start TLS")]
    assert not reader.pending


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(FLIGHT_REPLIES)), max_size=12))
def test_pieces_cut_anywhere_give_the_same_replies(cuts: list[int]) -> None:
    reader = ReplyReader()
    bounds = [0, *sorted(cuts), len(FLIGHT_REPLIES)]
    got = [r for a, b in itertools.pairwise(bounds) for r in reader.feed(FLIGHT_REPLIES[a:b])]
    assert got == FLIGHT_PARSED


def test_a_thousand_recipient_replies_in_one_piece() -> None:
    wire = b"250 2.1.0 OK\r\n" + b"".join(b"250 2.1.5 Recipient <r%d@example.org> OK\r\n" % i for i in range(1000))
    replies = ReplyReader().feed(wire + b"354 go ahead\r\n")
    assert len(replies) == 1002 and replies[1000].text == "2.1.5 Recipient <r999@example.org> OK"
    assert replies[-1] == ServerReply(354, "go ahead")


@pytest.mark.parametrize(
    ("pieces", "why"),
    [
        ([b"220 " + b"x" * 70_000 + b"\r\n"], "reply line too long"),  # a whole line, too long
        ([b"220 " + b"x" * 40_000, b"x" * 40_000], "reply line too long"),  # no end in sight
        ([b"250-x\r\n" * 1063 + b"250-y\r\n"], "reply too long"),
        ([b"250 OK\r\nhello\r\n"], "not an SMTP reply"),
    ],
)
def test_what_is_not_a_reply_is_refused(pieces: list[bytes], why: str) -> None:
    reader = ReplyReader()
    with pytest.raises(ReplySyntaxError, match=why):
        for piece in pieces:
            reader.feed(piece)


def test_the_longest_reply_allowed_still_comes_out() -> None:
    assert ReplyReader().feed(b"250-x\r\n" * 1063 + b"250 y\r\n")[0].text.count("\n") == 1063


@pytest.mark.parametrize(
    ("code", "ok", "transient"),
    [
        (250, True, False),
        (235, True, False),
        (354, False, False),
        (421, False, True),
        (451, False, True),
        (550, False, False),
    ],
)
def test_server_reply_classes(code: int, ok: bool, transient: bool) -> None:
    reply = ServerReply(code, "text")
    assert (reply.ok, reply.transient) == (ok, transient)


def test_ehlo_extensions_from_infobips_list() -> None:
    extensions = ehlo_extensions(read_reply(INFOBIP_EHLO))
    assert extensions["SIZE"] == "20971520"
    assert extensions["AUTH"] == "LOGIN PLAIN"
    assert {k: v for k, v in extensions.items() if k != "OK"} == {
        "8BITMIME": "",
        "SIZE": "20971520",
        "STARTTLS": "",
        "AUTH": "LOGIN PLAIN",
        "ENHANCEDSTATUSCODES": "",
        "PIPELINING": "",
    }
    assert "SMTP.EMAIL-MESSAGING.COM" not in extensions  # the first line is the server's name


def test_ehlo_keywords_are_upper_cased_and_a_name_only_reply_has_none() -> None:
    assert ehlo_extensions(ServerReply(250, "mx.example.com\nsize 100\npipelining")) == {
        "SIZE": "100",
        "PIPELINING": "",
    }
    assert ehlo_extensions(ServerReply(250, "mx.example.com")) == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.6.0 Message queued as <7b6f1e2a-9c1d-4c8e-b1a2-0123456789ab>", "7b6f1e2a-9c1d-4c8e-b1a2-0123456789ab"),
        ("2.6.0 Message queued as 7b6f1e2a", "7b6f1e2a"),
        ("2.6.0 Message QUEUED AS <abc>", "abc"),
        ("2.0.0 Ok: queued as 4Xyz12 extra words", "4Xyz12"),
        ("first line\n2.6.0 Message queued as <id-2>", "id-2"),
        ("2.0.0 OK", None),
        ("2.6.0 Message queued as <>", None),
        ("2.6.0 Message queued as", None),
    ],
)
def test_queued_id(text: str, expected: str | None) -> None:
    assert queued_id(ServerReply(250, text)) == expected


# --- commands -----------------------------------------------------------------------------------


def test_transaction_commands_exact_bytes() -> None:
    assert transaction_commands("app@example.com", ["a@example.org", "b@example.net"], size=1234, eight_bit=True) == (
        b"MAIL FROM:<app@example.com> SIZE=1234 BODY=8BITMIME\r\n"
        b"RCPT TO:<a@example.org>\r\n"
        b"RCPT TO:<b@example.net>\r\n"
        b"DATA\r\n"
    )


@pytest.mark.parametrize(
    ("size", "eight_bit", "mail"),
    [
        (None, False, b"MAIL FROM:<app@example.com>\r\n"),
        (0, False, b"MAIL FROM:<app@example.com> SIZE=0\r\n"),
        (20971520, False, b"MAIL FROM:<app@example.com> SIZE=20971520\r\n"),
        (None, True, b"MAIL FROM:<app@example.com> BODY=8BITMIME\r\n"),
    ],
)
def test_transaction_commands_mail_parameters(size: int | None, eight_bit: bool, mail: bytes) -> None:
    assert transaction_commands("app@example.com", ["a@example.org"], size=size, eight_bit=eight_bit) == (
        mail + b"RCPT TO:<a@example.org>\r\nDATA\r\n"
    )


def test_transaction_commands_many_recipients_in_one_flight() -> None:
    recipients = [f"r{i}@example.org" for i in range(1000)]
    flight = transaction_commands("app@example.com", iter(recipients), size=None, eight_bit=False)
    lines = flight.split(b"\r\n")
    assert lines[0] == b"MAIL FROM:<app@example.com>"
    assert lines[1:1001] == [f"RCPT TO:<r{i}@example.org>".encode() for i in range(1000)]
    assert lines[1001:] == [b"DATA", b""]


def test_transaction_commands_null_sender() -> None:
    assert transaction_commands("", ["a@example.org"], size=None, eight_bit=False).startswith(b"MAIL FROM:<>\r\n")


# --- dot-stuffing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b".starts with a dot\r\n", b"..starts with a dot\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),  # a lone dot is not the end of data
        (b"..two\r\n", b"...two\r\n.\r\n"),
        (b"a.b\r\n. \r\n", b"a.b\r\n.. \r\n.\r\n"),
        (b"a\n.b\r\n", b"a\n..b\r\n.\r\n"),  # after a bare LF too: no lenient parser sees an early end
        (b"a\n.\nb\r\n", b"a\n..\nb\r\n.\r\n"),
        (b"a\r.b\r\n", b"a\r..b\r\n.\r\n"),  # a dot after a bare CR is stuffed too (smuggling)
        (b"no dots\r\n", b"no dots\r\n.\r\n"),
    ],
)
def test_stuffing_at_line_starts(data: bytes, wire: bytes) -> None:
    assert stuff(data) == wire


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\n", b"a\n\r\n.\r\n"),
        (b"a\r", b"a\r\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
    ],
)
def test_the_end_of_data(data: bytes, wire: bytes) -> None:
    assert stuff(data) == wire
    assert stuff(data, chunk=1) == wire


def test_no_segments_at_all_is_an_empty_message() -> None:
    assert b"".join(stuffed_chunks([])) == b".\r\n"
    assert stuff([b"", b""]) == b".\r\n"


def test_a_mid_line_dot_at_a_chunk_boundary_is_not_stuffed() -> None:
    data = b"0123456789.dot after ten\r\n.real line start\r\n"
    for chunk in (1, 2, 3, 5, 10, 11, 12):
        assert stuff(data, chunk=chunk) == b"0123456789.dot after ten\r\n..real line start\r\n.\r\n", chunk


def test_long_line_chunks_are_bounded_and_split_mid_line() -> None:
    data = b"." + b"x" * 25 + b".y" * 10 + b"\r\n"
    pieces = list(stuffed_chunks([memoryview(data)], chunk=8))
    assert len(pieces) > 5
    assert all(len(p) <= 9 for p in pieces)  # a piece is at most one chunk plus one stuffed dot
    assert b"".join(pieces) == b".." + data[1:] + b".\r\n"


def test_a_chunk_cuts_after_the_last_line_feed_it_holds() -> None:
    pieces = list(stuffed_chunks([memoryview(b"ab\r\ncd\r\nefgh\r\n")], chunk=10))
    assert pieces == [b"ab\r\ncd\r\n", b"efgh\r\n", b".\r\n"]


@pytest.mark.parametrize(
    ("segments", "wire"),
    [
        ([b"X-A: 1\r\n", b".body\r\n"], b"X-A: 1\r\n..body\r\n.\r\n"),  # a segment starts a line
        ([b"abc", b".def\r\n"], b"abc.def\r\n.\r\n"),  # a segment continues a line
        ([b"abc\r", b"\n.def\r\n"], b"abc\r\n..def\r\n.\r\n"),  # CR and LF in different segments
        ([b"abc\r\n", b"", b".def\r\n"], b"abc\r\n..def\r\n.\r\n"),
        ([b"abc\r", b"\n"], b"abc\r\n.\r\n"),
        ([b"a", b"\r", b"\n", b"."], b"a\r\n..\r\n.\r\n"),
    ],
)
def test_segment_boundaries(segments: list[bytes], wire: bytes) -> None:
    assert stuff(segments) == wire
    assert stuff(segments, chunk=2) == wire


def reference(data: bytes) -> bytes:
    """Stuffing done on the whole message at once, with the terminator the rules call for."""
    stuffed = re.sub(rb"(?m)(?:^|(?<=\r))\.", b"..", data)
    if not data:
        return b".\r\n"
    return stuffed + (b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n")


wire_bytes = st.lists(st.sampled_from([b".", b"\r\n", b"\n", b"\r", b"a", b"..", b"\r\n.", b"x."]), max_size=40).map(
    b"".join
)


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(st.one_of(wire_bytes, st.binary(max_size=30)), max_size=5),
    chunk=st.integers(1, 12),
)
def test_chunking_never_changes_the_result(parts: list[bytes], chunk: int) -> None:
    data = b"".join(parts)
    wire = stuff(parts, chunk=chunk)
    assert wire == reference(data)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    body = wire[:-3]
    assert b"\r\n.\r\n" not in body[:-2]  # no early end of data
    for match in re.finditer(rb"\n\.", body):
        assert body[match.end() : match.end() + 1] == b"."  # every dot at a line start is stuffed
    assert not body.startswith(b".") or body.startswith(b"..")


crlf_lines = st.lists(
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")).map(lambda b: b + b"\r\n")
    | st.sampled_from([b".\r\n", b"..\r\n", b".x\r\n", b"\r\n"]),
    max_size=20,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=crlf_lines, cut=st.integers(0, 400), chunk=st.integers(1, 64))
def test_round_trip_per_rfc_5321(data: bytes, cut: int, chunk: int) -> None:
    segments = [data[:cut], data[cut:]]
    wire = stuff(segments, chunk=chunk)
    if data:
        assert wire.endswith(b"\r\n.\r\n")
    assert unstuff(wire) == data


@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"a"]), max_size=120).map(b"".join), st.integers(1, 9))
def test_stuffing_with_bytes_replace_is_the_regex_stuffing_for_any_chunking(body: bytes, chunk: int) -> None:
    """The C-speed stuffing doubles exactly the dots the former regex doubled: at a line start (at the
    start, or after LF) and after a bare CR, wherever the pieces are cut."""
    reference = re.compile(rb"(?m)(?:^|(?<=\r))\.").sub(b"..", body)
    stuffed = b"".join(stuffed_chunks([memoryview(body)], chunk=chunk))
    assert stuffed.startswith(reference)
    assert stuffed[len(reference) :] in (b".\r\n", b"\r\n.\r\n")
