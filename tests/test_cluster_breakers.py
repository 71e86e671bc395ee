"""One breaker per profile for all replicas, through a real Redis: one replica's failures pause the others,
only one replica probes, and its success releases everyone's held mail."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.app import Relay
from relay.testing.standin import InfobipStandIn
from tests.cluster_services import RedisServer, redis_server
from tests.conftest import StartRelay, message
from tests.helpers import SENDER, send_one, spooled, until

pytestmark = pytest.mark.slow  # several relays and a Redis server: seconds each; .ci/run runs them

__all__ = ["redis_server"]  # the fixture, imported for pytest


def counting_probes(relay: Relay) -> list[None]:
    """Count the default profile's probes (a wrapper around its pool's public probe())."""
    probes: list[None] = []
    pool = relay.pool
    original = pool.probe

    async def probe() -> None:
        probes.append(None)
        await original()

    pool.probe = probe  # type: ignore[method-assign]
    return probes


async def test_one_replicas_failures_pause_all_and_one_probe_serves_the_cluster(
    redis_server: RedisServer, standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    cluster = {"redis_url": redis_server.url, "heartbeat": 0.2}
    a = await start_relay(
        spool=spooled(tmp_path / "a", sync_wait=0.2, breaker_threshold=1), cluster={**cluster, "node_name": "a"}
    )
    b = await start_relay(spool=spooled(tmp_path / "b", sync_wait=0.2), cluster={**cluster, "node_name": "b"})
    assert a.delivery is not None and b.delivery is not None
    probes_a, probes_b = counting_probes(a), counting_probes(b)
    standin.behaviour.down = True
    await send_one(a.port, SENDER, ["a@example.org"], message(to="a@example.org"))  # fails on replica a only
    await until(lambda: a.delivery is not None and a.delivery.breaker.is_open)
    await until(lambda: b.delivery is not None and b.delivery.breaker.is_open)  # b never failed itself
    assert "paused by replica a" in b.upstream_status()["delivery"]["last_error"]  # type: ignore[index]
    reply = await send_one(b.port, SENDER, ["held@example.org"], message(to="held@example.org"))
    assert reply.startswith("250 ")  # answered as soon as it is on disk: b knows delivery is paused
    await until(lambda: len(probes_a) >= 2)  # a probes for both ...
    assert probes_b == []  # ... and b does not

    standin.behaviour.down = False
    await until(lambda: not a.delivery.breaker.is_open and not b.delivery.breaker.is_open)
    await until(lambda: "held@example.org" in {r for m in standin.messages for r in m.rcpt_tos})
    assert probes_b == []  # a's success released b's mail


async def test_without_a_cluster_each_relay_keeps_its_own_breaker(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    a = await start_relay(spool=spooled(tmp_path / "a", sync_wait=0.2, breaker_threshold=1))
    b = await start_relay(spool=spooled(tmp_path / "b", sync_wait=0.2, breaker_threshold=1))
    assert a.delivery is not None and b.delivery is not None
    standin.behaviour.down = True
    await send_one(a.port, SENDER, ["x@example.org"], message(to="x@example.org"))
    await until(lambda: a.delivery is not None and a.delivery.breaker.is_open)
    assert not b.delivery.breaker.is_open
