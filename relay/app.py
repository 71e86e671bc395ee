"""Composes the relay: inbound server -> prepare -> spool -> delivery -> upstream pool; owns start and stop."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from structlog.contextvars import bound_contextvars

from relay.cluster.node import Replicas
from relay.config import ConfigError, Settings, load_settings
from relay.core.alignment import organizational_domain
from relay.core.first_attempt import client_reply
from relay.core.message import Envelope, Prepared
from relay.core.profiles import DEFAULT, ProfileMatch, select_profile
from relay.core.replies import SHUTTING_DOWN, Reply
from relay.core.smtp_client import queued_id
from relay.delivery.clock import Clock
from relay.delivery.scheduler import Delivery
from relay.inbound.server import RelayHandler, RelaySMTP, SessionInfo, Sessions
from relay.ops import privacy
from relay.ops.http_server import HttpServer, Readiness
from relay.ops.logs import configure_logging, message_fields
from relay.ops.metrics import Metrics, relay_version
from relay.ops.status import register_status_metrics, upstream_status
from relay.outcomes.service import outcomes_for
from relay.store.sealing import sealer_for
from relay.store.spool import Spool
from relay.upstream.errors import UpstreamError
from relay.upstream.pool import UpstreamPool

log = structlog.get_logger("relay.app")

Overrides = Callable[[Settings], Settings]  # what the command line puts over a loaded config (`serve --demo`)


class Relay:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.running = settings  # what restart_needed_for compares with: the listeners and spool in use
        self.metrics = Metrics()
        privacy.configure(settings)  # privacy.redact: addresses in logs as keyed hashes
        self.pools = self._pools(settings, {})
        spool = Spool(settings.spool.path, sealer_for(settings.spool)) if settings.spool.enabled else None
        self.spool: Spool | None = spool  # sealed at rest with spool.encryption_key_file
        self.outcomes = outcomes_for(settings, self.metrics.registry, clock)  # None while reports, bounces are off
        self.delivery: Delivery | None = (
            Delivery(self.spool, self.pools, settings.spool, self.metrics, clock, self.outcomes)
            if self.spool is not None
            else None
        )
        self.replicas = Replicas(settings, self.metrics)  # relay/cluster: shared budget (Redis), hand-off
        deliver = self.deliver_spooled if self.spool else self.deliver_direct
        outcomes = self.outcomes
        backlogged = outcomes.backlogged if outcomes is not None else (lambda: False)
        self.handler = RelayHandler(settings, deliver, self.metrics, self.replicas.budget, backlogged)
        self.sessions = Sessions()
        self.http = HttpServer(self.metrics, self.readiness, self.upstream_status, self.outcomes)
        self._server: asyncio.Server | None = None
        register_status_metrics(self)

    def upstream_status(self) -> dict[str, object]:
        return upstream_status(self)

    @property
    def pool(self) -> UpstreamPool:
        """The default profile's pool ([upstream])."""
        return self.pools[DEFAULT]

    def _pools(self, settings: Settings, old: dict[str, UpstreamPool]) -> dict[str, UpstreamPool]:
        """One pool per profile; one whose settings did not change is kept (its connections stay warm)."""
        wanted = {DEFAULT: settings.upstream} | {p.name: p.upstream(settings.upstream) for p in settings.profiles}
        pools: dict[str, UpstreamPool] = {}
        for name, upstream in wanted.items():
            kept = old.get(name)
            if kept is not None and kept.settings == upstream and kept.local_name == settings.listen.hostname:
                pools[name] = kept
                continue
            pools[name] = UpstreamPool(upstream, settings.listen.hostname, self.metrics)
            if kept is not None:
                pools[name].inherit(kept)
        return pools

    def profile_for(self, message: Prepared, session: SessionInfo) -> str:
        if session.profile is not None:  # picked at MAIL by the inbound side (limits and rules followed it)
            return session.profile
        matches = [
            ProfileMatch(p.name, p.sender_domain, p.sender, p.client_network, p.user) for p in self.settings.profiles
        ]
        return select_profile(matches, sender=message.mail_from, client_ip=session.client_ip, user=session.user)

    def readiness(self) -> Readiness:
        """Does this relay accept and store mail? Listening, and the spool writable. Infobip's state is not
        part of it with the spool on (a sidecar failing readiness takes its app out of service: the
        outage the spool exists to ride out); see /upstream for that. In pass-through mode, it is."""
        checks = {"listening": "ok" if self._server is not None and self._server.is_serving() else "not listening"}
        if self.spool is not None:
            checks["spool"] = self.spool.writable()
            if checks["spool"] == "ok" and self.delivery is not None:
                checks["spool"] = self.delivery.journal.problem or "ok"
            return Readiness(all(v == "ok" for v in checks.values()), checks)
        failure = self.pool.last_failure
        recent = self.pool.last_authenticated is not None and (
            time.monotonic() - self.pool.last_authenticated < self.settings.http.ready_upstream_window
        )
        checks["upstream"] = "ok" if failure is None or recent else failure
        return Readiness(all(v == "ok" for v in checks.values()), checks)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        await asyncio.to_thread(organizational_domain, "example.com")  # load the Public Suffix List now
        if self.outcomes is not None:  # before delivery: recovered messages are attempted at once
            await self.outcomes.start()
        if self.delivery is not None:
            await self.delivery.start()
        await self.replicas.start(self.delivery)
        loop = asyncio.get_running_loop()
        listen = self.settings.listen
        self._server = await loop.create_server(
            lambda: RelaySMTP(self.handler, self.sessions), host=listen.host, port=listen.port
        )
        if self.settings.http.enabled:
            await self.http.start(self.settings.http.host, self.settings.http.port)
        log.info(
            "relay_listening",
            version=relay_version(),
            host=listen.host,
            port=self.port,
            upstream=f"{self.settings.upstream.host}:{self.settings.upstream.port}",
            spool=str(self.settings.spool.path) if self.spool else None,
            http_port=self.http.port or None,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop accepting, let sessions in DATA finish, finish deliveries in flight, then close."""
        grace = self.settings.spool.drain_timeout if grace is None else grace
        deadline = time.monotonic() + grace
        if self._server is not None:
            self._server.close()
        self.sessions.stop_accepting()  # open sessions: 421 at their next MAIL
        await self.sessions.wait_until_no_data(deadline)
        self.sessions.close_all(str(SHUTTING_DOWN))
        if self.delivery is not None:
            await self.delivery.stop(deadline - time.monotonic())
        await self.replicas.stop()
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        if self.outcomes is not None:
            await self.outcomes.stop(deadline - time.monotonic())
        await self.http.stop()
        log.info("relay_stopped", queued=self.delivery.queue.depth if self.delivery else 0)

    async def reload(self, new: Settings) -> None:
        """Apply a new config through each component's own `apply`; connections and queued mail stay."""
        restart_needed = [key for key in RESTART_KEYS if _key(self.running, key) != _key(new, key)]
        self.settings = new
        self.handler.apply(new)
        configure_logging(new.log)
        privacy.configure(new)
        retired, self.pools = self.pools, self._pools(new, self.pools)
        if self.delivery is not None:
            self.delivery.apply(new.spool, self.pools)
        if self.outcomes is not None:
            self.outcomes.apply(new)
        kept = set(map(id, self.pools.values()))
        await asyncio.gather(*(pool.close() for pool in retired.values() if id(pool) not in kept))
        log.info("config_reloaded", restart_needed_for=restart_needed or None)

    async def deliver_direct(self, message: Prepared, session: SessionInfo) -> Reply:
        """Pass-through (spool disabled): the client waits for Infobip's own verdict."""
        profile = self.profile_for(message, session)
        if self.outcomes is not None:  # our X-IB-Bulk-Id (the profile's), and the history
            message = self.outcomes.received(message, session.client_ip, profile)
        with bound_contextvars(queue_id=message.queue_id, client_ip=session.client_ip):
            return await self._deliver_direct(message, self.pools.get(profile, self.pool))

    async def _deliver_direct(self, message: Prepared, pool: UpstreamPool) -> Reply:
        started = time.monotonic()
        fields = {"sender": message.mail_from, "recipients": len(message.recipients), "size": message.size}
        try:
            with self.metrics.delivery_seconds.time():
                result = await pool.deliver(message)
        except UpstreamError as exc:
            log.warning("message_deferred", **fields, outcome="deferred", reply=str(exc.reply), attempt=1)
            self.metrics.rejected.labels("upstream_unavailable").inc()
            if self.outcomes is not None:
                await self.outcomes.relayed(message, None, exc.reply)
            return exc.reply
        self.metrics.upstream_replies.labels(str(result.final.code)).inc()
        if result.final.ok:
            self.metrics.relayed.inc()
        else:
            self.metrics.rejected.labels("upstream_refused" if result.final.code >= 500 else "upstream_deferred").inc()
        reply = client_reply(result)
        log.info(
            "message_relayed" if result.final.ok else "message_refused",
            **fields,
            infobip_id=queued_id(result.final),
            attempt=1,
            outcome="relayed" if result.final.ok else "refused",
            reply=str(reply),
            connection=result.connection_id,
            upstream_reply=str(result.final),
            refused_recipients=len(result.refused),
            seconds=round(time.monotonic() - started, 4),
        )
        if self.outcomes is not None:
            await self.outcomes.relayed(message, result, reply)
        return reply

    async def deliver_spooled(self, message: Prepared, session: SessionInfo) -> Reply:
        """Commit to disk and attempt at once; the first-attempt table says what the client hears."""
        assert self.delivery is not None
        profile = self.profile_for(message, session)
        if self.outcomes is not None:  # our X-IB-Bulk-Id (the profile's), and the history
            message = self.outcomes.received(message, session.client_ip, profile)
        envelope = Envelope(
            queue_id=message.queue_id,
            mail_from=message.mail_from,
            recipients=message.recipients,
            message_id=message.message_id,
            client_ip=session.client_ip,
            received_at=self.delivery.clock.time(),
            size=message.size,
            profile=profile,
        )
        with bound_contextvars(queue_id=envelope.queue_id, client_ip=envelope.client_ip):
            # Both the commit and the attempt start before any await, so a client hanging up cannot
            # leave a committed message unscheduled.
            job = self.delivery.submit(message, envelope)
            del message
            first = job.first
            reply, outcome = await self.delivery.answer(job)
            if outcome != "unstorable":
                result = first.machine.result if first is not None else None
                log.info(
                    "message_answered",
                    **message_fields(envelope),
                    infobip_id=",".join(result.infobip_ids) if result and result.infobip_ids else None,
                    outcome=outcome,
                    reply=str(reply),
                )
            return reply


RESTART_KEYS = (
    "listen.host",
    "listen.port",
    "spool.enabled",
    "spool.path",
    "spool.encryption_key_file",  # the spool's sealer is made once, at start-up (after its key check)
    "spool.old_key_files",
    "http.host",
    "http.port",
    "upstream.pool_size",
    "reports.enabled",
    "reports.notify_listen",
    "reports.history_path",
    "reports.history_url",
    "reports.history_timeout",  # set on the history's connection as it is made
    "bounces.enabled",
)


def _key(settings: Settings, dotted: str) -> object:
    section, name = dotted.split(".")
    return getattr(getattr(settings, section), name)


async def _reload_from(relay: Relay, config: Path | None, overrides: Overrides | None = None) -> None:
    """SIGHUP: the file again, with what the command line put over it at start (`--demo`: the stand-in, so a
    reload never turns a demo towards Infobip), held to the same secrets `relay serve` needs."""
    try:
        new = load_settings(config)
        if overrides is not None:
            new = overrides(new)
        if missing := new.missing_secrets():
            raise ConfigError("; ".join(missing))
    except ConfigError as exc:
        log.error("config_reload_failed", error=str(exc), kept="the running config")
        relay.metrics.reloaded(False)
        return
    await relay.reload(new)
    relay.metrics.reloaded(True)


async def run(
    settings: Settings,
    stop: asyncio.Event | None = None,
    config: Path | None = None,
    overrides: Overrides | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain. SIGHUP re-reads `config` (then `overrides`)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(settings)
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = asyncio.ensure_future(_reload_from(relay, config, overrides))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await relay.start()
    # What start-up built (modules, settings, compiled patterns: ~87,000 objects) lives as long as the
    # process; a full collection walking it cost 55-58 ms of CPU, a stall of up to 265 ms on a busy host.
    gc.freeze()
    try:
        await stop.wait()
    finally:
        log.info("relay_stopping")
        await relay.stop()
