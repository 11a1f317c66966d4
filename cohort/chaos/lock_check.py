"""Safety checks for distributed locks and partition-log ownership.

Lock intervals are recorded by lock holders on the shared monotonic clock: ``grant_time``
when the holder learned it holds the lock, ``release_time`` when it started to release it
(``None``: never released while observed, i.e. held until +infinity).  That is exactly the
span during which the holder *acts* as the owner, so two incompatible intervals on one
resource overlapping in time is a safety violation whatever the server believed.

Lock modes are the VMS/OpenVMS DLM modes.  Compatibility (``y`` = may be held together)::

          NL CR CW PR PW EX
      NL  y  y  y  y  y  y
      CR  y  y  y  y  y  n
      CW  y  y  y  n  n  n
      PR  y  y  n  y  n  n
      PW  y  y  n  n  n  n
      EX  y  n  n  n  n  n
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

Mode: TypeAlias = Literal["NL", "CR", "CW", "PR", "PW", "EX"]
MODES: tuple[Mode, ...] = ("NL", "CR", "CW", "PR", "PW", "EX")

_COMPAT_ROWS = {
    "NL": "yyyyyy",
    "CR": "yyyyyn",
    "CW": "yyynnn",
    "PR": "yynynn",
    "PW": "yynnnn",
    "EX": "ynnnnn",
}
COMPATIBLE: frozenset[tuple[str, str]] = frozenset(
    (a, b) for a, row in _COMPAT_ROWS.items() for b, c in zip(MODES, row, strict=True) if c == "y"
)


def compatible(a: str, b: str) -> bool:
    """Whether locks in modes ``a`` and ``b`` may be held on one resource at once."""
    if a not in _COMPAT_ROWS or b not in _COMPAT_ROWS:
        raise ValueError(f"unknown lock mode {a!r} or {b!r}")
    return (a, b) in COMPATIBLE


@dataclass(frozen=True, slots=True)
class LockInterval:
    """One grant as its holder saw it (``release_time`` ``None`` = still held)."""

    holder: str
    resource: str
    mode: str
    grant_time: float
    release_time: float | None
    fencing_token: int | None = None

    @property
    def end(self) -> float:
        return math.inf if self.release_time is None else self.release_time

    def to_dict(self) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "resource": self.resource,
            "mode": self.mode,
            "grant_time": self.grant_time,
            "release_time": self.release_time,
            "fencing_token": self.fencing_token,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LockInterval:
        return cls(
            str(d["holder"]),
            str(d["resource"]),
            str(d["mode"]),
            float(d["grant_time"]),
            None if d.get("release_time") is None else float(d["release_time"]),
            None if d.get("fencing_token") is None else int(d["fencing_token"]),
        )


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken safety property: ``kind`` names it, ``detail`` explains, ``items`` are the
    offending records (JSON-ready dicts)."""

    kind: str
    detail: str
    items: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail, "items": list(self.items)}


def check_lock_overlaps(intervals: Iterable[LockInterval]) -> list[Violation]:
    """Pairs of incompatible grants on one resource whose intervals overlap.

    Intervals are half-open ``[grant, release)``: a release and a grant at the same
    instant do not overlap.  A holder's own intervals are compared too (a second grant
    to the same holder while it still holds an incompatible one is equally unsafe).
    """
    by_res: dict[str, list[LockInterval]] = {}
    for iv in intervals:
        compatible(iv.mode, iv.mode)  # validates the mode
        by_res.setdefault(iv.resource, []).append(iv)
    out: list[Violation] = []
    for res, ivs in sorted(by_res.items()):
        ivs.sort(key=lambda i: (i.grant_time, i.end))
        active: list[LockInterval] = []
        for iv in ivs:
            active = [a for a in active if a.end > iv.grant_time]
            for a in active:
                if not compatible(a.mode, iv.mode):
                    out.append(
                        Violation(
                            "lock-overlap",
                            f"{res}: {a.holder} held {a.mode} [{a.grant_time}, {a.end}) while "
                            f"{iv.holder} was granted {iv.mode} at {iv.grant_time}",
                            (a.to_dict(), iv.to_dict()),
                        )
                    )
            active.append(iv)
    return out


