"""What the relay says about itself at scrape time: the spool, the breakers, Infobip by profile, and
GET /upstream. Read from the running parts when asked, so the hot path keeps no bookkeeping for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from relay.core.profiles import DEFAULT
from relay.ops.metrics import oldest_received, spool_depth

if TYPE_CHECKING:
    from relay.app import Relay
    from relay.delivery.queue import DeliveryQueue


def _queues(relay: Relay) -> list[DeliveryQueue]:
    return [lane.queue for lane in relay.delivery.lanes.values()] if relay.delivery is not None else []


def _spool_depth(relay: Relay) -> float:
    if relay.delivery is None or relay.spool is None:
        return 0.0
    return float(spool_depth(_queues(relay), relay.spool.queue))  # not what `queue delete` removed


def _oldest_age(relay: Relay) -> float:
    if relay.delivery is None or relay.spool is None:
        return 0.0
    oldest = oldest_received(_queues(relay), relay.spool.queue)
    return max(0.0, relay.delivery.clock.time() - oldest) if oldest else 0.0


def _next_probe(relay: Relay) -> float:
    at = relay.delivery.prober.status().get("next_probe_at") if relay.delivery is not None else None
    return float(at) if isinstance(at, float | int) else 0.0


def _up(relay: Relay) -> float:
    return 1.0 if relay.pool.status == "ok" else 0.0


def _paused(relay: Relay) -> float:
    return 1.0 if relay.delivery is not None and relay.delivery.breaker.is_open else 0.0


def _by_lane(relay: Relay, read: str) -> dict[str, float]:
    lanes = relay.delivery.lanes if relay.delivery is not None else {}
    if read == "paused":
        return {name: 1.0 if lane.breaker.is_open else 0.0 for name, lane in lanes.items()}
    return {name: float(lane.queue.depth) for name, lane in lanes.items()}


def register_status_metrics(relay: Relay) -> None:
    m = relay.metrics
    m.gauge("relay_spool_depth", "Messages waiting in the spool", lambda: _spool_depth(relay))
    m.gauge("relay_spool_oldest_age_seconds", "Age of the oldest message waiting", lambda: _oldest_age(relay))
    m.gauge("relay_upstream_pool_connections", "Upstream connections open", lambda: relay.pool.size)
    m.gauge("relay_client_connections", "Client connections open", lambda: len(relay.sessions.live))
    if relay.spool is not None:
        m.spool_disk(relay.spool.path)
    m.gauge("relay_breaker_open", "1 while delivery is paused by the circuit breaker", lambda: _paused(relay))
    m.gauge("relay_breaker_next_probe_timestamp_seconds", "Next probe while paused (epoch)", lambda: _next_probe(relay))
    m.gauge(
        "relay_upstream_up", "1 when the last connection to Infobip worked", lambda: float(relay.pool.status == "ok")
    )
    m.gauge(
        "relay_upstream_credentials_refused",
        "1 when Infobip refused our credentials last time",
        lambda: float(relay.pool.status == "credentials_refused"),
    )
    m.per_profile(
        "relay_profile_upstream_up",
        "1 when the profile's last connection worked",
        lambda: {name: 1.0 if pool.status == "ok" else 0.0 for name, pool in relay.pools.items()},
    )
    m.per_profile(
        "relay_profile_breaker_open", "1 while the profile's delivery is paused", lambda: _by_lane(relay, "paused")
    )
    m.per_profile("relay_profile_queued", "Messages waiting, by profile", lambda: _by_lane(relay, "queued"))


def upstream_status(relay: Relay) -> dict[str, object]:
    """GET /upstream: what the relay knows of Infobip now, for the default profile and each one
    (readiness does not depend on it)."""
    profiles = {name: _profile_status(relay, name) for name in relay.pools}
    return {**profiles[DEFAULT], "profiles": profiles}


def _profile_status(relay: Relay, name: str) -> dict[str, object]:
    pool = relay.pools[name]
    lane = relay.delivery.lanes.get(name) if relay.delivery is not None else None
    return {
        "status": pool.status,
        "since": pool.status_since,
        "last_error": pool.last_failure,
        "delivery": lane.prober.status() if lane is not None else {"paused": False},
    }
