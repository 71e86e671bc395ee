"""Infobip's delivery reports, pulled: `GET {base_url}/email/1/reports?bulkId=<ours>`.

A report is handed out once per account, then it is gone (seed 004). Other systems may share the
account, so every request carries a filter only the relay's own messages match: the X-IB-Bulk-Id it
added itself (one per instance, hour and profile; relay/outcomes/decide.py). Each bulk id is fetched with
the API key of the profile whose messages carry it (a profile may be another Infobip account). Messages
that carry the app's own bulk id are never polled: their reports belong to whoever set it. No request
without a filter is ever made. Errors and 429 double that key's interval (Retry-After is respected),
and only that key's: one account's wrong key does not slow the others; a message is polled until its
recipients have a final status or are 48 h old (Infobip keeps reports that long).

A history that fails (a locked file, a PostgreSQL server gone) does not end the poller: the round is a
poll error (`history`) and the next one waits twice as long. A page Infobip handed out that could not be
stored is kept in memory and stored before anything more is fetched: Infobip will not hand it out again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import structlog
from pydantic import SecretStr

from relay.config import ReportsSettings
from relay.delivery.clock import Clock, Timer
from relay.outcomes.decide import REPORT_WINDOW, Report, parse_reports, poll_delay, read_json
from relay.outcomes.metrics import OutcomeMetrics

log = structlog.get_logger("relay.outcomes")
PAGE = 500  # reports per request; a full page means more may be waiting: ask again at once
REPORTS_PATH = "/email/1/reports"
LAST_TRY = 2.0  # seconds a stop gives a page it interrupted (or one the history refused) to be stored


@dataclass(frozen=True, slots=True)
class Fetched:
    reports: list[Report] = field(default_factory=list)
    full: bool = False  # a whole page came: ask again
    error: str | None = None  # metric reason: rate_limited, http_error, connection, bad_response
    detail: str = ""
    retry_after: float | None = None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: the doubling alone will do
        return None


class ReportsClient:
    """HTTPS to the reports endpoint: certificates verified (system store plus `ca_file`), each request's
    API key in its Authorization header and nowhere else."""

    def __init__(self, settings: ReportsSettings) -> None:
        self.url = settings.base_url.rstrip("/") + REPORTS_PATH
        self._tls = ssl.create_default_context()
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.ca_file is not None:
            self._tls.load_verify_locations(cafile=str(settings.ca_file))
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, bulk_id: str, api_key: SecretStr) -> Fetched:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=2),
                timeout=aiohttp.ClientTimeout(total=30),
                headers={"Accept": "application/json"},
            )
        query = {"bulkId": bulk_id, "limit": str(PAGE)}
        auth = {"Authorization": f"App {api_key.get_secret_value()}"}
        try:
            async with self._session.get(self.url, params=query, headers=auth) as response:
                if response.status == 429:
                    return Fetched(
                        error="rate_limited",
                        detail="429",
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                if response.status != 200:
                    return Fetched(error="http_error", detail=f"HTTP {response.status}")
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Fetched(error="connection", detail=f"{type(exc).__name__}: {exc}")
        try:
            reports, bad = parse_reports(read_json(body))
        except ValueError:
            return Fetched(error="bad_response", detail="not JSON")
        if bad and not reports:
            return Fetched(error="bad_response", detail="no results list")
        return Fetched(reports, full=len(reports) + bad >= PAGE)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


Apply = Callable[[list[Report], str], Awaitable[None]]
Pending = Callable[[float], Awaitable[list[str]]]
KeyFor = Callable[[str], SecretStr]  # a bulk id -> the API key of the account its messages went out with


@dataclass(slots=True)
class _Backoff:
    """One API key's (one account's) consecutive failures, and when it may be used again."""

    failures: int = 0
    due: float = 0.0


class Poller:
    """Polls each of our bulk ids with recipients still waiting, every `poll_interval` seconds, each with
    its own account's key; a key that fails backs off alone."""

    def __init__(
        self,
        client: ReportsClient,
        interval: float,
        clock: Clock,
        metrics: OutcomeMetrics,
        pending: Pending,
        apply: Apply,
        key_for: KeyFor,
    ) -> None:
        self.client = client
        self.interval = interval
        self.clock = clock
        self.metrics = metrics
        self._pending = pending
        self._apply = apply
        self._key_for = key_for
        self._wake = asyncio.Event()
        self._keys: dict[str, _Backoff] = {}  # by key, in memory only (never logged)
        self._history_failures = 0  # consecutive rounds the history failed
        self._unstored: list[Report] = []  # a page taken from Infobip that the history could not store yet
        self._next_client: ReportsClient | None = None
        self._retired: list[ReportsClient] = []
        self._idle = asyncio.Event()  # no round under way (a fetch, a store)
        self._idle.set()
        self._stopping = False
        self._running = False
        self._ended = asyncio.Event()  # run() is over, its last try included

    def poll_now(self) -> None:
        self._wake.set()

    def replace_client(self, client: ReportsClient) -> None:
        """A reloaded base URL or CA: used from the next round on; the old client is closed then, between
        rounds (closed under a fetch, it lost the page Infobip was handing out)."""
        if self._next_client is not None:
            self._retired.append(self._next_client)
        self._next_client = client

    async def _take_next_client(self) -> None:
        if self._next_client is not None:
            self._retired.append(self.client)
            self.client, self._next_client = self._next_client, None
        while self._retired:
            await self._retired.pop().close()

    async def finish(self, wait: float) -> None:
        """A stop: no new round or page; a round under way gets `wait` seconds to store the page it is fetching
        (Infobip hands a page out once: cut off, it is lost, and reports_fetch_cut says whose it was)."""
        self._stopping = True
        self._wake.set()
        if not self._running:
            return
        if not self._idle.is_set():
            log.info("reports_stop_waiting", seconds=round(wait, 1))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._idle.wait()
        with contextlib.suppress(TimeoutError):  # then run() ends by itself, after a last try of a page it holds
            async with asyncio.timeout(LAST_TRY):
                await self._ended.wait()

    async def close(self) -> None:
        """At a stop, after run() has ended."""
        for client in (self.client, self._next_client, *self._retired):
            if client is not None:
                await client.close()

    async def run(self) -> None:
        self._running = True
        try:
            await self._rounds()
        finally:  # stopped holding a page not stored yet (Infobip will not hand it out again): one last try,
            try:  # the history is closed after the poller; else whose reports may be lost
                if self._unstored:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(LAST_TRY):
                            await self._store(self._unstored)
            finally:  # said even if the last try is cancelled
                if self._unstored:
                    ids = sorted({report.message_id for report in self._unstored})
                    log.error("reports_not_stored", reports=len(self._unstored), infobip_ids=ids)
                self._ended.set()

    async def _rounds(self) -> None:
        while True:
            delay = self._next_delay()
            self.metrics.next_poll.set(self.clock.time() + delay)
            timer: Timer = self.clock.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()
            if self._stopping:
                return
            await self._take_next_client()
            self._idle.clear()
            try:
                await self.poll_once()
                self._history_failures = 0
            except Exception as exc:  # the history's: Infobip's own errors are Fetched.error
                self._history_failures += 1
                self.metrics.poll_errors.labels("history").inc()
                log.error(
                    "reports_poll_failed", reason="history", unstored=len(self._unstored),
                    error_type=type(exc).__name__, error=str(exc),
                )  # fmt: skip
            finally:
                self._idle.set()

    def _next_delay(self) -> float:
        """The interval while any key works (or none was used yet); else until the first backing-off key
        is due again. After a round the history failed, doubled per such round."""
        if self._history_failures:
            return poll_delay(self.interval, self._history_failures)
        if not self._keys or any(state.failures == 0 for state in self._keys.values()):
            return self.interval
        return max(0.0, min(state.due for state in self._keys.values()) - self.clock.time())

    async def poll_once(self) -> None:
        """One round over our waiting bulk ids, each with its account's key unless that key is backing off;
        a page the last round could not store, first. Raises what the history raised."""
        if self._unstored:
            await self._store(self._unstored)
        now = self.clock.time()
        used: dict[str, _Backoff] = {}
        whole = False
        try:
            for bulk in await self._pending(now - REPORT_WINDOW):
                if self._stopping:
                    break
                key = self._key_for(bulk)
                state = used.setdefault(key.get_secret_value(), self._keys.get(key.get_secret_value(), _Backoff()))
                if state.due > now:  # backing off, or failed earlier in this round
                    continue
                if (failed := await self._fetch_all(bulk, key)) is not None:
                    state.failures += 1
                    state.due = now + poll_delay(self.interval, state.failures, failed.retry_after)
            whole = True
        finally:  # a round the history ended early keeps the keys it did not reach as they were
            for state in used.values():
                if state.due <= now:  # worked for every bulk id it was used for
                    state.failures = 0
            self._keys = used if whole else {**self._keys, **used}

    async def _fetch_all(self, bulk: str, key: SecretStr) -> Fetched | None:
        """Every waiting report of `bulk`, page by page, into the history; the failed fetch if one fails."""
        while True:
            try:
                fetched = await self.client.fetch(bulk, key)
            except asyncio.CancelledError:  # a stop past its wait: the page Infobip may be handing out is lost
                log.error("reports_fetch_cut", bulk_id=bulk)
                raise
            if fetched.error is not None:
                self.metrics.poll_errors.labels(fetched.error).inc()
                log.warning("reports_poll_failed", reason=fetched.error, detail=fetched.detail, bulk_id=bulk)
                return fetched
            if fetched.reports:
                await self._store(fetched.reports)
            if not fetched.full or self._stopping:
                return None

    async def _store(self, reports: list[Report]) -> None:
        """Into the history, or kept until it can be: Infobip hands a report out once."""
        try:
            await self._apply(reports, "pulled")
        except BaseException:  # a stop meanwhile too: run() names what it held
            self._unstored = reports
            raise
        self._unstored = []
