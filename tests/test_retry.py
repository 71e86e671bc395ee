"""The retry schedule, as plain values."""

from __future__ import annotations

from relay.core.retry import AttemptResult, backoff, next_step, recipient_batches

SCHEDULE = {"initial": 60.0, "maximum": 3600.0}


def test_backoff_doubles_and_caps_with_jitter_between_half_and_full() -> None:
    assert [backoff(n, jitter=0.0, **SCHEDULE) for n in (1, 2, 3, 4)] == [30.0, 60.0, 120.0, 240.0]
    assert backoff(1, jitter=0.999999, **SCHEDULE) < 60.0
    assert backoff(20, jitter=0.0, **SCHEDULE) == 1800.0
    assert backoff(20, jitter=0.5, **SCHEDULE) == 2700.0


def test_recipient_batches_of_at_most_1000_in_order() -> None:
    recipients = [f"r{i}@x.org" for i in range(2001)]
    batches = recipient_batches(recipients)
    assert [len(b) for b in batches] == [1000, 1000, 1]
    assert [r for b in batches for r in b] == recipients
    assert recipient_batches(recipients[:3]) == [tuple(recipients[:3])]


def step(result: AttemptResult, attempts: int = 1, age: float = 0.0, max_age: float = 432000.0):  # type: ignore[no-untyped-def]
    return next_step(
        result, attempts=attempts, first_seen=1000.0, now=1000.0 + age, max_age=max_age, jitter=0.0, **SCHEDULE
    )


def test_all_accepted_means_nothing_left() -> None:
    result = step(AttemptResult(accepted=("a@x.org",), infobip_ids=("id1",)))
    assert (result.retry, result.retry_at, result.dead) == ((), None, {})


def test_transient_recipients_are_retried_permanent_ones_die_at_once() -> None:
    result = step(
        AttemptResult(
            accepted=("a@x.org",),
            transient={"b@x.org": "450 4.2.0 Mailbox busy"},
            permanent={"c@x.org": "550 5.7.1 Recipient <c@x.org> not allowed"},
        ),
        attempts=2,
    )
    assert result.retry == ("b@x.org",)
    assert result.retry_at == 1000.0 + 60.0  # after attempt 2: 120 s nominal, jitter 0 -> half
    assert result.dead == {"c@x.org": "550 5.7.1 Recipient <c@x.org> not allowed"}
    assert result.last_reply == "450 4.2.0 Mailbox busy"


def test_transient_past_max_age_dies_with_the_last_reply() -> None:
    result = step(AttemptResult(transient={"b@x.org": "451 4.3.0 Try later"}), attempts=7, age=431990.0)
    assert result.retry == () and result.retry_at is None
    assert result.dead["b@x.org"] == "expired after 7 attempts over 431990 s; last reply: 451 4.3.0 Try later"
