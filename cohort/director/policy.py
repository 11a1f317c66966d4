"""Director balancing policies: which server serves a request that several could serve.

Routing in Cohort is dictated by ownership for everything but one case: reads of a
partition that has read replicas (hot read-only spreading, ``Router.read``).  There the
owner and every replica holding the partition in PR can answer, and the director is free
to choose.  This module is the choice, as a pure, synchronous, I/O-free policy object:

* :class:`RoundRobin` - each partition's candidates in turn;
* :class:`CapabilityWeighted` - smooth weighted round robin by server capacity (the
  ``capacity`` each server joined with: a bigger machine gets proportionally more);
* :class:`LeastOutstanding` - the candidate with the fewest requests in flight from this
  director, relative to capacity (needs :meth:`Chooser.started` / :meth:`Chooser.finished`);
* :class:`Rules` - ordered rules (tenant, bucket, method, hours of the day) that restrict
  the candidates to servers carrying a tag, then delegate to another chooser; e.g.
  "tenant ``analytics`` to servers tagged ``batch``", or "between 08-18 prefer ``eu``"
  (follow-the-sun).  A rule whose tag no candidate carries falls through to the next.

Build one from configuration with :func:`from_config`; the director's ``--balance`` option
does, and :meth:`cohort.director.router.Router.read` asks it (see docs/architecture.md,
"Balancing policies").
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Candidate:
    """A server that can serve the request: the owner or a read replica."""

    address: str
    server: str = ""
    capacity: float = 1.0
    tags: frozenset[str] = frozenset()
    owner: bool = False


@dataclass(frozen=True)
class Request:
    partition: int
    bucket: str = ""
    tenant: str = "default"
    method: str = "obj.get"


class NoCandidate(Exception):
    """No server may serve the request (empty candidate list, or a strict rule)."""


class Chooser(Protocol):
    def choose(self, req: Request, candidates: Sequence[Candidate]) -> Candidate: ...
    def started(self, c: Candidate) -> None: ...
    def finished(self, c: Candidate) -> None: ...


class _Base:
    def started(self, c: Candidate) -> None:
        pass

    def finished(self, c: Candidate) -> None:
        pass


def _check(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise NoCandidate("no server can serve this request")


class RoundRobin(_Base):
    """Each partition's candidates in turn (a counter per partition, so two partitions
    read alternately do not both land on the owner)."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}

    def choose(self, req: Request, candidates: Sequence[Candidate]) -> Candidate:
        _check(candidates)
        i = self._next.get(req.partition, 0)
        self._next[req.partition] = i + 1
        return candidates[i % len(candidates)]


class CapabilityWeighted(_Base):
    """Smooth weighted round robin (as nginx): over any window, each candidate gets a
    share proportional to its capacity, interleaved rather than in bursts."""

    def __init__(self) -> None:
        self._current: dict[int, dict[str, float]] = {}

    def choose(self, req: Request, candidates: Sequence[Candidate]) -> Candidate:
        _check(candidates)
        cur = self._current.setdefault(req.partition, {})
        if cur and cur.keys() != {c.address for c in candidates}:
            cur.clear()  # readers came or went: start a fresh cycle, no debts carried over
        total = 0.0
        best: Candidate | None = None
        for c in candidates:
            w = max(c.capacity, 0.0)
            total += w
            cur[c.address] = cur.get(c.address, 0.0) + w
            if best is None or cur[c.address] > cur[best.address]:
                best = c
        assert best is not None
        cur[best.address] -= total
        return best


