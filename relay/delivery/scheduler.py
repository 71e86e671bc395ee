"""Delivery: workers that take due messages and send them through the upstream pool.

A message's first attempt starts while it is committed to the journal, and its SMTP session may wait
for the verdict (`sync_wait`). What the session is told and what the store must do are decided by
`relay.core.first_attempt`; later attempts by `relay.core.retry`; when Infobip as a whole gets a rest
by the breaker. This module only carries those decisions out: it schedules and does I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools

import structlog
from structlog.contextvars import bound_contextvars

from relay.config import SpoolSettings
from relay.core.breaker import CircuitBreaker
from relay.core.first_attempt import (
    ANSWER_AFTER,
    WORKER_ACTIONS,
    Answer,
    Attempt,
    Commit,
    Decision,
    FirstAttempt,
    Store,
    outcome,
)
from relay.core.message import Envelope
from relay.core.prepare import Prepared
from relay.core.replies import INTERNAL_ERROR, Reply
from relay.core.retry import AttemptResult, NextStep, next_step, recipient_batches
from relay.core.smtp_client import queued_id
from relay.delivery.clock import Clock, SystemClock
from relay.delivery.queue import DeliveryQueue, Handoff, Job
from relay.delivery.recovery import promote_journal, scan_queue, schedule_found, stored_message
from relay.ops.logs import message_fields
from relay.ops.metrics import Metrics
from relay.store.journal import Journal
from relay.store.spool import EntryState, Spool
from relay.testing.failpoints import crashpoint
from relay.upstream.pool import UpstreamError, UpstreamPool

log = structlog.get_logger("relay.delivery")
POKE_INTERVAL = 1.0  # seconds between checks for `relay queue flush` requests from another process


class Delivery:
    def __init__(
        self,
        spool: Spool,
        pool: UpstreamPool,
        settings: SpoolSettings,
        workers: int,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.spool = spool
        self.journal = Journal(spool.journal_dir)
        self.metrics = metrics or Metrics()
        self.clock = clock or SystemClock()
        self.breaker = CircuitBreaker()
        self.queue = DeliveryQueue(self.clock, self.breaker)
        self.pool = pool
        self.settings = settings
        self.apply(settings, pool)
        self._workers = workers
        self._done: set[str] = set()  # delivered, files not yet removed (the janitor does it)
        self._janitor_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._helpers: list[asyncio.Task[None]] = []
        self._promotions: set[asyncio.Task[None]] = set()

    def apply(self, settings: SpoolSettings, pool: UpstreamPool) -> None:
        """A reloaded config: the retry schedule and the breaker change for what comes next."""
        self.settings, self.pool = settings, pool
        self.breaker.threshold = settings.breaker_threshold
        self.breaker.initial = settings.retry_initial
        self.breaker.maximum = settings.retry_max

    # lifecycle

    async def start(self) -> None:
        started = self.clock.monotonic()
        await asyncio.to_thread(self.spool.recover)
        recovered = await asyncio.to_thread(promote_journal, self.spool, self.journal)
        self.journal.start(asyncio.get_running_loop())
        count = await self._load_queue()
        if await asyncio.to_thread(self.spool.take_flush_request):  # `relay queue flush` while stopped
            self.queue.flush()
        log.info(
            "spool_recovered",
            messages=count,
            from_journal=recovered,
            seconds=round(self.clock.monotonic() - started, 3),
        )
        self._tasks = [asyncio.create_task(self._worker(), name=f"delivery-{i}") for i in range(self._workers)]
        self._helpers = [
            asyncio.create_task(self._watch(), name="delivery-watch"),
            asyncio.create_task(self._janitor(), name="delivery-janitor"),
        ]

    async def stop(self, timeout: float) -> None:
        """Start nothing new; let attempts in flight finish within `timeout` seconds; leave the rest."""
        self.queue.stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=max(0.0, timeout))
            for task in pending:
                task.cancel()
        for helper in self._helpers:
            helper.cancel()
        await asyncio.gather(*self._tasks, *self._helpers, *self._promotions, return_exceptions=True)
        await self._remove_done()
        # Messages never attempted go to queue/ now, so that a stopped relay's `relay queue` shows them.
        for job in list(self.queue.jobs.values()):
            if not job.in_journal or job.message is None:
                continue
            if job.committing is not None:  # promoted before its journal write landed, it would
                await asyncio.wait({job.committing})  # stay live there, and be promoted again at start
                if job.committing.exception() is not None:
                    continue  # never acknowledged
            try:
                await self._promote(job, job.message)
            except OSError:  # it stays in the journal for the next start
                continue
        await self.journal.close()

    @property
    def depth(self) -> int:
        return self.queue.depth

    def oldest_received(self) -> float | None:
        return self.queue.oldest_received()

    def flush(self) -> None:
        self.queue.flush()

    async def _load_queue(self) -> int:
        skip = self.queue.busy | self._done
        found = await asyncio.to_thread(scan_queue, self.spool, skip)
        return schedule_found(self.queue, found, self._done)

    # the first attempt: the session's side

    def submit(self, message: Prepared, envelope: Envelope) -> Job:
        """Commit a message to the journal and attempt it at once, side by side (latency: the longer of
        the two, not their sum). `answer(job)` then says what the client is told."""
        handoff = Handoff(FirstAttempt(), asyncio.get_running_loop().create_future())
        committing = self.journal.append(message, envelope)
        job = Job(envelope, due=0.0, message=message, in_journal=True, first=handoff, committing=committing)
        committing.add_done_callback(functools.partial(self._on_commit, job, handoff))
        self.queue.schedule(job)
        return job

    async def answer(self, job: Job) -> tuple[Reply, str]:
        """The reply for the waiting client and its log outcome: Infobip's verdict if it comes within
        `sync_wait`, else what the table says once `sync_wait` has passed."""
        handoff = job.first
        assert handoff is not None
        try:
            await asyncio.wait({handoff.reply}, timeout=self.settings.sync_wait)
            if not handoff.reply.done():
                self._react(job, handoff, handoff.machine.stopped_waiting())
            reply = await asyncio.shield(handoff.reply)
        except asyncio.CancelledError:  # the client hung up: what it would have waited for happens anyway
            self._react(job, handoff, handoff.machine.gone())
            raise
        return reply, outcome(handoff.machine.answered_with, handoff.machine.attempt)

    def _on_commit(self, job: Job, handoff: Handoff, committing: asyncio.Future[None]) -> None:
        if committing.cancelled() or committing.exception() is not None:
            self._react(job, handoff, handoff.machine.commit_failed())
        else:
            self._react(job, handoff, handoff.machine.committed())

    def _react(self, job: Job, handoff: Handoff, decision: Decision) -> None:
        """Carry out what an event implies, except what only the worker holding the message can do."""
        store = decision.store
        if store is Store.TAKE_TO_QUEUE:
            handoff.machine.begin(store)
            if self.queue.withdraw(job.queue_id) is not None:
                self.queue.busy.add(job.queue_id)  # as if a worker had it, while it is written
                task = asyncio.ensure_future(self._take_to_queue(job, handoff))
                self._promotions.add(task)
                task.add_done_callback(self._promotions.discard)
                return
            decision = Decision(decision.answer, Store.NOTHING)  # not waiting in the queue: it stays put
        elif store is Store.WITHDRAW:
            handoff.machine.begin(store)
            self.queue.withdraw(job.queue_id)
        elif store is Store.MARK_DONE:
            handoff.machine.begin(store)
            self.journal.done(job.queue_id)
        if decision.answer_now:
            self._answer(job, handoff, decision)

    def _answer(self, job: Job, handoff: Handoff, decision: Decision) -> None:
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
            await self._promote(job, job.message)
            job.first = None  # the first attempt is over: the next one is an ordinary retry
        except OSError as exc:  # still safe in the journal; it keeps its bytes and goes out from memory
            log.error("spool_promote_failed", queue_id=job.queue_id, error=exc.strerror or str(exc))
        finally:
            self.queue.busy.discard(job.queue_id)
            self.queue.schedule(job)
            self._answer(job, handoff, handoff.machine.decision())

    async def _promote(self, job: Job, message: Prepared) -> None:
        """Journal -> its own file in queue/ (raises OSError, and then it stays in the journal)."""
        await asyncio.to_thread(self.spool.commit, message, job.envelope)
        job.in_journal, job.message = False, None
        self.journal.done(job.queue_id)

    # the workers

    async def _worker(self) -> None:
        while (job := await self.queue.next_job()) is not None:
            with bound_contextvars(queue_id=job.queue_id, client_ip=job.envelope.client_ip):
                try:
                    await self._attempt(job)
                except Exception as exc:  # never lose the worker; the message stays in the spool
                    self._after_internal_error(job, exc)
                finally:
                    self.queue.busy.discard(job.queue_id)

    def _after_internal_error(self, job: Job, exc: Exception) -> None:
        log.error("delivery_error", error_type=type(exc).__name__, error=str(exc))
        handoff, job.first = job.first, None
        written = handoff is None or handoff.machine.commit is Commit.WRITTEN
        if handoff is not None and not handoff.reply.done():  # never leave a session waiting
            queued = handoff.machine.answer(Decision(Answer.QUEUED, Store.NOTHING), job.queue_id)
            handoff.reply.set_result(queued if written and queued else INTERNAL_ERROR)
        if written:  # on disk: tried again later (not on disk: the client heard 451 and sends it again)
            job.due = self.clock.time() + self.settings.retry_initial
            self.queue.schedule(job)

    async def _load(self, job: Job) -> Prepared | None:
        if job.message is not None:
            message = job.message
            if not job.in_journal:  # on disk in queue/: no need to hold the bytes between attempts
                job.message = None
            return message
        try:
            envelope, data = await asyncio.to_thread(self.spool.read, job.queue_id)
        except FileNotFoundError:
            return None  # deleted by `relay queue delete`
        return stored_message(envelope, data)

    async def _attempt(self, job: Job) -> None:
        message = await self._load(job)
        if message is None:
            return
        handoff = job.first
        if handoff is not None:
            self._react(job, handoff, handoff.machine.sending())
        recipients = job.recipients if job.recipients is not None else message.recipients
        with self.metrics.delivery_seconds.time():
            result = await self._send(message, recipients)
        crashpoint("after_upstream_reply")
        job.attempts += 1
        step = self._next_step(job, result)
        if handoff is None:
            await self._settle(job, step, message)
            self._count_and_log(job, result, step, handed_back=False)
        else:
            handed_back = await self._settle_first(job, handoff, result, step, message)
            self._count_and_log(job, result, step, handed_back=handed_back)

    async def _settle_first(
        self, job: Job, handoff: Handoff, result: AttemptResult, step: NextStep, message: Prepared
    ) -> bool:
        """The first attempt's verdict: the table decides; the worker carries out its part. Returns
        whether the refusal went back to the waiting client (not to dead/)."""
        machine = handoff.machine
        self._react(job, handoff, machine.verdict(result))
        if machine.commit is Commit.PENDING and machine.attempt is not Attempt.ACCEPTED:
            assert job.committing is not None
            await asyncio.wait({job.committing})  # `_on_commit` has updated the machine when this returns
        decision = machine.decision()
        job.first = None
        if decision.store in WORKER_ACTIONS:
            machine.begin(decision.store)
            if decision.store is Store.SETTLE:
                await self._settle(job, step, message)
            elif decision.store is Store.MARK_DONE_DURABLY:
                await self._done_durably(job)
            self._answer(job, handoff, machine.decision())
        elif decision.store not in ANSWER_AFTER:
            self._react(job, handoff, decision)
        refused = decision.store is Store.DROP and machine.attempt is Attempt.REFUSED
        return decision.store is Store.MARK_DONE_DURABLY or refused

    def _next_step(self, job: Job, result: AttemptResult) -> NextStep:
        return next_step(
            result,
            attempts=job.attempts,
            first_seen=job.envelope.received_at,
            now=self.clock.time(),
            max_age=self.settings.max_age,
            initial=self.settings.retry_initial,
            maximum=self.settings.retry_max,
            jitter=self.clock.random(),
        )

    async def _settle(self, job: Job, step: NextStep, message: Prepared) -> None:
        """Make the spool say what `step` decided: dead-letter, reschedule, or remove."""
        if job.in_journal and (step.retry or step.dead):
            try:
                await self._promote(job, message)
            except OSError as exc:  # still safe in the journal: keep the bytes, try it all again later
                log.error("spool_promote_failed", error=exc.strerror or str(exc))
                again = (*step.retry, *(r for r in step.dead if r not in step.retry))
                due = self.clock.time() + self.settings.retry_initial
                self.queue.schedule(dataclasses.replace(job, due=due, recipients=again, message=message))
                return
        if step.dead:
            await asyncio.to_thread(self.spool.dead_letter, job.queue_id, step.dead, step.last_reply)
        if step.retry:
            assert step.retry_at is not None
            state = EntryState(job.attempts, step.retry_at, list(step.retry), step.last_reply)
            await asyncio.to_thread(self.spool.write_state, job.queue_id, state)
            self.queue.schedule(dataclasses.replace(job, due=step.retry_at, recipients=step.retry, message=None))
        elif job.in_journal:  # delivered from memory: a crash before the done mark is durable: one more delivery
            self.journal.done(job.queue_id)
        else:
            self._done.add(job.queue_id)
            self._janitor_wakeup.set()

    async def _done_durably(self, job: Job) -> None:
        """The client is being told 5xx: the message must be gone first."""
        if not job.in_journal:
            await asyncio.to_thread(self.spool.remove, job.queue_id)
            return
        try:
            await self.journal.done_durably(job.queue_id)
        except OSError as exc:  # retried with the next batch; a crash first only repeats the refusal
            log.error("spool_journal_done_failed", error=exc.strerror or str(exc))

    def _count_and_log(self, job: Job, result: AttemptResult, step: NextStep, *, handed_back: bool) -> None:
        if result.accepted:
            self.metrics.relayed.inc()
        if step.retry:
            self.metrics.deferred.inc()
        if step.dead and not handed_back:
            self.metrics.dead.inc()
        log.info(
            "delivery_attempt",
            **message_fields(job.envelope, recipients=len(job.recipients or job.envelope.recipients)),
            infobip_id=",".join(result.infobip_ids) or None,
            attempt=job.attempts,
            outcome="handed_back" if handed_back else _outcome(result, step.retry),
            reply=step.last_reply or None,
            accepted=len(result.accepted),
            deferred=len(step.retry),
            dead=0 if handed_back else len(step.dead),
            next_attempt_in=round(step.retry_at - self.clock.time(), 1) if step.retry_at else None,
        )

    async def _send(self, message: Prepared, recipients: tuple[str, ...]) -> AttemptResult:
        accepted: list[str] = []
        transient: dict[str, str] = {}
        permanent: dict[str, str] = {}
        ids: list[str] = []
        for batch in recipient_batches(recipients):
            try:
                result = await self.pool.deliver(dataclasses.replace(message, recipients=batch))
            except UpstreamError as exc:
                self.breaker.failure(self.clock.monotonic())
                transient.update({rcpt: str(exc.reply) for rcpt in batch})
                continue
            except Exception as exc:  # a bug or a surprise: retried on schedule, dead-lettered after max_age
                log.error("delivery_error", error_type=type(exc).__name__, error=str(exc))
                transient.update({rcpt: str(INTERNAL_ERROR) for rcpt in batch})
                continue
            recovered = self.breaker.failures > 0
            self.breaker.success()
            if recovered:  # Infobip is back: everything waiting is due now, oldest first
                self.queue.flush()
            self.metrics.upstream_replies.labels(str(result.final.code)).inc()
            for rcpt, reply in result.refused.items():
                (transient if reply.transient else permanent)[rcpt] = str(reply)
            if result.final.ok:
                accepted.extend(result.accepted)
                if infobip_id := queued_id(result.final):
                    ids.append(infobip_id)
            else:
                target = transient if result.final.transient else permanent
                target.update({rcpt: str(result.final) for rcpt in batch if rcpt not in result.refused})
        return AttemptResult(tuple(accepted), transient, permanent, tuple(ids))

    # housekeeping

    async def _watch(self) -> None:
        """Pick up `relay queue flush` and `requeue` requests made by another process."""
        while True:
            await asyncio.sleep(POKE_INTERVAL)
            if await asyncio.to_thread(self.spool.take_flush_request):
                added = await self._load_queue()
                self.queue.flush()
                log.info("spool_flush", added=added, queued=self.depth)

    async def _janitor(self) -> None:
        """Removes delivered messages' files off the event loop, in batches: an unlink of a file just
        fsync'd can take half a millisecond, and nobody waits for it (a crash before it: redelivery)."""
        while True:
            await self._janitor_wakeup.wait()
            self._janitor_wakeup.clear()
            try:
                await self._remove_done()
            except OSError as exc:  # the ids stay in _done: the next pass tries again
                log.error("spool_remove_failed", error=exc.strerror or str(exc))
                await asyncio.sleep(1.0)
                self._janitor_wakeup.set()

    async def _remove_done(self) -> None:
        batch = list(self._done)  # taken on the loop: the thread never iterates a set being added to
        await asyncio.to_thread(self.spool.remove_many, batch)
        self._done.difference_update(batch)


def _outcome(result: AttemptResult, retry: tuple[str, ...]) -> str:
    if result.accepted and not retry and not result.permanent:
        return "delivered"
    if result.accepted:
        return "partial"
    return "deferred" if retry else "dead"
