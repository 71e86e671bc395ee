"""The client side of SMTP as plain functions over bytes: reply lines, commands, dot-stuffing.

No sockets here (h11-style), so each rule is tested with plain values; `upstream` does the I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

CHUNK = 256 * 1024  # bytes of body stuffed and written at a time: bounds the extra memory per message
# A dot at a line start, or after a bare CR: whatever an upstream parser takes for a line break, it
# never sees <break>.<break> before our real end of data (SMTP smuggling).
_LINE_START_DOT = re.compile(rb"(?m)(?:^|(?<=\r))\.")
_QUEUED_AS = re.compile(r"queued as <?([^\s<>]+)>?", re.IGNORECASE)  # "<>" is no id


class ReplySyntaxError(ValueError):
    """The server sent something that is not an SMTP reply line."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    code: int
    text: str  # lines joined with "\n", enhanced code included as the server sent it

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0]

    def __str__(self) -> str:
        return f"{self.code} {self.first_line}"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    final: ServerReply  # the reply to the end of data, or the one that ended the transaction early
    accepted: tuple[str, ...]
    refused: dict[str, ServerReply] = field(default_factory=dict)
    connection_id: int = 0


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """(code, is_last_line, text) of one reply line such as b"250-PIPELINING\\r\\n"."""
    stripped = line.rstrip(b"\r\n")
    code_bytes, sep = stripped[:3], stripped[3:4]
    if len(code_bytes) != 3 or not code_bytes.isdigit() or sep not in (b"", b" ", b"-"):
        raise ReplySyntaxError(f"not an SMTP reply: {stripped[:80]!r}")
    return int(code_bytes), sep != b"-", stripped[4:].decode("utf-8", errors="replace")


def ehlo_extensions(reply: ServerReply) -> dict[str, str]:
    """EHLO keywords (upper-cased) and their parameters; the first line is the server's name."""
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params
    return extensions


def queued_id(reply: ServerReply) -> str | None:
    """Infobip's message id from `250 2.6.0 Message queued as <id>`."""
    match = _QUEUED_AS.search(reply.text)
    return match.group(1) if match else None


def transaction_commands(mail_from: str, recipients: Iterable[str], *, size: int | None, eight_bit: bool) -> bytes:
    """MAIL, every RCPT and DATA as one flight (RFC 2920): the caller checks the addresses first."""
    params = (f" SIZE={size}" if size is not None else "") + (" BODY=8BITMIME" if eight_bit else "")
    lines = [f"MAIL FROM:<{mail_from}>{params}\r\n"]
    lines.extend(f"RCPT TO:<{rcpt}>\r\n" for rcpt in recipients)
    lines.append("DATA\r\n")
    return "".join(lines).encode("ascii")


def stuffed_chunks(segments: Iterable[memoryview], chunk: int = CHUNK) -> Iterator[bytes]:
    """The message body on the wire: dot-stuffed (RFC 5321 4.5.2), ending with CRLF . CRLF.

    Works on bounded pieces so a 20 MB message never exists twice in memory. A "." after a bare LF or
    a bare CR is stuffed too, so no upstream parser can see an early end of data.
    """
    at_line_start = True
    last = b"\r\n"
    for segment in segments:
        pos = 0
        while pos < len(segment):
            end = min(pos + chunk, len(segment))
            if end < len(segment):
                cut = bytes(segment[pos:end]).rfind(b"\n")
                if cut >= 0:
                    end = pos + cut + 1
            piece = bytes(segment[pos:end])
            out = _LINE_START_DOT.sub(b"..", piece)
            if not at_line_start and piece.startswith(b"."):
                out = out[1:]  # the piece starts mid-line: that dot is not at a line start
            yield out
            at_line_start = piece.endswith((b"\n", b"\r"))
            last = piece[-2:] if len(piece) >= 2 else last[-1:] + piece
            pos = end
    yield b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n"
