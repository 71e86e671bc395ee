"""The session's side of a message's first attempt: the commit, the wait, and the answer.

`relay.core.first_attempt` decides; this carries out the decisions that belong to whoever brought the
event (the commit finishing, the client's wait ending). The worker carries out the rest.
"""

from __future__ import annotations

import asyncio
import functools

import structlog

from relay.core.first_attempt import Answer, Decision, FirstAttempt, Store, outcome
from relay.core.message import Envelope, Prepared
from relay.core.replies import Reply
from relay.delivery.queue import DeliveryQueue, Handoff, Job
from relay.ops.metrics import Metrics
from relay.store.journal import Journal
from relay.store.spool import Spool

log = structlog.get_logger("relay.delivery")


async def promote(spool: Spool, journal: Journal, job: Job, message: Prepared) -> None:
    """Journal -> its own file in queue/ (raises OSError, and then it stays in the journal)."""
    await asyncio.to_thread(spool.commit, message, job.envelope)
    job.in_journal, job.message, job.record = False, None, None
    journal.done(job.queue_id)


class Handoffs:
    def __init__(self, spool: Spool, journal: Journal, queue: DeliveryQueue, metrics: Metrics) -> None:
        self.spool = spool
        self.journal = journal
        self.queue = queue
        self.metrics = metrics
        self.promotions: set[asyncio.Task[None]] = set()

    def submit(self, message: Prepared, envelope: Envelope) -> Job:
        """Commit a message to the journal and attempt it at once, side by side (latency: the longer of
        the two, not their sum). `answer(job)` then says what the client is told."""
        handoff = Handoff(FirstAttempt(), asyncio.get_running_loop().create_future())
        committing = self.journal.append(message, envelope)
        job = Job(envelope, due=0.0, message=message, in_journal=True, first=handoff, committing=committing, noted=True)
        committing.add_done_callback(functools.partial(self._on_commit, job, handoff))
        self.queue.schedule(job)
        return job

    async def answer(self, job: Job, sync_wait: float) -> tuple[Reply, str]:
        """The reply for the waiting client and its log outcome: Infobip's verdict if it comes within
        `sync_wait`, else what the table says once `sync_wait` has passed."""
        handoff = job.first
        assert handoff is not None
        try:
            await asyncio.wait({handoff.reply}, timeout=sync_wait)
            if not handoff.reply.done():
                self.react(job, handoff, handoff.machine.stopped_waiting())
            reply = await asyncio.shield(handoff.reply)
        except asyncio.CancelledError:  # the client hung up: what it would have waited for happens anyway
            self.react(job, handoff, handoff.machine.gone())
            raise
        return reply, outcome(handoff.machine.answered_with, handoff.machine.attempt)

    def _on_commit(self, job: Job, handoff: Handoff, committing: asyncio.Future[None]) -> None:
        if committing.cancelled() or committing.exception() is not None:
            self.react(job, handoff, handoff.machine.commit_failed())
        else:
            self.react(job, handoff, handoff.machine.committed())

    async def promote_unattempted(self) -> None:
        """At stop: messages never attempted go to queue/, so that a stopped relay's `relay queue` shows
        them (left in the journal, they would be recovered in place just as well)."""
        for job in list(self.queue.jobs.values()):
            if not job.in_journal or job.message is None:
                continue
            if job.committing is not None:  # promoted before its journal write landed, it would
                await asyncio.wait({job.committing})  # stay live there, and be promoted again at start
                if job.committing.exception() is not None:
                    continue  # never acknowledged
            try:
                await promote(self.spool, self.journal, job, job.message)
            except OSError:  # it stays in the journal for the next start
                continue

    def react(self, job: Job, handoff: Handoff, decision: Decision) -> None:
        """Carry out what an event implies, except what only the worker holding the message can do."""
        store = decision.store
        if store is Store.TAKE_TO_QUEUE:
            handoff.machine.begin(store)
            if self.queue.withdraw(job.queue_id) is not None:
                self.queue.busy.add(job.queue_id)  # as if a worker had it, while it is written
                task = asyncio.ensure_future(self._take_to_queue(job, handoff))
                self.promotions.add(task)
                task.add_done_callback(self.promotions.discard)
                return
            decision = Decision(decision.answer, Store.NOTHING)  # not waiting in the queue: it stays put
        elif store is Store.WITHDRAW:
            handoff.machine.begin(store)
            self.queue.withdraw(job.queue_id)
        elif store is Store.MARK_DONE:
            handoff.machine.begin(store)
            self.journal.done(job.queue_id)
        if decision.answer_now:
            self.answer_now(job, handoff, decision)

    def answer_now(self, job: Job, handoff: Handoff, decision: Decision) -> None:
        reply = handoff.machine.answer(decision, job.queue_id)
        if reply is None or handoff.reply.done():
            return
        if decision.answer is Answer.UNSTORABLE:
            log.error("spool_write_failed", queue_id=job.queue_id, error="not on disk and not sent")
            self.metrics.rejected.labels("spool_unwritable").inc()
        handoff.reply.set_result(reply)

    async def _take_to_queue(self, job: Job, handoff: Handoff) -> None:
        """The client is about to hear "queued" and no worker has the message yet (an outage could
        queue thousands): to its own file in queue/, where `relay queue` shows it, out of memory."""
        assert job.message is not None
        try:
            await promote(self.spool, self.journal, job, job.message)
            job.first = None  # the first attempt is over: the next one is an ordinary retry
        except OSError as exc:  # still safe in the journal; it keeps its bytes and goes out from memory
            log.error("spool_promote_failed", queue_id=job.queue_id, error=exc.strerror or str(exc))
        finally:
            self.queue.busy.discard(job.queue_id)
            self.queue.schedule(job)
            self.answer_now(job, handoff, handoff.machine.decision())
