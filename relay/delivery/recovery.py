"""Start-up and `relay queue flush`: what the store holds becomes jobs for the scheduler.

Start-up lists queue/ (names only) before the relay listens, and reads the entries after: a batch at a
time in a thread, each batch scheduled as soon as it is read, oldest first (queue ids sort by arrival),
so a big queue neither delays the first EHLO nor waits to be read in full before its oldest messages
go out. Until a message is read it is counted as waiting (`DeliveryQueue.unloaded`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet

import structlog

from relay.core.message import Envelope, Prepared
from relay.delivery.queue import DeliveryQueue, Job
from relay.store.journal import Journal, LiveRecord
from relay.store.sealing import UnknownKeyError
from relay.store.spool import EntryState, Listing, Spool

log = structlog.get_logger("relay.delivery")
Route = Callable[[Envelope], DeliveryQueue]  # the queue of the message's profile
Found = list[tuple[Envelope, EntryState]]
LOAD_BATCH = 500  # queue/ entries read per trip to the loader thread (about 25 ms of reading)


def stored_message(envelope: Envelope, data: bytes) -> Prepared:
    """A message read back from disk: its bytes are already exactly what goes upstream."""
    return Prepared(envelope.queue_id, envelope.mail_from, envelope.recipients, envelope.message_id, b"", data)


def schedule_journal(route: Route, records: list[LiveRecord], queued: AbstractSet[str]) -> dict[str, LiveRecord]:
    """Start-up: what the journal holds and nobody finished is delivered from where it is (recovery
    needs no free space). A message also in queue/ (`queued`: promoted just before the crash) is returned,
    not scheduled: it goes from queue/ once that copy is read, and from the journal if it does not read."""
    in_queue: dict[str, LiveRecord] = {}
    for record in records:
        if record.envelope.queue_id in queued:
            in_queue[record.envelope.queue_id] = record
        else:
            route(record.envelope).schedule(Job(record.envelope, due=0.0, in_journal=True, record=record))
    return in_queue


def read_entries(spool: Spool, ids: Iterable[str], with_state: Callable[[str], bool]) -> Found:
    """Read these queue/ entries (in a thread: disk only, no event-loop state)."""
    found = []
    for queue_id in ids:
        try:
            found.append(spool.read_queued(queue_id, with_state(queue_id)))
        except FileNotFoundError:
            continue  # delivered and removed since the directory was listed
        except UnknownKeyError as exc:  # the start-up key check reads a sample: left for an engineer
            log.error("spool_entry_key_missing", queue_id=queue_id, key_id=exc.key_id, kept="in place")
        except Exception as exc:  # unreadable: leave it for an engineer, say so
            log.error("spool_entry_unreadable", queue_id=queue_id, error=f"{type(exc).__name__}: {exc}")
    return found


def scan_queue(spool: Spool, skip: set[str]) -> Found:
    """Read what queue/ holds now (`relay queue flush` and `requeue` on a running relay)."""
    return read_entries(spool, (i for i in spool.queued_ids() if i not in skip), lambda _: True)


def schedule_found(route: Route, found: Found, skip: set[str], held: set[DeliveryQueue] | None = None) -> int:
    """Schedule every message not known yet; a known one takes its recipients from its .state (e.g.
    `requeue` added dead-lettered recipients back). Returns how many were new; `held` gets the queues
    that got a message held by an outage."""
    added = 0
    for envelope, state in found:
        queue_id = envelope.queue_id
        queue = route(envelope)
        if queue_id in queue.busy or queue_id in skip:
            continue  # taken by a worker while we read
        recipients = tuple(state.recipients) if state.recipients is not None else None
        known = queue.jobs.get(queue_id)
        if known is not None:
            if recipients is not None:
                known.recipients = recipients
            continue
        job = Job(envelope, due=state.next_attempt, attempts=state.attempts, recipients=recipients, held=state.held)
        queue.schedule(job)
        added += 1
        if job.held and held is not None:
            held.add(queue)
    return added


class QueueLoader:
    """queue/ as listed at start-up, read and scheduled after the relay listens (see the module's doc)."""

    def __init__(
        self,
        spool: Spool,
        journal: Journal,
        listing: Listing,
        in_journal: dict[str, LiveRecord],
        counted: DeliveryQueue,
    ) -> None:
        self.spool = spool
        self.journal = journal
        self.listing = listing
        self.in_journal = in_journal  # from schedule_journal: in queue/ and in the journal
        self.counted = counted  # the queue whose depth counts what is not read yet (the default lane's)
        self.loaded = 0
        counted.unloaded += len(listing.ids)

    async def run(self, route: Route, skip: Callable[[], set[str]], hold: Callable[[DeliveryQueue], None]) -> None:
        """Read and schedule every batch; `hold(queue)` for a queue that got a message an outage held
        before the restart (delivery there waits for one probe, then all go at once)."""
        started = time.monotonic()  # for the log: real seconds, whatever clock the scheduler runs on
        ids, with_state = await asyncio.to_thread(sorted, self.listing.ids), self.listing.with_state
        for start in range(0, len(ids), LOAD_BATCH):
            batch = ids[start : start + LOAD_BATCH]
            found = await asyncio.to_thread(read_entries, self.spool, batch, with_state.__contains__)
            held: set[DeliveryQueue] = set()
            self.loaded += schedule_found(route, found, skip(), held)
            self.counted.unloaded -= len(batch)  # (stopped before: they stay counted, and on disk)
            if self.in_journal:
                self._settle_journal_copies(route, batch, {envelope.queue_id for envelope, _ in found})
            for queue in held:
                hold(queue)
        self.listing = Listing(set(), set())  # 50,000 ids are worth letting go
        log.info("spool_loaded", messages=self.loaded, seconds=round(time.monotonic() - started, 3))

    def _settle_journal_copies(self, route: Route, batch: list[str], read: set[str]) -> None:
        """A message both promoted and still live in the journal (a crash between the two): the queue/
        copy read, so the journal's is done; it did not read, so the journal's goes instead."""
        for queue_id in batch:
            record = self.in_journal.pop(queue_id, None)
            if record is None:
                continue
            if queue_id in read:
                self.journal.done(queue_id)
            else:
                route(record.envelope).schedule(Job(record.envelope, due=0.0, in_journal=True, record=record))
