"""Reading and writing RFC 5322 header lines as bytes, without touching the rest of a message.

We never re-encode a message: we find header fields by offset in the original bytes, and we only ever
produce new, validated, folded header lines to put in front of them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from relay.core.replies import (
    BARE_LINE_BREAK_IN_HEADERS,
    CONTROL_IN_HEADERS,
    Rejection,
    header_block_too_big,
    not_a_header_line,
    too_many_header_fields,
)

MAX_LINE = 998  # RFC 5322 2.1.1, without CRLF
FOLD_AT = 78  # RFC 5322 2.1.1 "SHOULD"

_NAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")  # ftext: printable ASCII except ":"
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # everything but HTAB
_FIELD_START_RE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
# In a header block we accept, every line ends in CRLF and is a field ("Name:", no space before the colon)
# or a continuation with text on it: then every reader (MTAs, mail clients, Python's email) splits it alike.
_BAD_BYTE_RE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
_BAD_LINE_RE = re.compile(rb"(?:\A|\n)(?!\Z)(?![\x21-\x39\x3b-\x7e]+:|[ \t]+[^ \t\r])")
# One field of a block that passed both checks above: "Name:", then lines, each continuation starting with
# whitespace; no bare CR or LF anywhere, so [^\r]* runs to the line's CRLF (or the block's end).
_CLEAN_FIELD_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):([^\r]*(?:\r\n[ \t][^\r]*)*)(?:\r\n|\Z)")


class HeaderError(ValueError):
    """A header name or value we were asked to write is not a single valid header field."""


@dataclass(frozen=True, slots=True)
class HeaderField:
    name: str  # as written by the sender
    value: str  # unfolded, leading whitespace stripped; bytes decoded as UTF-8 with replacement
    start: int  # offset of the first byte of the field in the message
    end: int  # offset just past the field's last CRLF


def header_block_end(data: bytes) -> int:
    """Offset of the body: just past the blank line that ends the header block (len(data) if none)."""
    if data.startswith(b"\r\n"):
        return 2
    index = data.find(b"\r\n\r\n")
    return len(data) if index < 0 else index + 4


def read_header_block(data: bytes, max_fields: int, max_bytes: int) -> list[HeaderField]:
    """The header fields, once the block is known to read the same to every receiver; else a Rejection.

    Everything here is a C-speed scan of at most `max_bytes`, so a 20 MB message of tiny header lines
    costs milliseconds and no per-field objects before it is refused.
    """
    if data.startswith(b"\r\n"):
        return []  # no header block at all (and so no From:)
    end = data.find(b"\r\n\r\n", 0, max_bytes + 4)
    if end < 0 and len(data) > max_bytes:
        raise Rejection(header_block_too_big(max_bytes), reason="bad_headers")
    block = data if end < 0 else data[: end + 2]
    if len(block) > max_bytes:
        raise Rejection(header_block_too_big(max_bytes), reason="bad_headers")
    if bad := _BAD_BYTE_RE.search(block):
        reply = BARE_LINE_BREAK_IN_HEADERS if bad.group() in (b"\r", b"\n") else CONTROL_IN_HEADERS
        raise Rejection(reply, reason="bad_headers")
    lines = block.count(b"\n") + (not block.endswith(b"\n"))
    if lines - block.count(b"\n ") - block.count(b"\n\t") > max_fields:
        raise Rejection(too_many_header_fields(max_fields), reason="bad_headers")
    if block[:1] in (b" ", b"\t"):
        raise Rejection(not_a_header_line(1), reason="bad_headers")  # a continuation of nothing
    if bad := _BAD_LINE_RE.search(block):
        raise Rejection(not_a_header_line(block.count(b"\n", 0, bad.start() + 1) + 1), reason="bad_headers")
    return [  # what parse_header_fields reads, in one C-speed scan (tests/test_headers.py compares the two)
        HeaderField(
            name=match[1].decode("ascii"),
            value=match[2].replace(b"\r\n", b"").decode("utf-8", errors="replace").strip(" \t"),
            start=match.start(),
            end=match.end(),
        )
        for match in _CLEAN_FIELD_RE.finditer(block)
    ]


def parse_header_fields(data: bytes) -> list[HeaderField]:
    """The header fields of a message, in order, with their byte offsets.

    Parsing stops at the blank line or at the first line that is neither a field nor a continuation,
    which is where a lenient reader (Python's email package, most MUAs) would start the body.
    """
    fields: list[HeaderField] = []
    limit = header_block_end(data)
    pos = 0
    start = -1  # where the field being read starts; -1 before the first
    name, colon = "", 0
    while pos < limit:
        eol = data.find(b"\r\n", pos, limit)
        if eol == pos:
            break
        line_end = limit if eol < 0 else eol + 2
        # No object per line: a block of many short continuation lines costs no more memory than its fields.
        if data[pos : pos + 1] in (b" ", b"\t") and start >= 0:
            pass
        elif match := _FIELD_START_RE.match(data, pos, limit if eol < 0 else eol):
            if start >= 0:
                fields.append(_field(data, name, colon, start, pos))
            name = data[pos : match.end() - 1].rstrip(b" \t").decode("ascii")
            start, colon = pos, match.end()
        else:
            break
        pos = line_end
    if start >= 0:
        fields.append(_field(data, name, colon, start, pos))
    return fields


def _field(data: bytes, name: str, colon: int, start: int, end: int) -> HeaderField:
    value = data[colon:end].replace(b"\r\n", b"").decode("utf-8", errors="replace").strip(" \t")
    return HeaderField(name=name, value=value, start=start, end=end)


def find_field(fields: list[HeaderField], name: str) -> HeaderField | None:
    wanted = name.lower()
    return next((f for f in fields if f.name.lower() == wanted), None)


def validate_header_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise HeaderError(
            f"header name {name!r} is not valid: use 1-76 printable ASCII characters without ':' or spaces"
        )


def validate_header_value(name: str, value: str) -> None:
    if _CONTROL_RE.search(value):
        raise HeaderError(f"header {name!r}: the value contains a line break or control character")
    fold_header(name, value)


def clean_value(value: str) -> str:
    """Make a string built from client input safe to put in a header: no control characters at all."""
    return _CONTROL_RE.sub(" ", value.replace("\t", " "))


@functools.lru_cache(maxsize=256)  # a policy's fixed headers are folded once, not once per message
def fold_header(name: str, value: str) -> bytes:
    """One header field as bytes, folded at whitespace so that lines stay short (RFC 5322 2.2.3).

    Folding only ever inserts CRLF before existing whitespace, so unfolding gives back the exact value.
    A fold always carries a word with it: a line of only whitespace is obsolete syntax (RFC 5322 4.2)
    that some parsers take for the end of the header block. Raises HeaderError when a value has a run
    without whitespace too long for any legal line.
    """
    if _CONTROL_RE.search(value):
        raise HeaderError(f"header {name!r}: the value contains a line break or control character")
    body = value.rstrip(" \t")
    words = re.findall(r"[ \t]*[^ \t]+", body) or [""]  # each later word starts with whitespace
    words[-1] += value[len(body) :]  # trailing whitespace stays on the last line
    lines: list[str] = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if len(current) + len(word) > FOLD_AT:
            lines.append(current)
            current = word
        else:
            current += word
    lines.append(current)
    encoded = [line.encode("utf-8") for line in lines]
    if any(len(line) > MAX_LINE for line in encoded):
        raise HeaderError(
            f"header {name!r}: the value has a run of more than {MAX_LINE} characters without a space,"
            " which no mail line can carry"
        )
    return b"\r\n".join(encoded) + b"\r\n"
