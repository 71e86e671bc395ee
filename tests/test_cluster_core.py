"""The pure part of the cluster's budget: each replica's share while Redis is unreachable."""

from __future__ import annotations

from relay.core.cluster import LocalBucket, fallback_bucket, replica_share


def test_the_share_is_the_budget_over_the_members_last_seen_rounded_up() -> None:
    assert replica_share(600, 3) == 200
    assert replica_share(100, 3) == 34  # three replicas admit 102: within the budget's rounding
    assert replica_share(600, 0) == 600  # never seen any other: all of it
    assert replica_share(2, 5) == 1  # never nothing: that would look like an outage
    assert replica_share(0, 3) == 0  # unlimited stays unlimited


def test_a_local_bucket_refills_continuously() -> None:
    bucket = LocalBucket(60, 60.0, tokens=2.0, updated=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(0.5)
    assert bucket.take(1.0)  # one a second at 60 a minute


def test_falling_back_mid_way_starts_empty_and_a_replica_that_never_shared_starts_full() -> None:
    mid_way = fallback_bucket(600, 3, now=10.0, was_shared=True)
    assert (mid_way.capacity, mid_way.tokens) == (200, 0.0)  # the shared bucket may have been spent
    assert not mid_way.take(10.0)
    assert mid_way.take(10.3)  # 200 a minute: one each 0.3 s
    alone = fallback_bucket(600, 1, now=0.0, was_shared=False)
    assert (alone.capacity, alone.tokens) == (600, 600.0)
