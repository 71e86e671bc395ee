"""A bounded pool of warm, authenticated connections to Infobip, and the one retry that is always safe."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from relay.config import UpstreamSettings
from relay.core.message import Prepared
from relay.core.smtp_client import DeliveryResult
from relay.ops.metrics import Metrics
from relay.upstream.connection import UpstreamConnection
from relay.upstream.errors import UpstreamAuthError, UpstreamError, UpstreamTLSError
from relay.upstream.tls import make_tls_context

log = structlog.get_logger("relay.upstream.pool")


class UpstreamPool:
    """At most `pool_size` connections, each reused for many messages; idle ones are kept warm."""

    def __init__(self, settings: UpstreamSettings, local_name: str, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.local_name = local_name
        self._settings = settings
        self._metrics = metrics
        self._closed = False
        self._local_name = local_name
        self._context = make_tls_context(settings)
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._idle: list[UpstreamConnection] = []
        self._ids = itertools.count(1)
        self._in_use = 0
        self.last_authenticated: float | None = None  # monotonic time of the last successful AUTH
        self.last_failure: str | None = None  # why the last connection attempt failed (None after a success)
        self.status = "unknown"  # ok | unreachable | tls_failed | credentials_refused (the last attempt)
        self.status_since = time.time()

    def inherit(self, retired: UpstreamPool) -> None:
        """A reload replaced the pool: what we knew of Infobip stays known until a new attempt says otherwise."""
        self.last_authenticated, self.last_failure = retired.last_authenticated, retired.last_failure
        self.status, self.status_since = retired.status, retired.status_since

    def _set_status(self, status: str) -> None:
        if status != self.status:
            self.status, self.status_since = status, time.time()

    @property
    def pool_size(self) -> int:
        """The most connections this pool opens: one worker each."""
        return self._settings.pool_size

    @property
    def size(self) -> int:
        """Connections open now: idle ones plus those in use."""
        return len(self._idle) + self._in_use

    async def _open(self) -> UpstreamConnection:
        try:
            connection = await UpstreamConnection.open(self._settings, self._context, self._local_name, next(self._ids))
        except UpstreamError as exc:
            if self._metrics is not None:
                self._metrics.upstream_failures.inc()
            self.last_failure = exc.reply.text
            self._set_status(_status_of(exc))
            log.warning("upstream_connect_failed", host=self._settings.host, reply=str(exc.reply))
            raise
        if self._metrics is not None:
            self._metrics.upstream_connects.inc()
        self.last_authenticated = time.monotonic()
        self.last_failure = None
        self._set_status("ok")
        log.info("upstream_connected", connection=connection.ident, host=self._settings.host)
        return connection

    @asynccontextmanager
    async def _connection(self, *, fresh: bool = False) -> AsyncIterator[tuple[UpstreamConnection, bool]]:
        async with self._slots:
            connection: UpstreamConnection | None = None
            while self._idle and not fresh:
                candidate = self._idle.pop()
                if candidate.usable:
                    connection = candidate
                    break
                candidate.abort()
            reused = connection is not None
            if connection is None:
                connection = await self._open()
            self._in_use += 1
            try:
                yield connection, reused
            finally:
                self._in_use -= 1
                if connection.usable and not self._closed:
                    self._idle.append(connection)
                else:
                    connection.abort()

    async def deliver(self, message: Prepared) -> DeliveryResult:
        async with self._connection() as (connection, reused):
            try:
                return await connection.transact(message)
            except UpstreamError as exc:
                if not reused or exc.data_sent:
                    raise
                # A warm connection Infobip dropped while idle: nothing was sent, so try a fresh one.
                log.info("upstream_stale_connection", connection=connection.ident, reason=str(exc.reply))
        async with self._connection(fresh=True) as (connection, _):
            return await connection.transact(message)

    async def probe(self) -> None:
        """Is Infobip back? One fresh connection through TLS and AUTH, no message; kept warm for the
        backlog. Raises UpstreamError when it fails."""
        async with self._connection(fresh=True):
            pass

    async def close(self) -> None:
        """Quit idle connections; those in use are closed when their transaction ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(c.quit() for c in idle), return_exceptions=True)


def _status_of(failure: UpstreamError) -> str:
    if isinstance(failure, UpstreamAuthError):
        return "credentials_refused"
    return "tls_failed" if isinstance(failure, UpstreamTLSError) else "unreachable"
