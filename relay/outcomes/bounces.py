"""The bounce outbox: bounces the history holds are sent to the company's mail server, durably.

A bounce is queued in the same transaction as the status that calls for it, so a crash loses none;
it is marked sent only after the server's 250 (a crash in between sends it again: the one case of a
duplicate, with the same Message-ID). An outcome the history cannot record at that moment is kept in
memory and recorded before anything else at the next look; the rest of the batch goes on meanwhile.
A server that is down or says 4xx gets it again on the schedule in relay/outcomes/decide.py (first
within a minute); a 5xx, or a sender no server could route (the null sender: a bounce of a bounce
would loop), is logged and never retried.
Plain SMTP on the company network, STARTTLS when the server offers it (not verified: opportunistic,
as Postfix's `smtp_tls_security_level = may`). MAIL FROM:<>, as RFC 3464 wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable

import aiosmtplib
import structlog

from relay.config import BouncesSettings
from relay.delivery.clock import Clock, Timer
from relay.outcomes.decide import bounce_address, next_bounce_attempt
from relay.outcomes.dsn import build_dsn
from relay.outcomes.history import BounceJob
from relay.outcomes.metrics import OutcomeMetrics
from relay.outcomes.store import SENDING_STALE

log = structlog.get_logger("relay.outcomes")
CHECK_EVERY = 10.0  # seconds between looks at the outbox when nothing wakes it sooner
BATCH = 20
# Seconds a claim is used for: the rest of a batch still unsent then (a slow mail server) is left to go stale
# and be offered again, rather than sent under a claim another replica may take over at SENDING_STALE.
CLAIM_USE = SENDING_STALE / 2


class Bouncer:
    def __init__(
        self,
        settings: BouncesSettings,
        hostname: str,
        clock: Clock,
        metrics: OutcomeMetrics,
        due: Callable[[float, int], Awaitable[list[BounceJob]]],
        done: Callable[[int, float, str, str, float | None], Awaitable[bool]],
        retry: Callable[[int, float, str, float | None], Awaitable[bool]],
        delayed: Callable[[float, float], Awaitable[int]],
        *,
        passing: Callable[[Exception], bool] = lambda error: False,
    ) -> None:
        """`passing`: whether a failed record may succeed later (the history failing for a while), so it is kept."""
        self.settings = settings
        self.hostname = hostname
        self.clock = clock
        self.metrics = metrics
        self._due, self._done, self._retry, self._delayed = due, done, retry, delayed
        self._passing = passing
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # no bounce being sent (and recorded) now
        self._idle.set()
        self._stopping = False
        self._unrecorded: list[functools.partial[Awaitable[object]]] = []  # outcomes the history refused, to record

    def send_now(self) -> None:
        """A bounce was queued: look at the outbox now rather than at the next check."""
        self._wake.set()

    def send_once_written(self, written: asyncio.Future[bool]) -> None:
        """A bounce is being queued with the history batch `written`: look at the outbox once that is on disk
        (not if the write failed: history_write_failed)."""
        written.add_done_callback(lambda done: None if done.cancelled() or not done.result() else self.send_now())

    async def finish(self, wait: float) -> None:
        """A stop: no bounce is taken any more, and one being sent gets `wait` seconds to be sent and recorded.
        Cancelled mid-send, it stays claimed and goes again at the next start: the sender would get it twice."""
        self._stopping = True
        if self._idle.is_set():
            return
        log.info("bounce_stop_waiting", seconds=round(wait, 1))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._idle.wait()

    async def run(self) -> None:
        try:
            await self._checks()
        finally:  # stopped with records the history had not taken: those bounces go again once offered again
            if self._unrecorded:
                log.error("bounce_records_lost", records=len(self._unrecorded))

    async def _checks(self) -> None:
        while True:
            try:
                await self._look()
            except Exception as exc:  # the history's (a locked file, a server gone): the outbox waits for the next look
                log.error("bounce_outbox_failed", error_type=type(exc).__name__, error=str(exc))
            timer: Timer = self.clock.call_later(CHECK_EVERY, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()

    async def _look(self) -> None:
        """Outcomes not recorded yet, the delay warnings that fall due, then every bounce due, a batch at a time
        (each batch after the outcomes of the last are recorded)."""
        await self._record_kept()
        if self.settings.delay_warning > 0:  # Postfix's delay_warning_time: one per message
            now = self.clock.time()
            if warned := await self._delayed(now - self.settings.delay_warning, now):
                log.info("bounce_delay_warnings_queued", messages=warned)
        while not self._stopping and (jobs := await self._due(self.clock.time(), BATCH)):
            for job in jobs:  # the rest of a batch a stop leaves claimed is offered again at the next start
                if self._stopping:
                    return
                if job.claimed_at is not None and self.clock.time() - job.claimed_at >= CLAIM_USE:
                    log.warning("bounce_claims_left", bounces=len(jobs) - jobs.index(job), reason="claim too old")
                    return
                self._idle.clear()
                try:
                    await self.send(job)
                finally:
                    self._idle.set()
            await self._record_kept()
        log.debug("bounce_outbox_checked", at=self.clock.time())  # nothing due now: asleep until the next look

    async def send(self, job: BounceJob) -> None:
        now = self.clock.time()
        fields = {"queue_id": job.queue_id, "action": job.action, "recipients": len(job.recipients)}
        to = bounce_address(job.sender, self.settings.to)
        if to is None:  # never a bounce to <>: that is how bounce loops start
            log.warning("bounce_not_sent", **fields, reason="null or unroutable sender", sender=job.sender)
            self.metrics.bounces.labels("not_sent").inc()
            await self._record(
                self._done,
                job.bounce_id,
                now,
                "dropped",
                f"not sent: no route to sender <{job.sender}>",
                job.claimed_at,
            )
            return
        data = build_dsn(job, hostname=self.hostname, to=to, now=now)
        try:
            reply = await self._deliver(to, data)
        except aiosmtplib.SMTPResponseException as exc:
            if 500 <= exc.code < 600:  # the server will not take it: retrying would only repeat that
                log.error("bounce_refused", **fields, to=to, reply=f"{exc.code} {exc.message}")
                self.metrics.bounces.labels("dropped").inc()
                await self._record(
                    self._done, job.bounce_id, now, "dropped", f"refused: {exc.code} {exc.message}", job.claimed_at
                )
                return
            await self._again(job, fields, f"{exc.code} {exc.message}")
            return
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self._again(job, fields, f"{type(exc).__name__}: {exc}")
            return
        log.info("bounce_sent", **fields, to=to, server=f"{self.settings.smtp_host}:{self.settings.smtp_port}")
        self.metrics.bounces.labels("sent").inc()
        await self._record(self._done, job.bounce_id, self.clock.time(), "sent", f"to <{to}>: {reply}", job.claimed_at)

    async def _deliver(self, to: str, data: bytes) -> str:
        smtp = aiosmtplib.SMTP(
            hostname=self.settings.smtp_host,
            port=self.settings.smtp_port,
            local_hostname=self.hostname,
            timeout=self.settings.timeout,
            start_tls=None,  # when offered
            validate_certs=False,
        )
        try:
            async with smtp:
                _, reply = await smtp.sendmail("", [to], data)
        except aiosmtplib.SMTPRecipientsRefused as exc:  # our one recipient: its own code decides
            refused = exc.recipients[0]
            raise aiosmtplib.SMTPResponseException(refused.code, refused.message) from None
        return reply

    async def _again(self, job: BounceJob, fields: dict[str, object], error: str) -> None:
        now = self.clock.time()
        due = next_bounce_attempt(job.attempts + 1, job.created_at, now)
        if due is None:
            log.error("bounce_dropped", **fields, reason=f"still failing after {job.attempts + 1} tries: {error}")
            self.metrics.bounces.labels("dropped").inc()
            await self._record(self._done, job.bounce_id, now, "dropped", f"gave up: {error}", job.claimed_at)
            return
        log.warning("bounce_deferred", **fields, error=error, next_attempt_in=round(due - now, 1))
        self.metrics.bounces.labels("retried").inc()
        await self._record(self._retry, job.bounce_id, due, error, job.claimed_at)

    async def _record(self, write: Callable[..., Awaitable[object]], *args: object) -> None:
        """Record a bounce's outcome (under its claim). One the history cannot take now (failing, or busy
        trying a write again) is kept and recorded before the next batch is claimed; the rest of this batch
        goes on meanwhile, and the bounce stays claimed, so it is not sent again. One it refuses for good is
        not kept: the claim goes stale, and the bounce is offered again."""
        record = functools.partial(write, *args)
        try:
            recorded = await record()
        except asyncio.CancelledError:  # stopped mid-write: counted as not recorded (bounce_records_lost)
            self._unrecorded.append(record)
            raise
        except Exception as exc:
            self._keep(record, exc)
            return
        _say_if_claim_lost(recorded, args[0])

    def _keep(self, record: functools.partial[Awaitable[object]], error: Exception) -> None:
        kept = self._passing(error)
        if kept:
            self._unrecorded.append(record)
        log.error(
            "bounce_outbox_failed", error_type=type(error).__name__, error=str(error), unrecorded=len(self._unrecorded),
            kept=kept,
        )  # fmt: skip

    async def _record_kept(self) -> None:
        """The outcomes kept, in order; one the history still cannot take ends the look (the rest wait)."""
        while self._unrecorded:
            record = self._unrecorded.pop(0)
            try:
                _say_if_claim_lost(await record(), record.args[0])
            except Exception as exc:
                if not self._passing(exc):
                    self._keep(record, exc)  # logged, and gone
                    continue
                self._unrecorded.insert(0, record)
                raise
            except asyncio.CancelledError:  # stopped mid-write: still counted (bounce_records_lost)
                self._unrecorded.insert(0, record)
                raise


def _say_if_claim_lost(recorded: object, bounce_id: object) -> None:
    if recorded is False:  # the claim went stale meanwhile, and another sender has the bounce now
        log.warning("bounce_claim_lost", bounce_id=bounce_id)
