"""Linearizability checking of per-key register histories (Wing-Gong / Lowe, as in Porcupine).

Model: each key is an independent register whose initial value is ``None`` (missing).
``put v`` sets it to ``v``; ``delete`` sets it to ``None``; ``get`` must return the current
value (``None`` = missing).  Registers are independent, so a history is linearizable iff
each key's sub-history is (locality), and keys are checked separately.

Operation outcomes (see :mod:`cohort.chaos.history`): ``fail`` operations are dropped;
``info`` operations may have taken effect at any point after their invocation, or not at
all — they are given a completion time of +infinity, which expresses both (an operation
linearized after everything else has no observable effect).  ``info`` reads carry no
information and are dropped, and so is an ``info`` write whose value no read ever
returned: omitting it is always at least as good as applying it.

The search is Lowe's refinement of Wing & Gong: the history is a doubly linked list of
call and return events; the search repeatedly linearizes a minimal pending call whose
model step is legal and backtracks at a return whose call was not linearized, memoising
every ``(set of linearized ops, model state)`` pair already explored so no configuration
is expanded twice.  The set is a Python ``int`` bitmask.

When a key is not linearizable, :func:`check_key` reports a small failing sub-history:
first the shortest failing time prefix (linearizability is prefix-closed, so this is a
binary search; the longest linearizable prefix plus the operation that cannot be placed),
then operations are removed while the rest stays non-linearizable, within a time budget.
Removal never drops the only write of a value some kept read returned, so the
counterexample keeps the reason (a stale read stays a stale read rather than degrading
into "read of a value never written").
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from cohort.chaos.history import History, Op, Value, ops_sorted

_PUT, _GET, _DEL = 0, 1, 2
_KIND = {"put": _PUT, "get": _GET, "delete": _DEL}


class _COp(NamedTuple):
    """An operation as the search sees it."""

    invoke: float
    end: float
    kind: int
    value: Value  # written value (put) or read value (get)
    skippable: bool  # unknown outcome: at its end it may be dropped instead of applied
    orig: Op


class Timeout(Exception):
    """The search exceeded its deadline."""


def prepare(ops: Iterable[Op]) -> list[_COp]:
    """Register operations of one key in the form the search uses (see :func:`_prepare`)."""
    return _prepare([(o, o) for o in ops])


def _prepare(pairs: Iterable[tuple[Op, Op]]) -> list[_COp]:
    """``(effective op, op to report)`` pairs of one key as search operations.

    ``fail`` ops and unknown-outcome reads are dropped.  An unknown-outcome write can take
    effect at any time after its invocation or never; rather than give it an infinite
    end, which would keep it concurrent with the whole rest of the history, it is given
    the latest end at which applying it can still matter, and is *skippable*: when the
    search reaches that end without having applied it, it may drop it instead.

    * If it is the only write of a value that some read returned, it must have taken
      effect before every such read: its end is the earliest end of those reads.
    * Otherwise (shared value, e.g. deletes) applying it after the last read of its value
      is equivalent to never applying it (nobody can observe it before the next write):
      its end is the latest end of those reads; with no such read it is dropped.
    """
    kept = [(o, r) for o, r in pairs if o.kind in _KIND and o.result != "fail"]
    read_ends: dict[Any, list[float]] = {}
    for o, _ in kept:
        if o.kind == "get" and o.result == "ok" and o.complete is not None:
            read_ends.setdefault(_vkey(o.read_value), []).append(o.complete)
    writers: dict[Any, int] = {}
    for o, _ in kept:
        if o.kind in ("put", "delete"):
            vk = _vkey(o.value if o.kind == "put" else None)
            writers[vk] = writers.get(vk, 0) + 1
    out: list[_COp] = []
    for o, r in kept:
        k = _KIND[o.kind]
        unknown = o.result == "info" or o.complete is None
        if k == _GET:
            if not unknown:
                out.append(_COp(o.invoke, o.end, k, o.read_value, False, r))
            continue
        v = o.value if k == _PUT else None
        if not unknown:
            out.append(_COp(o.invoke, o.end, k, v, False, r))
            continue
        vk = _vkey(v)
        ends = [e for e in read_ends.get(vk, ()) if e >= o.invoke]
        if not ends:
            continue  # never observed afterwards: omitting it is always a valid choice
        end = min(ends) if writers[vk] == 1 and vk != _vkey(None) else max(ends)
        out.append(_COp(o.invoke, end, k, v, True, r))
    out.sort(key=lambda c: (c.invoke, c.end))
    return out


def _vkey(v: Value) -> tuple[str, Value]:
    # b"x" and "x" are different values; keep them apart in sets
    return (type(v).__name__, v)


def _search(
    cops: Sequence[_COp],
    initial: Value,
    deadline: float | None,
    stuck: list[float] | None = None,
) -> bool:
    """WGL search; True iff linearizable.  Raises :class:`Timeout` past ``deadline``.

    When not linearizable and ``stuck`` is given, appends the time of the furthest return
    event the search reached: the history cut there is the shortest failing prefix.
    """
    furthest = -1
    n = len(cops)
    if n == 0:
        return True
    events: list[tuple[float, int, int]] = []
    for i, c in enumerate(cops):
        events.append((c.invoke, 0, i))
        # at equal times calls sort before returns: such operations count as concurrent
        events.append((c.end, 1, i))
    events.sort()
    head, tail = 0, 2 * n + 1
    nxt = [*range(1, 2 * n + 2), tail]
    prv = [0, *range(0, 2 * n + 1)]
    op_of = [-1] * (2 * n + 2)
    match = [0] * (2 * n + 2)  # call node -> its return node; 0 for return nodes
    call_node = [0] * n
    ret_node = [0] * n
    for pos, (_, typ, i) in enumerate(events, start=1):
        op_of[pos] = i
        if typ == 0:
            call_node[i] = pos
        else:
            ret_node[i] = pos
    for i in range(n):
        match[call_node[i]] = ret_node[i]
    kinds = [c.kind for c in cops]
    values = [c.value for c in cops]
    skippable = [c.skippable for c in cops]
    # Symmetry reduction: unknown-outcome writes of the same value with the same end are
    # interchangeable once all are pending, so only the earliest invoked unlinearized one
    # may be applied (``before[i]``: the bits that must be linearized first).  Without
    # this, k pending timed-out deletes multiply the configurations by up to 2**k.
    before = [0] * n
    groups: dict[tuple[int, Any, float], int] = {}
    for i, c in enumerate(cops):  # cops are in invocation order
        if c.skippable:
            g = (c.kind, _vkey(c.value), c.end)
            before[i] = groups.get(g, 0)
            groups[g] = before[i] | (1 << i)

    state: Value = initial
    lin = 0
    seen: set[tuple[int, Value]] = set()
    # frames: (call node, state before, skipped instead of applied)
    stack: list[tuple[int, Value, bool]] = []
    entry = nxt[head]
    steps = 0
    while nxt[head] != tail:
        steps += 1
        if deadline is not None and steps & 0xFFF == 0 and time.monotonic() > deadline:
            raise Timeout
        ret = match[entry]
        if ret:  # a call: try to linearize it here
            i = op_of[entry]
            k = kinds[i]
            if k == _GET:
                v = values[i]
                legal = v == state and type(v) is type(state)
                new = state
            else:
                legal = lin & before[i] == before[i]
                new = values[i] if k == _PUT else None
            if legal:
                nl = lin | (1 << i)
                conf = (nl, new)
                if conf not in seen:
                    seen.add(conf)
                    stack.append((entry, state, False))
                    state, lin = new, nl
                    # lift the call and its return out of the list
                    nxt[prv[entry]] = nxt[entry]
                    prv[nxt[entry]] = prv[entry]
                    nxt[prv[ret]] = nxt[ret]
                    prv[nxt[ret]] = prv[ret]
                    entry = nxt[head]
                    continue
            entry = nxt[entry]
            continue
        # a return whose call is not linearized yet
        i = op_of[entry]
        if skippable[i]:
            nl = lin | (1 << i)
            conf = (nl, state)
            if conf not in seen:
                # drop the unknown-outcome write: it never took effect
                seen.add(conf)
                call = call_node[i]
                stack.append((call, state, True))
                lin = nl
                nxt[prv[call]] = nxt[call]
                prv[nxt[call]] = prv[call]
                nxt[prv[entry]] = nxt[entry]
                prv[nxt[entry]] = prv[entry]
                entry = nxt[head]
                continue
        # backtrack: undo the latest choice; an undone skip is no choice, so keep undoing
        furthest = max(furthest, entry)
        while True:
            if not stack:
                if stuck is not None:
                    stuck.append(events[furthest - 1][0])
                return False
            entry, state, skipped = stack.pop()
            lin &= ~(1 << op_of[entry])
            ret = match[entry]
            # unlift in reverse order of lifting
            nxt[prv[ret]] = ret
            prv[nxt[ret]] = ret
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry
            if not skipped:
                break
        entry = nxt[entry]
    return True


def check_register(
    ops: Sequence[Op], *, initial: Value = None, timeout: float | None = None
) -> bool | None:
    """Whether the register operations ``ops`` (any keys are treated as one register) are
    linearizable; ``None`` if the search did not finish within ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        return _search(prepare(ops), initial, deadline)
    except Timeout:
        return None


