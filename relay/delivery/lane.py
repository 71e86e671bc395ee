"""One profile's way to Infobip: its own pool, breaker (with its probe schedule), queue and workers,
so that one account's refused credentials hold only its own mail while the others flow.

The workers take due messages and send them; what the waiting client is told and what the store must do
are decided by `relay.core.first_attempt`, later attempts by `relay.core.retry`. This only carries it out.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from structlog.contextvars import bound_contextvars

from relay.config import SpoolSettings
from relay.core.breaker import Change, CircuitBreaker
from relay.core.first_attempt import ANSWER_AFTER, WORKER_ACTIONS, Answer, Attempt, Commit, Decision, Store
from relay.core.message import Envelope, Prepared
from relay.core.replies import INTERNAL_ERROR, Reply
from relay.core.retry import AttemptResult, NextStep, next_step
from relay.delivery.clock import Clock
from relay.delivery.handoffs import Handoffs, promote
from relay.delivery.janitor import Janitor
from relay.delivery.prober import BreakerLink, Prober
from relay.delivery.queue import DeliveryQueue, Handoff, Job
from relay.delivery.recovery import stored_message
from relay.delivery.send import count_and_log, send
from relay.delivery.unnoted import UnnotedMarks
from relay.ops.metrics import Metrics
from relay.store.journal import Journal
from relay.store.spool import EntryState, Spool
from relay.testing.failpoints import crashpoint
from relay.upstream.pool import UpstreamPool

log = structlog.get_logger("relay.delivery")


@dataclass
class Shared:
    """What every lane uses alike: the store, the clock, the settings, and where a job belongs."""

    spool: Spool
    journal: Journal
    janitor: Janitor
    metrics: Metrics
    clock: Clock
    settings: SpoolSettings
    route: Callable[[Job], DeliveryQueue]  # the queue of a job's profile (the default if it is gone)
    write_status: Callable[[str, dict[str, object]], None]
    marks: UnnotedMarks
    outcomes: AttemptObserver | None = None  # told of every attempt (relay/outcomes: history, bounces)
    cluster: BreakerLink | None = None  # replicas: one breaker per profile for them all (relay/cluster)


class AttemptObserver(Protocol):
    def resumed(self, message: Prepared, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        """A message this process did not receive (recovered at start, or read back from queue/) is about
        to be attempted: noted again, so that a note lost in a crash is not missing from the history."""

    def attempted(
        self, queue_id: str, attempt: int, result: AttemptResult, step: NextStep, *, handed_back: bool
    ) -> asyncio.Future[bool] | None:
        """Noted (never waits); the note's future when it calls for a bounce: True once it is on disk."""

    def dead_lettered(self, message: Prepared, envelope: Envelope, state: EntryState) -> asyncio.Future[bool] | None:
        """A dead letter whose bounce's note a crash or a stop cut off, noted again at start."""


