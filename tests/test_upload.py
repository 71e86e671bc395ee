"""relay.inbound.upload: where a DATA upload ends, what it keeps, what the memory budget holds, and why it is
refused, whichever way the bytes are cut into chunks."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.replies import Reply
from relay.inbound.access import Refusal
from relay.inbound.limits import MemoryBudget
from relay.inbound.upload import Upload

TOO_LONG = Refusal(
    "too_long", Reply(500, "5.5.6", "A message line is longer than this relay accepts; nothing was sent")
)


def feed_all(upload: Upload, stream: bytes, cuts: list[int]) -> int:
    """Feed `stream` cut at `cuts` (offsets) until the upload ends; the bytes it took in all."""
    used = 0
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        if start >= end:
            continue
        used += upload.feed(stream[start:end])
        if upload.ended:
            break
    return used


def test_lines_are_kept_dot_unstuffed_and_counted_against_the_budget() -> None:
    budget = MemoryBudget(1000)
    upload = Upload(budget, max_size=100, max_line=1000)
    stream = b"Subject: x\r\n\r\n..leading dot\r\n..\r\n.\r\nQUIT\r\n"
    assert upload.feed(stream) == len(stream) - len(b"QUIT\r\n")  # the next command is the client's
    assert upload.ended and upload.refusal is None
    data = upload.take()
    assert data == b"Subject: x\r\n\r\n.leading dot\r\n.\r\n"
    assert budget.used == len(data)  # handed on, still counted until released
    upload.release()
    assert budget.used == 0


def test_an_empty_message_and_a_dot_at_the_very_start() -> None:
    empty = Upload(MemoryBudget(0), max_size=100, max_line=1000)
    assert empty.feed(b".\r\n") == 3 and empty.ended and empty.take() == b""
    dotted = Upload(MemoryBudget(0), max_size=100, max_line=1000)
    assert dotted.feed(b"..x\r\n.\r\n") == 8 and dotted.take() == b".x\r\n"


def reference(stream: bytes) -> tuple[bytes, int] | None:
    """What the relay read line by line before: CRLF lines, a leading dot removed, the end at a lone dot."""
    kept, pos = bytearray(), 0
    while (eol := stream.find(b"\r\n", pos)) >= 0:
        line = stream[pos : eol + 2]
        pos = eol + 2
        if line == b".\r\n":
            return bytes(kept), pos
        kept += line[1:] if line[:1] == b"." else line
    return None


pieces = st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\r", b"x\r\n.", b"\r\n.\r\n", b"\r\n..\r\n"]))


@settings(max_examples=500, deadline=None)
@given(parts=pieces, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_any_cut_into_chunks_reads_the_same_as_line_by_line(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts) + b"\r\n.\r\nNOOP\r\n"
    upload = Upload(MemoryBudget(0), max_size=10_000, max_line=10_000)
    used = feed_all(upload, stream, sorted(c for c in cuts if c < len(stream)))
    expected = reference(stream)
    assert expected is not None and upload.ended and upload.refusal is None
    assert (bytes(upload.take()), used) == expected


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.integers(0, 40), min_size=1, max_size=6), cuts=st.lists(st.integers(0, 300), max_size=6))
def test_a_line_over_max_line_is_refused_wherever_the_chunks_are_cut(lines: list[int], cuts: list[int]) -> None:
    stream = b"".join(b"x" * n + b"\r\n" for n in lines) + b".\r\n"
    upload = Upload(MemoryBudget(0), max_size=10_000, max_line=20)
    feed_all(upload, stream, sorted(c for c in cuts if c < len(stream)))
    assert upload.ended
    assert upload.refusal == (TOO_LONG if max(lines) > 20 else None)


def test_too_big_is_refused_and_what_was_held_goes_back_at_once() -> None:
    budget = MemoryBudget(0)
    upload = Upload(budget, max_size=10, max_line=1000)
    upload.feed(b"12345678\r\nx\r\n" + b"z" * 20)
    assert upload.refusal == Refusal(
        "too_big", Reply(552, "5.3.4", "Message too big: this relay takes at most 10 bytes; nothing was sent")
    )
    assert budget.used == 0 and upload.take() == b""
    upload.feed(b"y\r\n.\r\n")  # read to the end of data, nothing kept
    assert upload.ended and budget.used == 0 and upload.take() == b""


def test_an_exhausted_budget_refuses_the_upload() -> None:
    budget = MemoryBudget(5)
    assert budget.take(3)
    upload = Upload(budget, max_size=100, max_line=1000)
    upload.feed(b"ab\r\n.\r\n")
    assert upload.refusal == Refusal(
        "memory_budget", Reply(451, "4.3.2", "The relay holds too much message data right now; try again shortly")
    )
    assert budget.used == 3  # only the other upload's bytes


def test_the_first_problem_is_the_one_told() -> None:
    upload = Upload(MemoryBudget(0), max_size=1100, max_line=1001)
    upload.feed(b"x" * 1002 + b"\r\n")
    upload.feed(b"too big for the limit, and more" * 10 + b"\r\n.\r\n")
    assert upload.refusal == TOO_LONG and upload.ended


BARE_LF_END = Refusal(
    "protocol",
    Reply(
        554,
        "5.6.0",
        "Bare LF next to a dot line: end the message with CRLF.CRLF and every line with CRLF;"
        " nothing was sent; closing the connection",
    ),
)


def test_a_dot_line_next_to_a_bare_lf_ends_the_upload_at_once_with_a_hang_up() -> None:
    for stream in (b"Subject: x\n\nhi\n.\n", b"a\r\nb\n.\r\n", b"a\r\n.\nMAIL FROM:<e@x>\r\n", b"\n.\n"):
        budget = MemoryBudget(0)
        upload = Upload(budget, max_size=1000, max_line=1000)
        for byte in range(len(stream)):  # one byte at a time: found as soon as it is whole
            upload.feed(stream[byte : byte + 1])
            if upload.ended:
                break
        assert byte == len(stream) - 1 or stream.endswith(b"\r\n"), stream
        assert (upload.ended, upload.hang_up, upload.refusal) == (True, True, BARE_LF_END), stream
        assert budget.used == 0


def test_a_dot_after_a_bare_lf_is_refused_at_the_end_of_data() -> None:
    upload = Upload(MemoryBudget(0), max_size=1000, max_line=1000)
    upload.feed(b"Subject: x\r\n\r\na\n..b\r\n.\r\n")
    assert upload.ended and not upload.hang_up
    assert upload.refusal is not None and upload.refusal.reply == Reply(
        550,
        "5.6.0",
        "A line after a bare LF starts with a dot, which mail servers read in different ways;"
        " end every line with CRLF; nothing was sent",
    )
    ok = Upload(MemoryBudget(0), max_size=1000, max_line=1000)
    ok.feed(b"a\nb\r\n.b\rc\r\n.\r\n")  # a bare LF or CR without a dot after it is content
    assert ok.refusal is None and ok.take() == b"a\nb\r\nb\rc\r\n"


def test_parsing_a_big_header_block_is_held_in_the_budget_too() -> None:
    budget = MemoryBudget(0)
    small = Upload(budget, max_size=10**6, max_line=10**6)
    small.feed(b"From: a@b.c\r\n\r\n" + b"x" * 100_000 + b"\r\n.\r\n")
    assert small.hold_for_parsing(262144) and small.held == len(small.data)  # read on the loop: nothing more
    big = Upload(budget, max_size=10**6, max_line=10**6)
    head = b"From: a@b.c\r\n" + b"X-A: b\r\n" * 5000 + b"\r\n"
    big.feed(head + b"body\r\n.\r\n")
    assert big.hold_for_parsing(262144) and big.held == len(big.data) + 2 * len(head)
    tight = Upload(MemoryBudget(len(head) + 100), max_size=10**6, max_line=10**6)
    tight.feed(head + b"body\r\n.\r\n")
    assert not tight.hold_for_parsing(262144) and tight.refusal is not None
    assert tight.refusal.reason == "memory_budget" and tight.held == 0
    assert re.match(r"451 4\.3\.2 ", str(tight.refusal.reply))
