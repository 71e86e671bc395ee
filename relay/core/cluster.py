"""What a replica decides alone about the cluster's shared budget. Pure.

With Redis reachable, every replica takes from one token bucket (relay/cluster/budget.py, a Lua script
that runs atomically in Redis). Without it, each replica admits its share: the budget over the members
it last saw, so the cluster as a whole still stays about within the budget, and mail keeps flowing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def replica_share(budget: int, members: int) -> int:
    """Messages per minute one replica may admit on its own: budget / last known members, rounded up
    (at least 1: a replica that can admit nothing would look like an outage). 0 = unlimited, as ever."""
    if budget <= 0:
        return 0
    return max(1, math.ceil(budget / max(1, members)))


@dataclass
class LocalBucket:
    """A token bucket of `capacity` per `period` seconds, refilled continuously, at `now` values given."""

    capacity: int
    period: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        if self.capacity <= 0:
            return True
        refill = max(0.0, now - self.updated) * self.capacity / self.period
        self.tokens = min(float(self.capacity), self.tokens + refill)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def fallback_bucket(budget: int, members: int, now: float, *, was_shared: bool) -> LocalBucket:
    """The bucket a replica uses while Redis is unreachable. Falling back mid-way (the shared bucket may be
    spent) it starts empty and fills at its share's rate; a replica that never reached Redis starts full,
    as a single relay does."""
    share = replica_share(budget, members)
    return LocalBucket(share, 60.0, 0.0 if was_shared else float(share), now)
