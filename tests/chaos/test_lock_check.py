"""Lock safety, fencing and single-owner checks."""

from __future__ import annotations

import itertools

import pytest

from cohort.chaos.lock_check import (
    MODES,
    LockInterval,
    check_fencing_tokens,
    check_lock_overlaps,
    check_locks,
    compatible,
    fenced_writes,
    single_owner,
)


def iv(
    holder: str,
    mode: str,
    g: float,
    r: float | None,
    tok: int | None = None,
    res: str = "r",
) -> LockInterval:
    return LockInterval(holder, res, mode, g, r, tok)


def test_compatibility_matrix() -> None:
    expect_incompatible = {
        ("CR", "EX"),
        ("CW", "PR"),
        ("CW", "PW"),
        ("CW", "EX"),
        ("PR", "PW"),
        ("PR", "EX"),
        ("PW", "PW"),
        ("PW", "EX"),
        ("EX", "EX"),
    }
    for a, b in itertools.product(MODES, MODES):
        bad = (a, b) in expect_incompatible or (b, a) in expect_incompatible
        assert compatible(a, b) is not bad, (a, b)
        assert compatible(a, b) == compatible(b, a)
    assert all(compatible("NL", m) for m in MODES)
    with pytest.raises(ValueError):
        compatible("XX", "EX")


def test_overlapping_exclusive_grants_detected() -> None:
    v = check_lock_overlaps([iv("a", "EX", 0, 10), iv("b", "EX", 5, 15)])
    assert len(v) == 1 and v[0].kind == "lock-overlap"
    assert {d["holder"] for d in v[0].items} == {"a", "b"}


def test_back_to_back_grants_are_fine() -> None:
    assert check_lock_overlaps([iv("a", "EX", 0, 10), iv("b", "EX", 10, 15)]) == []


def test_compatible_overlaps_and_other_resources_are_fine() -> None:
    ivs = [
        iv("a", "PR", 0, 10),
        iv("b", "PR", 1, 9),
        iv("c", "CR", 2, 20),
        iv("d", "NL", 3, 4),
        iv("e", "EX", 0, 10, res="other"),
        iv("f", "CW", 11, 12),  # CW with CR is fine, PR ones are released
    ]
    assert check_lock_overlaps(ivs) == []
    assert len(check_lock_overlaps([*ivs, iv("g", "PW", 5, 6)])) == 2  # vs both PR


def test_unreleased_lock_conflicts_with_everything_later() -> None:
    v = check_lock_overlaps([iv("zombie", "EX", 0, None), iv("b", "PR", 100, 101)])
    assert len(v) == 1


def test_fencing_tokens() -> None:
    good = [iv("a", "EX", 0, 1, 1), iv("b", "EX", 2, 3, 2), iv("c", "EX", 4, 5, 7)]
    assert check_fencing_tokens(good) == []
    bad = [*good, iv("d", "EX", 6, 7, 7)]
    v = check_fencing_tokens(bad)
    assert [x.kind for x in v] == ["fencing-order"]
    # shared grants at the same instant need distinct tokens, order among them is free
    same = [iv("a", "PR", 0, 1, 5), iv("b", "PR", 0, 1, 4), iv("c", "EX", 2, 3, 6)]
    assert check_fencing_tokens(same) == []
    dup = [iv("a", "PR", 0, 1, 5), iv("b", "PR", 0, 1, 5)]
    assert [x.kind for x in check_fencing_tokens(dup)] == ["fencing-duplicate"]
    # tokens are per resource
    assert check_fencing_tokens([iv("a", "EX", 0, 1, 9), iv("b", "EX", 2, 3, 1, "s")]) == []


def test_check_locks_combines_and_round_trips() -> None:
    a, b = iv("a", "EX", 0, 10, 2), iv("b", "EX", 5, 15, 1)
    kinds = sorted(v.kind for v in check_locks([a, b]))
    assert kinds == ["fencing-order", "lock-overlap"]
    assert LockInterval.from_dict(a.to_dict()) == a
    assert LockInterval.from_dict(iv("z", "NL", 1, None).to_dict()).release_time is None


def test_single_owner() -> None:
    assert single_owner([(1, 1), (2, 1), (3, 2), (4, 2), (5, 5)]) == []
    assert single_owner([(3, 2), (1, 1), (2, 1)]) == []  # order of input is irrelevant
    v = single_owner([(1, 1), (2, 2), (3, 1), (4, 2)])
    assert len(v) == 1 and v[0].kind == "single-owner"
    assert v[0].items == ({"seq": 2, "epoch": 2}, {"seq": 3, "epoch": 1})
    dup = single_owner([(1, 1), (2, 1), (2, 2)])
    assert [x.kind for x in dup] == ["single-owner"]
    assert "two records at seq 2" in dup[0].detail


def test_fenced_writes() -> None:
    assert fenced_writes([(0, 1), (1, 1), (2, 3), (3, 3)]) == []
    v = fenced_writes([(0, 1), (1, 3), (2, 2)])
    assert len(v) == 1 and v[0].kind == "fenced-write" and "token 2" in v[0].detail
