"""Workers that take messages from the spool and send them through the upstream pool.

The first attempt starts while the message is committed to the journal, and the SMTP session may wait
for its verdict (`sync_wait`). A message the first attempt does not settle is promoted from the journal
to its own file in queue/, where every later attempt finds it. Decisions (what to retry, when, what
is dead) are `retry.next_step`; the breaker decides when the upstream as a whole gets a rest. This
module only schedules and does I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import random
import time
from dataclasses import dataclass

import structlog

from relay.config import SpoolSettings
from relay.core.breaker import CircuitBreaker
from relay.core.prepare import Prepared
from relay.core.retry import AttemptResult, NextStep, next_step, recipient_batches
from relay.core.smtp_client import queued_id
from relay.ops.logs import log_message
from relay.ops.metrics import Metrics
from relay.store.journal import Journal
from relay.store.spool import EntryState, Envelope, Spool
from relay.testing.failpoints import crashpoint
from relay.upstream.pool import UpstreamError, UpstreamPool

log = structlog.get_logger("relay.delivery.scheduler")
POKE_INTERVAL = 1.0  # seconds between checks for `relay queue flush` and new files in queue/


@dataclass
class Handoff:
    """Between a waiting SMTP session and the first attempts: who answers for the message."""

    future: asyncio.Future[AttemptResult]
    active: bool = True  # the session is still waiting for a verdict
    settling: bool = False  # a worker is deciding: the session must wait for it

    async def wait(self, timeout: float) -> AttemptResult | None:
        """The verdict if one comes within `timeout` (or while a worker is settling); else None."""
        try:
            await asyncio.wait({self.future}, timeout=timeout)
            while self.settling and not self.future.done():
                await asyncio.wait({self.future}, timeout=1.0)
        finally:
            self.active = False
        return self.future.result() if self.future.done() else None


@dataclass
class Job:
    queue_id: str
    due: float
    attempts: int = 0
    recipients: tuple[str, ...] | None = None  # None: all of the envelope's
    message: Prepared | None = None  # kept in memory for the first attempt only
    first_seen: float = 0.0
    handoff: Handoff | None = None
    sender: str = ""
    client_ip: str = ""
    size: int = 0
    committing: asyncio.Future[None] | None = None  # the journal write running beside the first attempt
    envelope: Envelope | None = None  # set while the message is in the journal only, not in queue/


class Delivery:
    def __init__(
        self, spool: Spool, pool: UpstreamPool, settings: SpoolSettings, workers: int, metrics: Metrics | None = None
    ) -> None:
        self.spool = spool
        self.journal = Journal(spool.path / "journal")
        self.metrics = metrics or Metrics()
        self.pool = pool
        self.settings = settings
        self.breaker = CircuitBreaker(
            threshold=settings.breaker_threshold, initial=settings.retry_initial, maximum=settings.retry_max
        )
        self._workers = workers
        self._heap: list[tuple[float, str]] = []
        self._jobs: dict[str, Job] = {}
        self._busy: set[str] = set()
        self._idle: list[asyncio.Future[None]] = []  # one per worker waiting for work
        self._done: set[str] = set()  # delivered, files not yet removed (the janitor does it)
        self._janitor_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._helpers: list[asyncio.Task[None]] = []
        self._promotions: set[asyncio.Task[None]] = set()
        self._stopping = False

    # lifecycle

    async def start(self) -> None:
        started = time.monotonic()
        await asyncio.to_thread(self.spool.recover)
        recovered = await asyncio.to_thread(self._promote_journal)
        self.journal.start(asyncio.get_running_loop())
        count = await self._load_queue()
        if await asyncio.to_thread(self.spool.take_flush_request):  # `relay queue flush` while stopped
            self.flush()
        log.info(
            "spool_recovered",
            messages=count,
            from_journal=recovered,
            seconds=round(time.monotonic() - started, 3),
        )
        self._tasks = [asyncio.create_task(self._worker(), name=f"delivery-{i}") for i in range(self._workers)]
        self._helpers = [
            asyncio.create_task(self._watch(), name="delivery-watch"),
            asyncio.create_task(self._janitor(), name="delivery-janitor"),
        ]

    async def stop(self, deadline: float) -> None:
        """Start nothing new; let attempts in flight finish until `deadline` (monotonic); leave the rest."""
        self._stopping = True
        self._wake(everyone=True)
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
        for helper in self._helpers:
            helper.cancel()
        await asyncio.gather(*self._tasks, *self._helpers, *self._promotions, return_exceptions=True)
        await self._remove_done()
        # Messages never attempted go to queue/ now, so that a stopped relay's `relay queue` shows them.
        for job in list(self._jobs.values()):
            if job.envelope is None or job.message is None:
                continue
            try:
                if job.committing is not None:  # promoted before its journal write landed, it would
                    await job.committing  # stay live there, and be promoted again at the next start
                    job.committing = None
                await self._promote(job, job.message)
            except OSError:  # not in the journal (never acknowledged), or it stays there for next start
                continue
        await self.journal.close()

    def _promote_journal(self) -> int:
        """Start-up: what the journal holds and nobody finished goes to queue/ (then the journal starts
        afresh). A message promoted before the crash is simply written again, with the same bytes."""
        count = 0
        ignored: list[tuple[str, int]] = []
        for envelope, data in self.journal.recover(ignored):
            self.spool.commit(_stored(envelope, data), envelope)
            count += 1
        for segment, size in ignored:  # after a crash, a torn last record (never acknowledged) is normal
            log.warning("spool_journal_tail_ignored", segment=segment, bytes=size)
        return count

    async def _promote(self, job: Job, message: Prepared) -> None:
        """Journal -> its own file in queue/ (raises OSError, and then it stays in the journal)."""
        assert job.envelope is not None
        await asyncio.to_thread(self.spool.commit, message, job.envelope)
        job.envelope = job.message = None
        self.journal.done(job.queue_id)

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

    def _scan_queue(self, skip: set[str]) -> list[tuple[str, Envelope, EntryState]]:
        """Read what queue/ holds (in a thread: disk only, no event-loop state)."""
        found = []
        for queue_id in self.spool.queued_ids():
            if queue_id in skip:
                continue
            try:
                found.append((queue_id, self.spool.read_envelope(queue_id), self.spool.read_state(queue_id)))
            except FileNotFoundError:
                continue  # delivered and removed since the directory was listed
            except Exception as exc:  # unreadable: leave it for an engineer, say so
                log.error("spool_entry_unreadable", queue_id=queue_id, error=f"{type(exc).__name__}: {exc}")
        return found

    async def _load_queue(self) -> int:
        """Schedule every committed message not known yet, and take the recipients of queued ones from
        their .state (start-up, `relay queue flush`, `relay queue requeue`)."""
        entries = await asyncio.to_thread(self._scan_queue, self._busy | self._done)
        added = 0
        for queue_id, envelope, state in entries:
            if queue_id in self._busy or queue_id in self._done:
                continue  # taken by a worker while we read
            known = self._jobs.get(queue_id)
            if known is not None:
                if state.recipients is not None:  # e.g. `requeue` added the dead-lettered recipients back
                    known.recipients = tuple(state.recipients)
                continue
            self._schedule(
                Job(
                    queue_id=queue_id,
                    due=state.next_attempt,
                    attempts=state.attempts,
                    recipients=tuple(state.recipients) if state.recipients is not None else None,
                    first_seen=envelope.received_at,
                    sender=envelope.mail_from,
                    client_ip=envelope.client_ip,
                    size=envelope.size,
                )
            )
            added += 1
        return added

    # submitting

    def submit(self, message: Prepared, envelope: Envelope) -> Job:
        """Commit a message to the journal and attempt it at once, side by side (latency: the longer of
        the two, not their sum). Nothing about it is settled on disk before the commit is done
        (`job.committing`). The session may await `job.handoff`."""
        job = Job(
            queue_id=envelope.queue_id,
            due=0.0,
            recipients=envelope.recipients,
            message=message,
            first_seen=envelope.received_at,
            handoff=Handoff(asyncio.get_running_loop().create_future()),
            sender=envelope.mail_from,
            client_ip=envelope.client_ip,
            size=envelope.size,
            committing=self.journal.append(message, envelope),
            envelope=envelope,
        )
        self._schedule(job)
        return job

    def withdraw(self, queue_id: str) -> bool:
        """Take back a message whose spool write failed, unless a worker is already sending it."""
        if queue_id in self._busy:
            return False
        self._jobs.pop(queue_id, None)  # its heap entry goes stale
        return True

    def on_disk(self, queue_id: str) -> asyncio.Future[None] | None:
        """The message is in the journal and the client is about to hear "queued". A job still waiting
        for a worker (an outage could queue thousands) goes to its own file in queue/, where `relay
        queue` shows it, and stops holding its bytes in memory: the worker will read the file. The
        session may await the returned promotion, so that "queued" means "in queue/"."""
        job = self._jobs.get(queue_id)
        if job is None or job.message is None or job.envelope is None:
            return None
        self._jobs.pop(queue_id)  # out of the queue while it is written, as if a worker had it
        self._busy.add(queue_id)
        task = asyncio.ensure_future(self._promote_waiting(job))
        self._promotions.add(task)
        task.add_done_callback(self._promotions.discard)
        return task

    async def _promote_waiting(self, job: Job) -> None:
        assert job.message is not None
        job.committing = None  # the session saw it succeed
        try:
            await self._promote(job, job.message)
        except OSError as exc:  # still safe in the journal; it keeps its bytes and goes out from memory
            log.error("spool_promote_failed", queue_id=job.queue_id, error=exc.strerror or str(exc))
        finally:
            self._busy.discard(job.queue_id)
            self._schedule(job)

    def _schedule(self, job: Job) -> None:
        self._jobs[job.queue_id] = job
        heapq.heappush(self._heap, (job.due, job.queue_id))
        self._wake()

    def _wake(self, *, everyone: bool = False) -> None:
        """Wake one idle worker (all for a flush or stop): a shared event would wake them all per message."""
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def _take(self, due_id: str) -> Job:
        """The due job, or, while Infobip is failing, the oldest waiting one: it probes, and after
        recovery the backlog goes in order of arrival (see `_send`)."""
        if self.breaker.failures:
            oldest = min(self._jobs)  # queue ids sort by arrival; rare: only while failing
            if oldest != due_id:
                heapq.heappush(self._heap, (self._jobs[due_id].due, due_id))  # stays as scheduled
                due_id = oldest
        return self._jobs.pop(due_id)

    def flush(self) -> None:
        """Everything waiting is due now."""
        for job in self._jobs.values():
            job.due = 0.0
        self._heap = sorted((0.0, queue_id) for queue_id in self._jobs)
        self.breaker.success()
        self._wake(everyone=True)

    @property
    def depth(self) -> int:
        return len(self._jobs) + len(self._busy)

    def oldest_received(self) -> float | None:
        """Arrival time of the oldest message waiting (epoch seconds), for the age gauge."""
        return min((job.first_seen for job in self._jobs.values() if job.first_seen), default=None)

    # working

    async def _next_job(self) -> Job | None:
        while not self._stopping:
            now = time.time()
            wait = POKE_INTERVAL
            if self._heap:
                due, queue_id = self._heap[0]
                job = self._jobs.get(queue_id)
                if job is None or job.due != due:
                    heapq.heappop(self._heap)  # stale entry: rescheduled or removed
                    continue
                if due <= now:
                    if self.breaker.allows(time.monotonic()):
                        heapq.heappop(self._heap)
                        return self._take(queue_id)
                    wait = min(wait, max(0.01, self.breaker.wait(time.monotonic())))
                else:
                    wait = min(wait, due - now)
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._idle.append(waiter)
            timer = loop.call_later(wait, _release, waiter)  # (asyncio.timeout costs more, once per message)
            try:
                await waiter
            finally:
                timer.cancel()
                if waiter in self._idle:  # a timed-out waiter is done but still listed
                    self._idle.remove(waiter)
        return None

    async def _worker(self) -> None:
        while (job := await self._next_job()) is not None:
            self._busy.add(job.queue_id)
            try:
                await self._attempt(job)
            except Exception as exc:  # never lose the worker; the message stays in the spool
                log.error("delivery_error", queue_id=job.queue_id, error_type=type(exc).__name__, error=str(exc))
                if job.handoff is not None and not job.handoff.future.done():  # never leave a session waiting
                    job.handoff.future.set_result(AttemptResult(transient={"": "451 4.3.0 Internal error"}))
                job.due = time.time() + self.settings.retry_initial
                self._schedule(job)
            finally:
                self._busy.discard(job.queue_id)

    async def _watch(self) -> None:
        """Pick up `relay queue flush` and `requeue` requests made by another process."""
        while True:
            await asyncio.sleep(POKE_INTERVAL)
            if await asyncio.to_thread(self.spool.take_flush_request):
                added = await self._load_queue()
                self.flush()
                log.info("spool_flush", added=added, queued=self.depth)

    async def _load(self, job: Job) -> tuple[Prepared, Envelope] | None:
        try:
            envelope, data = await asyncio.to_thread(self.spool.read, job.queue_id)
        except FileNotFoundError:
            return None  # deleted by `relay queue delete`
        return _stored(envelope, data), envelope

    async def _attempt(self, job: Job) -> None:
        if job.message is not None:
            message = job.message
            if job.envelope is None:  # on disk in queue/: no need to hold the bytes between attempts
                job.message = None
        else:
            loaded = await self._load(job)
            if loaded is None:
                return
            message, envelope = loaded
            job.first_seen = job.first_seen or envelope.received_at
            job.sender, job.client_ip, job.size = envelope.mail_from, envelope.client_ip, envelope.size
        recipients = job.recipients if job.recipients is not None else message.recipients
        with self.metrics.delivery_seconds.time():
            result = await self._send(message, recipients)
        crashpoint("after_upstream_reply")
        if result.complete and job.handoff is not None and not job.handoff.future.done():
            # Infobip has it all: the client need not wait for our disk. (Set even when the session
            # stopped waiting: should the journal write fail, the session must still know it was sent.)
            job.handoff.future.set_result(result)
        if job.committing is not None and not (result.complete and not job.committing.done()):
            # (Infobip has every recipient and the journal is still writing: nothing waits for it, and
            # `_settle` marks the message done once written. The worker goes on to the next message.)
            committing, job.committing = job.committing, None
            try:
                await committing
            except OSError:  # nothing on disk to settle or retry: the session answers from `stored`
                if job.handoff is not None and not job.handoff.future.done():
                    job.handoff.future.set_result(dataclasses.replace(result, stored=False))
                return
        job.attempts += 1
        step = next_step(
            result,
            attempts=job.attempts,
            first_seen=job.first_seen,
            now=time.time(),
            max_age=self.settings.max_age,
            initial=self.settings.retry_initial,
            maximum=self.settings.retry_max,
            jitter=random.random(),
        )
        handoff = job.handoff if job.handoff is not None and job.handoff.active else None
        if handoff is not None and handoff.future.done():
            handoff = None  # already answered above
        # A permanent refusal while the client still waits goes back to the client, not to dead/.
        handed_back = handoff is not None and not result.accepted and not step.retry and bool(result.permanent)
        if handoff is not None:
            handoff.settling = True
        try:
            await self._settle(job, step, handed_back, message)
        finally:
            if handoff is not None:
                handoff.settling = False
                if not handoff.future.done():
                    handoff.future.set_result(result)
        if result.accepted:
            self.metrics.relayed.inc()
        if step.retry:
            self.metrics.deferred.inc()
        if step.dead and not handed_back:
            self.metrics.dead.inc()
        log_message(
            log,
            "delivery_attempt",
            queue_id=job.queue_id,
            client_ip=job.client_ip,
            sender=job.sender,
            recipients=len(recipients),
            size=job.size,
            infobip_id=",".join(result.infobip_ids) or None,
            attempt=job.attempts,
            outcome="handed_back" if handed_back else _outcome(result, step.retry),
            reply=step.last_reply or None,
            accepted=len(result.accepted),
            deferred=len(step.retry),
            dead=0 if handed_back else len(step.dead),
            next_attempt_in=round(step.retry_at - time.time(), 1) if step.retry_at else None,
        )

    async def _settle(self, job: Job, step: NextStep, handed_back: bool, message: Prepared) -> None:
        """Make the spool say what `step` decided: dead-letter, reschedule, or remove."""
        if job.envelope is not None and (step.retry or (step.dead and not handed_back)):
            try:
                await self._promote(job, message)
            except OSError as exc:  # still safe in the journal: keep the bytes, try it all again later
                log.error("spool_promote_failed", queue_id=job.queue_id, error=exc.strerror or str(exc))
                again = (*step.retry, *(r for r in step.dead if r not in step.retry))
                due = time.time() + self.settings.retry_initial
                self._schedule(dataclasses.replace(job, due=due, recipients=again, message=message))
                return
        if step.dead and not handed_back:
            await asyncio.to_thread(self.spool.dead_letter, job.queue_id, step.dead, step.last_reply)
        if step.retry:
            assert step.retry_at is not None
            state = EntryState(
                attempts=job.attempts,
                next_attempt=step.retry_at,
                recipients=list(step.retry),
                last_reply=step.last_reply,
            )
            await asyncio.to_thread(self.spool.write_state, job.queue_id, state)
            self._schedule(dataclasses.replace(job, due=step.retry_at, recipients=step.retry, message=None))
        elif handed_back:  # the client is being told 5xx: the message must be gone first
            if job.envelope is not None:
                try:
                    await self.journal.done_durably(job.queue_id)
                except OSError as exc:  # retried with the next batch; a crash first only repeats the refusal
                    log.error("spool_journal_done_failed", queue_id=job.queue_id, error=exc.strerror or str(exc))
            else:
                await asyncio.to_thread(self.spool.remove, job.queue_id)
        elif job.envelope is not None:  # a crash before the done mark is durable: one more delivery
            if job.committing is not None:
                job.committing.add_done_callback(functools.partial(self._done_when_written, job.queue_id))
            else:
                self.journal.done(job.queue_id)
        else:
            self._done.add(job.queue_id)
            self._janitor_wakeup.set()

    def _done_when_written(self, queue_id: str, committing: asyncio.Future[None]) -> None:
        if not committing.cancelled() and committing.exception() is None:  # failed: it never was in it
            self.journal.done(queue_id)

    async def _send(self, message: Prepared, recipients: tuple[str, ...]) -> AttemptResult:
        accepted: list[str] = []
        transient: dict[str, str] = {}
        permanent: dict[str, str] = {}
        ids: list[str] = []
        for batch in recipient_batches(recipients):
            try:
                result = await self.pool.deliver(dataclasses.replace(message, recipients=batch))
            except UpstreamError as exc:
                self.breaker.failure(time.monotonic())
                transient.update({rcpt: str(exc.reply) for rcpt in batch})
                continue
            except Exception as exc:  # a bug or a surprise: retried on schedule, dead-lettered after max_age
                log.error("delivery_error", error_type=type(exc).__name__, error=str(exc))
                transient.update({rcpt: "451 4.3.0 Internal error in the relay" for rcpt in batch})
                continue
            recovered = self.breaker.failures > 0
            self.breaker.success()
            if recovered:  # Infobip is back: everything waiting is due now, oldest first
                self.flush()
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


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _stored(envelope: Envelope, data: bytes) -> Prepared:
    """A message read back from disk: its bytes are already exactly what goes upstream."""
    return Prepared(envelope.queue_id, envelope.mail_from, envelope.recipients, envelope.message_id, b"", data)


def _outcome(result: AttemptResult, retry: tuple[str, ...]) -> str:
    if result.accepted and not retry and not result.permanent:
        return "delivered"
    if result.accepted:
        return "partial"
    return "deferred" if retry else "dead"