class Lane:
    def __init__(self, name: str, pool: UpstreamPool, shared: Shared) -> None:
        self.name = name
        self.pool = pool
        self.shared = shared
        self.spool, self.journal, self.janitor = shared.spool, shared.journal, shared.janitor
        self.metrics, self.clock = shared.metrics, shared.clock
        self.breaker = CircuitBreaker(threshold=shared.settings.breaker_threshold)
        self.queue = DeliveryQueue(self.clock, self.breaker)
        self.handoffs = Handoffs(shared.spool, shared.journal, self.queue, shared.metrics)
        self.prober = Prober(
            lambda: self.pool,
            self.breaker,
            self.clock,
            self.queue.release_held,
            lambda s: shared.write_status(name, s),
            link=lambda: shared.cluster,
            name=name,
        )
        self.tasks: list[asyncio.Task[None]] = []  # the workers
        self.prober_task: asyncio.Task[None] | None = None

    @property
    def settings(self) -> SpoolSettings:
        return self.shared.settings

    def start(self) -> None:
        workers = [self._worker() for _ in range(self.pool.pool_size)]
        self.tasks = [asyncio.create_task(w, name=f"delivery-{self.name}-{i}") for i, w in enumerate(workers)]
        self.prober_task = asyncio.create_task(self.prober.run(), name=f"prober-{self.name}")

    def stop(self) -> None:
        """No worker takes anything more; the prober stops."""
        self.queue.stop()
        if self.prober_task is not None:
            self.prober_task.cancel()

    def flush(self, ids: set[str] | None = None) -> None:
        """Everything waiting (or only `ids`) is due now; while delivery is paused, that means a probe now."""
        if ids:
            self.queue.flush_ids(ids)
        else:
            self.queue.flush()
        self.prober.probe_now()

    async def answer(self, job: Job) -> tuple[Reply, str]:
        # While delivery is paused no attempt can happen: the app is answered as soon as it is on disk.
        return await self.handoffs.answer(job, 0.0 if self.breaker.is_open else self.settings.sync_wait)

    async def _send(self, message: Prepared, recipients: tuple[str, ...]) -> AttemptResult:
        return await send(self.pool, self.breaker, self.clock, self.metrics, message, recipients, self._on_breaker)

    def _on_breaker(self, change: Change | None) -> None:
        if change is Change.OPENED:
            self.prober.opened()
        elif change is Change.CLOSED:  # an attempt begun before the pause got through: Infobip is back
            self.prober.closed()

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
        if written and job.recipients != ():  # on disk: tried again later (not: the client heard 451 and sends
            job.due = self.clock.time() + self.settings.retry_initial  # it again); none left: nothing to try
            self.shared.route(job).schedule(job)

    async def _load(self, job: Job) -> Prepared | None:
        if job.message is not None:
            message = job.message
            if not job.in_journal:  # on disk in queue/: no need to hold the bytes between attempts
                job.message = None
            return message
        if job.in_journal and job.record is not None:  # recovered from the journal after a crash
            return stored_message(job.envelope, await asyncio.to_thread(self.journal.read, job.record))
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
            self.handoffs.react(job, handoff, handoff.machine.sending())
        recipients = job.recipients if job.recipients is not None else message.recipients
        if not job.noted and self.shared.outcomes is not None:
            self.shared.outcomes.resumed(message, job.envelope, recipients)
            job.noted = True
        with self.metrics.delivery_seconds.time():
            result = await self._send(message, recipients)
        crashpoint("after_upstream_reply")
        if not result.unreachable:  # an outage is not the message's attempt: its own backoff stays
            job.attempts += 1
        step = self._next_step(job, result)
        try:
            if handoff is None:  # noted first (never waits): a stop cutting the settling short loses no outcome
                await self._settle(job, step, message, self._note_outcome(job, result, step, handed_back=False))
                handed_back = False
            else:
                handed_back = await self._settle_first(job, handoff, result, step, message)
        except Exception:
            if result.accepted:  # settling failed (a full disk): the next try must not send Infobip these again
                job.recipients = (*step.retry, *(rcpt for rcpt in step.dead if rcpt not in step.retry))
            raise
        count_and_log(self.metrics, job, result, step, handed_back=handed_back, now=self.clock.time())

    async def _settle_first(
        self, job: Job, handoff: Handoff, result: AttemptResult, step: NextStep, message: Prepared
    ) -> bool:
        """The first attempt's verdict: the table decides; the worker carries out its part. Returns
        whether the refusal went back to the waiting client (not to dead/)."""
        machine = handoff.machine
        self.handoffs.react(job, handoff, machine.verdict(result))
        if machine.commit is Commit.PENDING and machine.attempt is not Attempt.ACCEPTED:
            assert job.committing is not None
            await asyncio.wait({job.committing})  # `_on_commit` has updated the machine when this returns
        decision = machine.decision()
        job.first = None
        refused = decision.store is Store.DROP and machine.attempt is Attempt.REFUSED
        handed_back = decision.store is Store.MARK_DONE_DURABLY or refused
        bounce_noted = self._note_outcome(job, result, step, handed_back=handed_back)
        if decision.store in WORKER_ACTIONS:
            machine.begin(decision.store)
            if decision.store is Store.SETTLE:
                await self._settle(job, step, message, bounce_noted)
            elif decision.store is Store.MARK_DONE_DURABLY:
                await self._done_durably(job)
            self.handoffs.answer_now(job, handoff, machine.decision())
        elif decision.store not in ANSWER_AFTER:
            self.handoffs.react(job, handoff, decision)
        return handed_back

    def _note_outcome(
        self, job: Job, result: AttemptResult, step: NextStep, *, handed_back: bool
    ) -> asyncio.Future[bool] | None:
        """Into the history (never waits); the note's future when it calls for a bounce (for _settle)."""
        if self.shared.outcomes is None:
            return None
        return self.shared.outcomes.attempted(job.queue_id, job.attempts, result, step, handed_back=handed_back)

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
            hold=self.breaker.probe_initial * (0.75 + self.clock.random() / 2),
        )

    async def _settle(
        self, job: Job, step: NextStep, message: Prepared, bounce_noted: asyncio.Future[bool] | None = None
    ) -> None:
        """Make the spool say what `step` decided: dead-letter, reschedule, or remove. `bounce_noted`: the note
        of the bounce the dead recipients are owed (relay/delivery/unnoted.py)."""
        if job.in_journal and (step.retry or step.dead):
            try:
                await promote(self.spool, self.journal, job, message)
            except OSError as exc:  # still safe in the journal: keep the bytes, try it all again later
                log.error("spool_promote_failed", error=exc.strerror or str(exc))
                again = (*step.retry, *(r for r in step.dead if r not in step.retry))
                due = self.clock.time() + self.settings.retry_initial
                self.shared.route(job).schedule(dataclasses.replace(job, due=due, recipients=again, message=message))
                return
        if step.dead:
            await self._dead_letter(job, step, bounce_noted)
            # With bounces off, this line is how anyone learns of it.
            log.warning(
                "message_dead_lettered",
                sender=job.envelope.mail_from,
                recipients=sorted(step.dead),
                reason=step.last_reply,
            )
        if step.retry:
            assert step.retry_at is not None
            state = EntryState(job.attempts, step.retry_at, list(step.retry), step.last_reply, held=step.held)
            await asyncio.to_thread(self.spool.write_state, job.queue_id, state)
            retry = dataclasses.replace(job, due=step.retry_at, recipients=step.retry, message=None, held=step.held)
            self.shared.route(job).schedule(retry)
        elif job.in_journal:  # delivered from memory: a crash before the done mark is durable: one more delivery
            self.journal.done(job.queue_id)
        else:
            self.janitor.remove(job.queue_id)

    async def _dead_letter(self, job: Job, step: NextStep, bounce_noted: asyncio.Future[bool] | None) -> None:
        """Into dead/; with `bounce_noted`, marked until that note, and any other of the message, is on disk."""
        if bounce_noted is None:
            await asyncio.to_thread(self.spool.dead_letter, job.queue_id, step.dead, step.last_reply)
            return
        marks = self.shared.marks
        marks.expect(job.queue_id)
        try:
            await asyncio.to_thread(self.spool.dead_letter, job.queue_id, step.dead, step.last_reply, unnoted=True)
        except BaseException:  # the marker may be there: it stays
            marks.settle(job.queue_id, False)
            raise
        marks.watch(job.queue_id, bounce_noted)

    async def _done_durably(self, job: Job) -> None:
        """The client is being told 5xx: the message must be gone first."""
        if not job.in_journal:
            await asyncio.to_thread(self.spool.remove, job.queue_id)
            return
        try:
            await self.journal.done_durably(job.queue_id)
        except OSError as exc:  # retried with the next batch; a crash first only repeats the refusal
            log.error("spool_journal_done_failed", error=exc.strerror or str(exc))
