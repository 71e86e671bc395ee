"""Reports and tracking events pushed by Infobip to the URLs the relay put on its own messages.

A listener of its own (`reports.notify_listen`), apart from the ops port, which stays on loopback. It
serves two things: `POST <any prefix>/<token>` with Infobip's report JSON (X-IB-Notify-Url), and
`POST <any prefix>/<token>/tracking` with a tracking notification (X-IB-Tracking-Url: opened, clicked,
...), where the token is this instance's unguessable secret (kept in the history, so it survives
restarts). Anything else is 404 and logged with method, path and peer, never the body. A report seen
both pushed and pulled counts once (the history keeps the first final status); a tracking event is
recorded once per eventId. A push the history cannot store (a locked file, a PostgreSQL server gone) gets
503, so that Infobip sends it again, and a `push_not_stored` log line.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from relay.outcomes.decide import Report, parse_reports, parse_tracking, read_json
from relay.outcomes.history import Tracked

log = structlog.get_logger("relay.outcomes")
MAX_BODY = 1024 * 1024
# The listener faces the internet: a connection (a push is one small POST) is closed after CONNECTION_DEADLINE
# seconds whatever it is doing, so silent or slow clients cannot hold the relay's descriptors; past
# MAX_CONNECTIONS open at once the newest are closed; a stop waits STOP_WAIT seconds for pushes being handled.
CONNECTION_DEADLINE = 30.0
MAX_CONNECTIONS = 256
STOP_WAIT = 2.0
REAP_EVERY = 1.0  # seconds between looks at the open connections
TRACKING = "tracking"  # the last path segment of the X-IB-Tracking-Url, after the token


class PushListener:
    def __init__(
        self,
        listen: str,
        token: str,
        apply: Callable[[list[Report], str], Awaitable[None]],
        track: Callable[[list[Tracked]], Awaitable[None]],
        now: Callable[[], float],
    ) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._token = token
        self._apply = apply
        self._track = track
        self._now = now  # the relay's clock: when a tracking event arrived
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=STOP_WAIT)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        assert self._runner.server is not None
        self._reaper = asyncio.create_task(_reap(self._runner.server), name="push-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    def _route(self, request: web.Request) -> str | None:
        """ "reports" or TRACKING for a POST that carries our token where it belongs; None otherwise."""
        parts = request.path.rstrip("/").split("/")
        kind = TRACKING if parts[-1] == TRACKING else "reports"
        token = parts[-2] if kind == TRACKING and len(parts) > 1 else parts[-1]
        ours = request.method == "POST" and hmac.compare_digest(token.encode(), self._token.encode())
        return kind if ours else None

    async def _handle(self, request: web.Request) -> web.Response:
        kind = self._route(request)
        if kind is None:
            path = request.path.replace(self._token, "<token>")[:100]  # the secret is never logged
            log.warning("push_refused", method=request.method, path=path, peer=request.remote)
            return web.json_response({"error": "not found"}, status=404)
        try:
            payload = read_json(await request.read())
        except ValueError:
            log.warning("push_unreadable", peer=request.remote, reason="not JSON", kind=kind)
            return web.json_response({"error": f"expected Infobip's {kind} JSON"}, status=400)
        try:
            if kind == TRACKING:
                return await self._tracking(payload, request.remote)
            return await self._reports(payload, request.remote)
        except Exception as exc:  # the history's: not ours to keep, so Infobip must send it again
            log.error("push_not_stored", peer=request.remote, kind=kind, error_type=type(exc).__name__, error=str(exc))
            return web.json_response({"error": "not stored; send it again"}, status=503)

    async def _reports(self, payload: object, peer: str | None) -> web.Response:
        reports, bad = parse_reports(payload)
        if bad:
            log.warning("push_unreadable", peer=peer, reason=f"{bad} item(s) without messageId and to")
            if not reports:
                return web.json_response({"error": "expected Infobip's report JSON"}, status=400)
        if reports:
            await self._apply(reports, "pushed")
        return web.json_response({"accepted": len(reports)})

    async def _tracking(self, payload: object, peer: str | None) -> web.Response:
        events, bad = parse_tracking(payload, self._now())
        if bad:
            reason = f"{bad} item(s) without notificationType, eventId, messageId and recipient"
            log.warning("push_unreadable", peer=peer, reason=reason, kind=TRACKING)
            if not events:
                return web.json_response({"error": "expected Infobip's tracking notification JSON"}, status=400)
        if events:
            await self._track(events)
        return web.json_response({"accepted": len(events)})


async def _reap(server: web.Server) -> None:
    """Close each connection CONNECTION_DEADLINE seconds after it was first seen, and the newest past
    MAX_CONNECTIONS (a connection that never sends a request never reaches a handler, so no handler's timeout
    would end it)."""
    first_seen: dict[object, float] = {}
    while True:
        await asyncio.sleep(REAP_EVERY)
        now = time.monotonic()
        connections = server.connections
        first_seen = {c: first_seen.get(c, now) for c in connections}
        newest = sorted(connections, key=first_seen.__getitem__)[MAX_CONNECTIONS:]
        for connection in connections:
            if now - first_seen[connection] >= CONNECTION_DEADLINE or connection in newest:
                connection.force_close()
        if newest:
            log.warning("push_connections_over_limit", closed=len(newest), limit=MAX_CONNECTIONS)
