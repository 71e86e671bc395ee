"""Rate limits and the memory budget: so a runaway legacy job cannot burn the Infobip account or our RAM.

Pure bookkeeping over `now` values given by the caller; token buckets that refill continuously, so a
limit of 60 per minute allows a burst of 60 and then one a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from relay.config import LimitsSettings
from relay.core.replies import client_message_rate, client_recipient_rate, message_rate
from relay.inbound.access import Refusal


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class TokenBuckets:
    """One bucket per key: `capacity` tokens, refilled at capacity/period per second. 0 = unlimited."""

    capacity: int
    period: float
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, now: float, count: int = 1) -> bool:
        if self.capacity <= 0:
            return True
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) > 10000:  # forget clients idle long enough to be full again
                self.buckets = {k: b for k, b in self.buckets.items() if self._level(b, now) < self.capacity}
            bucket = self.buckets[key] = _Bucket(float(self.capacity), now)
        bucket.tokens = self._level(bucket, now)
        bucket.updated = now
        if bucket.tokens < count:
            return False
        bucket.tokens -= count
        return True

    def _level(self, bucket: _Bucket, now: float) -> float:
        refill = (now - bucket.updated) * self.capacity / self.period
        return min(float(self.capacity), bucket.tokens + refill)


class SharedBudget(Protocol):
    """`messages_per_minute` for a whole cluster of replicas (relay/cluster/budget.py)."""

    async def take(self, capacity: int) -> bool: ...


class RateLimits:
    """The [limits] section's rates, checked at MAIL (messages) and RCPT (recipients)."""

    def __init__(self, settings: LimitsSettings, shared: SharedBudget | None = None) -> None:
        self.client_messages = TokenBuckets(settings.client_messages_per_minute, 60.0)
        self.all_messages = TokenBuckets(settings.messages_per_minute, 60.0)
        self.client_recipients = TokenBuckets(settings.client_recipients_per_hour, 3600.0)
        self.shared = shared

    async def admit(self, client_ip: str, now: float) -> Refusal | None:
        """`message`, with `messages_per_minute` taken from the cluster's budget when replicas share one."""
        if self.shared is None:
            return self.message(client_ip, now)
        if not self.client_messages.take(client_ip, now):
            return Refusal("rate_limit", client_message_rate(client_ip, self.client_messages.capacity))
        if not await self.shared.take(self.all_messages.capacity):
            return Refusal("rate_limit", message_rate(self.all_messages.capacity))
        return None

    def message(self, client_ip: str, now: float) -> Refusal | None:
        if not self.client_messages.take(client_ip, now):
            return Refusal("rate_limit", client_message_rate(client_ip, self.client_messages.capacity))
        if not self.all_messages.take("*", now):
            return Refusal("rate_limit", message_rate(self.all_messages.capacity))
        return None

    def recipient(self, client_ip: str, now: float) -> Refusal | None:
        if not self.client_recipients.take(client_ip, now):
            return Refusal("rate_limit", client_recipient_rate(client_ip, self.client_recipients.capacity))
        return None


class MemoryBudget:
    """Bytes of message data held in memory across all sessions; 0 = unlimited."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def take(self, count: int) -> bool:
        if self.limit and self.used + count > self.limit:
            return False
        self.used += count
        self.peak = max(self.peak, self.used)
        return True

    def release(self, count: int) -> None:
        self.used -= count

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.used >= self.limit
