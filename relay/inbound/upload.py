"""One DATA upload as its lines arrive: what is kept, what the memory budget holds, and why it is refused.

Pure bookkeeping, no I/O: the server reads lines and hands them here. The message is read to its end
whatever happens (RFC 5321 4.2.5: the reply comes after the end of data); after the first problem the
rest is dropped as it arrives and the bytes held so far go back to the budget at once.
"""

from __future__ import annotations

from relay.core.replies import LINE_TOO_LONG, MEMORY_BUDGET_FULL, message_too_big
from relay.inbound.access import Refusal
from relay.inbound.limits import MemoryBudget


class Upload:
    def __init__(self, budget: MemoryBudget, max_size: int) -> None:
        self.budget = budget
        self.max_size = max_size
        self.data = bytearray()
        self.held = 0  # bytes taken from the budget
        self.refusal: Refusal | None = None

    def add(self, line: bytes) -> None:
        """One line as received, CRLF included; a leading dot is transparency (RFC 5321 4.5.2) and goes."""
        if self.refusal is not None:
            return
        if line[:1] == b".":
            line = line[1:]
        if self.held + len(line) > self.max_size:
            self.refuse(Refusal("too_big", message_too_big(self.max_size)))
        elif not self.budget.take(len(line)):
            self.refuse(Refusal("memory_budget", MEMORY_BUDGET_FULL))
        else:
            self.held += len(line)
            self.data += line

    def line_too_long(self) -> None:
        """A line longer than the stream limit arrived (its pieces are not handed here)."""
        self.refuse(Refusal("too_long", LINE_TOO_LONG))

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
