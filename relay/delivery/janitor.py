"""Removes delivered messages' files off the event loop, in batches: an unlink of a file just fsync'd
can take half a millisecond, and nobody waits for it (a crash before it: one redelivery)."""

from __future__ import annotations

import asyncio

import structlog

from relay.store.spool import Spool
from relay.testing.failpoints import crashpoint

log = structlog.get_logger("relay.delivery")


class Janitor:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.done: set[str] = set()  # delivered, files not yet removed
        self._wakeup = asyncio.Event()

    def remove(self, queue_id: str) -> None:
        self.done.add(queue_id)
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.remove_done()
            except OSError as exc:  # the ids stay in `done`: the next pass tries again
                log.error("spool_remove_failed", error=exc.strerror or str(exc))
                await asyncio.sleep(1.0)
                self._wakeup.set()

    async def remove_done(self) -> None:
        batch = list(self.done)  # taken on the loop: the thread never iterates a set being added to
        await asyncio.to_thread(self.spool.remove_many, batch)
        crashpoint("after_spool_removed")
        self.done.difference_update(batch)