def check_fencing_tokens(intervals: Iterable[LockInterval]) -> list[Violation]:
    """Fencing tokens must strictly increase in grant order, per resource.

    Grants at the same instant are unordered, so they only need distinct tokens.
    Intervals without a token are ignored.
    """
    by_res: dict[str, list[LockInterval]] = {}
    for iv in intervals:
        if iv.fencing_token is not None:
            by_res.setdefault(iv.resource, []).append(iv)
    out: list[Violation] = []
    for res, ivs in sorted(by_res.items()):
        ivs.sort(key=lambda i: i.grant_time)
        best: tuple[int, LockInterval] | None = None  # highest token granted strictly earlier
        i = 0
        while i < len(ivs):
            j = i
            while j < len(ivs) and ivs[j].grant_time == ivs[i].grant_time:
                j += 1
            same = [(iv.fencing_token or 0, iv) for iv in ivs[i:j]]
            seen: dict[int, LockInterval] = {}
            for tok, iv in same:
                if best is not None and tok <= best[0]:
                    out.append(
                        Violation(
                            "fencing-order",
                            f"{res}: {iv.holder} granted at {iv.grant_time} with token "
                            f"{tok} <= {best[0]} granted earlier to {best[1].holder} "
                            f"at {best[1].grant_time}",
                            (best[1].to_dict(), iv.to_dict()),
                        )
                    )
                if tok in seen:
                    out.append(
                        Violation(
                            "fencing-duplicate",
                            f"{res}: token {tok} granted to both {seen[tok].holder} "
                            f"and {iv.holder} at {iv.grant_time}",
                            (seen[tok].to_dict(), iv.to_dict()),
                        )
                    )
                seen[tok] = iv
            top = max(same, key=lambda p: p[0])
            if best is None or top[0] > best[0]:
                best = top
            i = j
    return out


def check_locks(intervals: Iterable[LockInterval]) -> list[Violation]:
    """Both lock checks: overlaps of incompatible modes and fencing-token order."""
    ivs = list(intervals)
    return check_lock_overlaps(ivs) + check_fencing_tokens(ivs)


def check_monotonic(
    records: Iterable[tuple[int, int]], *, kind: str, what: str = "epoch", strict_seq: bool = True
) -> list[Violation]:
    """``(seq, value)`` pairs sorted by ``seq`` must have non-decreasing ``value``.

    With ``strict_seq``, two records with the same ``seq`` are a violation too (two
    writers each believed they appended at that position).
    """
    recs = sorted(records, key=lambda r: r[0])
    out: list[Violation] = []
    hi: tuple[int, int] | None = None  # the record with the highest value so far
    prev: tuple[int, int] | None = None
    for rec in recs:
        seq, val = rec
        if strict_seq and prev is not None and prev[0] == seq:
            out.append(
                Violation(
                    kind,
                    f"two records at seq {seq} ({what}s {prev[1]} and {val})",
                    ({"seq": prev[0], what: prev[1]}, {"seq": seq, what: val}),
                )
            )
        if hi is not None and val < hi[1]:
            out.append(
                Violation(
                    kind,
                    f"record at seq {seq} has {what} {val} after seq {hi[0]} with {what} {hi[1]}",
                    ({"seq": hi[0], what: hi[1]}, {"seq": seq, what: val}),
                )
            )
        if hi is None or val > hi[1]:
            hi = rec
        prev = rec
    return out


def single_owner(records: Iterable[tuple[int, int]]) -> list[Violation]:
    """A partition log's ``(seq, epoch)`` records: epochs never decrease along ``seq``.

    A record from an older epoch after one from a newer epoch means a deposed owner kept
    appending after the new owner started: two owners at once (split brain).  Duplicate
    sequence numbers are reported as well.
    """
    return check_monotonic(records, kind="single-owner", what="epoch")


def fenced_writes(landed: Sequence[tuple[int, int]]) -> list[Violation]:
    """``(landing order, fencing token)`` of writes a lock protected: tokens must never
    decrease in the order the writes landed (a lower token landing later is a write by
    a deposed holder that the fence should have rejected).  One holder may write several
    times under one token, so equal tokens are allowed; landing positions must be unique.
    """
    return check_monotonic(landed, kind="fenced-write", what="token")
