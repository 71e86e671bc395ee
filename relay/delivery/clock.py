"""Time and chance for the scheduler, injected: the system's in production, a fake one in tests, so
that a test moves time forward instead of sleeping."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float:
        """Epoch seconds: retry times are kept on disk in these."""

    def monotonic(self) -> float:
        """Seconds for intervals (the breaker)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` on the event loop after `delay` seconds of this clock."""

    def random(self) -> float:
        """Jitter in [0, 1)."""


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)

    def random(self) -> float:
        return random.random()
