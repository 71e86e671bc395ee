"""relay.core.headers: finding fields by offset in the original bytes, and writing new, folded, safe ones."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.headers import (
    FOLD_AT,
    MAX_LINE,
    HeaderError,
    HeaderField,
    clean_value,
    find_field,
    fold_header,
    header_block_end,
    parse_header_fields,
    read_header_block,
    validate_header_name,
    validate_header_value,
)

CONTROL_CHARS = [chr(c) for c in range(0x20) if c != 0x09] + ["\x7f"]


def unfold(folded: bytes) -> bytes:
    """RFC 5322 2.2.3: unfolding removes every CRLF that is followed by WSP (and the final CRLF)."""
    assert folded.endswith(b"\r\n")
    return re.sub(rb"\r\n(?=[ \t])", b"", folded[:-2])


# --- header_block_end ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"\r\n", 2),  # empty header block, empty body
        (b"\r\nbody\r\n", 2),  # message starting with CRLF: no headers, all body
        (b"\r\n\r\nbody", 2),
        (b"Subject: x\r\n", 12),  # no body, no blank line
        (b"Subject: x", 10),  # no body, no final CRLF
        (b"Subject: x\r\n\r\n", 14),  # blank line, empty body
        (b"Subject: x\r\n\r\nbody\r\n\r\nmore", 14),  # the first blank line ends the headers
        (b"A: 1\r\nB: 2\r\n\r\n", 14),
    ],
)
def test_header_block_end(data: bytes, expected: int) -> None:
    assert header_block_end(data) == expected


# --- parse_header_fields ------------------------------------------------------------------------


def test_parse_offsets_point_at_the_exact_bytes_of_each_field() -> None:
    data = b"From: A <a@example.com>\r\nSubject: hi\r\nTo: b@example.org\r\n\r\nbody\r\n"
    fields = parse_header_fields(data)
    assert fields == [
        HeaderField("From", "A <a@example.com>", 0, 25),
        HeaderField("Subject", "hi", 25, 38),
        HeaderField("To", "b@example.org", 38, 57),
    ]
    assert data[fields[1].start : fields[1].end] == b"Subject: hi\r\n"
    assert data[fields[-1].end :] == b"\r\nbody\r\n"


def test_parse_unfolds_continuation_lines_and_keeps_their_whitespace() -> None:
    data = b"Subject: one\r\n two\r\n\tthree\r\nX-Other:  v \r\n\r\nbody"
    fields = parse_header_fields(data)
    assert fields == [
        HeaderField("Subject", "one two\tthree", 0, 28),
        HeaderField("X-Other", "v", 28, 42),
    ]
    assert data[0:28] == b"Subject: one\r\n two\r\n\tthree\r\n"


def test_parse_name_with_space_before_colon_and_no_space_after() -> None:
    assert parse_header_fields(b"Subject :x\r\nA:b\r\n\r\n") == [
        HeaderField("Subject", "x", 0, 12),
        HeaderField("A", "b", 12, 17),
    ]


def test_parse_no_body_and_no_final_crlf() -> None:
    assert parse_header_fields(b"A: 1\r\nB: 2") == [HeaderField("A", "1", 0, 6), HeaderField("B", "2", 6, 10)]
    assert parse_header_fields(b"A: 1\r\nB: 2\r\n") == [HeaderField("A", "1", 0, 6), HeaderField("B", "2", 6, 12)]


@pytest.mark.parametrize("data", [b"", b"\r\n", b"\r\nFrom: a@example.com\r\n\r\n", b"\r\n\r\n"])
def test_parse_empty_header_block(data: bytes) -> None:
    assert parse_header_fields(data) == []


def test_parse_stops_at_the_first_line_that_is_not_a_field() -> None:
    data = b"A: 1\r\nthis is body text\r\nB: 2\r\n\r\n"
    assert parse_header_fields(data) == [HeaderField("A", "1", 0, 6)]


def test_parse_a_leading_continuation_line_is_not_a_field() -> None:
    assert parse_header_fields(b" folded: no\r\nA: 1\r\n\r\n") == []


def test_parse_does_not_read_into_the_body() -> None:
    data = b"A: 1\r\n\r\nFrom: evil@example.net\r\n"
    assert parse_header_fields(data) == [HeaderField("A", "1", 0, 6)]


def test_parse_decodes_8bit_values_with_replacement() -> None:
    [field] = parse_header_fields("Subject: caf\u00e9\r\n\r\n".encode() + b"")
    assert field.value == "caf\u00e9"
    [field] = parse_header_fields(b"Subject: \xff\r\n\r\n")
    assert field.value == "\ufffd"


def test_find_field_is_case_insensitive_and_returns_the_first() -> None:
    fields = parse_header_fields(b"message-id: <1@x>\r\nMessage-ID: <2@x>\r\n\r\n")
    found = find_field(fields, "MESSAGE-ID")
    assert found is not None and found.value == "<1@x>"
    assert find_field(fields, "Date") is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parse_offsets_are_ordered_and_within_the_header_block(data: bytes) -> None:
    fields = parse_header_fields(data)
    limit = header_block_end(data)
    previous_end = 0
    for field in fields:
        assert previous_end == field.start < field.end <= limit
        assert data[field.start : field.end].split(b":", 1)[0].rstrip(b" \t").decode("ascii") == field.name
        previous_end = field.end


# --- validation and folding ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["X-IB-Tracking-Url", "a", "X" * 76, "Weird!#$%&'*+-.^_`|~Name"])
def test_valid_header_names(name: str) -> None:
    validate_header_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "X" * 77, "X IB", "X:IB", "X-IB\r\nBcc", "X-IB\n", "X\x00", "X\t", "Caf\u00e9", "X\x7f"],
)
def test_invalid_header_names_raise(name: str) -> None:
    with pytest.raises(HeaderError, match="header name"):
        validate_header_name(name)


@pytest.mark.parametrize("char", CONTROL_CHARS)
def test_control_characters_in_values_raise(char: str) -> None:
    value = f"https://hooks.example.com/{char}Bcc: victim@example.org"
    with pytest.raises(HeaderError, match="line break or control character"):
        validate_header_value("X-IB-Tracking-Url", value)
    with pytest.raises(HeaderError, match="line break or control character"):
        fold_header("X-IB-Tracking-Url", value)


def test_tab_is_allowed_in_values() -> None:
    validate_header_value("X-A", "a\tb")
    assert fold_header("X-A", "a\tb") == b"X-A: a\tb\r\n"


def test_fold_short_value_is_one_line() -> None:
    assert fold_header("X-IB-Tracking-Url", "https://hooks.example.com/ib/track") == (
        b"X-IB-Tracking-Url: https://hooks.example.com/ib/track\r\n"
    )


def test_fold_empty_value() -> None:
    assert fold_header("X-Empty", "") == b"X-Empty: \r\n"


def test_fold_long_value_breaks_before_whitespace_only() -> None:
    value = " ".join(f"word{i:02d}" for i in range(30))  # 209 characters
    folded = fold_header("Subject", value)
    lines = folded[:-2].split(b"\r\n")
    assert len(lines) == 3
    assert lines[0] == b"Subject: " + " ".join(f"word{i:02d}" for i in range(10)).encode()
    assert lines[1] == b" " + " ".join(f"word{i:02d}" for i in range(10, 21)).encode()  # 77 characters
    assert lines[2] == b" " + " ".join(f"word{i:02d}" for i in range(21, 30)).encode()
    assert all(len(line) <= FOLD_AT for line in lines)
    assert unfold(folded) == b"Subject: " + value.encode()


def test_fold_a_long_word_stays_whole_up_to_the_line_limit() -> None:
    url = "https://hooks.example.com/" + "a" * 500
    folded = fold_header("X-IB-Tracking-Url", url)
    assert folded == b"X-IB-Tracking-Url: " + url.encode() + b"\r\n"


def test_fold_unbreakable_value_longer_than_a_line_raises() -> None:
    fold_header("X", "a" * (MAX_LINE - len("X: ")))  # exactly 998 bytes: fine
    with pytest.raises(HeaderError, match="without a space"):
        fold_header("X", "a" * (MAX_LINE - len("X: ") + 1))
    with pytest.raises(HeaderError, match="without a space"):
        fold_header("X", "short " + "b" * 1200 + " short")


def test_fold_counts_bytes_not_characters_for_the_line_limit() -> None:
    with pytest.raises(HeaderError):
        fold_header("X", "\u00e9" * 500)  # 500 characters, 1000 bytes


def test_fold_never_writes_a_whitespace_only_line() -> None:
    # RFC 5322 3.2.2: a line of only white space is obsolete syntax, and some parsers end the header block there.
    for value in ["x" * 75 + " ", "x" * 75 + "  \t ", "a" + " " * 200, "a" + " " * 100 + "b", " " * 150]:
        folded = fold_header("X", value)
        lines = folded[:-2].split(b"\r\n")
        assert all(line.strip(b" \t") for line in lines), folded
        assert unfold(folded) == b"X: " + value.encode()


def test_validate_header_value_rejects_over_long_unbreakable_values() -> None:
    with pytest.raises(HeaderError):
        validate_header_value("X-IB-Callback-Data", "{" + "x" * 1000 + "}")


@settings(max_examples=300, deadline=None)
@given(
    name=st.from_regex(r"[\x21-\x39\x3b-\x7e]{1,20}", fullmatch=True),
    value=st.text(st.characters(exclude_categories=["Cs"], exclude_characters=CONTROL_CHARS), max_size=400),
)
def test_fold_round_trip_and_line_shape(name: str, value: str) -> None:
    try:
        folded = fold_header(name, value)
    except HeaderError:
        # A field that fits on one line is never refused.
        assert len(f"{name}: {value}".encode()) > MAX_LINE
        return
    assert unfold(folded) == f"{name}: {value}".encode()
    lines = folded[:-2].split(b"\r\n")
    assert lines[0].startswith(name.encode() + b": ")
    for line in lines[1:]:
        assert line[:1] in (b" ", b"\t")  # folded only before existing whitespace
    assert all(line.strip(b" \t") for line in lines)
    assert all(len(line) <= MAX_LINE for line in lines)
    assert b"\r" not in folded.replace(b"\r\n", b"") and b"\n" not in folded.replace(b"\r\n", b"")
    # Our own parser reads back exactly one field with the value (minus outer whitespace).
    [field] = parse_header_fields(folded + b"\r\n")
    assert (field.name, field.value) == (name, value.strip(" \t"))


# --- clean_value --------------------------------------------------------------------------------


def test_clean_value_replaces_every_control_character_with_a_space() -> None:
    dirty = "a" + "".join(CONTROL_CHARS) + "\tb"
    assert clean_value(dirty) == "a" + " " * len(CONTROL_CHARS) + " b"


def test_clean_value_keeps_ordinary_text() -> None:
    assert clean_value('{"app":"erp"} caf\u00e9 <id@x>') == '{"app":"erp"} caf\u00e9 <id@x>'


@given(st.text(max_size=200))
def test_clean_value_output_has_no_control_characters(value: str) -> None:
    cleaned = clean_value(value)
    assert len(cleaned) == len(value)
    assert not re.search(r"[\x00-\x1f\x7f]", cleaned)
    validate_header_value("X", cleaned[:100])  # always acceptable to the validator


_line_text = st.text(st.sampled_from("ab :\t;<>@.=\u00e9"), max_size=12)
_field_line = st.builds(lambda n, v: f"{n}:{v}", st.sampled_from(["From", "X-IB-Bulk-Id", "subject", "a"]), _line_text)
_continuation = st.builds(lambda ws, v: f"{ws}x{v}", st.sampled_from([" ", "\t", "  "]), _line_text)
_clean_block = st.builds(
    lambda fields, tail: "\r\n".join(line for first, rest in fields for line in (first, *rest)) + tail,
    st.lists(st.tuples(_field_line, st.lists(_continuation, max_size=2)), max_size=6),
    st.sampled_from(["\r\n", "\r\n\r\nbody\r\n", ""]),
)


@settings(max_examples=300, deadline=None)
@given(text=_clean_block)
def test_the_fast_read_of_an_accepted_block_is_the_line_by_line_read(text: str) -> None:
    data = text.encode("utf-8")
    assert read_header_block(data, 100, 64 * 1024) == parse_header_fields(data)
