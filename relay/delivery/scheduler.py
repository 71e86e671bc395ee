"""Delivery: the lanes (one per profile) and what they share: the store, recovery, housekeeping.

A message goes out through its profile's lane (relay/delivery/lane.py): its own pool, breaker, queue and
workers. This module starts and stops them, routes each message to its lane, recovers the store at
start-up, and applies reloads.
"""

from __future__ import annotations

import asyncio
import functools

import structlog

from relay.config import SpoolSettings
from relay.core.breaker import CircuitBreaker
from relay.core.message import Envelope, Prepared
from relay.core.profiles import DEFAULT
from relay.core.replies import Reply
from relay.delivery.clock import Clock, SystemClock
from relay.delivery.janitor import Janitor
from relay.delivery.lane import AttemptObserver, Lane, Shared
from relay.delivery.prober import Prober
from relay.delivery.queue import DeliveryQueue, Job
from relay.delivery.recovery import QueueLoader, scan_queue, schedule_found, schedule_journal, stored_message
from relay.delivery.unnoted import UnnotedMarks
from relay.ops.metrics import Metrics
from relay.store.journal import Journal
from relay.store.spool import DamagedRecord, Spool, unnoted_ids
from relay.upstream.pool import UpstreamPool

log = structlog.get_logger("relay.delivery")
POKE_INTERVAL = 1.0  # seconds between checks for `relay queue flush` requests from another process


