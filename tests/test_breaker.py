"""The circuit breaker's own probe schedule, as plain values."""

from __future__ import annotations

from relay.core.breaker import Change, CircuitBreaker


def opened(threshold: int = 3) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold=threshold, probe_initial=1.0, probe_max=5.0, together=0.5)
    for n in range(threshold):
        breaker.failure(float(n), "451 4.4.1 down", jitter=0.5)
    assert breaker.is_open
    return breaker


def test_failures_that_land_together_are_one() -> None:
    breaker = CircuitBreaker(threshold=2, together=0.5)
    changes = [breaker.failure(10.0 + n * 0.001, "down", jitter=0.5) for n in range(8)]  # a 10 ms blip
    assert changes == [None] * 8 and not breaker.is_open
    assert breaker.failure(10.6, "down", jitter=0.5) is Change.OPENED


def test_it_opens_at_the_threshold_and_probes_about_a_second_later() -> None:
    breaker = CircuitBreaker(threshold=3)
    assert [breaker.failure(t, "down", jitter=0.5) for t in (0.0, 1.0, 2.0)] == [None, None, Change.OPENED]
    assert not breaker.probe_due(2.9) and breaker.wait(2.0) == 1.0 and breaker.probe_due(3.0)


def test_the_probe_interval_grows_to_its_cap_with_jitter() -> None:
    breaker = opened()
    intervals = []
    now = breaker.next_probe
    for _ in range(6):
        breaker.probe_failed(now, "down", jitter=0.5)
        intervals.append(breaker.next_probe - now)
        now = breaker.next_probe
    assert intervals == [2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    breaker.probe_failed(now, "down", jitter=0.0)
    assert breaker.next_probe - now == 3.75  # 75% of the cap
    breaker.probe_failed(now, "down", jitter=0.999)
    assert 6.2 < breaker.next_probe - now < 6.25  # just under 125%


def test_a_success_closes_it_and_says_so_once() -> None:
    breaker = opened()
    assert breaker.success() is Change.CLOSED
    assert not breaker.is_open and breaker.success() is None
    assert breaker.failure(100.0, "down", jitter=0.5) is None  # counting starts again from one


def test_probe_now_and_hold() -> None:
    breaker = opened()
    breaker.probe_failed(10.0, "down", jitter=0.5)
    breaker.probe_now(10.5)
    assert breaker.probe_due(10.5)
    fresh = CircuitBreaker(threshold=5)
    assert fresh.hold(7.0, "held at start-up") is Change.OPENED
    assert fresh.is_open and fresh.probe_due(7.0) and fresh.hold(8.0, "again") is None
