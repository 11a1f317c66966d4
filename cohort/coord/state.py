"""The coordinator's state machine: membership with leases, the partition map, buckets.

Pure and deterministic: every method takes ``now`` (seconds, monotonic) and mutates the
in-memory state; nothing here does I/O.  Wall time (event stamps, ``joined_at``, bucket
creation, failback windows and capacity schedules) comes from the injected ``clock`` and
every identifier (cluster id, incarnations, bucket ids) from the injected ``new_id``, so
the same inputs give the same state.  The backends are two ways to store this state and
to elect the one process that steps it: the embedded coordinator persists it in SQLite
after each change; on etcd the elected primary keeps it in ``v/state`` and folds in what
it observes in etcd (:mod:`cohort.coord.etcd`).

Rules it enforces
-----------------
* A member holds a lease of ``lease_ttl`` seconds, renewed by heartbeats.  ``tick`` declares
  a member dead once its lease has expired; its partitions go to survivors with a new
  epoch.  A member re-joining under the same id is a new *incarnation*: the old one is
  treated as dead at once (its partitions get new epochs), because a process can only
  re-join after it has lost all its state.
* Partition ``p`` is served by ``owner`` while that member holds the partition lock
  (``acquire_partition``).  The lock is granted only to the map's owner, and only once
  the previous holder released it or is dead: so two members never serve ``p`` at once.
  The fencing token of a grant is the partition's epoch, which grows with every change
  of owner or incarnation.
* Assignment (the "primary" role of seed 004): orphaned partitions go to the live,
  non-draining servers with the fewest partitions (weighted by capacity); when the
  spread between the most and least loaded server exceeds one partition, partitions move
  (gracefully: the old owner releases when it sees the new map) to even it out.
* Load-aware balancing (:class:`LoadPolicy`): servers may report per-partition request
  rates with their heartbeats (:meth:`CoordinatorState.report_load`).  When every active
  server reports and the capacity-weighted load of the busiest one exceeds the mean by
  ``threshold`` for ``ticks`` consecutive evaluations, at most ``max_moves`` partitions
  move from it to the least loaded server, never one that moved in the last
  ``cooldown`` seconds, and only when the move lowers the peak.  A move that would
  unbalance the partition *counts* is made a swap with the receiver's coldest partition,
  so the count evening never undoes it.  No reports, no load moves: servers and tests
  that do not report load see the count-only behaviour.
"""

from __future__ import annotations

import fnmatch
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

_WINDOW = re.compile(r"^([01]?\d|2[0-3])-([01]?\d|2[0-4])$")

Clock = Callable[[], float]  # wall-clock seconds since the epoch
IdFactory = Callable[[], str]  # a fresh random hex identifier (at least 16 digits)


def system_clock() -> float:
    """The real wall clock: what the backends inject outside tests."""
    return time.time()


def random_id() -> str:
    """A fresh random identifier (32 hex digits): what the backends inject outside tests."""
    return uuid.uuid4().hex


class Member(msgspec.Struct):
    id: str
    role: str  # "server" | "director"
    address: str
    incarnation: str
    lease_expiry: float
    state: str = "alive"  # alive | draining | dead | left
    capacity: float = 1.0
    standby: bool = False
    pid: int = 0
    joined_at: float = 0.0  # wall clock, for display
    meta: dict[str, Any] = {}


@dataclass
class LoadPolicy:
    """Hysteresis of load-aware rebalancing (see the module docstring)."""

    enabled: bool = True
    threshold: float = 1.5  # busiest server's weighted load / mean weighted load
    ticks: int = 3  # consecutive imbalanced evaluations before moving anything
    period: float = 1.0  # seconds between evaluations
    max_moves: int = 2  # partitions moved per decision
    cooldown: float = 30.0  # a partition that moved is left alone this long
    min_rate: float = 20.0  # requests/s cluster-wide below which load is ignored
    stale: float = 10.0  # a server's report older than this counts as no report
    smoothing: float = 0.5  # EWMA weight of the newest per-partition rate


