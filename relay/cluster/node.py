"""What app.py composes for running beside other replicas: the Redis link and shared budget (only with
[cluster] redis_url) and the hand-off watcher (always with a spool: `relay queue handoff` needs no Redis)."""

from __future__ import annotations

from relay.cluster.breakers import BreakerSync
from relay.cluster.budget import SharedBudget
from relay.cluster.handoff import HandoffService
from relay.cluster.state import Cluster
from relay.config import Settings
from relay.delivery.scheduler import Delivery
from relay.ops.metrics import Metrics


class Replicas:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.listen = settings.listen
        self.cluster: Cluster | None = None
        self.budget: SharedBudget | None = None
        self.handoff: HandoffService | None = None
        self.breakers: BreakerSync | None = None
        if settings.cluster.redis_url.get_secret_value():
            cluster = self.cluster = Cluster(settings.cluster, settings.limits.messages_per_minute)
            self.budget = SharedBudget(cluster)
            metrics.gauge("relay_cluster_redis_up", "1 while Redis (shared state) answers", lambda: float(cluster.up))
            metrics.gauge("relay_cluster_members", "Replicas seen by the last heartbeat", lambda: cluster.members)

    async def start(self, delivery: Delivery | None) -> None:
        if self.cluster is not None:
            await self.cluster.start()
            if delivery is not None:  # one breaker per profile for all replicas
                self.breakers = delivery.shared.cluster = BreakerSync(self.cluster, delivery)
                self.breakers.start()
        if delivery is not None:
            self.handoff = HandoffService(delivery, self.listen)
            self.handoff.start()

    async def stop(self) -> None:
        if self.handoff is not None:
            await self.handoff.stop()
        if self.breakers is not None:
            await self.breakers.stop()
        if self.cluster is not None:
            await self.cluster.stop()
