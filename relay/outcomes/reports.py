"""Infobip's delivery reports, pulled: `GET {base_url}/email/1/reports?bulkId=<ours>`.

A report is handed out once per account, then it is gone (seed 004). Other systems may share the
account, so every request carries a filter only the relay's own messages match: the X-IB-Bulk-Id it
added itself (one per instance and hour; relay/outcomes/decide.py). Messages that carry the app's own
bulk id are never polled: their reports belong to whoever set it. No request without a filter is ever
made. Errors and 429 double the interval (Retry-After is respected); a message is polled until its
recipients have a final status or are 48 h old (Infobip keeps reports that long).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from relay.config import ReportsSettings
from relay.delivery.clock import Clock, Timer
from relay.outcomes.decide import REPORT_WINDOW, Report, parse_reports, poll_delay
from relay.outcomes.metrics import OutcomeMetrics

log = structlog.get_logger("relay.outcomes")
PAGE = 500  # reports per request; a full page means more may be waiting: ask again at once
REPORTS_PATH = "/email/1/reports"


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
    """HTTPS to the reports endpoint: certificates verified (system store plus `ca_file`), the API key
    in the Authorization header and nowhere else."""

    def __init__(self, settings: ReportsSettings) -> None:
        self.url = settings.base_url.rstrip("/") + REPORTS_PATH
        self._key = settings.api_key
        self._tls = ssl.create_default_context()
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.ca_file is not None:
            self._tls.load_verify_locations(cafile=str(settings.ca_file))
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self, bulk_id: str) -> Fetched:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._tls, limit=2),
                timeout=aiohttp.ClientTimeout(total=30),
                headers={"Authorization": f"App {self._key.get_secret_value()}", "Accept": "application/json"},
            )
        try:
            async with self._session.get(self.url, params={"bulkId": bulk_id, "limit": str(PAGE)}) as response:
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
            reports, bad = parse_reports(json.loads(body))
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


class Poller:
    """Polls each of our bulk ids with recipients still waiting, every `poll_interval` seconds."""

    def __init__(
        self,
        client: ReportsClient,
        interval: float,
        clock: Clock,
        metrics: OutcomeMetrics,
        pending: Pending,
        apply: Apply,
    ) -> None:
        self.client = client
        self.interval = interval
        self.clock = clock
        self.metrics = metrics
        self._pending = pending
        self._apply = apply
        self._wake = asyncio.Event()
        self.failures = 0

    def poll_now(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        retry_after: float | None = None
        while True:
            delay = poll_delay(self.interval, self.failures, retry_after)
            self.metrics.next_poll.set(self.clock.time() + delay)
            timer: Timer = self.clock.call_later(delay, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                timer.cancel()
            self._wake.clear()
            retry_after = await self.poll_once()

    async def poll_once(self) -> float | None:
        """One round over our waiting bulk ids; returns Infobip's Retry-After after a 429."""
        for bulk in await self._pending(self.clock.time() - REPORT_WINDOW):
            while True:
                fetched = await self.client.fetch(bulk)
                if fetched.error is not None:
                    self.failures += 1
                    self.metrics.poll_errors.labels(fetched.error).inc()
                    log.warning("reports_poll_failed", reason=fetched.error, detail=fetched.detail, bulk_id=bulk)
                    return fetched.retry_after
                if fetched.reports:
                    await self._apply(fetched.reports, "pulled")
                if not fetched.full:
                    break
        self.failures = 0
        return None
