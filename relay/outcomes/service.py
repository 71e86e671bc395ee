"""Outcomes: the history, the report poller, the push listener (reports and tracking events) and the
bounces as one component of the app.

The data path calls three hooks: `received` (the app handed us a message: it gets our bulk id),
`attempted` (after each delivery attempt from the spool) and `relayed` (pass-through). Nothing here is
constructed unless `[reports]` or `[bounces]` is enabled: then nothing is written either.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from relay.config import Settings
from relay.core.message import Envelope, Prepared
from relay.core.profiles import DEFAULT
from relay.core.replies import Reply
from relay.core.retry import AttemptResult, NextStep
from relay.core.smtp_client import DeliveryResult, queued_id
from relay.delivery.clock import Clock, SystemClock
from relay.outcomes.bounces import Bouncer
from relay.outcomes.decide import (
    FAILED,
    Report,
    bounce_headers,
    bulk_id,
    bulk_id_of,
    bulk_profile,
    claim_reports,
    dead_status,
)
from relay.outcomes.history import Attempted, HistoryStore, MessageReceived, MessageTrace, Tracked
from relay.outcomes.metrics import OutcomeMetrics, tracking_label
from relay.outcomes.postgres import PostgresHistory
from relay.outcomes.push import TRACKING, PushListener
from relay.outcomes.reports import Poller, ReportsClient
from relay.outcomes.sqlite import SqliteHistory, history_path
from relay.outcomes.trace import SHOWN, as_json
from relay.outcomes.writer import History, HistoryFailing
from relay.store.spool import EntryState
from relay.testing.failpoints import crashpoint

log = structlog.get_logger("relay.outcomes")
PRUNE_EVERY = 3600.0
PASS_THROUGH_WAIT = 5.0  # seconds a pass-through 250 waits for its bounce's note to be on disk
STOP_WAIT = 1.0  # seconds a stop gives a bounce being sent, or a page of reports being fetched, at least
HEADERS_KEPT = 65536  # bytes of a header block kept for a bounce's text/rfc822-headers part


def open_store(settings: Settings) -> HistoryStore:
    """PostgreSQL when `history_url` is set (one history for every replica), else the SQLite file."""
    if url := settings.reports.history_url.get_secret_value():
        return PostgresHistory(url, settings.spool.encryption_keys, timeout=settings.reports.history_timeout)
    path = history_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHistory(path, settings.spool.encryption_keys, timeout=settings.reports.history_timeout)


def reports_key(settings: Settings, bulk: str) -> SecretStr:
    """The key for `bulk`'s reports: its profile's `reports_api_key`, else [reports]'s (no such profile)."""
    name = bulk_profile(bulk)  # "default" is never a [[profiles]] name
    own = next((profile.reports_api_key for profile in settings.profiles if profile.name == name), None)
    return own if own is not None else settings.reports.api_key