class Delivery:
    def __init__(
        self,
        spool: Spool,
        pools: dict[str, UpstreamPool],
        settings: SpoolSettings,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        outcomes: AttemptObserver | None = None,
    ) -> None:
        self.spool = spool
        self.journal = Journal(spool.journal_dir, sealer=spool.sealer)
        self.janitor = Janitor(spool)
        self.clock = clock or SystemClock()
        self._status: dict[str, dict[str, object]] = {}
        self.shared = Shared(
            spool, self.journal, self.janitor, metrics or Metrics(), self.clock, settings, self.route, self._status_of,
            UnnotedMarks(spool.dead),
        )  # fmt: skip
        self.shared.outcomes = outcomes
        self.lanes: dict[str, Lane] = {}
        self._started = False
        self._helpers: list[asyncio.Task[None]] = []
        self.apply(settings, pools)

    # the default profile's lane, which is the only one without [[profiles]]
    @property
    def queue(self) -> DeliveryQueue:
        return self.lanes[DEFAULT].queue

    @property
    def breaker(self) -> CircuitBreaker:
        return self.lanes[DEFAULT].breaker

    @property
    def prober(self) -> Prober:
        return self.lanes[DEFAULT].prober

    def lane(self, profile: str) -> Lane:
        return self.lanes.get(profile) or self.lanes[DEFAULT]

    def route(self, job: Job) -> DeliveryQueue:
        return self.lane(job.envelope.profile).queue

    def apply(self, settings: SpoolSettings, pools: dict[str, UpstreamPool]) -> None:
        """A (re)loaded config: each profile's pool and breaker settings; a new profile gets a lane, and the
        mail of a profile that is gone falls back to the default one. Fixed credentials get a probe now."""
        self.shared.settings = settings
        for name, pool in pools.items():
            lane = self.lanes.get(name)
            if lane is None:
                lane = self.lanes[name] = Lane(name, pool, self.shared)
                if self._started:
                    lane.start()
            lane.pool = pool
            lane.breaker.threshold = settings.breaker_threshold
            lane.prober.probe_now()
        for name in [name for name in self.lanes if name not in pools]:
            gone = self.lanes.pop(name)
            gone.stop()
            for job in list(gone.queue.jobs.values()):
                log.warning("profile_gone", queue_id=job.queue_id, profile=name, now="default")
                self.lanes[DEFAULT].queue.schedule(job)

    # lifecycle

    async def start(self) -> None:
        """Recover the store and start the lanes; queue/ is only listed here and read after the relay
        listens (relay/delivery/recovery.py), so start-up time does not grow with the queue."""
        started = self.clock.monotonic()
        self.spool.lock()  # raises SpoolLocked before anything on disk is touched
        listing = await asyncio.to_thread(self.spool.recover)
        ignored: list[tuple[str, int]] = []
        records = await asyncio.to_thread(self.journal.recover, ignored)
        for segment, size in ignored:  # after a crash, a torn last record (never acknowledged) is normal
            log.warning("spool_journal_tail_ignored", segment=segment, bytes=size)
        self.journal.start(asyncio.get_running_loop())
        in_both = schedule_journal(self._route_envelope, records, listing.ids)
        wanted = await asyncio.to_thread(self.spool.take_flush_request)  # `relay queue flush` while stopped
        seconds = round(self.clock.monotonic() - started, 3)
        recovered = len(records) - len(in_both)
        log.info("spool_recovered", messages=len(listing.ids), from_journal=recovered, seconds=seconds)
        self._started = True
        unnoted = await asyncio.to_thread(unnoted_ids, self.spool.dead)
        for queue_id in unnoted:  # counted before any lane runs: a new note of theirs must not take the marker
            self.shared.marks.expect(queue_id)
        for lane in self.lanes.values():
            lane.start()
        loader = QueueLoader(self.spool, self.journal, listing, in_both, self.queue)
        self._helpers = [
            asyncio.create_task(self._load(loader, wanted), name="delivery-load"),
            asyncio.create_task(self.janitor.run(), name="delivery-janitor"),
            asyncio.create_task(self._note_unnoted(unnoted), name="delivery-unnoted"),
        ]

    async def _note_unnoted(self, unnoted: list[str]) -> None:
        """Dead letters whose bounce's note a crash or a stop cut off (relay/delivery/unnoted.py; each counted
        at start): noted again, and unmarked once that is on disk (with no history, or bounces off now, at
        once: no bounce at stake). One that cannot be read, or that a stop leaves for later, keeps its mark."""
        outcomes = self.shared.outcomes
        for queue_id in unnoted:
            try:
                envelope, data = await asyncio.to_thread(functools.partial(self.spool.read, queue_id, dead=True))
                state = await asyncio.to_thread(self.spool.read_state, queue_id, dead=True)
            except FileNotFoundError as exc:
                if not isinstance(exc, DamagedRecord):  # requeued or deleted meanwhile: its marker went with it
                    self.shared.marks.settle(queue_id, True)
                    continue
                self._unreadable(queue_id, exc)
                continue
            except Exception as exc:  # damaged, or under a key no longer configured: kept as it is
                self._unreadable(queue_id, exc)
                continue
            if not state.dead:  # marked, not yet dead-lettered (a crash between): queue/ still holds them all
                self.shared.marks.settle(queue_id, True)
                continue
            message = stored_message(envelope, data)
            written = None if outcomes is None else outcomes.dead_lettered(message, envelope, state)
            if written is None:  # no history, or bounces off (noted all the same): no bounce at stake
                self.shared.marks.settle(queue_id, True)
            else:
                self.shared.marks.watch(queue_id, written)

    def _unreadable(self, queue_id: str, exc: Exception) -> None:
        log.error("dead_letter_unreadable", queue_id=queue_id, error_type=type(exc).__name__, error=str(exc))
        self.shared.marks.settle(queue_id, False)

    async def _load(self, loader: QueueLoader, wanted: set[str] | None) -> None:
        """queue/ into the lanes; then the flush asked for while stopped, and the watch for the next ones."""
        held: set[str] = set()

        def hold(queue: DeliveryQueue) -> None:  # held by an outage before the restart: one probe, then all
            for name, lane in self.lanes.items():
                if lane.queue is not queue:
                    continue
                if name not in held:
                    held.add(name)
                    lane.breaker.hold(self.clock.monotonic(), "messages held by an outage before the restart")
                    lane.prober.opened()
                elif not lane.breaker.is_open:  # the probe succeeded while later batches were read
                    queue.release_held()

        await loader.run(self._route_envelope, self._skip, hold)
        for lane in self.lanes.values() if wanted is not None else ():
            lane.queue.flush_ids(wanted) if wanted else lane.queue.flush()
        await self._watch()

    def _skip(self) -> set[str]:
        """Messages not to schedule from disk: a worker has them, or they are delivered and being removed."""
        return {queue_id for lane in self.lanes.values() for queue_id in lane.queue.busy} | self.janitor.done

    async def stop(self, timeout: float) -> None:
        """Start nothing new; let attempts in flight finish within `timeout` seconds; leave the rest."""
        lanes = list(self.lanes.values())
        for lane in lanes:
            lane.stop()
        tasks = [task for lane in lanes for task in lane.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout))
            for task in pending:
                task.cancel()
        for helper in self._helpers:
            helper.cancel()
        promotions = [task for lane in lanes for task in lane.handoffs.promotions]
        probers = [lane.prober_task for lane in lanes if lane.prober_task is not None]
        await asyncio.gather(*tasks, *self._helpers, *promotions, *probers, return_exceptions=True)
        await self.janitor.remove_done()
        for lane in lanes:
            await lane.handoffs.promote_unattempted()
        await self.journal.close()
        self.spool.unlock()

    @property
    def depth(self) -> int:
        return sum(lane.queue.depth for lane in self.lanes.values())

    def oldest_received(self) -> float | None:
        return min((t for lane in self.lanes.values() if (t := lane.queue.oldest_received())), default=None)

    def flush(self, ids: set[str] | None = None) -> None:
        """Everything waiting (or only `ids`) is due now; while a lane is paused, that means a probe now."""
        for lane in self.lanes.values():
            lane.flush(ids)

    def _route_envelope(self, envelope: Envelope) -> DeliveryQueue:
        if envelope.profile not in self.lanes:
            log.warning("profile_gone", queue_id=envelope.queue_id, profile=envelope.profile, now="default")
        return self.lane(envelope.profile).queue

    async def _load_queue(self) -> int:
        found = await asyncio.to_thread(scan_queue, self.spool, self._skip())
        return schedule_found(self._route_envelope, found, self._skip())

    def _status_of(self, profile: str, status: dict[str, object]) -> None:
        """Every lane's pause, in one status file for `relay queue list` (written off the loop)."""
        self._status[profile] = status
        paused = {name: s for name, s in self._status.items() if s.get("paused")}
        summary: dict[str, object] = {**next(iter(paused.values()), {"paused": False}), "profiles": dict(self._status)}
        task = asyncio.ensure_future(asyncio.to_thread(self.spool.write_status, summary))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    # the session's side

    def submit(self, message: Prepared, envelope: Envelope) -> Job:
        return self.lane(envelope.profile).handoffs.submit(message, envelope)

    async def answer(self, job: Job) -> tuple[Reply, str]:
        return await self.lane(job.envelope.profile).answer(job)

    # housekeeping

    async def _watch(self) -> None:
        """Pick up `relay queue flush` and `requeue` requests made by another process."""
        while True:
            await asyncio.sleep(POKE_INTERVAL)
            ids = await asyncio.to_thread(self.spool.take_flush_request)
            if ids is None:
                continue
            added = await self._load_queue()
            self.flush(ids)
            log.info("spool_flush", added=added, queued=self.depth, only=sorted(ids) or None)
