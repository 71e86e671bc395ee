"""Circuit breaker: when Infobip keeps failing, pause delivery as a whole and probe until it is back. Pure.

Closed: deliveries flow. Connection-level failures are counted, but failures that land together (within
`together` seconds of the last one counted) are one failure: eight workers failing in the same 10 ms
blip are one event, not eight. After `threshold` of them it opens: no worker takes a message, and a
probe (one connection, no message) goes out on a short schedule of its own, about `probe_initial`
seconds growing to `probe_max`, with jitter. The first success closes it, and everything held by the
outage is due at once. This schedule is separate from each message's retry schedule (`retry.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Change(Enum):
    OPENED = "opened"
    CLOSED = "closed"


@dataclass
class CircuitBreaker:
    threshold: int = 5
    probe_initial: float = 1.0
    probe_max: float = 5.0
    together: float = 0.5
    failures: int = 0
    last_failure: float | None = None  # when the last counted failure happened
    probe_interval: float = 0.0
    next_probe: float = 0.0
    last_error: str = ""

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def failure(self, now: float, error: str, jitter: float) -> Change | None:
        """A connection-level failure. Returns OPENED when this one opens the breaker."""
        self.last_error = error
        if self.is_open or (self.last_failure is not None and now - self.last_failure < self.together):
            return None  # already paused, or part of the same blip
        self.last_failure = now
        self.failures += 1
        if not self.is_open:
            return None
        self.probe_interval = self.probe_initial
        self.next_probe = now + self._jittered(jitter)
        return Change.OPENED

    def probe_due(self, now: float) -> bool:
        return self.is_open and now >= self.next_probe

    def wait(self, now: float) -> float:
        """Seconds until the next probe (0 when closed or due)."""
        return max(0.0, self.next_probe - now) if self.is_open else 0.0

    def probe_failed(self, now: float, error: str, jitter: float) -> None:
        self.last_error = error
        self.probe_interval = min(self.probe_max, self.probe_interval * 2 or self.probe_initial)
        self.next_probe = now + self._jittered(jitter)

    def probe_now(self, now: float) -> None:
        """A reload, `relay queue flush` or a restart: a fresh chance, without firing every message at once."""
        if self.is_open:
            self.next_probe = now
            self.probe_interval = 0.0

    def hold(self, now: float, error: str) -> Change | None:
        """Open at once, for a probe now: at start-up, when messages were held by an outage."""
        if self.is_open:
            return None
        self.failures, self.last_failure, self.last_error = self.threshold, now, error
        self.probe_interval, self.next_probe = 0.0, now
        return Change.OPENED

    def success(self) -> Change | None:
        """A connection worked. Returns CLOSED when this ends a pause."""
        was_open = self.is_open
        self.failures, self.last_failure, self.probe_interval = 0, None, 0.0
        return Change.CLOSED if was_open else None

    def _jittered(self, jitter: float) -> float:
        """The interval scaled into [75%, 125%): probes of several relays do not arrive together."""
        return self.probe_interval * (0.75 + jitter / 2)