async def _on_disk_or_later(written: asyncio.Future[bool]) -> None:
    """Wait for a note to be on disk, shielded (the batch's future is shared: one cancelled session must not
    cancel it) and for PASS_THROUGH_WAIT at most: a history failing for longer keeps the note (tried again),
    and the app gets its answer."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(PASS_THROUGH_WAIT):
            await asyncio.shield(written)


def _outbox(history: History, store: HistoryStore) -> tuple[Callable[..., Awaitable[Any]], ...]:
    """The store's bounce methods, each run on the history's thread."""

    def on_thread(method: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        return lambda *args: history.call(method, *args)

    return tuple(on_thread(m) for m in (store.due_bounces, store.bounce_done, store.bounce_retry, store.delayed))


def outcomes_for(settings: Settings, registry: CollectorRegistry, clock: Clock | None) -> Outcomes | None:
    """The app's outcomes component, or None while [reports] and [bounces] are both off (then nothing is
    written). The metric families are registered either way, at 0, so alert rules always find them."""
    metrics = OutcomeMetrics(registry)
    return Outcomes(settings, metrics, clock) if settings.reports.enabled or settings.bounces.enabled else None


class Outcomes:
    def __init__(self, settings: Settings, metrics: OutcomeMetrics, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = metrics
        self.history: History | None = None
        self.store: HistoryStore | None = None
        self.replica = secrets.token_hex(8)  # this process, for the report poller's lease (PostgreSQL)
        self.instance = ""
        self.push_token = ""
        self.poller: Poller | None = None
        self.bouncer: Bouncer | None = None
        self.push: PushListener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.reports_on = settings.reports.enabled  # turning either on or off needs a restart (RESTART_KEYS)
        self.bounces_on = settings.bounces.enabled

    def apply(self, settings: Settings) -> None:
        """A reloaded config (SIGHUP): poll interval, API keys, URL, CA, notify URL, the history's age and backlog
        and every bounce setting apply now; on/off, notify_listen and history_path at restart."""
        old, self.settings = self.settings, settings
        if self.poller is not None:
            self.poller.interval = settings.reports.poll_interval  # the keys: read per poll (reports_key)
            if (settings.reports.base_url, settings.reports.ca_file) != (old.reports.base_url, old.reports.ca_file):
                self.poller.replace_client(ReportsClient(settings.reports))
        if self.bouncer is not None:
            self.bouncer.settings = settings.bounces

    @property
    def notify_url(self) -> str | None:
        url = self.settings.reports.notify_url
        return f"{url.rstrip('/')}/{self.push_token}" if url and self.reports_on else None

    @property
    def tracking_url(self) -> str | None:
        """The same listener and token, on the path that takes tracking events (push.TRACKING)."""
        url = self.notify_url
        return f"{url}/{TRACKING}" if url else None

    async def start(self) -> None:
        self.store = store = await asyncio.to_thread(open_store, self.settings)
        self.history = History(store, bounces_on=self.bounces_on, on_error=self.metrics.history_errors.inc)
        self.history.start()
        self.instance = await self.history.call(store.meta, "instance", secrets.token_hex(4))
        self.push_token = await self.history.call(store.meta, "push_token", secrets.token_urlsafe(24))
        if self.bounces_on:
            self.bouncer = Bouncer(
                self.settings.bounces, self.settings.listen.hostname, self.clock, self.metrics,
                *_outbox(self.history, store),
                passing=lambda error: isinstance(error, HistoryFailing) or store.passing(error),
            )  # fmt: skip
            self._tasks.append(asyncio.create_task(self.bouncer.run(), name="bounces"))
        if self.reports_on:
            self.poller = Poller(
                ReportsClient(self.settings.reports),
                self.settings.reports.poll_interval,
                self.clock,
                self.metrics,
                self._pending,
                self.take_reports,
                lambda bulk: reports_key(self.settings, bulk),
            )
            self._tasks.append(asyncio.create_task(self.poller.run(), name="reports-poller"))
            if self.settings.reports.notify_listen:
                self.push = PushListener(
                    self.settings.reports.notify_listen,
                    self.push_token,
                    self.take_reports,
                    self.take_tracking,
                    self.clock.time,
                )
                await self.push.start()
        self._tasks.append(asyncio.create_task(self._prune(), name="history-prune"))

    async def stop(self, grace: float = 0.0) -> None:
        """`grace`: the drain left, which a bounce being sent and a page of reports being fetched get (STOP_WAIT at
        least) to finish: cut off, the bounce would go twice, and the page be lost."""
        wait = max(grace, STOP_WAIT)
        await asyncio.gather(*(part.finish(wait) for part in (self.bouncer, self.poller) if part is not None))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.push is not None:
            await self.push.stop()
        if self.poller is not None:
            await self.poller.close()
        if self.history is not None:
            await self.history.close()

    # hooks from the data path

    def backlogged(self) -> bool:  # reports.history_backlog notes (or _bytes) wait for a held-up write: MAIL gets 451
        reports = self.settings.reports
        return self.history is not None and self.history.held_up(reports.history_backlog, reports.history_backlog_bytes)

    def received(self, message: Prepared, client_ip: str, profile: str = DEFAULT) -> Prepared:
        """The app handed us `message`, to go out with `profile`: claim its reports (our bulk id for that
        profile) and its tracking events (push on), and note it. Returns what to send."""
        assert self.history is not None
        now = self.clock.time()
        bulk: str | None = None
        if self.reports_on:
            ours = bulk_id(self.instance, now, profile)
            message, owned = claim_reports(message, ours, self.notify_url, self.tracking_url)
            bulk = ours if owned else None
        self._note_received(message, client_ip, now, bulk)
        return message

    def resumed(self, message: Prepared, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        """A message this process did not receive is about to be attempted for `recipients` (recovered at
        start, or read back from queue/): noted again, as received, so a note a crash lost in its last moments
        is not missing. Nothing is written if the history knows the message already."""
        message = dataclasses.replace(message, recipients=recipients)
        self._note_received(message, envelope.client_ip, envelope.received_at, bulk_id_of(message, self.instance), True)

    def _note_received(self, message: Prepared, ip: str, at: float, bulk: str | None, again: bool = False) -> None:
        """Noted as received; `again` by `resumed` (only the recipients still to go, in `message`)."""
        assert self.history is not None
        headers = bounce_headers(message, self.push_token)[:HEADERS_KEPT] if self.bounces_on else None
        self.history.note(
            MessageReceived(
                message.queue_id, message.message_id, message.mail_from, ip, at, message.size, message.recipients,
                bulk, headers, again,
            )
        )  # fmt: skip

    def attempted(
        self, queue_id: str, attempt: int, result: AttemptResult, step: NextStep, *, handed_back: bool
    ) -> asyncio.Future[bool] | None:
        """After an attempt from the spool; never waits. Returns the note's future when it calls for a bounce:
        the dead letter's marker goes once that is on disk (Lane)."""
        if step.held and not (result.accepted or step.dead):  # an outage, not an attempt
            return None
        dead = {rcpt: (dead_status(reason), reason) for rcpt, reason in step.dead.items()}
        deferred = {rcpt: result.transient.get(rcpt, step.last_reply) for rcpt in step.retry}
        return self._attempted(
            Attempted(
                queue_id, self.clock.time(), attempt, result.accepted, result.infobip_ids, deferred, dead,
                bounce=not handed_back,
            )
        )  # fmt: skip

    def dead_lettered(self, message: Prepared, envelope: Envelope, state: EntryState) -> asyncio.Future[bool] | None:
        """A dead letter whose note a crash or a stop cut off, noted again at start (no bounce twice: _failed).
        The note's future when it calls for a bounce (bounces on), else None."""
        self.resumed(message, envelope, tuple(state.dead))
        dead = {rcpt: (dead_status(reason), reason) for rcpt, reason in state.dead.items()}
        return self._attempted(Attempted(envelope.queue_id, self.clock.time(), state.attempts, dead=dead, bounce=True))

    async def relayed(self, message: Prepared, result: DeliveryResult | None, reply: Reply) -> None:
        """Pass-through: only recipients refused inside a 250 bounce, noted on disk before the app hears it."""
        assert self.history is not None
        if result is None or not result.final.ok:
            why = f"refused; the app was told {reply}"
            dead = {rcpt: (FAILED, why) for rcpt in message.recipients}
            change = Attempted(message.queue_id, self.clock.time(), 1, dead=dead, bounce=False)
        else:
            infobip_id = queued_id(result.final)
            refused = {rcpt: (FAILED, str(r)) for rcpt, r in result.refused.items()}
            ids = (infobip_id,) if infobip_id else ()
            change = Attempted(message.queue_id, self.clock.time(), 1, result.accepted, ids, dead=refused, bounce=True)
        if (written := self._attempted(change)) is not None:
            await _on_disk_or_later(written)

    def _attempted(self, change: Attempted) -> asyncio.Future[bool] | None:
        """Note `change`; a bounce it calls for wakes the bouncer once written (its note's future is returned)."""
        assert self.history is not None
        written = self.history.note(change, now=bool(change.dead and change.bounce and self.bounces_on))
        for rcpt, (status, reason) in change.dead.items():
            log.info(
                "message_outcome", queue_id=change.queue_id, recipient=rcpt, status=status, infobip_id=None,
                detail=reason, bounce=change.bounce and self.bounces_on,
            )  # fmt: skip
        if change.dead and change.bounce and self.bouncer is not None:
            self.bouncer.send_once_written(written)
            return written
        return None

    # reports

    async def _pending(self, since: float) -> list[str]:
        assert self.history is not None and self.store is not None
        if isinstance(self.store, PostgresHistory):  # replicas share the history: only the lease holder polls
            lease = max(60.0, 3 * self.settings.reports.poll_interval)
            if not await self.history.call(self.store.poll_lease, self.replica, lease):
                return []
        return await self.history.call(self.store.pending_bulk_ids, since)

    async def take_reports(self, reports: list[Report], source: str) -> None:
        """Reports (pulled or pushed) into the history: one transaction, then the logs and metrics."""
        assert self.history is not None and self.store is not None
        applied = await self.history.call(self.store.apply_reports, reports, source, self.clock.time(), self.bounces_on)
        crashpoint("after_report_stored")  # the report is ours alone now (Infobip hands it out once)
        if self.bouncer is not None and any(outcome.bounce for outcome in applied.outcomes):
            self.bouncer.send_now()
        self.metrics.reports.labels("pending").inc(applied.pending)
        self.metrics.reports.labels("duplicate").inc(applied.duplicates)
        self.metrics.reports.labels("unknown").inc(applied.unknown)
        if applied.unknown:
            log.warning("reports_unmatched", source=source, count=applied.unknown)
        for status, count in Counter(outcome.status for outcome in applied.outcomes).items():
            self.metrics.reports.labels(status).inc(count)  # a label lookup per status, not per report
        for outcome in applied.outcomes:
            if outcome.seconds is not None:
                self.metrics.outcome_seconds.observe(max(0.0, outcome.seconds))
            log.info(
                "message_outcome", queue_id=outcome.queue_id, recipient=outcome.address, status=outcome.status,
                infobip_id=outcome.infobip_id, detail=outcome.detail, source=source, bounce=outcome.bounce,
            )  # fmt: skip

    async def take_tracking(self, events: list[Tracked]) -> None:
        """Tracking events pushed to our X-IB-Tracking-Url into the history, one at a time (a push carries
        one), so each recorded one gets its log line and count, and a repeat or a stranger is said once."""
        assert self.history is not None and self.store is not None
        for event in events:
            if not await self.history.call(self.store.record_tracking, [event]):
                log.info("tracking_ignored", infobip_id=event.infobip_id, kind=event.kind, reason="seen, or not ours")
                continue
            self.metrics.tracking.labels(tracking_label(event.kind)).inc()
            log.info(
                "message_tracking", queue_id=await self._queue_id_of(event.infobip_id), infobip_id=event.infobip_id,
                recipient=event.address, kind=event.kind,
            )  # fmt: skip

    async def _queue_id_of(self, infobip_id: str) -> str | None:
        """For a log line: the event is recorded already, so a history failing now costs only this."""
        with contextlib.suppress(Exception):
            if found := await self.lookup(infobip_id, 1):
                return found[0].queue_id
        return None

    async def lookup(self, query: str, limit: int = 50) -> list[MessageTrace]:
        assert self.history is not None and self.store is not None
        return await self.history.call(self.store.lookup, query, limit)

    async def messages(self, query: str) -> tuple[list[dict[str, Any]], bool]:
        """GET /messages?q=: the same lookup as `relay trace --json`, and whether more than SHOWN matched."""
        found = await self.lookup(query, SHOWN + 1)
        return [as_json(trace) for trace in found[:SHOWN]], len(found) > SHOWN

    async def _prune(self) -> None:
        assert self.history is not None and self.store is not None
        while True:
            before = self.clock.time() - self.settings.reports.history_days * 86400
            try:
                if removed := await self.history.call(self.store.prune, before):
                    log.info("history_pruned", messages=removed)
            except Exception as exc:
                log.error("history_prune_failed", error_type=type(exc).__name__, error=str(exc))
            await asyncio.sleep(PRUNE_EVERY)