@dataclass(frozen=True)
class CapacityRule:
    """Scheduled capacity (seed 002's follow-the-sun): servers whose id matches the shell
    pattern ``member`` count with ``capacity`` during the daily ``HH-HH`` window (local
    time; ``22-06`` wraps midnight).  The first matching rule wins; outside every window
    a server has the capacity it joined with."""

    member: str
    hours: str
    capacity: float

    @classmethod
    def parse(cls, text: str) -> CapacityRule:
        """``PATTERN@HH-HH=CAPACITY``, e.g. ``server-eu-*@08-18=2``."""
        member, _, rest = text.partition("@")
        hours, _, cap = rest.partition("=")
        if not member or not _WINDOW.match(hours) or not cap:
            raise ValueError(f"capacity rule must be PATTERN@HH-HH=CAPACITY, not {text!r}")
        return cls(member, hours, float(cap))

    def active(self, member_id: str, hour: int) -> bool:
        if not fnmatch.fnmatchcase(member_id, self.member):
            return False
        return _in_window(self.hours, hour)


def check_failback(failback: str) -> None:
    """Raise ValueError unless ``failback`` is immediate, never or a daily HH-HH window."""
    if failback not in ("immediate", "never") and not _WINDOW.match(failback):
        raise ValueError(f"failback policy must be immediate, never or HH-HH, not {failback!r}")


def _in_window(window: str, hour: int) -> bool:
    start, _, end = window.partition("-")
    lo, hi = int(start), int(end)
    return lo <= hour < hi if lo <= hi else (hour >= lo or hour < hi)


class Partition(msgspec.Struct):
    owner: str | None = None
    epoch: int = 0
    # the member (id, incarnation) currently holding the partition lock, if any
    holder: str | None = None
    holder_incarnation: str | None = None
    # the server that owned it before it failed over to a standby (for failback)
    home: str | None = None


class Bucket(msgspec.Struct):
    name: str
    id: str
    created: float  # wall clock
    tenant: str = "default"


class Event(msgspec.Struct):
    time: float  # wall clock
    kind: str
    detail: str


class CoordinatorError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bucket_taken(existing: Bucket | dict[str, Any], name: str, tenant: str) -> CoordinatorError:
    """The error for creating bucket ``name`` as ``tenant`` when ``existing`` has the name
    (the rule both backends apply: S3's two codes)."""
    owner = existing.tenant if isinstance(existing, Bucket) else existing.get("tenant")
    if owner == tenant:
        return CoordinatorError("BucketAlreadyOwnedByYou", name)
    return CoordinatorError("BucketAlreadyExists", name)


