"""/metrics, /healthz and /readyz on aiohttp, in the relay's own event loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.ops import privacy
from relay.ops.metrics import Metrics

log = structlog.get_logger("relay.ops.http")


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    checks: dict[str, str]  # check -> "ok" or why not


class MessageIndex(Protocol):
    async def messages(self, query: str) -> tuple[list[dict[str, Any]], bool]: ...


class HttpServer:
    def __init__(
        self,
        metrics: Metrics,
        readiness: Callable[[], Readiness],
        upstream: Callable[[], dict[str, object]] | None = None,
        history: MessageIndex | None = None,
    ) -> None:
        self._history = history
        self._metrics = metrics
        self._readiness = readiness
        self._upstream = upstream or (lambda: {})
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.started = time.monotonic()

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_view)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/upstream", self._upstream_view)
        app.router.add_get("/messages", self._messages_view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the bound port, when `port` is 0

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics_view(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "uptime_seconds": round(time.monotonic() - self.started, 1)})

    async def _messages_view(self, request: web.Request) -> web.Response:
        """GET /messages?q=QUERY: what `relay trace --json` prints, as one JSON list."""
        query = request.query.get("q", "").strip()
        if self._history is None:
            return web.json_response({"error": "no message history: enable [reports] or [bounces]"}, status=404)
        if not query:
            return web.json_response({"error": "give q: a queue id, Infobip id, <Message-ID> or address"}, status=400)
        try:
            found, more = await self._history.messages(query)
        except Exception as exc:  # the history's (failing, and being tried again; a server gone): ask later
            log.warning("messages_unavailable", error_type=type(exc).__name__, error=str(exc))
            return web.json_response({"error": "the message history cannot be read now; try again"}, status=503)
        if (hasher := privacy.hasher()) is not None:  # privacy.redact: addresses as keyed hashes, here too
            found = [{key: hasher.value(key, value) for key, value in message.items()} for message in found]
            query = hasher.text(query)
        return web.json_response({"query": query, "messages": found, "truncated": more})

    async def _upstream_view(self, request: web.Request) -> web.Response:
        return web.json_response(self._upstream())

    async def _readyz(self, request: web.Request) -> web.Response:
        readiness = self._readiness()
        return web.json_response(
            {"status": "ready" if readiness.ready else "not ready", "checks": readiness.checks},
            status=200 if readiness.ready else 503,
        )
