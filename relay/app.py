"""Composes the relay: inbound server -> prepare -> upstream pool, and owns start and stop."""

from __future__ import annotations

import asyncio
import signal
import time

import structlog

from relay.config import Settings
from relay.inbound import ConnectionCount, RelayHandler, RelaySMTP, SessionInfo
from relay.prepare import Prepared
from relay.replies import Reply
from relay.upstream import UpstreamError, UpstreamPool
from relay.verdict import client_reply
from relay.wire import queued_id

log = structlog.get_logger("relay.app")


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = UpstreamPool(settings.upstream, settings.listen.hostname)
        self.handler = RelayHandler(settings, self.deliver)
        self.connections = ConnectionCount()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.settings.listen
        self._server = await loop.create_server(
            lambda: RelaySMTP(self.handler, self.connections), host=listen.host, port=listen.port
        )
        log.info("relay_listening", host=listen.host, port=self.port, upstream=self.settings.upstream.host)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.pool.close()

    async def deliver(self, message: Prepared, session: SessionInfo) -> Reply:
        started = time.monotonic()
        fields = {
            "queue_id": message.queue_id,
            "client_ip": session.client_ip,
            "sender": message.mail_from,
            "recipients": len(message.recipients),
            "size": message.size,
        }
        try:
            result = await self.pool.deliver(message)
        except UpstreamError as exc:
            log.warning("message_deferred", **fields, outcome="deferred", reply=str(exc.reply))
            return exc.reply
        reply = client_reply(result)
        log.info(
            "message_relayed" if result.final.ok else "message_refused",
            **fields,
            infobip_id=queued_id(result.final),
            connection=result.connection_id,
            outcome="relayed" if result.final.ok else "refused",
            upstream_reply=str(result.final),
            refused_recipients=len(result.refused),
            reply=str(reply),
            seconds=round(time.monotonic() - started, 4),
        )
        return reply


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(settings)
    await relay.start()
    try:
        await stop.wait()
    finally:
        log.info("relay_stopping")
        await relay.stop()
