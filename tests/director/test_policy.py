"""Director balancing policies (cohort.director.policy): pure choosers."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from cohort.director.policy import (
    Candidate,
    CapabilityWeighted,
    LeastOutstanding,
    NoCandidate,
    RoundRobin,
    Rule,
    Rules,
    from_config,
)
from cohort.director.policy import (
    Request as Req,
)

A = Candidate("a:1", "s1", owner=True)
B = Candidate("b:1", "s2")
C = Candidate("c:1", "s3")


def picks(chooser: object, req: Req, cands: list[Candidate], n: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        out[chooser.choose(req, cands).address] += 1  # type: ignore[attr-defined]
    return out


def test_round_robin_is_even_per_partition() -> None:
    rr = RoundRobin()
    assert picks(rr, Req(1), [A, B, C], 300) == {"a:1": 100, "b:1": 100, "c:1": 100}
    # interleaving another partition does not skew the first
    seq = [rr.choose(Req(p), [A, B]).address for _ in range(3) for p in (7, 8)]
    assert seq == ["a:1", "a:1", "b:1", "b:1", "a:1", "a:1"]


def test_empty_candidates_raise() -> None:
    for ch in (RoundRobin(), CapabilityWeighted(), LeastOutstanding(), Rules([])):
        with pytest.raises(NoCandidate):
            ch.choose(Req(0), [])


def test_capability_weighted_shares_and_interleaves() -> None:
    big = Candidate("big:1", capacity=3.0)
    small = Candidate("small:1", capacity=1.0)
    w = CapabilityWeighted()
    seq = [w.choose(Req(0), [big, small]).address for _ in range(8)]
    assert Counter(seq) == {"big:1": 6, "small:1": 2}
    assert "big:1,big:1,big:1,big:1" not in ",".join(seq)  # smooth, not bursty
    # a zero-capacity server gets nothing while others can serve
    idle = Candidate("idle:1", capacity=0.0)
    assert picks(w, Req(1), [big, idle], 20)["idle:1"] == 0


def test_capability_weighted_forgets_departed_candidates() -> None:
    w = CapabilityWeighted()
    picks(w, Req(0), [A, B, C], 10)
    assert picks(w, Req(0), [A, B], 10) == {"a:1": 5, "b:1": 5}


def test_least_outstanding_prefers_the_idle_server() -> None:
    lo = LeastOutstanding()
    a = lo.choose(Req(0), [A, B])
    lo.started(a)
    b = lo.choose(Req(0), [A, B])
    assert b != a  # the busy one is avoided
    lo.started(b)
    lo.started(b)
    assert lo.choose(Req(0), [A, B]) == a  # a: 1 in flight, b: 2
    lo.finished(b)
    lo.finished(b)
    lo.finished(a)
    assert lo.outstanding == {}
    # capacity scales what "busy" means
    big = Candidate("big:1", capacity=4.0)
    lo.started(big)
    lo.started(big)
    lo.started(A)
    assert lo.choose(Req(0), [A, big]) == big  # 2/4 < 1/1


def test_rules_route_a_tenant_to_tagged_servers() -> None:
    batch = Candidate("x:1", "s4", tags=frozenset({"batch"}))
    r = Rules([Rule(tag="batch", tenant="analytics")])
    assert picks(r, Req(0, tenant="analytics"), [A, B, batch], 10) == {"x:1": 10}
    # other tenants use everybody
    assert len(picks(r, Req(0, tenant="web"), [A, B, batch], 9)) == 3
    # nobody carries the tag: fall through (or refuse, if strict)
    assert picks(r, Req(0, tenant="analytics"), [A, B], 4) == {"a:1": 2, "b:1": 2}
    with pytest.raises(NoCandidate):
        Rules([Rule(tag="batch", tenant="analytics")], strict=True).choose(
            Req(0, tenant="analytics"), [A, B]
        )


def test_rules_follow_the_sun_by_hour() -> None:
    eu = Candidate("eu:1", tags=frozenset({"eu"}))
    us = Candidate("us:1", tags=frozenset({"us"}))
    hour = [9]

    def clock() -> float:
        t = list(time.localtime())
        t[3] = hour[0]
        return time.mktime(time.struct_time(t))

    r = Rules([Rule(tag="eu", hours="08-18"), Rule(tag="us", hours="18-08")], clock=clock)
    assert r.choose(Req(0), [eu, us]) == eu
    hour[0] = 23
    assert r.choose(Req(0), [eu, us]) == us
    hour[0] = 3  # the window wraps midnight
    assert r.choose(Req(0), [eu, us]) == us


def test_from_config() -> None:
    assert isinstance(from_config("round-robin"), RoundRobin)
    assert isinstance(from_config({"policy": "weighted"}), CapabilityWeighted)
    r = from_config(
        {
            "policy": "rules",
            "then": "least-outstanding",
            "rules": [{"tenant": "analytics", "tag": "batch"}, {"hours": "08-18", "tag": "eu"}],
        }
    )
    assert isinstance(r, Rules) and isinstance(r.inner, LeastOutstanding)
    assert r.rules[0] == Rule(tag="batch", tenant="analytics")
    with pytest.raises(ValueError):
        from_config("random")
    with pytest.raises(ValueError):
        from_config({"policy": "rules", "rules": [{"tag": "x", "hours": "25-3"}]})