@dataclass(slots=True)
class KeyResult:
    """The verdict for one key.

    ``linearizable`` is ``None`` when the search gave up (time limit).  When it is
    ``False``, ``counterexample`` is a non-linearizable sub-history (original ``Op``
    objects, by invocation time) and ``reason`` describes it.
    """

    key: str
    linearizable: bool | None
    ops: int
    elapsed: float
    counterexample: list[Op] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "linearizable": self.linearizable,
            "ops": self.ops,
            "elapsed": round(self.elapsed, 6),
            "reason": self.reason,
            "counterexample": [o.to_dict() for o in self.counterexample],
        }


@dataclass(slots=True)
class LinearizabilityReport:
    """Per-key verdicts; ``ok`` is False if any key failed, None if any was undecided."""

    keys: dict[str, KeyResult]

    @property
    def ok(self) -> bool | None:
        verdicts = [r.linearizable for r in self.keys.values()]
        if False in verdicts:
            return False
        if None in verdicts:
            return None
        return True

    def failures(self) -> list[KeyResult]:
        return [r for r in self.keys.values() if r.linearizable is False]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "keys": {k: r.to_dict() for k, r in self.keys.items()}}


_Pair = tuple[Op, Op]  # (operation as checked, operation as reported)


def _truncate(pairs: Sequence[_Pair], t: float) -> list[_Pair]:
    """The history as it stood at time ``t``: later calls removed, operations still running
    at ``t`` become pending (writes: unknown outcome; reads: dropped)."""
    out: list[_Pair] = []
    for o, r in pairs:
        if o.invoke > t:
            continue
        if o.end > t:
            if o.kind == "get":
                continue
            o = replace(o, result="info", complete=None)
        out.append((o, r))
    return out


