"""The history for async code: every store call on one thread of its own, in the order made.

The data path only notes what happened (`note`, no waiting: a list append); notes gather for up to 50 ms,
and while the previous batch is being written, so 10,000 messages cost a few hundred transactions and
thread hops, not 20,000. A caller that must know a note is on disk (pass-through: a recipient refused inside
a 250 calls for a bounce) awaits the future `note` returns: one per batch, shared by its notes, not one per
message. One thread rather than asyncio.to_thread's pool: one SQLite connection, and writes never overtake
each other. A write that fails in a way that may pass is tried again, the notes behind it waiting (while it
is held up, Outcomes.backlogged refuses new mail once reports.history_backlog of them wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

from relay.outcomes.history import Change, HistoryStore

log = structlog.get_logger("relay.outcomes")
T = TypeVar("T")
GATHER = 0.05  # seconds notes may wait to share a transaction (and one hop to the thread) with others
BATCH = 500  # ... or until this many are waiting
HELD_UP = 1.0  # seconds a write may take before the history counts as held up (healthy writes take milliseconds)
RETRY_FIRST, RETRY_MAX = 0.25, 30.0  # seconds before a write that failed in passing is tried again, doubling
CLOSE_WAIT = 5.0  # seconds a stop waits for notes a failing history has not taken


class History:
    def __init__(self, store: HistoryStore, *, bounces_on: bool, on_error: Callable[[], None]) -> None:
        self.store = store
        self.bounces_on = bounces_on
        self._on_error = on_error
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="relay-history")
        self._batch: list[Change] = []
        self._done: asyncio.Future[bool] | None = None  # the batch being gathered: True once it is written
        self._last: asyncio.Future[bool] | None = None  # the latest batch, gathered or being written
        self._wake = asyncio.Event()
        self._now = asyncio.Event()  # someone waits for the write: no gathering
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._writing_since: float | None = None  # monotonic time the write in flight began (its tries included)
        self._writing: list[Change] = []  # the batch in flight

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="history-writer")

    def held_up(self, backlog: int) -> bool:
        """A write has taken HELD_UP seconds or more and `backlog` notes wait behind it: so many that new mail
        should wait too (a healthy history gathers a few hundred at most between its writes)."""
        since = self._writing_since
        return since is not None and len(self._batch) >= backlog and time.monotonic() - since >= HELD_UP

    def note(self, change: Change, *, now: bool = False) -> asyncio.Future[bool]:
        """Queue a change; the future says True once it is on disk (False if the write failed). It is
        written within GATHER seconds, together with the others; `now` if someone waits for it."""
        if (done := self._done) is None:
            done = self._done = self._last = asyncio.get_running_loop().create_future()
        self._batch.append(change)
        self._wake.set()
        if now or len(self._batch) >= BATCH:
            self._now.set()
        return done

    async def flush(self) -> None:
        """Wait until everything noted so far is written."""
        if self._last is not None and not self._last.done():
            self._now.set()
            await asyncio.shield(self._last)

    async def call(self, function: Callable[..., T], *args: object) -> T:
        """Run a store method on the history's thread, after everything noted before it."""
        await self.flush()
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            with contextlib.suppress(TimeoutError):  # a moment for more notes: one hop, one transaction
                async with asyncio.timeout(GATHER):  # not wait_for: on 3.11 it can swallow close()'s cancel
                    await self._now.wait()
            self._wake.clear()
            self._now.clear()
            batch, done = self._batch, self._done
            self._batch, self._done = [], None
            if not batch or done is None:
                continue
            self._writing_since, self._writing = time.monotonic(), batch
            try:
                ok = await self._write(batch)
            finally:
                self._writing_since, self._writing = None, []
            if not done.done():
                done.set_result(ok)

    async def _write(self, batch: list[Change]) -> bool:
        """Write `batch`, trying again while the store says its failure may pass (a lock held, a full disk, a
        server away): the notes behind it wait, and history_backlog bounds them. A batch refused for good (a
        value the store cannot take) is dropped: trace will miss it, and the relay goes on."""
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST
        while True:
            try:
                await loop.run_in_executor(self._executor, self.store.write, batch, self.bounces_on)
                return True
            except Exception as exc:
                self._on_error()
                again = self.store.passing(exc)
                log.error(
                    "history_write_failed", changes=len(batch), error_type=type(exc).__name__, error=str(exc),
                    retry_in=delay if again else None,
                )  # fmt: skip
                if not again:
                    return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_MAX)

    async def close(self) -> None:
        """Write what is noted, then close the store on its own thread. Once: a second stop waits for the
        first, and a stop cancelled midway does not leave the store open."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(TimeoutError):  # a history still failing: what it has not taken is lost
                async with asyncio.timeout(CLOSE_WAIT):
                    await self.flush()
            lost = len(self._writing) + len(self._batch)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            if lost:
                log.error("history_notes_lost", changes=lost)
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._executor.shutdown(wait=True)
