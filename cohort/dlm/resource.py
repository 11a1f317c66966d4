"""The pure lock-table core: resources, their queues, and the grant rules.

No I/O, no asyncio, no clock of its own: a :class:`LockTable` is driven by method calls
(``request``, ``convert``, ``release``, ``cancel``, ``drop_node``, ``tick(now)``, ...)
and each call returns the list of :class:`Event` it caused (``Granted``, ``Blocking``,
``Denied``).  The caller (the lock agent on the resource's master node, or a test)
delivers them.  This is the "sans-I/O" shape of h11 and etcd's raft.

Grant rules (VMS):

* Each resource has a *granted* set, a *converting* queue and a *waiting* queue.
* A new request is granted at once iff it is compatible with every granted lock whose
  byte range overlaps it, and no converting or waiting lock with an overlapping range is
  queued (strict FIFO, so a stream of PR can never starve a waiting EX).  ``EXPEDITE``
  drops the queue-order condition (compatibility with granted locks is still required).
* A conversion is granted at once iff compatible with every *other* granted lock; with
  ``QUECVT`` it must also not overtake an overlapping conversion already queued.
  Otherwise it joins the converting queue, keeping its old mode meanwhile.
* When anything leaves or changes, conversions are served first (in order), then waiters
  (in order); a blocked entry blocks later entries whose ranges overlap it.
* ``NOQUEUE``: a request (or conversion) not grantable at once is denied, not queued.
* Blocking notifications: every granted lock that asked for them (``BLOCKING`` flag) and
  stands in the way of a queued request gets ``Blocking(key, mode)`` with the strongest
  mode it blocks; it is re-notified only for a stronger mode or after its mode changed.
* Value block (≤ 64 bytes): read by every grant; written by ``release``/down-``convert``
  of a PW/EX lock that passes a value.  ``drop_node`` of a node holding PW/EX marks it
  invalid and records the node as ``dead_holder``; every later grant reports it until a
  PW/EX grant (the holder that replays the dead node's work) clears it.
* Fencing token: per resource, incremented on every grant and granted conversion; it
  starts at ``epoch << 32`` when a resource is created so it stays monotonic when a
  resource is re-created on a new master after a membership change.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from cohort.dlm.modes import COMPAT_MASK, Mode

#: Byte ranges are half-open ``[start, end)``; a whole-resource lock covers all of it.
RANGE_MAX = (1 << 63) - 1
VALUE_BLOCK_SIZE = 64

#: Request flags (a bit set; travels in messages as one small int).
NOQUEUE = 1
QUECVT = 2
BLOCKING = 4  # the holder wants blocking notifications
EXPEDITE = 8  # grant if compatible with the granted set, regardless of queue order

WAITING = 0
GRANTED = 1
CONVERTING = 2

LockKey = Hashable


@dataclass(slots=True)
class Granted:
    """``key`` now holds ``mode`` (a new grant or a granted conversion)."""

    key: Any
    mode: int
    token: int
    value: bytes
    value_valid: bool
    dead_holder: str | None


@dataclass(slots=True)
class Blocking:
    """The granted lock ``key`` blocks a queued request for ``mode``."""

    key: Any
    mode: int


@dataclass(slots=True)
class Denied:
    """The request (or conversion) of ``key`` was refused: ``reason`` is ``notqueued``,
    ``timeout``, ``deadlock`` or ``cancelled``.  A refused conversion keeps its old mode
    (``still_granted`` is then True)."""

    key: Any
    reason: str
    still_granted: bool = False


Event = Granted | Blocking | Denied


class Lock:
    """One lock (granted, converting or waiting) on a resource."""

    __slots__ = (
        "bast_mode",
        "deadline",
        "end",
        "flags",
        "key",
        "mode",
        "node",
        "owner",
        "resource",
        "rqmode",
        "start",
        "state",
        "token",
    )

    def __init__(
        self,
        key: Any,
        node: str,
        owner: Any,
        rqmode: int,
        flags: int,
        start: int,
        end: int,
        resource: Resource,
    ) -> None:
        self.key = key
        self.node = node
        self.owner = owner
        self.mode = -1  # granted mode; -1 while waiting
        self.rqmode = rqmode
        self.flags = flags
        self.start = start
        self.end = end
        self.state = WAITING
        self.bast_mode = -1
        self.deadline: float | None = None
        self.resource = resource
        self.token = 0

    def overlaps(self, other: Lock) -> bool:
        return self.start < other.end and other.start < self.end

    def __repr__(self) -> str:
        m = Mode(self.mode).name if self.mode >= 0 else "-"
        return f"Lock({self.key!r}, {m}->{Mode(self.rqmode).name}, state={self.state})"


class Resource:
    """A named resource: its three queues, value block and fencing-token counter."""

    __slots__ = (
        "converting",
        "dead_holder",
        "granted",
        "name",
        "token",
        "valid",
        "value",
        "waiting",
    )

    def __init__(self, name: str, token_base: int) -> None:
        self.name = name
        self.granted: dict[Any, Lock] = {}
        self.converting: list[Lock] = []
        self.waiting: list[Lock] = []
        self.value = b""
        self.valid = True
        self.token = token_base
        self.dead_holder: str | None = None

    @property
    def idle(self) -> bool:
        return not self.granted and not self.converting and not self.waiting

    def snapshot(self) -> dict[str, Any]:
        """A plain description (for tests, the dashboard and scenario files)."""
        return {
            "granted": [(lk.key, Mode(lk.mode).name) for lk in self.granted.values()],
            "converting": [(lk.key, Mode(lk.rqmode).name) for lk in self.converting],
            "waiting": [(lk.key, Mode(lk.rqmode).name) for lk in self.waiting],
            "value": self.value,
            "valid": self.valid,
            "token": self.token,
            "dead_holder": self.dead_holder,
        }


def _blocked_by_granted(res: Resource, lk: Lock, mode: int) -> bool:
    """True iff some other granted lock with an overlapping range is incompatible."""
    mask = COMPAT_MASK[mode]
    for g in res.granted.values():
        if g is not lk and not (mask >> g.mode) & 1 and g.start < lk.end and lk.start < g.end:
            return True
    return False


class LockTable:
    """All resources mastered by one node.  Deterministic; returns events, does no I/O.

    Lock keys are any hashable chosen by the caller and must be unique in the table (the
    agent uses ``(node_id, local_id)``).  ``node`` tells which node a lock belongs to, so
    that :meth:`drop_node` can remove a dead node's locks.  ``owner`` identifies the
    party (e.g. task or transaction) for deadlock detection.
    """

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        self.resources: dict[str, Resource] = {}
        self.locks: dict[Any, Lock] = {}

    # ---------------------------------------------------------------- helpers
    def resource(self, name: str) -> Resource:
        """The resource ``name``, created (idle, valid empty value) if unknown."""
        res = self.resources.get(name)
        if res is None:
            res = self.resources[name] = Resource(name, self.epoch << 32)
        return res

    def _grant(self, res: Resource, lk: Lock, events: list[Event]) -> None:
        res.token += 1
        lk.token = res.token
        lk.mode = lk.rqmode
        lk.state = GRANTED
        lk.bast_mode = -1
        lk.deadline = None
        res.granted[lk.key] = lk
        dead = res.dead_holder
        if lk.mode >= Mode.PW:
            # the PW/EX holder is the one responsible for replaying the dead node's work
            res.dead_holder = None
        events.append(Granted(lk.key, lk.mode, lk.token, res.value, res.valid, dead))

    def _process(self, res: Resource, events: list[Event]) -> None:
        """Grant whatever the rules allow, then send due blocking notifications."""
        blocked: list[Lock] = []
        if res.converting:
            keep: list[Lock] = []
            for lk in res.converting:
                if any(b.overlaps(lk) for b in keep) or _blocked_by_granted(res, lk, lk.rqmode):
                    keep.append(lk)
                else:
                    self._grant(res, lk, events)
            res.converting = keep
            blocked.extend(keep)
        if res.waiting:
            keep = []
            for lk in res.waiting:
                if (
                    not (lk.flags & EXPEDITE)
                    and (any(b.overlaps(lk) for b in blocked) or any(b.overlaps(lk) for b in keep))
                ) or _blocked_by_granted(res, lk, lk.rqmode):
                    keep.append(lk)
                else:
                    self._grant(res, lk, events)
            res.waiting = keep
            blocked.extend(keep)
        if blocked:
            self._basts(res, blocked, events)

    @staticmethod
    def _basts(res: Resource, blocked: list[Lock], events: list[Event]) -> None:
        for g in res.granted.values():
            if not g.flags & BLOCKING:
                continue
            want = -1
            for w in blocked:
                if w is g or not (g.start < w.end and w.start < g.end):
                    continue
                if not (COMPAT_MASK[w.rqmode] >> g.mode) & 1 and w.rqmode > want:
                    want = w.rqmode
            if want > g.bast_mode:
                g.bast_mode = want
                events.append(Blocking(g.key, want))

    # ---------------------------------------------------------------- operations
    def request(
        self,
        name: str,
        key: Any,
        mode: int,
        *,
        node: str = "",
        owner: Any = None,
        flags: int = 0,
        start: int = 0,
        end: int = RANGE_MAX,
        deadline: float | None = None,
    ) -> list[Event]:
        """Ask for a new lock ``key`` on ``name`` in ``mode`` over ``[start, end)``.

        Returns ``[Granted]`` (plus nothing else) when granted at once, ``[Denied
        notqueued]`` under NOQUEUE, or the blocking notifications the queued request
        causes.  ``deadline`` is compared with the ``now`` given to :meth:`tick`.
        Raises ``ValueError`` if ``key`` is already in use or the range is empty.
        """
        if key in self.locks:
            raise ValueError(f"lock key {key!r} already in use")
        if not 0 <= start < end:
            raise ValueError(f"empty or negative byte range [{start}, {end})")
        res = self.resources.get(name)
        if res is None:
            res = self.resources[name] = Resource(name, self.epoch << 32)
        lk = Lock(key, node, owner, mode, flags, start, end, res)
        events: list[Event] = []
        if not res.granted and not res.converting and not res.waiting:
            # the fast path: nothing else on the resource
            self.locks[key] = lk
            self._grant(res, lk, events)
            return events
        queued_overlap = not (flags & EXPEDITE) and (
            any(c.overlaps(lk) for c in res.converting) or any(w.overlaps(lk) for w in res.waiting)
        )
        if not queued_overlap and not _blocked_by_granted(res, lk, mode):
            self.locks[key] = lk
            self._grant(res, lk, events)
            return events
        if flags & NOQUEUE:
            events.append(Denied(key, "notqueued"))
            if res.idle:
                del self.resources[name]
            return events
        self.locks[key] = lk
        lk.deadline = deadline
        res.waiting.append(lk)
        self._basts(res, res.converting + res.waiting, events)
        return events

    def grant_idle(
        self, name: str, key: Any, mode: int, node: str, owner: Any, flags: int
    ) -> Resource | None:
        """Fast path of :meth:`request` for a whole-resource lock: if ``name`` has no
        locks at all, grant at once and return the resource (token, value and
        dead_holder as they were *before* this grant are the caller's to read from the
        returned lock via ``locks[key]``).  Returns None (nothing done) otherwise."""
        res = self.resources.get(name)
        if res is None:
            res = self.resources[name] = Resource(name, self.epoch << 32)
        elif res.granted or res.waiting or res.converting:
            return None
        lk = Lock(key, node, owner, mode, flags, 0, RANGE_MAX, res)
        self.locks[key] = lk
        res.token += 1
        lk.token = res.token
        lk.mode = mode
        lk.state = GRANTED
        res.granted[key] = lk
        return res

    def convert(
        self,
        key: Any,
        mode: int,
        *,
        flags: int | None = None,
        value: bytes | None = None,
        deadline: float | None = None,
    ) -> list[Event]:
        """Convert granted lock ``key`` to ``mode`` (up or down).

        ``value`` is written to the value block if the lock is held in PW/EX (a
        down-conversion hands it on).  ``flags``: NOQUEUE/QUECVT for this conversion
        (other bits are ignored; the lock keeps its BLOCKING/EXPEDITE choice).  Raises ``KeyError`` for an unknown
        key and ``ValueError`` if the lock is not granted or already converting.
        """
        lk = self.locks[key]
        if lk.state != GRANTED:
            raise ValueError(f"lock {key!r} is not granted (state {lk.state})")
        res = lk.resource
        if flags is not None:
            # only the per-conversion options change; BLOCKING/EXPEDITE stay as requested
            lk.flags = (lk.flags & ~(NOQUEUE | QUECVT)) | (flags & (NOQUEUE | QUECVT))
        if value is not None:
            value = _check_value(value)
        if value is not None and lk.mode >= Mode.PW:
            res.value = value
            res.valid = True
        lk.rqmode = mode
        events: list[Event] = []
        queued = bool(lk.flags & QUECVT) and any(c.overlaps(lk) for c in res.converting)
        if not queued and not _blocked_by_granted(res, lk, mode):
            self._grant(res, lk, events)
            # a down-conversion may unblock others
            if res.converting or res.waiting:
                self._process(res, events)
            return events
        if lk.flags & NOQUEUE:
            lk.rqmode = lk.mode
            events.append(Denied(key, "notqueued", still_granted=True))
            return events
        lk.state = CONVERTING
        lk.deadline = deadline
        res.converting.append(lk)
        self._process(res, events)
        return events

    def release(self, key: Any, value: bytes | None = None) -> list[Event]:
        """Remove lock ``key`` (granted, converting or waiting; unknown keys are ignored
        so a release racing with a failure is harmless).  ``value`` is written to the
        value block if the lock was held in PW/EX.  Returns the grants this allows."""
        lk = self.locks.pop(key, None)
        if lk is None:
            return []
        res = lk.resource
        events: list[Event] = []
        if value is not None:
            value = _check_value(value)
        if lk.state == WAITING:
            res.waiting.remove(lk)
        else:
            if value is not None and lk.mode >= Mode.PW:
                res.value = value
                res.valid = True
            del res.granted[key]
            if lk.state == CONVERTING:
                res.converting.remove(lk)
        if res.converting or res.waiting:
            self._process(res, events)
        return events

    def cancel(self, key: Any, reason: str = "cancelled") -> list[Event]:
        """Withdraw a queued request or conversion (timeout, deadlock victim, caller).

        A waiting request is removed; a converting lock goes back to its granted mode.
        Returns ``Denied(key, reason)`` followed by any grants this allows, or ``[]``
        if ``key`` is not queued (already granted or gone: the caller lost the race).
        """
        lk = self.locks.get(key)
        if lk is None or lk.state == GRANTED:
            return []
        res = lk.resource
        events: list[Event] = []
        if lk.state == WAITING:
            del self.locks[key]
            res.waiting.remove(lk)
            events.append(Denied(key, reason))
        else:
            res.converting.remove(lk)
            lk.state = GRANTED
            lk.rqmode = lk.mode
            lk.deadline = None
            events.append(Denied(key, reason, still_granted=True))
        self._process(res, events)
        return events

    def tick(self, now: float) -> list[Event]:
        """Expire queued requests whose deadline is ``<= now`` (reason ``timeout``)."""
        due = [
            lk.key
            for lk in self.locks.values()
            if lk.state != GRANTED and lk.deadline is not None and lk.deadline <= now
        ]
        events: list[Event] = []
        for key in due:
            events.extend(self.cancel(key, "timeout"))
        return events

    def drop_node(self, node: str) -> list[Event]:
        """Forget every lock of ``node`` (it died).  A PW/EX lock of that node marks
        its resource's value block invalid and records ``dead_holder = node``.  Returns
        the grants and notifications this allows."""
        mine = [lk for lk in self.locks.values() if lk.node == node]
        touched: dict[str, Resource] = {}
        for lk in mine:
            res = lk.resource
            if lk.state != WAITING and lk.mode >= Mode.PW:
                res.valid = False
                res.dead_holder = node
            del self.locks[lk.key]
            if lk.state == WAITING:
                res.waiting.remove(lk)
            else:
                del res.granted[lk.key]
                if lk.state == CONVERTING:
                    res.converting.remove(lk)
            touched[res.name] = res
        events: list[Event] = []
        for res in touched.values():
            self._process(res, events)
        return events

    def forget(self, name: str) -> bool:
        """Drop resource ``name`` if idle (no locks); returns True if dropped."""
        res = self.resources.get(name)
        if res is not None and res.idle:
            del self.resources[name]
            return True
        return False

    def insert_recovered(
        self,
        name: str,
        key: Any,
        *,
        node: str,
        owner: Any,
        mode: int,
        rqmode: int,
        flags: int,
        start: int,
        end: int,
        token: int = 0,
    ) -> None:
        """Rebuild state on a new master after a membership change: put back a lock as
        it was (``mode`` -1 = waiting; ``rqmode != mode`` = converting).  No grants are
        made until :meth:`settle` is called once every survivor's locks are in."""
        if key in self.locks:
            return
        res = self.resource(name)
        lk = Lock(key, node, owner, rqmode, flags, start, end, res)
        self.locks[key] = lk
        if mode < 0:
            res.waiting.append(lk)
            return
        lk.mode = mode
        lk.token = token
        res.granted[key] = lk
        if token > res.token:
            res.token = token
        if rqmode != mode:
            lk.state = CONVERTING
            res.converting.append(lk)
        else:
            lk.state = GRANTED

    def settle(self, names: Iterable[str]) -> list[Event]:
        """Run the grant rules on ``names`` (after recovery inserted their locks)."""
        events: list[Event] = []
        for name in names:
            res = self.resources.get(name)
            if res is not None:
                self._process(res, events)
        return events

    def wait_for_edges(self) -> list[tuple[Any, Any, Any, str]]:
        """The local part of the wait-for graph: ``(waiter_key, waiter_owner,
        blocker_owner, resource)`` for every queued lock and every granted or
        earlier-queued lock that keeps it waiting (conversion deadlocks included)."""
        edges: list[tuple[Any, Any, Any, str]] = []
        for res in self.resources.values():
            ahead: list[Lock] = []
            for w in res.converting + res.waiting:
                mask = COMPAT_MASK[w.rqmode]
                for g in res.granted.values():
                    if g is not w and not (mask >> g.mode) & 1 and g.overlaps(w):
                        edges.append((w.key, w.owner, g.owner, res.name))
                for a in ahead:
                    if a.overlaps(w) and (w.state == WAITING or a.state == CONVERTING):
                        edges.append((w.key, w.owner, a.owner, res.name))
                ahead.append(w)
        return edges


def _check_value(value: bytes) -> bytes:
    if len(value) > VALUE_BLOCK_SIZE:
        raise ValueError(f"lock value block is at most {VALUE_BLOCK_SIZE} bytes, got {len(value)}")
    return bytes(value)
