"""The messages waiting for a worker, by due time, and the workers waiting for a message."""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass

from relay.core.breaker import CircuitBreaker
from relay.core.first_attempt import FirstAttempt
from relay.core.message import Envelope, Prepared
from relay.core.replies import Reply
from relay.delivery.clock import Clock, Timer
from relay.store.journal import LiveRecord


@dataclass
class Handoff:
    """Between a message's first attempt and the SMTP session that may wait for it."""

    machine: FirstAttempt
    reply: asyncio.Future[Reply]


@dataclass(slots=True)
class Job:
    """A message the scheduler knows: its envelope, when it is due, and what is left to do."""

    envelope: Envelope
    due: float
    attempts: int = 0
    recipients: tuple[str, ...] | None = None  # None: all of the envelope's
    message: Prepared | None = None  # the bytes, kept in memory for the first attempt only
    in_journal: bool = False  # only in the journal, not (yet) in its own file in queue/
    held: bool = False  # waiting out an outage, not a 4xx: due as soon as a probe succeeds
    record: LiveRecord | None = None  # recovered from the journal: where its bytes are
    first: Handoff | None = None  # until the first attempt is settled
    committing: asyncio.Future[None] | None = None  # the journal write running beside the first attempt
    noted: bool = False  # in the history as received by this process (else noted again at its next attempt)

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id


class DeliveryQueue:
    """Jobs by due time; idle workers park here and are woken one at a time."""

    def __init__(self, clock: Clock, breaker: CircuitBreaker) -> None:
        self.clock = clock
        self.breaker = breaker
        self.jobs: dict[str, Job] = {}
        self.busy: set[str] = set()  # taken by a worker (or being written to queue/)
        self._heap: list[tuple[float, str]] = []
        self._idle: list[asyncio.Future[None]] = []
        self.stopping = False
        self.unloaded = 0  # listed in queue/ at start-up and not read yet (relay/delivery/recovery.py)

    def schedule(self, job: Job) -> None:
        self.jobs[job.queue_id] = job
        heapq.heappush(self._heap, (job.due, job.queue_id))
        self.wake()

    def withdraw(self, queue_id: str) -> Job | None:
        """Out of the queue (its heap entry goes stale)."""
        return self.jobs.pop(queue_id, None)

    def wake(self, *, everyone: bool = False) -> None:
        """Wake one idle worker (all for a flush or stop): a shared event would wake them all per message."""
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def flush(self) -> None:
        """Everything waiting is due now, oldest first (queue ids sort by arrival)."""
        for job in self.jobs.values():
            job.due = 0.0
        self._heap = sorted((0.0, queue_id) for queue_id in self.jobs)
        self.wake(everyone=True)

    def flush_ids(self, ids: set[str]) -> None:
        """Only these are due now (`relay queue flush ID...` on a running relay)."""
        for queue_id in ids & self.jobs.keys():
            self.jobs[queue_id].due = 0.0
            heapq.heappush(self._heap, (0.0, queue_id))
        self.wake(everyone=True)

    def release_held(self) -> None:
        """Infobip is back: what the outage held is due now, oldest first; 4xx retries keep their time."""
        for job in self.jobs.values():
            if job.held:
                job.due, job.held = 0.0, False
                heapq.heappush(self._heap, (0.0, job.queue_id))
        self.wake(everyone=True)

    @property
    def holds_any(self) -> bool:
        return any(job.held for job in self.jobs.values())

    def stop(self) -> None:
        self.stopping = True
        self.wake(everyone=True)

    @property
    def depth(self) -> int:
        return len(self.jobs) + len(self.busy) + self.unloaded

    def oldest_received(self) -> float | None:
        """Arrival time of the oldest message waiting (epoch seconds), for the age gauge."""
        return min((job.envelope.received_at for job in self.jobs.values()), default=None)

    def _due(self) -> Job | float:
        """The job to send now, or how long to wait for one."""
        while self._heap:
            due, queue_id = self._heap[0]
            job = self.jobs.get(queue_id)
            if job is None or job.due != due:
                heapq.heappop(self._heap)  # stale entry: rescheduled or removed
                continue
            if due > self.clock.time():
                return due - self.clock.time()
            if self.breaker.is_open:
                return float("inf")  # delivery is paused: the prober's success flushes and wakes us
            heapq.heappop(self._heap)
            job = self.jobs.pop(queue_id)
            self.busy.add(queue_id)
            return job
        return float("inf")

    async def next_job(self) -> Job | None:
        """Wait for a due job (None once stopping): a timer for the next due time, or a wake-up."""
        while not self.stopping:
            found = self._due()
            if isinstance(found, Job):
                return found
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            timer: Timer | None = None
            if found != float("inf"):
                timer = self.clock.call_later(found, lambda w=waiter: _release(w))  # type: ignore[misc]
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                if waiter in self._idle:  # a timed-out waiter is done but still listed
                    self._idle.remove(waiter)
        return None


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
