"""While the breaker is open, probe Infobip on the breaker's own short schedule: one connection, no
message. The first success closes the breaker and everything held by the outage is due at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import structlog

from relay.core.breaker import Change, CircuitBreaker
from relay.delivery.clock import Clock
from relay.upstream.errors import UpstreamError
from relay.upstream.pool import UpstreamPool

log = structlog.get_logger("relay.delivery")


class BreakerLink(Protocol):
    """Replicas sharing one breaker per profile (relay/cluster/breakers.py): told when ours opens or
    closes, and asked before each probe (one replica probes for the cluster)."""

    def changed(self, profile: str, change: Change, error: str) -> None: ...

    async def may_probe(self, profile: str) -> bool: ...


class Prober:
    def __init__(
        self,
        pool: Callable[[], UpstreamPool],
        breaker: CircuitBreaker,
        clock: Clock,
        on_closed: Callable[[], None],
        on_status: Callable[[dict[str, object]], None] | None = None,
        link: Callable[[], BreakerLink | None] = lambda: None,
        name: str = "",
    ) -> None:
        self._pool = pool
        self.breaker = breaker
        self.clock = clock
        self._on_closed = on_closed
        self._on_status = on_status or (lambda status: None)
        self._poke = asyncio.Event()
        self.paused_since: float | None = None
        self._link = link  # the cluster's, once it is up (None: this relay alone)
        self.name = name  # the profile

    def opened(self) -> None:
        """The breaker just opened: say so, and start probing."""
        self.paused_since = self.clock.time()
        log.warning(
            "breaker_opened",
            paused_until=self.paused_until(),
            last_error=self.breaker.last_error,
            message="delivery paused until Infobip answers a probe",
        )
        self._on_status(self.status())
        self._tell(Change.OPENED)
        self._poke.set()

    def _tell(self, change: Change) -> None:
        link = self._link()
        if link is not None:
            link.changed(self.name, change, self.breaker.last_error)

    def status(self) -> dict[str, object]:
        """For `relay queue list` and /upstream: is delivery paused, since when, until when, and why."""
        if not self.breaker.is_open:
            return {"paused": False}
        return {
            "paused": True,
            "since": self.paused_since,
            "next_probe_at": self.clock.time() + self.breaker.wait(self.clock.monotonic()),
            "last_error": self.breaker.last_error,
        }

    def paused_until(self) -> str | None:
        """When the next probe goes (ISO 8601, UTC), while delivery is paused."""
        if not self.breaker.is_open:
            return None
        at = self.clock.time() + self.breaker.wait(self.clock.monotonic())
        return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")

    def probe_now(self) -> None:
        """A reload, `relay queue flush` or a restart: try Infobip now rather than at the next probe."""
        self.breaker.probe_now(self.clock.monotonic())
        self._poke.set()

    async def run(self) -> None:
        while True:
            if not self.breaker.probe_due(self.clock.monotonic()):
                await self._wait()
                continue
            link = self._link()
            if link is not None and not await link.may_probe(self.name):  # another replica probes for us all
                self.breaker.probe_failed(self.clock.monotonic(), self.breaker.last_error, self.clock.random())
                continue
            try:
                await self._pool().probe()
            except UpstreamError as exc:
                self.breaker.probe_failed(self.clock.monotonic(), str(exc.reply), self.clock.random())
                log.info("breaker_probe_failed", paused_until=self.paused_until(), last_error=str(exc.reply))
                self._on_status(self.status())
                continue
            if self.breaker.success() is Change.CLOSED:
                self.closed()

    def closed(self) -> None:
        paused = round(self.clock.time() - self.paused_since, 1) if self.paused_since is not None else None
        self.paused_since = None
        log.info("breaker_closed", paused_seconds=paused, message="Infobip is back: delivery resumes")
        self._on_status(self.status())
        self._tell(Change.CLOSED)
        self._on_closed()

    async def _wait(self) -> None:
        """Until the next probe is due (a timer of the injected clock) or something pokes us."""
        timer = None
        if self.breaker.is_open:
            timer = self.clock.call_later(self.breaker.wait(self.clock.monotonic()), self._poke.set)
        try:
            await self._poke.wait()
        finally:
            self._poke.clear()
            if timer is not None:
                timer.cancel()