def _fails(pairs: Sequence[_Pair], initial: Value, deadline: float | None) -> bool:
    return not _search(_prepare(pairs), initial, deadline)


def _failing_prefix(
    pairs: Sequence[_Pair], initial: Value, deadline: float, hint: float | None = None
) -> tuple[list[_Pair], float] | None:
    """The shortest failing time prefix of a non-linearizable history, and its cut time.

    Linearizability is prefix-closed, so this is a binary search over completion times;
    ``hint`` (where a full search got stuck) is tried first as the upper bound.
    """
    times = sorted({o.complete for o, _ in pairs if o.result == "ok" and o.complete is not None})
    if not times:
        return None
    lo, hi = 0, len(times) - 1  # invariant: the prefix cut at times[hi] fails
    if hint is not None:
        h = bisect.bisect_left(times, hint)
        if h < len(times) and _fails(_truncate(pairs, times[h]), initial, deadline):
            hi = h
            # the search got no further than the hint, so shorter cuts will mostly pass:
            # probe just below it before bisecting
            if h > 0 and not _fails(_truncate(pairs, times[h - 1]), initial, deadline):
                return _truncate(pairs, times[h]), times[h]
    elif not _fails(_truncate(pairs, times[hi]), initial, deadline):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if _fails(_truncate(pairs, times[mid]), initial, deadline):
            hi = mid
        else:
            lo = mid + 1
    return _truncate(pairs, times[hi]), times[hi]


