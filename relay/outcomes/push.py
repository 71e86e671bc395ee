"""Reports pushed by Infobip to the X-IB-Notify-Url the relay put on its own messages.

A listener of its own (`reports.notify_listen`), apart from the ops port, which stays on loopback. It
serves one thing: `POST <any prefix>/<token>` with Infobip's report JSON, where the token is this
instance's unguessable secret (kept in the history, so it survives restarts). Anything else is 404 and
logged with method, path and peer, never the body. A report seen both pushed and pulled counts once
(the history keeps the first final status).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from relay.outcomes.decide import Report, parse_reports

log = structlog.get_logger("relay.outcomes")
MAX_BODY = 1024 * 1024


class PushListener:
    def __init__(self, listen: str, token: str, apply: Callable[[list[Report], str], Awaitable[None]]) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._token = token
        self._apply = apply
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _ours(self, request: web.Request) -> bool:
        last = request.path.rstrip("/").rpartition("/")[2]
        return request.method == "POST" and hmac.compare_digest(last.encode(), self._token.encode())

    async def _handle(self, request: web.Request) -> web.Response:
        if not self._ours(request):
            path = request.path.replace(self._token, "<token>")[:100]  # the secret is never logged
            log.warning("push_refused", method=request.method, path=path, peer=request.remote)
            return web.json_response({"error": "not found"}, status=404)
        try:
            reports, bad = parse_reports(json.loads(await request.read()))
        except (ValueError, UnicodeDecodeError):
            log.warning("push_unreadable", peer=request.remote, reason="not JSON")
            return web.json_response({"error": "expected Infobip's report JSON"}, status=400)
        if bad:
            log.warning("push_unreadable", peer=request.remote, reason=f"{bad} item(s) without messageId and to")
            if not reports:
                return web.json_response({"error": "expected Infobip's report JSON"}, status=400)
        if reports:
            await self._apply(reports, "pushed")
        return web.json_response({"accepted": len(reports)})
