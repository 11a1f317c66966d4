"""The coordinator's pure state machine: assignment, failover, standby and failback."""

from __future__ import annotations

from collections import Counter

import pytest

from cohort.coord.state import CoordinatorError, CoordinatorState


def owners(s: CoordinatorState) -> Counter[str | None]:
    return Counter(p.owner for p in s.partitions)


def cluster(
    n: int, *, standby: int = 0, failback: str = "immediate", P: int = 60
) -> CoordinatorState:
    s = CoordinatorState(P, lease_ttl=2.0, failback=failback)
    for i in range(1, n + 1):
        s.join(0.0, f"s{i}", "server", f"h:{i}")
    for i in range(1, standby + 1):
        s.join(0.0, f"sb{i}", "server", f"h:9{i}", standby=True)
    return s


def test_even_assignment_and_epochs() -> None:
    s = cluster(3)
    assert owners(s) == {"s1": 20, "s2": 20, "s3": 20}
    assert all(p.epoch >= 1 for p in s.partitions)


def test_weighted_capacity() -> None:
    s = CoordinatorState(60, 2.0)
    s.join(0.0, "big", "server", "h:1", capacity=2.0)
    s.join(0.0, "small", "server", "h:2", capacity=1.0)
    assert owners(s) == {"big": 40, "small": 20}


def test_lease_expiry_moves_partitions_with_new_epochs() -> None:
    s = cluster(3)
    before = {i: p.epoch for i, p in enumerate(s.partitions) if p.owner == "s2"}
    s.heartbeat(1.9, "s1", s.members["s1"].incarnation)
    s.heartbeat(1.9, "s3", s.members["s3"].incarnation)
    assert s.tick(2.5)
    assert s.members["s2"].state == "dead"
    assert owners(s) == {"s1": 30, "s3": 30}
    assert all(s.partitions[i].epoch > e for i, e in before.items())
    with pytest.raises(CoordinatorError):
        s.heartbeat(2.6, "s2", "stale")


def test_standby_takes_over_a_failed_server_and_fails_back() -> None:
    s = cluster(3, standby=1)
    assert owners(s)["sb1"] == 0  # a standby carries nothing while all is well
    failed = {i for i, p in enumerate(s.partitions) if p.owner == "s2"}
    for m in ("s1", "s3", "sb1"):
        s.heartbeat(1.9, m, s.members[m].incarnation)
    s.tick(2.5)
    assert {i for i, p in enumerate(s.partitions) if p.owner == "sb1"} == failed
    assert owners(s)["s1"] == 20 and owners(s)["s3"] == 20  # survivors keep their share
    s.join(3.0, "s2", "server", "h:2")  # the failed server comes back
    assert owners(s) == {"s1": 20, "s2": 20, "s3": 20}  # immediate failback


def test_failback_never_and_windows() -> None:
    s = cluster(2, standby=1, failback="never")
    for m in ("s1", "sb1"):
        s.heartbeat(1.9, m, s.members[m].incarnation)
    s.tick(2.5)
    assert owners(s)["sb1"] == 30
    s.join(3.0, "s2", "server", "h:2")
    assert owners(s)["sb1"] == 30  # never: the standby keeps them
    w = cluster(2, standby=1, failback="2-4")
    w.clock = lambda: 0.0  # 00:00 UTC-ish: outside the window in most time zones
    import time

    hour = time.localtime(0.0).tm_hour
    for m in ("s1", "sb1"):
        w.heartbeat(1.9, m, w.members[m].incarnation)
    w.tick(2.5)
    w.join(3.0, "s2", "server", "h:2")
    assert (owners(w)["sb1"] == 0) == (2 <= hour < 4)
    with pytest.raises(ValueError):
        CoordinatorState(8, failback="sometimes")


def test_drain_and_standby_toggles() -> None:
    s = cluster(3)
    s.set_state(1.0, "s3", "draining")
    assert owners(s) == {"s1": 30, "s2": 30}
    s.set_state(1.0, "s3", "alive")
    assert owners(s) == {"s1": 20, "s2": 20, "s3": 20}
    s.set_state(1.0, "s1", "standby")
    assert owners(s)["s1"] == 0
    s.set_state(1.0, "s1", "active")
    assert owners(s) == {"s1": 20, "s2": 20, "s3": 20}
    with pytest.raises(CoordinatorError):
        s.set_state(1.0, "s1", "bogus")
    with pytest.raises(CoordinatorError):
        s.set_state(1.0, "nobody", "draining")


def test_partition_lock_is_exclusive_and_waits_for_release() -> None:
    s = cluster(2)
    p = next(i for i, x in enumerate(s.partitions) if x.owner == "s1")
    inc1, inc2 = s.members["s1"].incarnation, s.members["s2"].incarnation
    token = s.acquire_partition(0.0, "s1", inc1, p)
    with pytest.raises(CoordinatorError) as e:
        s.acquire_partition(0.0, "s2", inc2, p)
    assert e.value.code == "NotOwner"
    s.set_state(0.5, "s1", "draining")  # the map moves p to s2 ...
    assert s.partitions[p].owner == "s2"
    with pytest.raises(CoordinatorError) as e:
        s.acquire_partition(0.5, "s2", inc2, p)  # ... but s1 still holds the lock
    assert e.value.code == "Busy"
    s.release_partition(0.6, "s1", inc1, p)
    assert s.acquire_partition(0.7, "s2", inc2, p) > token  # fencing token grew