class LeastOutstanding(_Base):
    """Fewest requests in flight from this director, per unit of capacity; ties go round
    robin.  The caller reports :meth:`started` and :meth:`finished` around each request."""

    def __init__(self) -> None:
        self.outstanding: dict[str, int] = {}
        self._tie = 0

    def choose(self, req: Request, candidates: Sequence[Candidate]) -> Candidate:
        _check(candidates)

        def load(c: Candidate) -> float:
            return self.outstanding.get(c.address, 0) / max(c.capacity, 1e-9)

        low = min(load(c) for c in candidates)
        tied = [c for c in candidates if load(c) == low]
        self._tie += 1
        return tied[self._tie % len(tied)]

    def started(self, c: Candidate) -> None:
        self.outstanding[c.address] = self.outstanding.get(c.address, 0) + 1

    def finished(self, c: Candidate) -> None:
        n = self.outstanding.get(c.address, 0) - 1
        if n > 0:
            self.outstanding[c.address] = n
        else:
            self.outstanding.pop(c.address, None)


@dataclass
class Rule:
    """Requests matching every given field go to candidates tagged ``tag``.

    ``tenant``, ``bucket`` and ``method`` are shell patterns (``*`` matches all);
    ``hours`` is a daily ``HH-HH`` window in local time (``"22-06"`` wraps midnight).
    """

    tag: str
    tenant: str = "*"
    bucket: str = "*"
    method: str = "*"
    hours: str = ""

    def matches(self, req: Request, hour: int) -> bool:
        if not (
            fnmatch.fnmatchcase(req.tenant, self.tenant)
            and fnmatch.fnmatchcase(req.bucket, self.bucket)
            and fnmatch.fnmatchcase(req.method, self.method)
        ):
            return False
        if not self.hours:
            return True
        lo, _, hi = self.hours.partition("-")
        a, b = int(lo), int(hi)
        return a <= hour < b if a <= b else (hour >= a or hour < b)


@dataclass
class Rules(_Base):
    """The first matching rule whose tag some candidate carries restricts the candidates;
    ``inner`` chooses among them.  With ``strict``, a matching rule whose tag nobody
    carries raises :class:`NoCandidate` instead of falling through."""

    rules: list[Rule]
    inner: Chooser = field(default_factory=RoundRobin)
    strict: bool = False
    clock: Callable[[], float] = time.time

    def choose(self, req: Request, candidates: Sequence[Candidate]) -> Candidate:
        _check(candidates)
        hour = time.localtime(self.clock()).tm_hour
        for r in self.rules:
            if not r.matches(req, hour):
                continue
            pool = [c for c in candidates if r.tag in c.tags]
            if pool:
                return self.inner.choose(req, pool)
            if self.strict:
                raise NoCandidate(f"no candidate tagged {r.tag!r} for {req}")
        return self.inner.choose(req, candidates)

    def started(self, c: Candidate) -> None:
        self.inner.started(c)

    def finished(self, c: Candidate) -> None:
        self.inner.finished(c)


POLICIES: dict[str, Callable[[], Chooser]] = {
    "round-robin": RoundRobin,
    "weighted": CapabilityWeighted,
    "least-outstanding": LeastOutstanding,
}


def from_config(cfg: dict[str, Any] | str) -> Chooser:
    """A chooser from configuration, e.g. ``"weighted"`` or::

    {"policy": "rules", "then": "least-outstanding", "strict": false,
     "rules": [{"tenant": "analytics", "tag": "batch"},
               {"hours": "08-18", "tag": "eu"}]}
    """
    if isinstance(cfg, str):
        cfg = {"policy": cfg}
    name = cfg.get("policy", "round-robin")
    if name == "rules":
        inner = from_config(cfg.get("then", "round-robin"))
        rules = [Rule(**r) for r in cfg.get("rules", [])]
        for r in rules:
            if r.hours and not _valid_hours(r.hours):
                raise ValueError(f"rule hours must be HH-HH, not {r.hours!r}")
        return Rules(rules, inner, strict=bool(cfg.get("strict", False)))
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r} ({', '.join([*POLICIES, 'rules'])})")
    return POLICIES[name]()


def _valid_hours(s: str) -> bool:
    lo, sep, hi = s.partition("-")
    return bool(sep) and lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= 23 and 0 <= int(hi) <= 24
