"""One replica's link to the others through Redis: the connection, whether it works now, and the members.

Members are a sorted set scored by Redis's own clock (TIME inside the script), so the replicas' clocks
need not agree; a member silent for three heartbeats is dropped by the next replica's heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import structlog
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from relay.config import ClusterSettings
from relay.core.cluster import replica_share

log = structlog.get_logger("relay.cluster")

HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""

Unreachable = (RedisError, OSError)  # what a failed Redis call raises


class Cluster:
    """The shared connection; `up` says whether the last call worked (the heartbeat retries every beat)."""

    def __init__(self, settings: ClusterSettings, budget: int = 0) -> None:
        self.settings = settings
        self.node = settings.node_name or socket.gethostname()
        self.budget = budget  # limits.messages_per_minute, for the share the logs name
        self.redis: Redis = Redis.from_url(
            settings.redis_url.get_secret_value(),
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            retry=Retry(NoBackoff(), 0),  # a failed call falls back at once; the heartbeat tries again
        )
        self.up = False
        self.ever_up = False
        self.members = 1
        self.on_change: list[Callable[[bool], None]] = []  # told when Redis becomes (un)reachable
        self._heartbeat = self.redis.register_script(HEARTBEAT)
        self._task: asyncio.Task[None] | None = None
        self._said_down = False
        self._stopping = False

    def key(self, *parts: str) -> str:
        return ":".join((self.settings.key_prefix, *parts))

    async def start(self) -> None:
        """One heartbeat now (an unreachable Redis is logged, not fatal), then one per `heartbeat`."""
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="cluster-heartbeat")

    async def stop(self) -> None:
        """Leave the members at once (the others' shares grow now, not three heartbeats later)."""
        self._stopping = True
        if self._task is not None:
            # A cancel that lands while redis-py is finishing a call can be swallowed (Python 3.11's
            # wait_for semantics; seen once in .ci/run on uvloop, where stop() then waited forever):
            # cancel again until the heartbeat is done, and the loop ends on `_stopping` anyway.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
        if self.up:
            with contextlib.suppress(*Unreachable):
                await self.redis.zrem(self.key("members"), self.node)
        with contextlib.suppress(*Unreachable):
            await self.redis.aclose()

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.settings.heartbeat)
            await self.beat()

    async def beat(self) -> None:
        try:
            members = await self._heartbeat(keys=[self.key("members")], args=[self.node, 3 * self.settings.heartbeat])
        except Unreachable as exc:
            self.unreachable(exc)
            return
        self.members = max(1, int(members))
        self.reachable()

    def reachable(self) -> None:
        if self.up:
            return
        self.up, self.ever_up, self._said_down = True, True, False
        log.info("cluster_redis_reachable", node=self.node, members=self.members, message="shared budget in use")
        for listener in self.on_change:
            listener(True)

    def unreachable(self, exc: BaseException) -> None:
        """A Redis call failed: fall back to this replica's share until a heartbeat works again."""
        was_up, self.up = self.up, False
        if not was_up and self._said_down:
            return
        self._said_down = True
        log.warning(
            "cluster_redis_unreachable",
            node=self.node,
            error=f"{type(exc).__name__}: {exc}",
            members=self.members,
            share_per_minute=replica_share(self.budget, self.members),
            message="each replica falls back to its share of messages_per_minute; mail keeps flowing",
        )
        for listener in self.on_change:
            listener(False)
