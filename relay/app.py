"""Composes the relay: inbound server -> prepare -> spool -> delivery -> upstream pool; owns start and stop."""

from __future__ import annotations

import asyncio
import signal
import time

import structlog

from relay.config import Settings
from relay.delivery import Delivery, Job
from relay.inbound import RelayHandler, RelaySMTP, SessionInfo, Sessions
from relay.prepare import Prepared
from relay.replies import Reply
from relay.spool import Envelope, Spool
from relay.upstream import UpstreamError, UpstreamPool
from relay.verdict import client_reply, spooled_reply
from relay.wire import queued_id

log = structlog.get_logger("relay.app")


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool = UpstreamPool(settings.upstream, settings.listen.hostname)
        self.spool: Spool | None = Spool(settings.spool.path) if settings.spool.enabled else None
        self.delivery: Delivery | None = (
            Delivery(self.spool, self.pool, settings.spool, workers=settings.upstream.pool_size)
            if self.spool is not None
            else None
        )
        self.handler = RelayHandler(settings, self.deliver_spooled if self.spool else self.deliver_direct)
        self.sessions = Sessions()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self.delivery is not None:
            await self.delivery.start()
        loop = asyncio.get_running_loop()
        listen = self.settings.listen
        self._server = await loop.create_server(
            lambda: RelaySMTP(self.handler, self.sessions), host=listen.host, port=listen.port
        )
        log.info(
            "relay_listening",
            host=listen.host,
            port=self.port,
            upstream=f"{self.settings.upstream.host}:{self.settings.upstream.port}",
            spool=str(self.settings.spool.path) if self.spool else None,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop accepting, let sessions in DATA finish, finish deliveries in flight, then close."""
        grace = self.settings.spool.drain_timeout if grace is None else grace
        deadline = time.monotonic() + grace
        if self._server is not None:
            self._server.close()
        await self.sessions.wait_until_no_data(deadline)
        self.sessions.close_all("421 4.3.2 The relay is shutting down; try again shortly")
        if self.delivery is not None:
            await self.delivery.stop(deadline)
        await self.pool.close()
        log.info("relay_stopped", queued=self.delivery.depth if self.delivery else 0)

    def _fields(self, message: Prepared, session: SessionInfo) -> dict[str, object]:
        return {
            "queue_id": message.queue_id,
            "client_ip": session.client_ip,
            "sender": message.mail_from,
            "recipients": len(message.recipients),
            "size": message.size,
        }

    async def deliver_direct(self, message: Prepared, session: SessionInfo) -> Reply:
        """Pass-through (spool disabled): the client waits for Infobip's own verdict."""
        started = time.monotonic()
        try:
            result = await self.pool.deliver(message)
        except UpstreamError as exc:
            log.warning("message_deferred", **self._fields(message, session), outcome="deferred", reply=str(exc.reply))
            return exc.reply
        reply = client_reply(result)
        log.info(
            "message_relayed" if result.final.ok else "message_refused",
            **self._fields(message, session),
            infobip_id=queued_id(result.final),
            connection=result.connection_id,
            outcome="relayed" if result.final.ok else "refused",
            upstream_reply=str(result.final),
            refused_recipients=len(result.refused),
            reply=str(reply),
            seconds=round(time.monotonic() - started, 4),
        )
        return reply

    async def deliver_spooled(self, message: Prepared, session: SessionInfo) -> Reply:
        """Commit to disk, start delivery, wait up to sync_wait for Infobip's verdict."""
        assert self.spool is not None and self.delivery is not None
        envelope = Envelope(
            queue_id=message.queue_id,
            mail_from=message.mail_from,
            recipients=message.recipients,
            message_id=message.message_id,
            client_ip=session.client_ip,
            received_at=time.time(),
            size=message.size,
        )
        # Shielded: once the bytes are on disk the message must be scheduled, even if the client hangs up.
        outcome = await asyncio.shield(asyncio.ensure_future(self._commit_and_submit(message, envelope)))
        del message
        if isinstance(outcome, Reply):
            return outcome
        assert outcome.handoff is not None
        result = await outcome.handoff.wait(self.settings.spool.sync_wait)
        reply = spooled_reply(envelope.queue_id, result)
        log.info(
            "message_accepted",
            queue_id=envelope.queue_id,
            client_ip=envelope.client_ip,
            sender=envelope.mail_from,
            recipients=len(envelope.recipients),
            size=envelope.size,
            reply=str(reply),
        )
        return reply

    async def _commit_and_submit(self, message: Prepared, envelope: Envelope) -> Reply | Job:
        assert self.spool is not None and self.delivery is not None
        try:
            await asyncio.to_thread(self.spool.commit, message, envelope)
        except OSError as exc:
            log.error("spool_write_failed", queue_id=envelope.queue_id, error=exc.strerror or str(exc))
            return Reply(452, "4.3.1", "The relay cannot store the message right now (disk full?); try again later")
        return self.delivery.submit(message, envelope)


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain."""
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
