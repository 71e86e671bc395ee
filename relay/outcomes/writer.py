"""The history for async code: every store call on one thread of its own, in the order made.

The data path only notes what happened (`note`, no waiting: a list append); notes gather for up to 50 ms,
and while the previous batch is being written, so 10,000 messages cost a few hundred transactions and
thread hops, not 20,000. A caller that must know a note is on disk (pass-through: a recipient refused inside
a 250 calls for a bounce) awaits the future `note` returns: one per batch, shared by its notes, not one per
message. One thread rather than asyncio.to_thread's pool: one SQLite connection, and writes never overtake
each other. A write that fails in a way that may pass (the store says which) is tried again for up to
RETRY_FOR seconds, the notes behind it waiting (Outcomes.backlogged refuses new mail once
reports.history_backlog of them wait); calls that must follow it fail at once meanwhile (HistoryFailing),
so a push gets its 503 and the poller keeps its page, rather than waiting as long as the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from relay.outcomes.history import Change, HistoryStore, MessageReceived

log = structlog.get_logger("relay.outcomes")
T = TypeVar("T")
GATHER = 0.05  # seconds notes may wait to share a transaction (and one hop to the thread) with others
BATCH = 500  # ... or until this many are waiting
HELD_UP = 1.0  # seconds a write may take before the history counts as held up (healthy writes take milliseconds)
RETRY_FIRST, RETRY_MAX = 0.25, 8.0  # seconds before a write that failed in passing is tried again, doubling
RETRY_FOR = 300.0  # seconds a batch is tried for; then it is dropped, as one refused for good (a failure the
# store took for passing that is not must not hold every later note, and with them new mail, for ever)
CLOSE_WAIT = 5.0  # seconds a stop waits for notes a failing history has not taken


class HistoryFailing(RuntimeError):
    """The history's writes fail and are being tried again: a call that must follow them fails now."""


class History:
    def __init__(
        self, store: HistoryStore, *, bounces_on: bool, on_error: Callable[[], None], retry_for: float = RETRY_FOR
    ) -> None:
        self.store = store
        self.retry_for = retry_for
        self.bounces_on = bounces_on
        self._on_error = on_error
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="relay-history")
        self._batch: list[Change] = []
        self._batch_bytes = 0  # of header blocks in _batch (the bulk of a note, while bounces are on)
        self._done: asyncio.Future[bool] | None = None  # the batch being gathered: True once it is written
        self._last: asyncio.Future[bool] | None = None  # the latest batch, gathered or being written
        self._wake = asyncio.Event()
        self._now = asyncio.Event()  # someone waits for the write: no gathering
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._writing_since: float | None = None  # monotonic time the write in flight began (its tries included)
        self._writing: list[Change] = []  # the batch in flight
        self._failing = asyncio.Event()  # set while the batch in flight has failed and is being tried again
        self._stopping = asyncio.Event()  # close(): a write waiting to be tried again is tried at once, then often
        self._writing_done: asyncio.Future[bool] | None = None  # the future of the batch in flight

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="history-writer")

    def held_up(self, backlog: int, backlog_bytes: int) -> bool:
        """A write has taken HELD_UP seconds or more and `backlog` notes, or `backlog_bytes` of header blocks,
        wait behind it: so much that new mail should wait too (a healthy history gathers a few hundred notes at
        most between its writes)."""
        since = self._writing_since
        if since is None or (len(self._batch) < backlog and self._batch_bytes < backlog_bytes):
            return False
        return time.monotonic() - since >= HELD_UP

    def note(self, change: Change, *, now: bool = False) -> asyncio.Future[bool]:
        """Queue a change; the future says True once it is on disk (False if the write failed). It is
        written within GATHER seconds, together with the others; `now` if someone waits for it."""
        if (done := self._done) is None:
            done = self._done = self._last = asyncio.get_running_loop().create_future()
        self._batch.append(change)
        if isinstance(change, MessageReceived) and change.headers:
            self._batch_bytes += len(change.headers)
        self._wake.set()
        if now or len(self._batch) >= BATCH:
            self._now.set()
        return done

    async def flush(self) -> None:
        """Wait until everything noted so far is written; HistoryFailing if the writes fail meanwhile."""
        last = self._last
        if last is None or last.done():
            return
        self._now.set()
        failing: asyncio.Future[Any] = asyncio.ensure_future(self._failing.wait())
        try:
            await asyncio.wait({last, failing}, return_when=asyncio.FIRST_COMPLETED)  # neither cancels `last`
        finally:
            failing.cancel()
        if not last.done():
            raise HistoryFailing("the message history's writes are failing (they are being tried again)")

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
            self._batch, self._done, self._batch_bytes = [], None, 0
            if not batch or done is None:
                continue
            self._writing_since, self._writing, self._writing_done = time.monotonic(), batch, done
            try:
                ok = await self._write(batch)
            except Exception as exc:  # _write's own bug: the writer lives on (every later note would wait for it)
                log.error("history_write_failed", changes=len(batch), error_type=type(exc).__name__, retry_in=None)
                ok = False
            finally:
                self._writing_since, self._writing = None, []
            if not done.done():
                done.set_result(ok)

    async def _write(self, batch: list[Change]) -> bool:
        """Write `batch`, trying again while the store says its failure may pass (a lock held, a full disk, a
        server away), for `retry_for` seconds at most: the notes behind it wait, and history_backlog bounds them.
        A batch refused for good (a value the store cannot take), or for too long, is dropped: trace will miss
        it, and the relay goes on."""
        loop = asyncio.get_running_loop()
        delay, give_up = RETRY_FIRST, time.monotonic() + self.retry_for
        try:
            while True:
                try:
                    await loop.run_in_executor(self._executor, self.store.write, batch, self.bounces_on)
                    if self._failing.is_set():
                        log.info("history_write_recovered", changes=len(batch))
                    return True
                except Exception as exc:
                    self._on_error()
                    again = self._passing(exc) and time.monotonic() + delay < give_up
                    log.error(
                        "history_write_failed", changes=len(batch), error_type=type(exc).__name__, error=str(exc),
                        retry_in=delay if again else None,
                    )  # fmt: skip
                    if not again:
                        return False
                self._failing.set()
                if self._stopping.is_set():  # closing: tried often, until close() gives up on it (CLOSE_WAIT)
                    await asyncio.sleep(RETRY_FIRST)
                    continue
                with contextlib.suppress(TimeoutError):  # a stop meanwhile: tried again at once
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                delay = min(2 * delay, RETRY_MAX)
        finally:
            self._failing.clear()

    def _passing(self, error: Exception) -> bool:
        try:
            return self.store.passing(error)
        except Exception:  # the writer must outlive any error, its own included
            return False

    async def close(self) -> None:
        """Write what is noted, then close the store on its own thread. Once: a second stop waits for the
        first, and a stop cancelled midway does not leave the store open."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._task is not None:
            self._stopping.set()
            if self._last is not None and not self._last.done():  # a history still failing gets CLOSE_WAIT
                self._now.set()
                await asyncio.wait({self._last}, timeout=CLOSE_WAIT)
            lost = len(self._writing) + len(self._batch)  # the write in flight may still go through
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            for future in (self._writing_done, self._done):  # nobody waits for ever on what will not be written
                if future is not None and not future.done():
                    future.set_result(False)
            if lost:
                log.error("history_notes_lost", changes=lost)  # not written at the stop: may be lost
        await asyncio.get_running_loop().run_in_executor(self._executor, self.store.close)
        self._executor.shutdown(wait=True)
