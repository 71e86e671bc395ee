"""Prometheus metrics, one registry per relay (so tests and reloads never share counters)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("relay_messages_received", "Messages whose DATA was received", registry=r)
        self.relayed = Counter(
            "relay_messages_relayed", "Messages Infobip accepted (at least one recipient)", registry=r
        )
        self.rejected = Counter(
            "relay_messages_rejected", "Messages or commands refused, by reason", ["reason"], registry=r
        )
        self.upstream_replies = Counter(
            "relay_upstream_replies", "Infobip's end-of-transaction replies, by code", ["code"], registry=r
        )
        self.deferred = Counter("relay_delivery_deferred", "Attempts that left recipients to retry", registry=r)
        self.dead = Counter("relay_delivery_dead_lettered", "Messages with recipients moved to dead/", registry=r)
        self.upstream_connects = Counter(
            "relay_upstream_connections_opened", "Upstream connections opened (reconnects included)", registry=r
        )
        self.upstream_failures = Counter(
            "relay_upstream_connection_failures", "Failed attempts to connect, TLS or authenticate", registry=r
        )
        self.delivery_seconds = Histogram(
            "relay_delivery_seconds",
            "From the end of DATA to Infobip's verdict (first attempt) or each retry's verdict",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A value read when scraped (spool depth, pool size): no bookkeeping on the hot path."""
        Gauge(name, documentation, registry=self.registry).set_function(read)
