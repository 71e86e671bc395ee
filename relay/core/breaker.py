"""Circuit breaker: when Infobip keeps failing, back off as a whole instead of per message. Pure.

Closed: deliveries flow. After `threshold` consecutive connection-level failures it opens for a
cool-down that doubles each time it re-opens (up to `maximum`); then one probe may go (half-open)
and the next one only a cool-down later; a success closes it, a failure re-opens it for longer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CircuitBreaker:
    threshold: int = 5
    initial: float = 1.0
    maximum: float = 60.0
    failures: int = 0
    open_until: float = 0.0
    cooldown: float = 0.0

    def allows(self, now: float) -> bool:
        """May a delivery start now? When open, one probe per cool-down."""
        if self.failures < self.threshold:
            return True
        if now < self.open_until:
            return False
        self.open_until = now + self.cooldown  # a probe whose outcome never comes cannot stall us
        return True

    def wait(self, now: float) -> float:
        """Seconds until a delivery may be allowed again (0 when closed)."""
        return max(0.0, self.open_until - now) if self.failures >= self.threshold else 0.0

    def success(self) -> None:
        self.failures = 0
        self.cooldown = 0.0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.cooldown = min(self.maximum, self.cooldown * 2 if self.cooldown else self.initial)
            self.open_until = now + self.cooldown

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold
