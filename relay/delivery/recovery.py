"""Start-up and `relay queue flush`: what the store holds becomes jobs for the scheduler."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from relay.core.message import Envelope, Prepared
from relay.delivery.queue import DeliveryQueue, Job
from relay.store.journal import Journal, LiveRecord
from relay.store.spool import EntryState, Spool

log = structlog.get_logger("relay.delivery")
Route = Callable[[Envelope], DeliveryQueue]  # the queue of the message's profile


def stored_message(envelope: Envelope, data: bytes) -> Prepared:
    """A message read back from disk: its bytes are already exactly what goes upstream."""
    return Prepared(envelope.queue_id, envelope.mail_from, envelope.recipients, envelope.message_id, b"", data)


def schedule_journal(route: Route, journal: Journal, records: list[LiveRecord]) -> int:
    """Start-up: what the journal holds and nobody finished is delivered from where it is (recovery
    needs no free space). A message also in queue/ (promoted just before the crash) goes from there."""
    count = 0
    for record in records:
        queue_id = record.envelope.queue_id
        queue = route(record.envelope)
        if queue_id in queue.jobs:
            journal.done(queue_id)
            continue
        queue.schedule(Job(record.envelope, due=0.0, in_journal=True, record=record))
        count += 1
    return count


def scan_queue(spool: Spool, skip: set[str]) -> list[tuple[Envelope, EntryState]]:
    """Read what queue/ holds (in a thread: disk only, no event-loop state)."""
    found = []
    for queue_id in spool.queued_ids():
        if queue_id in skip:
            continue
        try:
            found.append((spool.read_envelope(queue_id), spool.read_state(queue_id)))
        except FileNotFoundError:
            continue  # delivered and removed since the directory was listed
        except Exception as exc:  # unreadable: leave it for an engineer, say so
            log.error("spool_entry_unreadable", queue_id=queue_id, error=f"{type(exc).__name__}: {exc}")
    return found


def schedule_found(route: Route, found: list[tuple[Envelope, EntryState]], skip: set[str]) -> int:
    """Schedule every message not known yet; a known one takes its recipients from its .state (e.g.
    `requeue` added dead-lettered recipients back). Returns how many were new."""
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
    return added
