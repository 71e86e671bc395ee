"""The cluster-wide `messages_per_minute` against a real Redis started by the test: one bucket for all
replicas (an atomic Lua script), the members by heartbeat, and each replica's share while Redis is gone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from relay.cluster.budget import SharedBudget
from relay.cluster.state import Cluster
from relay.config import ClusterSettings
from tests.cluster_services import RedisServer, redis_server
from tests.conftest import Dialog, StartRelay

pytestmark = pytest.mark.slow  # relays sharing a Redis server: seconds each; .ci/run runs them

__all__ = ["redis_server"]  # the fixture, imported for pytest

Replica = tuple[Cluster, SharedBudget]


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Callable[[int], Replica]]:
    # A generous Redis timeout: on a loaded CI machine 150 calls at once took longer than 0.3 s, and a
    # replica that falls back admits its share instead of the bucket. A killed Redis refuses at once.
    made: list[Cluster] = []

    def make(n: int) -> Replica:
        settings = ClusterSettings(redis_url=redis_server.url, node_name=f"replica-{n}", heartbeat=0.2, timeout=3.0)
        cluster = Cluster(settings)
        made.append(cluster)
        return cluster, SharedBudget(cluster)

    yield make
    for cluster in made:
        await cluster.stop()


async def test_three_replicas_take_from_one_bucket_and_never_more_than_the_budget(
    replicas: Callable[[int], Replica],
) -> None:
    trio = [replicas(n) for n in range(3)]
    for cluster, _ in trio:
        await cluster.start()
    await trio[0][0].beat()
    assert trio[0][0].members == 3
    # 150 attempts at once, spread over the three: exactly the budget gets in (the script is atomic).
    taken = await asyncio.gather(*(trio[n % 3][1].take(60) for n in range(150)))
    assert sum(taken) == 60
    assert {n % 3 for n, ok in enumerate(taken) if ok} == {0, 1, 2}


async def test_without_redis_each_replica_admits_its_share_and_the_shared_bucket_resumes_when_it_returns(
    redis_server: RedisServer, replicas: Callable[[int], Replica]
) -> None:
    trio = [replicas(n) for n in range(3)]
    for cluster, _ in trio:
        await cluster.start()
    cluster, budget = trio[0]
    await cluster.beat()
    assert cluster.members == 3 and await budget.take(6000)
    redis_server.kill()
    with capture_logs() as logs:
        assert not await budget.take(6000)  # falling back mid-way: an empty bucket, filling at its share
    assert not cluster.up
    fallback = [e for e in logs if e["event"] == "cluster_redis_unreachable"]
    assert fallback and fallback[0]["share_per_minute"] == 2000 and fallback[0]["members"] == 3
    admitted = 0
    while admitted < 3:  # 2000 a minute: one each 30 ms; mail keeps flowing
        admitted += await budget.take(6000)
        await asyncio.sleep(0.01)
    redis_server.start()
    with capture_logs() as logs:
        await cluster.beat()
    assert cluster.up and [e["event"] for e in logs] == ["cluster_redis_reachable"]
    assert await budget.take(6000)
    assert redis_server.client().exists("relay:budget:messages")  # back on the one bucket


async def test_relays_with_a_cluster_share_messages_per_minute_at_mail(
    redis_server: RedisServer, start_relay: StartRelay
) -> None:
    relays = [
        await start_relay(
            limits={"messages_per_minute": 3},
            cluster={"redis_url": redis_server.url, "node_name": f"r{n}"},
        )
        for n in range(2)
    ]
    replies = []
    for n in range(5):
        dialog = await Dialog.open(relays[n % 2].port)
        try:
            await dialog.hello()
            replies.append(await dialog.send("MAIL FROM:<billing@erp.example.com>"))
        finally:
            with contextlib.suppress(OSError):
                await dialog.close()
    assert [reply[:3] for reply in replies] == ["250", "250", "250", "451", "451"]
    assert "at most 3 messages a minute" in replies[3]  # the budget the whole cluster shares
