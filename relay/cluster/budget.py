"""`limits.messages_per_minute` for the whole cluster: one token bucket in Redis, taken from by a Lua
script (atomic: two replicas cannot both take the last token). While Redis is unreachable each replica
admits its share (relay/core/cluster.py) from a bucket of its own."""

from __future__ import annotations

import time

from relay.cluster.state import Cluster, Unreachable
from relay.core.cluster import LocalBucket, fallback_bucket, replica_share

# Continuous refill at capacity/period per second, by Redis's clock; the key expires once it would be full.
TAKE = """
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * capacity / period)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('EXPIRE', KEYS[1], math.ceil(period * 2))
return taken
"""


class SharedBudget:
    """What RateLimits asks at MAIL (relay/inbound/limits.py SharedBudget): may one more message in?"""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._take = cluster.redis.register_script(TAKE)
        self._local: LocalBucket | None = None

    async def take(self, capacity: int) -> bool:
        if capacity <= 0:
            return True
        self.cluster.budget = capacity
        if self.cluster.up:
            try:
                taken = await self._take(keys=[self.cluster.key("budget", "messages")], args=[capacity, 60])
            except Unreachable as exc:
                self.cluster.unreachable(exc)
            else:
                self._local = None
                return bool(taken)
        return self._fallback(capacity).take(time.monotonic())

    def _fallback(self, capacity: int) -> LocalBucket:
        members = self.cluster.members
        bucket = self._local
        if bucket is None or bucket.capacity != replica_share(capacity, members):
            bucket = self._local = fallback_bucket(capacity, members, time.monotonic(), was_shared=self.cluster.ever_up)
        return bucket