class CoordinatorState:
    def __init__(
        self,
        partitions: int = 256,
        lease_ttl: float = 2.5,
        failback: str = "immediate",
        *,
        clock: Clock = system_clock,
        new_id: IdFactory = random_id,
    ) -> None:
        check_failback(failback)
        self.failback = failback
        # wall clock (events, joined_at, buckets, failback windows, capacity schedules)
        self.clock = clock
        self.new_id = new_id  # identifiers: cluster id, incarnations, bucket ids
        self.capacity_schedule: list[CapacityRule] = []
        self._scheduled: dict[str, float] = {}  # capacities in force, to log changes
        self.partition_count = partitions
        self.lease_ttl = lease_ttl
        self.members: dict[str, Member] = {}
        self.partitions: list[Partition] = [Partition() for _ in range(partitions)]
        self.buckets: dict[str, Bucket] = {}
        self.events: list[Event] = []
        self.version = 0  # bumped on every externally visible change
        # bumped whenever the set of live servers changes: the lock manager's epoch, so
        # every server's DLM agent agrees which membership a number means
        self.membership_epoch = 0
        self.cluster_id = new_id()
        self.event_seq = 0  # events appended since construction (for backends that ship them)
        # Load-aware balancing: soft state, rebuilt from heartbeats (never persisted).
        self.load_policy = LoadPolicy()
        self.part_rate: dict[int, float] = {}  # smoothed requests/s per partition
        self.part_bytes: dict[int, float] = {}  # smoothed bytes/s written per partition
        self.load_reported: dict[str, float] = {}  # member -> time of its last report
        self.moved_at: dict[int, float] = {}  # partition -> time of its last move
        self.load_moves = 0  # partitions moved because of load, since start
        self._load_strikes = 0
        self._load_hot = ""
        self._load_next_eval = 0.0

    # -- events / versioning ---------------------------------------------------------------
    def _changed(self, kind: str | None = None, detail: str = "") -> None:
        self.version += 1
        if kind is not None:
            self.events.append(Event(self.clock(), kind, detail))
            self.event_seq += 1
            del self.events[:-500]

    # -- membership ------------------------------------------------------------------------
    def join(
        self,
        now: float,
        member_id: str,
        role: str,
        address: str,
        *,
        capacity: float = 1.0,
        standby: bool = False,
        pid: int = 0,
        meta: dict[str, Any] | None = None,
        incarnation: str | None = None,
        joined_at: float | None = None,
    ) -> Member:
        """A member joins (``incarnation``: one the backend already handed out, as etcd's
        members pick their own; by default a fresh one from ``new_id``)."""
        old = self.members.get(member_id)
        if old is not None and old.state not in ("dead", "left") and role == "server":
            # A new incarnation: the previous process lost its state; fence it out now.
            self._member_gone(old, "restarted")
        m = Member(
            id=member_id,
            role=role,
            address=address,
            incarnation=incarnation or self.new_id()[:12],
            lease_expiry=now + self.lease_ttl,
            capacity=capacity,
            standby=standby,
            pid=pid,
            joined_at=self.clock() if joined_at is None else joined_at,
            meta=meta or {},
        )
        self.members[member_id] = m
        if role == "server":
            self.membership_epoch += 1
        self._changed("join", f"{role} {member_id} at {address}")
        if role == "server":
            self.rebalance(now)
        return m

    def heartbeat(self, now: float, member_id: str, incarnation: str, load: Any = None) -> Member:
        m = self.members.get(member_id)
        if m is None or m.incarnation != incarnation or m.state in ("dead", "left"):
            raise CoordinatorError("UnknownMember", f"{member_id} is not a live member; re-join")
        m.lease_expiry = now + self.lease_ttl
        if load is not None:
            self.report_load(now, member_id, load)
        return m

    def report_load(self, now: float, member_id: str, load: Any) -> None:
        """Take a server's per-partition rates: ``[[partition, requests/s, bytes/s], ...]``
        over its last heartbeat interval; partitions it serves but does not list had no
        requests.  Only the map's owner's figures count.  Changes no version (soft state)."""
        a = self.load_policy.smoothing
        listed: dict[int, tuple[float, float]] = {}
        for row in load:
            p, rate = int(row[0]), float(row[1])
            nbytes = float(row[2]) if len(row) > 2 else 0.0
            if 0 <= p < self.partition_count:
                listed[p] = (max(rate, 0.0), max(nbytes, 0.0))
        for p, part in enumerate(self.partitions):
            if part.owner != member_id:
                continue
            rate, nbytes = listed.get(p, (0.0, 0.0))
            self.part_rate[p] = a * rate + (1 - a) * self.part_rate.get(p, rate)
            self.part_bytes[p] = a * nbytes + (1 - a) * self.part_bytes.get(p, nbytes)
        self.load_reported[member_id] = now

    def server_loads(self) -> dict[str, float]:
        """Smoothed requests/s of every live server, by the partitions it owns now."""
        out = {
            m.id: 0.0
            for m in self.members.values()
            if m.role == "server" and m.state in ("alive", "draining")
        }
        for p, part in enumerate(self.partitions):
            if part.owner in out:
                out[part.owner] += self.part_rate.get(p, 0.0)
        return out

    def leave(self, now: float, member_id: str, incarnation: str) -> None:
        m = self.members.get(member_id)
        if m is None or m.incarnation != incarnation:
            return
        self._member_gone(m, "left")
        m.state = "left"
        self.rebalance(now)

    def set_state(self, now: float, member_id: str, state: str) -> Member:
        """Operator action: ``draining`` (hand all partitions away), ``alive``, or standby."""
        m = self.members.get(member_id)
        if m is None or m.role != "server":
            raise CoordinatorError("UnknownMember", f"no server named {member_id!r}")
        if m.state in ("dead", "left"):
            raise CoordinatorError("MemberDown", f"{member_id} is {m.state}")
        if state in ("standby", "active"):
            m.standby = state == "standby"
            self._changed("standby" if m.standby else "active", member_id)
            self.rebalance(now)
            return m
        if state not in ("alive", "draining"):
            raise CoordinatorError(
                "InvalidState", f"unknown member state {state!r} (alive, draining, standby, active)"
            )
        m.state = state
        self._changed("drain" if state == "draining" else "undrain", member_id)
        self.rebalance(now)
        return m

    def expire(
        self, now: float, member_id: str, incarnation: str, why: str = "lease expired"
    ) -> bool:
        """The lease of ``member_id``'s ``incarnation`` is gone before ``tick`` noticed (a
        backend that keeps leases elsewhere, e.g. etcd, saw it expire): the member is dead
        and its partitions move with new epochs.  False if that incarnation is not live."""
        m = self.members.get(member_id)
        if m is None or m.incarnation != incarnation or m.state in ("dead", "left"):
            return False
        self._member_gone(m, why)
        self.rebalance(now)
        return True

    def sync_members(self, now: float, live: list[dict[str, Any]], left: dict[str, str]) -> None:
        """Fold in a membership whose leases another system keeps (etcd).

        ``live``: the records (``id role address incarnation capacity standby pid meta
        joined_at``) of the members whose lease exists now, in the order they joined;
        ``left``: member id -> the incarnation that left cleanly.  An incarnation the rules
        have not seen joins (a new incarnation of a known id fences the old one out, as a
        re-join does); a live incarnation no longer in ``live`` left (if in ``left``) or
        lost its lease (:meth:`expire`); every one still live is renewed, so ``tick``
        never expires a lease that still exists.
        """
        by_id = {r["id"]: r for r in live}
        for m in list(self.members.values()):
            if m.state in ("dead", "left") or m.id in by_id:
                continue  # gone already, or live (a new incarnation: its join fences this)
            if left.get(m.id) == m.incarnation:
                self.leave(now, m.id, m.incarnation)
            else:
                self.expire(now, m.id, m.incarnation)
        for r in live:
            cur = self.members.get(r["id"])
            if cur is not None and cur.incarnation == r["incarnation"]:
                if cur.state in ("alive", "draining"):
                    cur.lease_expiry = now + self.lease_ttl
                continue
            self.join(
                now,
                r["id"],
                r["role"],
                r["address"],
                capacity=float(r.get("capacity", 1.0)),
                standby=bool(r.get("standby", False)),
                pid=int(r.get("pid", 0)),
                meta=r.get("meta") or {},
                incarnation=r["incarnation"],
                joined_at=r.get("joined_at"),
            )

    def adopt(
        self,
        now: float,
        owners: list[str | None],
        epochs: list[int],
        incs: list[str | None] | None,
        live: list[dict[str, Any]],
        membership_epoch: int,
        published_members: dict[str, str],
    ) -> None:
        """Continue a partition map decided without this state (an etcd map written before
        the rules ran there).  ``live`` members (records as for :meth:`sync_members`) are
        taken as they are; a partition keeps its owner only if the map names that owner's
        live incarnation, else it gets a new epoch (its owner is gone or restarted) and
        is assigned at the next ``tick``; the lock managers' epoch goes on from the
        published one, one more if its membership is not this one."""
        for r in live:
            st = r.get("state", "alive")
            self.members[r["id"]] = Member(
                id=r["id"],
                role=r["role"],
                address=r["address"],
                incarnation=r["incarnation"],
                lease_expiry=now + self.lease_ttl,
                state=st if st in ("alive", "draining") else "alive",
                capacity=float(r.get("capacity", 1.0)),
                standby=bool(r.get("standby", False)),
                pid=int(r.get("pid", 0)),
                joined_at=float(r.get("joined_at", 0.0)),
                meta=r.get("meta") or {},
            )
        for i, part in enumerate(self.partitions):
            o = owners[i]
            part.epoch = int(epochs[i])
            m = self.members.get(o) if o is not None else None
            if m is not None and incs is not None and m.incarnation == incs[i]:
                part.owner = o
            elif o is not None:
                part.epoch += 1
                part.home = o
        self.membership_epoch = membership_epoch
        if self.dlm_members() != published_members:
            self.membership_epoch += 1
        kept = sum(p.owner is not None for p in self.partitions)
        self._changed("adopt", f"{kept} partitions kept their owners")

    def dlm_members(self) -> dict[str, str]:
        """The lock managers' membership that ``membership_epoch`` numbers:
        ``id~incarnation`` -> address of every live server."""
        return {
            f"{m.id}~{m.incarnation}": m.address
            for m in self.members.values()
            if m.role == "server" and m.state in ("alive", "draining")
        }

    def _member_gone(self, m: Member, why: str) -> None:
        m.state = "dead" if why != "left" else "left"
        if m.role == "server":
            self.membership_epoch += 1
        for p in self.partitions:
            if p.holder == m.id and p.holder_incarnation == m.incarnation:
                p.holder = None
                p.holder_incarnation = None
            if p.owner == m.id:
                p.owner = None
                p.epoch += 1
                p.home = m.id
        self._changed("member-" + ("left" if why == "left" else "dead"), f"{m.id} ({why})")

    def tick(self, now: float) -> bool:
        """Expire leases and (re)assign partitions.  Returns True if anything changed."""
        before = self.version
        for m in self.members.values():
            if m.state in ("alive", "draining") and m.lease_expiry < now:
                self._member_gone(m, "lease expired")
        self.rebalance(now)
        return self.version != before

    def extend_all_leases(self, now: float) -> None:
        """After a coordinator restart: give every live member a fresh lease to re-heartbeat."""
        for m in self.members.values():
            if m.state in ("alive", "draining"):
                m.lease_expiry = now + self.lease_ttl

    def events_since(self, seq: int) -> list[Event]:
        """The events appended after :attr:`event_seq` was ``seq`` (those still kept)."""
        n = min(self.event_seq - seq, len(self.events))
        return self.events[len(self.events) - n :] if n > 0 else []

    # -- assignment --------------------------------------------------------------------------
    def _failback_allowed(self) -> bool:
        """May partitions move from standbys back to active servers now?"""
        if self.failback == "immediate":
            return True
        if self.failback == "never":
            return False
        # "HH-HH": a daily window in local time, as MSCS allows
        return _in_window(self.failback, self.hour())

    def hour(self) -> int:
        """The local hour of the injected wall clock (failback windows, schedules)."""
        return time.localtime(self.clock()).tm_hour

    def capacity_of(self, m: Member) -> float:
        """``m``'s capacity now: a scheduled one if a rule's window is open, else its own."""
        if self.capacity_schedule:
            hour = self.hour()
            for r in self.capacity_schedule:
                if r.active(m.id, hour):
                    return r.capacity
        return m.capacity

    def rebalance(self, now: float) -> None:
        """Assign orphaned partitions and even out the load.

        * A partition whose owner failed goes to a *standby* server if one is alive (N+1:
          the standby takes over the failed server's share); otherwise, and for
          partitions never assigned, to the least loaded active server.
        * Partitions held by standbys move back to active servers when the failback
          policy allows it (``immediate``, ``never``, or a daily ``HH-HH`` window).
        * Active servers are evened out by weighted share, moving a partition only while
          that strictly narrows the spread (so it terminates and never thrashes).
        Every move bumps the partition's epoch; the old owner hands over gracefully.
        """
        servers = [m for m in self.members.values() if m.role == "server" and m.state == "alive"]
        if not servers:
            return
        active = [m for m in servers if not m.standby]
        standby = [m for m in servers if m.standby]
        live_ids = {m.id for m in servers}
        counts: dict[str, int] = {m.id: 0 for m in servers}
        cap = {m.id: max(self.capacity_of(m), 0.01) for m in servers}
        if self.capacity_schedule:
            now_caps = {m.id: c for m in servers if (c := self.capacity_of(m)) != m.capacity}
            if now_caps != self._scheduled:
                self._scheduled = now_caps
                self._changed("capacity-schedule", repr(now_caps))
        for p in self.partitions:
            if p.owner in live_ids:
                counts[p.owner] += 1
        moved = 0

        def assign(i: int, target: str) -> None:
            nonlocal moved
            p = self.partitions[i]
            if p.owner in counts:
                counts[p.owner] -= 1
                self.moved_at[i] = now  # a hand-over between live servers (for the cooldown)
            p.owner = target
            p.epoch += 1
            counts[target] += 1
            moved += 1

        def least_loaded(pool: list[Member]) -> str:
            return min((m.id for m in pool), key=lambda s: (counts[s] / cap[s], s))

        active_ids = {m.id for m in active}
        for i, p in enumerate(self.partitions):
            if p.owner in live_ids:
                continue
            failed_over = p.home is not None and p.owner is None  # its owner failed
            if failed_over and standby:
                assign(i, least_loaded(standby))  # keeps p.home for failback
            else:
                assign(i, least_loaded(active or standby))
                p.home = None
        standby_ids = {m.id for m in standby}
        for i, p in enumerate(self.partitions):
            # a standby carries only what failed over to it (e.g. a server just made standby)
            if p.owner in standby_ids and p.home is None and active:
                assign(i, least_loaded(active))
        if standby and self._failback_allowed():
            for i, p in enumerate(self.partitions):
                if p.owner not in active_ids and p.home in active_ids:
                    home = p.home
                    assert home is not None
                    assign(i, home)
                    p.home = None
        # Even out the active servers.
        act = [m.id for m in active]
        total_cap = sum(cap[s] for s in act)
        owned_by_active = sum(counts[s] for s in act)
        share = {s: owned_by_active * cap[s] / total_cap for s in act} if act else {}
        while len(act) > 1:
            hi = max(act, key=lambda s: (counts[s] - share[s], s))
            lo = min(act, key=lambda s: (counts[s] - share[s], s))
            if (counts[hi] - share[hi]) - (counts[lo] - share[lo]) <= 1.0 + 1e-9:
                break
            # move the highest-numbered partition of hi (deterministic)
            assign(max(i for i, p in enumerate(self.partitions) if p.owner == hi), lo)
        if moved:
            self._changed("rebalance", f"{moved} partitions assigned")
        elif len(act) > 1:
            self._balance_load(now, act, counts, share, cap, assign)

    def _balance_load(
        self,
        now: float,
        act: list[str],
        counts: dict[str, int],
        share: dict[str, float],
        cap: dict[str, float],
        assign: Callable[[int, str], None],
    ) -> None:
        """One evaluation of load-aware balancing among the active servers ``act``."""
        pol = self.load_policy
        if not pol.enabled or now < self._load_next_eval:
            return
        self._load_next_eval = now + pol.period
        if any(now - self.load_reported.get(s, -1e18) > pol.stale for s in act):
            self._load_strikes = 0  # someone does not report load: no load information
            return
        rate = self.part_rate
        load = {s: 0.0 for s in act}
        mine: dict[str, list[int]] = {s: [] for s in act}
        for i, p in enumerate(self.partitions):
            if p.owner in load:
                load[p.owner] += rate.get(i, 0.0)
                mine[p.owner].append(i)
        total = sum(load.values())
        mean = total / sum(cap[s] for s in act)
        w = {s: load[s] / cap[s] for s in act}
        hi = max(act, key=lambda s: (w[s], s))
        if total < pol.min_rate or w[hi] <= pol.threshold * mean:
            self._load_strikes = 0
            return
        # the same server must stay the busiest for ``ticks`` evaluations in a row
        self._load_strikes = self._load_strikes + 1 if hi == self._load_hot else 1
        self._load_hot = hi
        if self._load_strikes < pol.ticks:
            return
        self._load_strikes = 0  # the next move needs a fresh run of evaluations
        moves: list[str] = []
        for _ in range(pol.max_moves):
            hi = max(act, key=lambda s: (w[s], s))
            lo = min(act, key=lambda s: (w[s], s))
            if hi == lo:
                break

            def free(s: str) -> list[int]:
                return [i for i in mine[s] if now - self.moved_at.get(i, -1e18) >= pol.cooldown]

            # a plain move keeps the count spread within one partition, or else a swap
            plain = (counts[lo] + 1 - share[lo]) - (counts[hi] - 1 - share[hi]) <= 1.0 + 1e-9
            cold = (
                None if plain else min(free(lo), key=lambda i: (rate.get(i, 0.0), i), default=None)
            )
            if not plain and cold is None:
                break
            back = rate.get(cold, 0.0) if cold is not None else 0.0
            best: tuple[float, int] | None = None
            for i in free(hi):
                r = rate.get(i, 0.0) - back
                if r <= 0:
                    continue
                peak = max(w[hi] - r / cap[hi], w[lo] + r / cap[lo])
                if peak < w[hi] * 0.95 and (best is None or (peak, i) < best):
                    best = (peak, i)
            if best is None:
                break  # nothing lowers the peak: one partition is the hot spot; leave it
            i = best[1]
            r = rate.get(i, 0.0) - back
            assign(i, lo)
            mine[hi].remove(i)
            mine[lo].append(i)
            w[hi] -= r / cap[hi]
            w[lo] += r / cap[lo]
            moves.append(f"{i} {hi}->{lo}")
            if cold is not None:
                assign(cold, hi)
                mine[lo].remove(cold)
                mine[hi].append(cold)
                moves.append(f"{cold} {lo}->{hi}")
        if moves:
            self.load_moves += len(moves)
            self._changed("load-rebalance", ", ".join(moves))

    # -- partition lock ------------------------------------------------------------------------
    def acquire_partition(self, now: float, member_id: str, incarnation: str, p: int) -> int:
        """Grant the lock ``partition/p`` in EX to the map's owner; returns the fencing token.

        Raises ``NotOwner`` if the map names someone else, ``Busy`` while the previous
        holder has not released it yet (the caller retries).
        """
        m = self.members.get(member_id)
        if m is None or m.incarnation != incarnation or m.state in ("dead", "left"):
            raise CoordinatorError("UnknownMember", f"{member_id} is not a live member")
        part = self.partitions[p]
        if part.owner != member_id:
            raise CoordinatorError("NotOwner", f"partition {p} is assigned to {part.owner}")
        if part.holder is not None and (
            part.holder != member_id or part.holder_incarnation != incarnation
        ):
            h = self.members.get(part.holder)
            if (
                h is not None
                and h.incarnation == part.holder_incarnation
                and h.state
                in (
                    "alive",
                    "draining",
                )
            ):
                raise CoordinatorError("Busy", f"partition {p} still held by {part.holder}")
        part.holder = member_id
        part.holder_incarnation = incarnation
        self._changed()
        return part.epoch

    def release_partition(self, now: float, member_id: str, incarnation: str, p: int) -> None:
        part = self.partitions[p]
        if part.holder == member_id and part.holder_incarnation == incarnation:
            part.holder = None
            part.holder_incarnation = None
            self._changed()

    # -- buckets ----------------------------------------------------------------------------
    def create_bucket(self, name: str, tenant: str = "default") -> Bucket:
        b = self.buckets.get(name)
        if b is not None:
            raise bucket_taken(b, name, tenant)
        b = self.new_bucket(name, tenant)
        self.buckets[name] = b
        self._changed("bucket-create", name)
        return b

    def new_bucket(self, name: str, tenant: str = "default") -> Bucket:
        """A new bucket record (fresh id, created now); not yet added."""
        return Bucket(name=name, id=self.new_id()[:16], created=self.clock(), tenant=tenant)

    def delete_bucket(self, name: str, bucket_id: str) -> None:
        b = self.buckets.get(name)
        if b is None or b.id != bucket_id:
            raise CoordinatorError("NoSuchBucket", name)
        del self.buckets[name]
        self._changed("bucket-delete", name)

    # -- views --------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """The cluster view that directors and servers cache (msgpack-friendly)."""
        return {
            "version": self.version,
            "cluster_id": self.cluster_id,
            "lease_ttl": self.lease_ttl,
            "membership_epoch": self.membership_epoch,
            "members": [msgspec.to_builtins(m) for m in self.members.values()],
            "partitions": [[p.owner, p.epoch, p.holder] for p in self.partitions],
            "buckets": [msgspec.to_builtins(b) for b in self.buckets.values()],
        }

    # -- persistence ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "version": self.version,
            "membership_epoch": self.membership_epoch,
            "partition_count": self.partition_count,
            "members": [msgspec.to_builtins(m) for m in self.members.values()],
            "partitions": [msgspec.to_builtins(p) for p in self.partitions],
            "buckets": [msgspec.to_builtins(b) for b in self.buckets.values()],
            "events": [msgspec.to_builtins(e) for e in self.events[-200:]],
        }

    @classmethod
    def restore(
        cls,
        snap: dict[str, Any],
        lease_ttl: float,
        failback: str = "immediate",
        *,
        clock: Clock = system_clock,
        new_id: IdFactory = random_id,
    ) -> CoordinatorState:
        s = cls(snap["partition_count"], lease_ttl, failback, clock=clock, new_id=new_id)
        s.cluster_id = snap["cluster_id"]
        s.version = snap["version"] + 1
        # a restarted coordinator must never reuse an epoch the agents have seen
        s.membership_epoch = int(snap.get("membership_epoch", 0)) + 1
        s.members = {m["id"]: msgspec.convert(m, Member) for m in snap["members"]}
        s.partitions = [msgspec.convert(p, Partition) for p in snap["partitions"]]
        s.buckets = {b["name"]: msgspec.convert(b, Bucket) for b in snap["buckets"]}
        s.events = [msgspec.convert(e, Event) for e in snap.get("events", [])]
        return s
