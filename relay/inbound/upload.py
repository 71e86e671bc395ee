"""One DATA upload as its bytes arrive: where it ends, what is kept, what the memory budget holds, and why it
is refused.

Pure bookkeeping, no I/O: the server reads large chunks and hands them here, and every scan of a chunk is
one C-speed bytes operation (find, replace, a regex), never Python work per line; so a 20 MB upload of tiny
lines keeps the event loop free for other clients. The message is read to its end whatever happens
(RFC 5321 4.2.5: the reply comes after the end of data); after the first problem the rest is dropped as it
arrives and the bytes held so far go back to the budget at once.

The end of data is only CRLF.CRLF. A dot line next to a bare LF (`\\n.\\n`, `\\n.\\r\\n`, `\\r\\n.\\n`) is where a
client that ends lines with LF thinks its message ends (it waits for a reply) and where a smuggler hides a
second message (commands follow): either way the client hears a refusal at once and the connection closes.
A line after a bare LF that starts with a dot is refused at the end of data: is it dot-stuffed or not?
"""

from __future__ import annotations

import re

from relay.core.replies import (
    BARE_LF_DOT_LINE,
    DOT_AFTER_BARE_LF,
    LINE_TOO_LONG,
    MEMORY_BUDGET_FULL,
    message_too_big,
)
from relay.inbound.access import Refusal
from relay.inbound.limits import MemoryBudget

_DOT_LINE = re.compile(rb"\n\.\r?\n")  # a dot alone between line breaks; the end of data when both are CRLF
PARSE_COST = 2  # reading a header block builds objects worth about twice its bytes
PREPARE_INLINE = 32768  # a bigger header block is read in a thread, beside others (relay/inbound/server.py)


def prepared_in_a_thread(data: bytes | bytearray) -> bool:
    """Whether prepare() reads this message in a thread: its header block is over PREPARE_INLINE bytes, enough
    to keep other clients waiting if it were read on the loop."""
    return len(data) > PREPARE_INLINE and data.find(b"\r\n\r\n", 0, PREPARE_INLINE + 4) < 0


class Upload:
    def __init__(self, budget: MemoryBudget, max_size: int, max_line: int) -> None:
        self.budget = budget
        self.max_size = max_size
        self.max_line = max_line
        self.data = bytearray()
        self.held = 0  # bytes taken from the budget
        self.received = 0  # bytes the client sent, kept or not (for the log line of a refused message)
        self.refusal: Refusal | None = None
        self.ended = False  # the end of data was seen
        self.hang_up = False  # ... or a dot line next to a bare LF: refused, and the connection is closed
        self._seen = b"\r\n"  # the last two bytes kept (the line break before the data counts), then any
        # not yet kept
        self._line = 0  # bytes of the current line so far

    def feed(self, chunk: bytes) -> int:
        """Take the next bytes from the client; how many belonged to the upload (fewer than len(chunk) once
        the end of data is in it: the rest are the client's next commands)."""
        used = self._feed(chunk)
        self.received += used
        return used

    def _feed(self, chunk: bytes) -> int:
        offset = len(self._seen)  # where `chunk` starts in `window`
        window = self._seen + chunk
        # A dot after a line break, and a CR after it, may be the start of the end of data: kept for the next chunk.
        content_end = len(window) - (1 if window.endswith(b"\n.") else 2 if window.endswith(b"\n.\r") else 0)
        dot_line = _DOT_LINE.search(window)
        if dot_line is not None:
            start = dot_line.start()
            if dot_line.group() != b"\n.\r\n" or window[start - 1 : start] != b"\r":
                self.hang_up = self.ended = True
                self.refusal = None
                self.refuse(Refusal("protocol", BARE_LF_DOT_LINE))
                return len(chunk)
            self.ended = True
            content_end = start + 1  # the CRLF before the dot ends the last line
        if self.refusal is None:
            # Every "\n." after a CR is a line start; any other is a dot after a bare LF (counting is C speed).
            if window.count(b"\n.", 1, content_end) > window.count(b"\r\n.", 0, content_end):
                self.refuse(Refusal("protocol", DOT_AFTER_BARE_LF))
            else:  # a stuffed dot (RFC 5321 4.5.2) follows a CRLF, which may be one of the two kept bytes
                self._keep(window[:content_end].replace(b"\r\n.", b"\r\n"))
        self._seen = window[content_end - 2 :]
        return dot_line.end() - offset if dot_line is not None else len(chunk)

    def _keep(self, unstuffed: bytes) -> None:
        """`unstuffed`: two bytes already kept, then the new content."""
        if self._too_long(unstuffed):
            self.refuse(Refusal("too_long", LINE_TOO_LONG))
        elif self.held + len(unstuffed) - 2 > self.max_size:
            self.refuse(Refusal("too_big", message_too_big(self.max_size)))
        elif not self.budget.take(len(unstuffed) - 2):
            self.refuse(Refusal("memory_budget", MEMORY_BUDGET_FULL))
        else:
            self.held += len(unstuffed) - 2
            self.data += memoryview(unstuffed)[2:]

    def _too_long(self, unstuffed: bytes) -> bool:
        """Whether a line (between CRLFs) is over max_line; `_line` carries the unfinished one on."""
        first = unstuffed.find(b"\r\n", 1)
        if first < 0:
            self._line += len(unstuffed) - 2
            return self._line > self.max_line + 1  # its CR may be in, its LF still to come
        longest = self._line + first - 2
        last = unstuffed.rfind(b"\r\n")
        if last - first > self.max_line:  # room for a long line between the first and the last CRLF
            longest = max(longest, *map(len, unstuffed[first + 2 : last].split(b"\r\n")))
        self._line = len(unstuffed) - last - 2
        return longest > self.max_line or self._line > self.max_line + 1

    def hold_for_parsing(self, max_header_bytes: int) -> bool:
        """Take from the budget what reading a big header block will build, beside the bytes: those are read in
        threads, several at once (a small one is read on the loop, one at a time). False, and the upload
        refused, when the budget has no room for it."""
        if not prepared_in_a_thread(self.data):
            return True
        end = self.data.find(b"\r\n\r\n", 0, max_header_bytes + 4)
        cost = PARSE_COST * (end + 4 if end >= 0 else min(len(self.data), max_header_bytes))
        if not self.budget.take(cost):
            self.refuse(Refusal("memory_budget", MEMORY_BUDGET_FULL))
            return False
        self.held += cost
        return True

    def refuse(self, refusal: Refusal) -> None:
        """The first problem is the one the client hears; nothing more is kept."""
        if self.refusal is None:
            self.refusal = refusal
        self.release()

    def take(self) -> bytearray:
        """The message, handed on without a copy; the budget counts it until `release`."""
        data, self.data = self.data, bytearray()
        return data

    def release(self) -> None:
        self.budget.release(self.held)
        self.held = 0
        self.data = bytearray()
