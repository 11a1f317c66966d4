"""The rule engine is pure: its wall clock and its identifiers are injected.

Two engines given the same clock, the same id factory and the same inputs end in the same
state, snapshot for snapshot; the engine never reads the real time or draws random ids.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from cohort.coord.state import CapacityRule, CoordinatorError, CoordinatorState, bucket_taken


def fakes() -> tuple[Callable[[], float], Callable[[], str]]:
    ticks = itertools.count()
    ids = itertools.count()
    return (lambda: 1_000_000.0 + next(ticks)), (lambda: f"{next(ids):032x}")


def drive(s: CoordinatorState) -> dict[str, Any]:
    s.join(0.0, "s1", "server", "h:1")
    s.join(0.1, "s2", "server", "h:2", standby=True)
    s.join(0.2, "s3", "server", "h:3")
    s.join(0.3, "d1", "director", "h:9")
    s.create_bucket("b1")
    s.set_state(0.4, "s3", "draining")
    s.set_state(0.5, "s3", "alive")
    for m in ("s1", "s2", "d1"):
        s.heartbeat(2.0, m, s.members[m].incarnation)
    s.tick(3.0)  # s3's lease lapsed: the standby takes over its partitions
    s.join(3.5, "s3", "server", "h:3")
    return s.snapshot()


def test_same_inputs_same_state() -> None:
    a_clock, a_ids = fakes()
    b_clock, b_ids = fakes()
    a = drive(CoordinatorState(16, 2.0, clock=a_clock, new_id=a_ids))
    b = drive(CoordinatorState(16, 2.0, clock=b_clock, new_id=b_ids))
    assert a == b
    assert a["cluster_id"] == f"{0:032x}"
    # wall times and identifiers all came from the fakes
    assert all(e["time"] >= 1_000_000.0 for e in a["events"])
    assert all(m["joined_at"] >= 1_000_000.0 for m in a["members"])
    assert all(m["incarnation"].startswith("0000") for m in a["members"])
    assert a["buckets"][0]["created"] >= 1_000_000.0


def test_no_real_clock_or_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object) -> Any:
        raise AssertionError("the rule engine read the real clock or drew a uuid")

    clock, ids = fakes()
    s = CoordinatorState(16, 2.0, clock=clock, new_id=ids)
    s.capacity_schedule = [CapacityRule.parse("s1@00-24=2")]
    monkeypatch.setattr(time, "time", boom)
    monkeypatch.setattr(uuid, "uuid4", boom)
    drive(s)
    r = CoordinatorState.restore(s.snapshot(), 2.0, clock=clock, new_id=ids)
    r.join(5.0, "s4", "server", "h:4")
    r.create_bucket("b2")


def test_join_with_a_given_incarnation_and_expire() -> None:
    clock, ids = fakes()
    s = CoordinatorState(8, 2.0, clock=clock, new_id=ids)
    m = s.join(0.0, "s1", "server", "h:1", incarnation="inc-a", joined_at=42.0)
    assert (m.incarnation, m.joined_at) == ("inc-a", 42.0)
    s.join(0.0, "s2", "server", "h:2", incarnation="inc-b")
    epochs = {i: p.epoch for i, p in enumerate(s.partitions) if p.owner == "s1"}
    me = s.membership_epoch
    seq = s.event_seq
    assert not s.expire(1.0, "s1", "not-this-one")
    assert s.expire(1.0, "s1", "inc-a")
    assert s.members["s1"].state == "dead" and s.membership_epoch == me + 1
    assert all(
        s.partitions[i].owner == "s2" and s.partitions[i].epoch > e for i, e in epochs.items()
    )
    assert s.event_seq > seq and s.events[-2].kind == "member-dead"
    assert not s.expire(1.0, "s1", "inc-a")  # already dead: nothing happens twice


def test_bucket_rule() -> None:
    clock, ids = fakes()
    s = CoordinatorState(8, 2.0, clock=clock, new_id=ids)
    b = s.create_bucket("x", "t1")
    for tenant, code in (("t1", "BucketAlreadyOwnedByYou"), ("t2", "BucketAlreadyExists")):
        with pytest.raises(CoordinatorError) as e:
            s.create_bucket("x", tenant)
        assert e.value.code == code
        assert bucket_taken({"tenant": "t1"}, "x", tenant).code == code
    assert len(b.id) == 16
