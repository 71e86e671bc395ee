"""The dead letters whose bounce is not noted in the message history yet, and their `.unnoted` markers.

A recipient that dies after the app heard 250 is owed a bounce, which exists only once its note is in the
history; nothing reads dead/ at a start. So Spool.dead_letter leaves a marker beside the dead letter, and it
goes only when every note made for that message is on disk: one message may die a recipient at a time, its
notes in flight together, and one of them may fail (dropped, or cut off by a stop or a crash). A marker left
is noted again at the next start (Scheduler._note_unnoted); the history's `failed` status makes a second note
change nothing, so no bounce goes twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from pathlib import Path

from relay.store.spool import bounce_noted


class UnnotedMarks:
    def __init__(self, dead: Path) -> None:
        self.dead = dead
        self._outstanding: Counter[str] = Counter()  # notes in flight, by queue id
        self._failed: set[str] = set()  # a note of theirs was not written: the marker stays until the next start

    def expect(self, queue_id: str) -> None:
        """Before the marker is made (Spool.dead_letter): a note for `queue_id` is coming."""
        self._outstanding[queue_id] += 1

    def watch(self, queue_id: str, written: asyncio.Future[bool]) -> None:
        """That note: the marker goes when it and every other one for `queue_id` are on disk."""
        written.add_done_callback(functools.partial(self._done, queue_id))

    def _done(self, queue_id: str, written: asyncio.Future[bool]) -> None:
        self.settle(queue_id, not written.cancelled() and written.result())

    def settle(self, queue_id: str, written: bool) -> None:
        """One expected note is over: on disk (`written`), or not (it failed, or was never made): then the
        marker stays until a start notes it again."""
        if not written:
            self._failed.add(queue_id)
        self._outstanding[queue_id] -= 1
        if self._outstanding[queue_id] > 0:
            return
        del self._outstanding[queue_id]
        if queue_id not in self._failed:
            with contextlib.suppress(OSError):  # one small unlink, on a rare path
                bounce_noted(self.dead, queue_id)
