"""One breaker per profile for all replicas, as KumoMTA's nodes share their suspensions: one replica's
failures open it for all of them, and one replica probes for the cluster.

In Redis, per profile: a probe key (`<prefix>:breaker:<profile>` = the probing replica, with a TTL it
renews at each probe) and a channel that carries "opened" and "closed". A replica told "opened" holds its
lane as its own breaker would, and its prober asks `may_probe` before each probe: no while another replica
holds the key. If that replica goes quiet its key expires and the next one to ask probes instead. Without
Redis each replica's breaker is its own again, as a single relay's."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Coroutine
from typing import Any

import structlog

from relay.cluster.state import Cluster, Unreachable
from relay.core.breaker import Change
from relay.delivery.scheduler import Delivery

log = structlog.get_logger("relay.cluster")
PROBE_TTL_MS = 15000  # a prober silent this long (dead, or cut off from Redis) gives the probe to another


class BreakerSync:
    def __init__(self, cluster: Cluster, delivery: Delivery) -> None:
        self.cluster = cluster
        self.delivery = delivery
        self.channel = cluster.key("breaker")
        self._applying = False  # a change another replica reported: not to be reported back
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None

    def key(self, profile: str) -> str:
        return self.cluster.key("breaker", profile)

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="cluster-breakers")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # what our lanes tell us (relay/delivery/prober.py BreakerLink)

    def changed(self, profile: str, change: Change, error: str) -> None:
        if self._applying:
            return
        event = {"change": change.value, "profile": profile, "node": self.cluster.node, "error": error}
        self._spawn(self._publish(event, claim=change is Change.OPENED))

    async def may_probe(self, profile: str) -> bool:
        """Yes when no other replica holds this profile's probe (or Redis cannot say: on our own then)."""
        if not self.cluster.up:
            return True
        node = self.cluster.node.encode()
        try:
            if await self.cluster.redis.set(self.key(profile), node, nx=True, px=PROBE_TTL_MS):
                return True
            if await self.cluster.redis.get(self.key(profile)) == node:
                await self.cluster.redis.pexpire(self.key(profile), PROBE_TTL_MS)
                return True
        except Unreachable as exc:
            self.cluster.unreachable(exc)
            return True
        return False

    async def _publish(self, event: dict[str, str], *, claim: bool) -> None:
        try:
            if claim:  # we saw it first: we probe for everyone
                await self.cluster.redis.set(self.key(event["profile"]), self.cluster.node, nx=True, px=PROBE_TTL_MS)
            else:
                await self.cluster.redis.delete(self.key(event["profile"]))
            await self.cluster.redis.publish(self.channel, json.dumps(event))
        except Unreachable as exc:
            self.cluster.unreachable(exc)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # what other replicas tell us

    async def _listen(self) -> None:
        while True:
            pubsub = self.cluster.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=0.8 * self.cluster.settings.timeout
                    )
                    if message is not None:
                        self.apply(json.loads(message["data"]))
            except Unreachable:
                await asyncio.sleep(self.cluster.settings.heartbeat)  # the heartbeat says when it is back
            finally:
                with contextlib.suppress(*Unreachable):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated

    def apply(self, event: dict[str, str]) -> None:
        """Another replica's breaker opened (hold our lane of that profile) or closed (release it)."""
        lane = self.delivery.lanes.get(event.get("profile", ""))
        if lane is None or event.get("node") == self.cluster.node:
            return
        self._applying = True
        try:
            if event.get("change") == Change.OPENED.value:
                error = f"paused by replica {event.get('node')}: {event.get('error')}"
                if lane.breaker.hold(lane.clock.monotonic(), error) is Change.OPENED:
                    lane.prober.opened()
            elif lane.breaker.is_open and lane.breaker.success() is Change.CLOSED:
                lane.prober.closed()
        finally:
            self._applying = False