def _shrink(pairs: list[_Pair], initial: Value, deadline: float) -> list[_Pair]:
    """Greedily remove operations (chunks, then singles) while the rest stays failing.

    Only removals that cannot create a violation are tried, so what is left is evidence
    against the whole history: a read may always go (dropping it from a valid order
    leaves a valid order), a put only once no remaining read returned its value, and a
    delete only once no remaining read returned "missing".  (Removing a write some read
    depends on can make a linearizable history fail; an earlier greedy shrinker did that
    and reported a misleading counterexample.)
    """

    def removable(gone: Sequence[_Pair], rest: Sequence[_Pair]) -> bool:
        read = {_vkey(o.read_value) for o, _ in rest if o.kind == "get"}
        for o, _ in gone:
            if o.kind == "put" and _vkey(o.value) in read:
                return False
            if o.kind == "delete" and _vkey(None) in read:
                return False
        return True

    def fails(sub: Sequence[_Pair]) -> bool:
        if not sub:
            return False
        try:
            return _fails(sub, initial, deadline)
        except Timeout:
            return False

    cur = list(pairs)
    chunk = max(1, len(cur) // 2)
    while True:
        before = len(cur)
        i = 0
        while i < len(cur):
            if time.monotonic() > deadline:
                return cur
            cand = cur[:i] + cur[i + chunk :]
            if removable(cur[i : i + chunk], cand) and fails(cand):
                cur = cand
            else:
                i += chunk
        if chunk > 1:
            chunk //= 2
        elif len(cur) == before:
            return cur
        # else: reads removed in this pass may have made earlier writes removable


def check_key(
    key: str,
    ops: Sequence[Op],
    *,
    initial: Value = None,
    timeout: float | None = 60.0,
    shrink_budget: float = 10.0,
) -> KeyResult:
    """Check one key's operations; on failure find a small counterexample.

    ``timeout`` bounds the main search (``None``: unbounded); ``shrink_budget`` bounds the
    extra time spent minimising a counterexample (the result is then merely small).
    """
    t0 = time.monotonic()
    pairs = [(o, o) for o in ops if o.kind in _KIND]
    cops = _prepare(pairs)
    # Any write, even one that failed or whose value was never read, can justify a read;
    # a read of a value no operation ever wrote is the plainest violation.
    written = {_vkey(o.value) for o in ops if o.kind == "put"}
    applicable = {_vkey(o.value) for o in ops if o.kind == "put" and o.result != "fail"}
    for c in cops:
        if c.kind != _GET or c.value is None:
            continue
        vk = _vkey(c.value)
        if vk not in written:
            return KeyResult(
                key, False, len(cops), time.monotonic() - t0, [c.orig],
                f"read of a value never written: {c.value!r}",
            )  # fmt: skip
        if vk not in applicable:
            failed = [o for o in ops if o.kind == "put" and _vkey(o.value) == vk]
            return KeyResult(
                key, False, len(cops), time.monotonic() - t0, ops_sorted([*failed, c.orig]),
                f"read of {c.value!r}, whose only write was reported failed (definitely "
                "not applied): the failure report or its classification is wrong",
            )  # fmt: skip
    deadline = None if timeout is None else t0 + timeout
    stuck: list[float] = []
    try:
        ok = _search(cops, initial, deadline, stuck)
    except Timeout:
        return KeyResult(key, None, len(cops), time.monotonic() - t0, [], "search timed out")
    if ok:
        return KeyResult(key, True, len(cops), time.monotonic() - t0)
    shrink_deadline = time.monotonic() + shrink_budget
    reason = "not linearizable"
    sub: list[_Pair] = [(c.orig, c.orig) for c in cops]
    try:
        pref = _failing_prefix(sub, initial, shrink_deadline, stuck[0] if stuck else None)
    except Timeout:
        pref = None
    if pref is not None:
        sub, cut = pref
        blocked = [r for o, r in sub if o.complete == cut and o.result == "ok"]
        reason = (
            "not linearizable; no valid order once "
            + ", ".join(r.describe() for r in blocked)
            + " completed"
        )
        sub = _shrink(sub, initial, shrink_deadline)
    counter = ops_sorted([r for _, r in sub])
    return KeyResult(key, False, len(cops), time.monotonic() - t0, counter, reason)


def check_history(
    history: History | Sequence[Op],
    *,
    initial: Value = None,
    timeout_per_key: float | None = 60.0,
    shrink_budget: float = 10.0,
) -> LinearizabilityReport:
    """Check every key's register sub-history (``lock``/``unlock`` ops are ignored)."""
    ops = history.ops if isinstance(history, History) else list(history)
    by_key: dict[str, list[Op]] = {}
    for o in ops:
        if o.kind in _KIND:
            by_key.setdefault(o.key, []).append(o)
    results = {
        k: check_key(k, v, initial=initial, timeout=timeout_per_key, shrink_budget=shrink_budget)
        for k, v in sorted(by_key.items())
    }
    return LinearizabilityReport(results)


def lost_acknowledged_writes(ops: Sequence[Op], final: Value) -> list[Op]:
    """Acknowledged writes of one key that vanished.

    ``final`` is the key's value read after the cluster healed and settled.  An ``ok``
    ``put`` is lost when ``final`` is not its value and no other write (``put`` or
    ``delete``, acknowledged or of unknown outcome) could have been ordered after it,
    i.e. every other write completed before the put was invoked.  An ``ok`` ``delete``
    is lost likewise when ``final`` is not ``None``.
    """
    writes = [o for o in ops if o.kind in ("put", "delete") and o.result != "fail"]
    lost: list[Op] = []
    for w in writes:
        if w.result != "ok":
            continue
        mine = w.value if w.kind == "put" else None
        if _vkey(mine) == _vkey(final):
            continue
        if any(o is not w and o.end > w.invoke for o in writes):
            continue  # a later or concurrent write may legitimately have replaced it
        lost.append(w)
    return lost
