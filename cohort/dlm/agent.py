"""The lock agent: one per node; masters some resources, requests locks on the others.

Protocol (all messages one-way, FIFO per sender/receiver pair; see ``transport.py``)::

    LOOKUP    [1, epoch, root]                    requester -> directory
    LOOKUP_R  [2, epoch, root, master, dead]      directory -> requester
    REQ       [3, name, lid, mode, flags, start, end, owner]   requester -> master
    CVT       [4, name, lid, mode, flags, value]  requester -> master
    REL       [5, name, lid, value]               requester -> master (no reply)
    CANCEL    [6, name, lid, reason]              requester -> master
    GRANT     [7, lid, mode, token, value, valid, dead]        master -> requester
    DENY      [8, lid, reason, still_granted]     master -> requester
    BAST      [9, lid, mode]                      master -> holder (blocking notification)
    NOTMASTER [10, lid]                           not-master -> requester (look up again)
    DIRSYNC   [11, epoch, masters, orphans]       every node -> every directory node
    ORPHAN    [12, epoch, root, master, claimants]   directory -> claimants
    RECOVER   [13, epoch, root, dead, locks]      claimant -> new master
    RECOVERED [14, epoch, root]                   new master -> claimants
    DLQ       [15, qid]  /  DLA [16, qid, edges]  deadlock search: query / answer
    VICTIM    [17, name, node, lid]               search initiator -> master
    DIRCOPY   [18, epoch, entries, tombstones]    directory -> its backup (one-way)

The directory entry of a new root is copied (one one-way DIRCOPY) to a backup directory
node, the runner-up of the rendezvous hash, which becomes the directory if the primary
dies; so a single failure never loses the fact that a dead node mastered a resource,
and its next master is told (value block invalid, ``previous_holder_died``).

Costs: a lock on a resource this node masters: 0 messages.  First lock on a resource
mastered elsewhere: LOOKUP/LOOKUP_R (0 if this node is the directory) then REQ/GRANT.
Later locks and conversions: REQ/GRANT (CVT/GRANT).  Release: one REL.  The first
locker of a resource (as told by the directory) becomes its master.  Resource trees
(``parent=``) are mastered with their root, so child locks never need the directory.

Membership: ``set_membership(epoch, members)`` comes from the coordinator.  Survivors
keep the resources they master (dropping dead nodes' locks: a dead PW/EX holder makes
the value block invalid and is reported to the next holder), re-register them with the
(re-hashed) directory, and *claim* the trees whose master died; the directory gives
each orphan a new master (the lowest claimant id), claimants send it their locks, and
it resumes granting once all have arrived.  A directory answers lookups of an epoch only
after every member of that epoch has re-registered (so no resource gets two masters).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from cohort.dlm.call import AcquireCall
from cohort.dlm.errors import DlmError, LockLost, UsageError, denial_error
from cohort.dlm.modes import Mode, parse_mode
from cohort.dlm.resource import (
    BLOCKING,
    EXPEDITE,
    NOQUEUE,
    QUECVT,
    RANGE_MAX,
    Blocking,
    Denied,
    Event,
    Granted,
    LockTable,
)
from cohort.dlm.transport import Transport

log = logging.getLogger("cohort.dlm")

SEP = "\x1f"  # separates a child's name from its parent's in the full resource name

LOOKUP, LOOKUP_R, REQ, CVT, REL, CANCEL, GRANT, DENY, BAST, NOTMASTER = range(1, 11)
DIRSYNC, ORPHAN, RECOVER, RECOVERED, DLQ, DLA, VICTIM, DIRCOPY = range(11, 19)

# handle states
H_PENDING = 0  # request not granted yet
H_GRANTED = 1
H_CONVERTING = 2
H_DONE = 3  # released, denied or lost

BlockingCallback = Callable[[Mode], Any]


def _rv_hash(m: str, root: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{m}\0{root}".encode(), digest_size=8).digest(), "big")


def rendezvous(root: str, members: list[str]) -> str:
    """The directory node of ``root``: highest hash of (member, root).  A membership
    change only moves the entries of the nodes that came or went."""
    return max(members, key=lambda m: _rv_hash(m, root))


def rendezvous_backup(root: str, members: list[str]) -> str | None:
    """The runner-up of :func:`rendezvous`: holds a copy of the directory entry."""
    if len(members) < 2:
        return None
    return sorted(members, key=lambda m: _rv_hash(m, root))[-2]


class LostFlag:
    """Set when the lock is lost; ``await flag.wait()`` or ``flag.is_set()``.
    (A lighter stand-in for ``asyncio.Event``; no loop needed until someone waits.)"""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiters:
            for f in self._waiters:
                if not f.done():
                    f.set_result(None)
            self._waiters = None

    async def wait(self) -> None:
        if self._set:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        await fut


class Handle:
    """One lock held (or requested) through a :class:`LockAgent`.

    Attributes: ``name``, ``mode`` (granted mode, ``None`` before the grant),
    ``token`` (fencing token of the latest grant: monotonic per resource), ``value``
    (value block read at the latest grant), ``value_valid`` (False when a PW/EX holder
    died since it was last written), ``previous_holder_died`` (node id of a dead PW/EX
    holder whose work this holder must replay, else ``None``), ``lost`` (a flag set if
    the lock is lost; the token is then stale).
    """

    __slots__ = (
        "_fut",
        "_write",
        "abandoned",
        "agent",
        "cvt_timer",
        "end",
        "error",
        "flags",
        "key",
        "lid",
        "lost",
        "master",
        "mode",
        "n_children",
        "name",
        "on_blocking",
        "owner",
        "parent",
        "previous_holder_died",
        "root",
        "rqmode",
        "start",
        "state",
        "token",
        "value",
        "value_valid",
    )

    def __init__(
        self, agent: LockAgent, lid: int, name: str, root: str, rqmode: int, flags: int
    ) -> None:
        self.agent = agent
        self.lid = lid
        self.key = (agent.node_id, lid)
        self.name = name
        self.root = root
        self.rqmode = rqmode
        self.flags = flags
        self.mode: Mode | None = None
        self.state = H_PENDING
        self.token = 0
        self.value = b""
        self.value_valid = True
        self.previous_holder_died: str | None = None
        self.lost = LostFlag()
        self.on_blocking: BlockingCallback | None = None
        self.parent: Handle | None = None
        self.n_children = 0
        self.start = 0
        self.end = RANGE_MAX
        self.owner: Any = None
        self.master: str | None = None
        self.error: DlmError | None = None
        self.abandoned = False
        self._fut: asyncio.Future[None] | None = None
        self._write: bytes | None = None
        self.cvt_timer: Any = None

    def __repr__(self) -> str:
        m = self.mode.name if self.mode is not None else "-"
        return f"<Handle {self.name!r} {m} token={self.token} state={self.state}>"

    @property
    def granted(self) -> bool:
        return self.state in (H_GRANTED, H_CONVERTING)

    def set_value(self, value: bytes) -> None:
        """Stage a new value block (≤ 64 bytes), written when this PW/EX lock is
        released or down-converted.  Ignored for weaker modes, as in VMS."""
        if len(value) > 64:
            raise ValueError("lock value block is at most 64 bytes")
        self._write = bytes(value)

    def check(self) -> None:
        """Raise :class:`LockLost` if the lock is no longer held."""
        if self.state != H_GRANTED and self.state != H_CONVERTING:
            raise LockLost(f"lock on {self.name!r} is not held (token {self.token} is stale)")

    async def release(self) -> None:
        """Give the lock up (one message to a remote master, none to a local one).
        Releasing a lost or released lock is a no-op."""
        self.agent._release(self)

    async def convert(
        self,
        mode: Mode | str,
        *,
        timeout: float | None = None,
        noqueue: bool = False,
        quecvt: bool = False,
    ) -> None:
        """Convert to ``mode`` (up or down).  Waits until granted; raises NotQueued,
        LockTimeout or DeadlockError (the lock keeps its old mode) or LockLost."""
        await self.agent._convert(self, parse_mode(mode), timeout, noqueue, quecvt)

    def lock(self, name: str, mode: Mode | str, **kw: Any) -> LockCall:
        """A child lock scoped under this one (same master, no directory lookup)."""
        return self.agent.lock(name, mode, parent=self, **kw)

    async def __aenter__(self) -> Handle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.agent._release(self)


#: What :meth:`LockAgent.lock` returns: ``await`` it (or ``create_task`` it) for a
#: :class:`Handle`, or use ``async with`` to release on exit.
LockCall = AcquireCall[Handle]


class _Recovering:
    __slots__ = ("buffered", "claimants", "dead", "epoch", "values", "waiting_for")

    def __init__(self, epoch: int, claimants: set[str], dead: str | None) -> None:
        self.epoch = epoch
        self.claimants = claimants
        self.waiting_for = set(claimants)
        self.dead = dead
        self.values: dict[str, list[tuple[int, bytes]]] = {}
        self.buffered: list[tuple[str, list[Any]]] = []


class LockAgent:
    """The lock agent of one node.

    ``LockAgent(node_id, transport)`` starts as a one-node cluster (epoch 0) so it
    works stand-alone; the host calls :meth:`set_membership` for a real cluster and
    :meth:`lease_lost` when its membership lease cannot be renewed.

    ``deadlock_wait``: seconds a request waits before a deadlock search starts (None
    disables detection).
    """

    def __init__(
        self,
        node_id: str,
        transport: Transport,
        *,
        deadlock_wait: float | None = 1.0,
        lease_valid: Callable[[], bool] | None = None,
    ) -> None:
        self.node_id = node_id
        self.transport = transport
        self.deadlock_wait = deadlock_wait
        # The host's membership lease (None: no leases, e.g. tests with fixed members).
        # Checked before every grant: a node whose lease may have expired has been, or
        # is about to be, declared dead and its resources re-mastered elsewhere, so a
        # grant from it could overlap one from the new master.
        self.lease_valid = lease_valid
        self.epoch = 0
        self.members: dict[str, str] = {node_id: ""}
        self._member_list = [node_id]
        self.table = LockTable(0)
        self.fenced = False
        self._was_removed = False
        self._admitted = False  # named in a membership yet (set_membership)
        self._lids = itertools.count(1)
        self.handles: dict[int, Handle] = {}
        # root -> master node (known masters, including this node for its own roots)
        self.master_of: dict[str, str] = {}
        # roots this node masters whose recovery is in progress
        self.recovering: dict[str, _Recovering] = {}
        # roots whose master is being resolved (lookup/claim): handles to (re)submit
        # and messages received for them meanwhile
        self.resolving: dict[str, list[Handle]] = {}
        self.buffered: dict[str, list[tuple[str, list[Any]]]] = {}
        self.unconfirmed: set[str] = set()
        # directory state
        self.dir_entries: dict[str, str] = {}
        self.tombstones: dict[str, str] = {}
        self.dir_copies: dict[str, str] = {}  # entries this node backs up
        self.tomb_copies: dict[str, str] = {}
        self.dir_ready = True
        self.dir_syncs: dict[str, list[Any]] = {}
        self.dir_waiting: list[tuple[str, list[Any]]] = []
        self.future_msgs: list[tuple[str, list[Any]]] = []
        # deadlock search state
        self._qids = itertools.count(1)
        self._searches: dict[int, tuple[Handle, set[str], list[tuple[str, list[Any]]]]] = {}
        self.stats = {"deadlocks": 0, "searches": 0}
        self._dead_masters: dict[str, str | None] = {}
        self._bg: set[asyncio.Future[Any]] = set()
        transport.attach(node_id, self._on_message)
        transport.set_addresses(self.members)

    # ================================================================ public API
    def lock(
        self,
        name: str,
        mode: Mode | str,
        *,
        timeout: float | None = None,
        noqueue: bool = False,
        expedite: bool = False,
        on_blocking: BlockingCallback | None = None,
        parent: Handle | None = None,
        range: tuple[int, int] | None = None,
        owner: Any = None,
    ) -> LockCall:
        """Request a lock on ``name`` in ``mode``.

        ``await agent.lock(...)`` returns a granted :class:`Handle`;
        ``async with agent.lock(...) as h:`` releases it on exit.  Raises
        :class:`NotQueued` (``noqueue`` and not grantable at once),
        :class:`LockTimeout` (not granted within ``timeout`` s), :class:`DeadlockError`
        (chosen as a deadlock victim) or :class:`LockLost` (agent fenced).
        ``on_blocking(mode)`` is called (a coroutine function is scheduled as a task)
        when this lock blocks a request for ``mode``.  ``parent`` scopes the name under a
        held lock.  ``range=(start, end)`` locks bytes ``[start, end)`` only.  ``owner``
        names the party for deadlock detection (default: the current task).
        """
        flags = (NOQUEUE if noqueue else 0) | (EXPEDITE if expedite else 0)
        if on_blocking is not None:
            flags |= BLOCKING
        args = (name, parse_mode(mode), timeout, flags, on_blocking, parent, range, owner)
        return AcquireCall(lambda: self._acquire(*args), self._release)

    def set_membership(self, epoch: int, members: dict[str, str]) -> None:
        """A new membership epoch from the coordinator (node id -> "host:port").
        Epochs must increase; older or equal ones are ignored."""
        if epoch <= self.epoch:
            return
        if self.node_id not in members and not self._admitted:
            # a membership from before we joined (a coordinator may publish the new
            # member list a moment after our join): we were never in the cluster, so
            # this is "not yet", not "removed"; wait for the epoch that names us
            return
        if self.node_id in members:
            self._admitted = True
        if self.node_id not in members:
            self._fence("removed from the cluster")
            self._was_removed = True
            self.epoch = epoch
            self.members = dict(members)
            self._member_list = sorted(members)
            return
        if self.fenced:
            if not self._was_removed:
                # still fenced until the cluster has removed us (others may still
                # think we hold locks until then)
                self.epoch = epoch
                return
            self.fenced = False
            self._was_removed = False
        old = set(self._member_list)
        self.epoch = epoch
        self.members = dict(members)
        self._member_list = sorted(members)
        self.transport.set_addresses(self.members)
        self.table.epoch = epoch
        dead = old - set(members)
        self._recover(dead)

    @property
    def in_cluster(self) -> bool:
        """Named in the current membership and not fenced: grants are cluster-wide."""
        return self._admitted and not self.fenced and self.node_id in self.members

    def lease_lost(self) -> None:
        """The membership lease could not be renewed: stop granting and tell every
        local holder and waiter that its lock is lost (self-fencing).  The agent stays
        fenced until a membership without it, then one with it again, arrives."""
        self._fence("membership lease lost")

    def close(self) -> None:
        """Shut the agent down: every local lock is lost (holders are told, as for
        :meth:`lease_lost`) and the transport is closed.  The coordinator should
        remove this node; its locks elsewhere vanish with the membership change."""
        self._fence("lock agent shut down")
        self.transport.close()

    def status(self) -> dict[str, Any]:
        """A plain snapshot for dashboards and tests."""
        return {
            "node": self.node_id,
            "epoch": self.epoch,
            "fenced": self.fenced,
            "mastered": sorted(r for r, m in self.master_of.items() if m == self.node_id),
            "locks": len(self.handles),
            "directory_entries": len(self.dir_entries),
        }

    # ================================================================ helpers
    def _send(self, dst: str, msg: list[Any]) -> None:
        if dst == self.node_id:
            self._on_message(dst, msg)
        else:
            self.transport.send(dst, msg)

    def _directory(self, root: str) -> str:
        ml = self._member_list
        if len(ml) == 1:
            return ml[0]
        return rendezvous(root, ml)

    # ================================================================ requester side
    async def _acquire(
        self,
        name: str,
        mode: Mode,
        timeout: float | None,
        flags: int,
        on_blocking: BlockingCallback | None,
        parent: Handle | None,
        rng: tuple[int, int] | None,
        owner: Any,
    ) -> Handle:
        h = self.submit(
            name,
            mode,
            flags=flags,
            on_blocking=on_blocking,
            parent=parent,
            range=rng,
            owner=owner if owner is not None else id(asyncio.current_task()),
        )
        if h.state == H_GRANTED:
            return h
        await self._wait(h, timeout)
        return h

    async def _wait(self, h: Handle, timeout: float | None) -> None:
        """Wait for the pending request/conversion of ``h``; on timeout withdraw it."""
        if h.error is not None:
            err, h.error = h.error, None
            raise err
        loop = asyncio.get_running_loop()
        fut = h._fut = loop.create_future()
        new_request = h.state == H_PENDING
        timer = None
        if self.deadlock_wait is not None:
            timer = loop.call_later(self.deadlock_wait, self._start_search, h)
        try:
            if timeout is None:
                await fut
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout)
                except TimeoutError:
                    # withdraw; the master answers with DENY (timeout) or the grant that
                    # was already on its way, so no lock is ever orphaned
                    self._cancel(h, "timeout")
                    await fut
        except asyncio.CancelledError:
            if not fut.done():
                h.abandoned = True
                self._cancel(h, "cancelled")
            elif new_request and h.state == H_GRANTED and h.error is None:
                # granted, but the caller was cancelled before it could see the handle:
                # nobody will ever release it, so give it back now
                self._release(h)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            h._fut = None
        if h.error is not None:
            err, h.error = h.error, None
            raise err

    def submit(
        self,
        name: str,
        mode: int,
        *,
        flags: int = 0,
        on_blocking: BlockingCallback | None = None,
        parent: Handle | None = None,
        range: tuple[int, int] | None = None,
        owner: Any = None,
    ) -> Handle:
        """Start a lock request without waiting (the sans-I/O entry point used by the
        async API and by the simulation tests).  Returns the handle: granted at once,
        pending, or done with ``error`` set."""
        if not self._may_act():
            raise LockLost(
                f"lock agent {self.node_id} is fenced (lease lost); cannot lock {name!r}"
            )
        if parent is not None:
            if parent.agent is not self or parent.state not in (H_GRANTED, H_CONVERTING):
                raise UsageError("parent lock must be held through this agent")
            full = parent.name + SEP + name
            root = parent.root
        else:
            if SEP in name:
                raise UsageError("resource names may not contain \\x1f")
            full = root = name
        lid = next(self._lids)
        h = Handle(self, lid, full, root, mode, flags)
        h.on_blocking = on_blocking
        h.owner = owner
        if parent is not None:
            h.parent = parent
            parent.n_children += 1
        if range is not None:
            h.start, h.end = range
            if not 0 <= h.start < h.end:
                raise ValueError(f"empty byte range {range}")
        self.handles[lid] = h
        master = self.master_of.get(root)
        if master == self.node_id and root not in self.recovering:
            # zero-message fast path
            h.master = master
            if range is None:
                res = self.table.grant_idle(full, h.key, mode, master, (master, owner), flags)
                if res is not None:
                    h.state = H_GRANTED
                    h.mode = Mode(mode)
                    h.token = res.token
                    h.value = res.value
                    h.value_valid = res.valid
                    dead = res.dead_holder
                    if dead is not None:
                        h.previous_holder_died = dead
                        if mode >= Mode.PW:
                            res.dead_holder = None
                    return h
            self._dispatch(
                self.table.request(
                    full,
                    h.key,
                    mode,
                    node=self.node_id,
                    owner=(self.node_id, owner),
                    flags=flags,
                    start=h.start,
                    end=h.end,
                )
            )
        elif master is not None and root not in self.resolving:
            self._send_req(h, master)
        else:
            self._resolve(h)
        return h

    def _send_req(self, h: Handle, master: str) -> None:
        h.master = master
        if master == self.node_id:
            if h.root in self.recovering:
                self.recovering[h.root].buffered.append((self.node_id, self._req_msg(h)))
                return
            self._dispatch(
                self.table.request(
                    h.name,
                    h.key,
                    h.rqmode,
                    node=self.node_id,
                    owner=(self.node_id, h.owner),
                    flags=h.flags,
                    start=h.start,
                    end=h.end,
                )
            )
        else:
            self.transport.send(master, self._req_msg(h))

    def _req_msg(self, h: Handle) -> list[Any]:
        full = h.start == 0 and h.end == RANGE_MAX
        return [
            REQ,
            h.name,
            h.lid,
            h.rqmode,
            h.flags,
            None if full else h.start,
            None if full else h.end,
            h.owner,
        ]

    def _resolve(self, h: Handle) -> None:
        """Find the master of ``h.root`` (directory lookup), then send the request."""
        root = h.root
        waiting = self.resolving.get(root)
        if waiting is not None:
            waiting.append(h)
            return
        self.resolving[root] = [h]
        self._lookup(root)

    def _lookup(self, root: str) -> None:
        d = self._directory(root)
        self._send(d, [LOOKUP, self.epoch, root])

    def _resolved(self, root: str, master: str) -> None:
        self.master_of[root] = master
        handles = self.resolving.pop(root, [])
        buffered = self.buffered.pop(root, [])
        for src, msg in buffered:
            self._on_message(src, msg)
        for h in handles:
            if h.state == H_PENDING and not h.abandoned:
                self._send_req(h, master)
            elif h.state == H_PENDING:
                self._finish(h, None)

    def _release(self, h: Handle) -> None:
        if h.state == H_DONE:
            return
        if h.n_children:
            raise UsageError(f"release the {h.n_children} child lock(s) of {h.name!r} first")
        value, h._write = h._write, None
        if h.state == H_PENDING:
            # released before granted (e.g. cancelled): withdraw instead
            h.abandoned = True
            self._cancel(h, "cancelled")
            return
        self._finish(h, None)
        master = h.master
        if master == self.node_id:
            if h.root in self.recovering:
                self.recovering[h.root].buffered.append((self.node_id, [REL, h.name, h.lid, value]))
                return
            events = self.table.release(h.key, value)
            if events:
                self._dispatch(events)
        elif master is not None:
            self.transport.send(master, [REL, h.name, h.lid, value])

    def _finish(self, h: Handle, error: DlmError | None) -> None:
        """The handle is done (released, denied, lost)."""
        h.state = H_DONE
        self.handles.pop(h.lid, None)
        p = h.parent
        if p is not None:
            p.n_children -= 1
            h.parent = None
        if error is not None:
            h.error = error
        fut = h._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _cancel(self, h: Handle, reason: str) -> None:
        master = h.master
        if master is None:
            # still resolving the master: nothing was sent
            if h.state == H_PENDING:
                if h.root in self.resolving and h in self.resolving[h.root]:
                    self.resolving[h.root].remove(h)
                self._finish(h, denial_error(reason, h.name))
            return
        if master == self.node_id:
            if h.root in self.recovering:
                self.recovering[h.root].buffered.append(
                    (self.node_id, [CANCEL, h.name, h.lid, reason])
                )
                return
            self._dispatch(self.table.cancel(h.key, reason))
        elif master not in self.members and h.state == H_PENDING:
            # the master died: nothing will answer; recovery will not re-send it
            h.abandoned = True
            self._finish(h, denial_error(reason, h.name))
        else:
            self.transport.send(master, [CANCEL, h.name, h.lid, reason])

    async def _convert(
        self, h: Handle, mode: Mode, timeout: float | None, noqueue: bool, quecvt: bool
    ) -> None:
        self.start_convert(h, mode, (NOQUEUE if noqueue else 0) | (QUECVT if quecvt else 0))
        if h.state == H_CONVERTING:
            await self._wait(h, timeout)
        elif h.error is not None:
            err, h.error = h.error, None
            raise err

    def start_convert(self, h: Handle, mode: int, flags: int = 0) -> None:
        """Start converting granted lock ``h`` to ``mode`` without waiting (sans-I/O
        entry point).  ``flags``: NOQUEUE and/or QUECVT.  A staged value is written
        if ``h`` is held in PW/EX."""
        if self.fenced or h.state == H_DONE:
            h.check()
        if h.state != H_GRANTED:
            raise UsageError(f"lock on {h.name!r} has a conversion in progress")
        flags = (h.flags & ~(NOQUEUE | QUECVT)) | (flags & (NOQUEUE | QUECVT))
        h.flags = flags
        h.rqmode = mode
        h.state = H_CONVERTING
        value, h._write = h._write, None
        master = h.master
        if master == self.node_id and h.root not in self.recovering:
            self._dispatch(self.table.convert(h.key, mode, flags=flags, value=value))
        else:
            assert master is not None
            self._send(master, [CVT, h.name, h.lid, mode, flags, value])

    # ---------------------------------------------------------------- results
    def _granted(
        self, lid: int, mode: int, token: int, value: bytes | None, valid: bool, dead: str | None
    ) -> None:
        h = self.handles.get(lid)
        if h is None:
            return
        if h.abandoned:
            # the caller gave up, but the grant won the race: give it back
            h.state = H_GRANTED
            h.rqmode = mode
            self._release(h)
            return
        h.state = H_GRANTED
        h.mode = Mode(mode)
        h.rqmode = mode
        h.token = token
        h.value = value or b""
        h.value_valid = valid
        h.previous_holder_died = dead
        fut = h._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _denied(self, lid: int, reason: str, still_granted: bool) -> None:
        h = self.handles.get(lid)
        if h is None:
            return
        if still_granted:
            h.state = H_GRANTED
            assert h.mode is not None
            h.rqmode = h.mode
            h.error = denial_error(reason, h.name)
            fut = h._fut
            if fut is not None and not fut.done():
                fut.set_result(None)
        else:
            self._finish(h, denial_error(reason, h.name))

    def _blocking(self, lid: int, mode: int) -> None:
        h = self.handles.get(lid)
        if h is None or h.on_blocking is None:
            return
        try:
            r = h.on_blocking(Mode(mode))
            if inspect.isawaitable(r):
                task = asyncio.ensure_future(r)
                self._bg.add(task)
                task.add_done_callback(self._bg.discard)
        except Exception:
            log.exception("blocking callback for %r failed", h.name)

    def _dispatch(self, events: list[Event]) -> None:
        """Deliver the core's events: to local handles directly, else by message."""
        if events and not self._may_act():
            return
        me = self.node_id
        for ev in events:
            node, lid = ev.key
            if type(ev) is Granted:
                if node == me:
                    self._granted(lid, ev.mode, ev.token, ev.value, ev.value_valid, ev.dead_holder)
                else:
                    self.transport.send(
                        node,
                        [
                            GRANT,
                            lid,
                            ev.mode,
                            ev.token,
                            ev.value or None,
                            ev.value_valid,
                            ev.dead_holder,
                        ],
                    )
            elif type(ev) is Denied:
                if node == me:
                    self._denied(lid, ev.reason, ev.still_granted)
                else:
                    self.transport.send(node, [DENY, lid, ev.reason, ev.still_granted])
            elif type(ev) is Blocking:
                if node == me:
                    self._blocking(lid, ev.mode)
                else:
                    self.transport.send(node, [BAST, lid, ev.mode])

    def _may_act(self) -> bool:
        """False once fenced; fences first if the host's lease may have expired.

        Checked before every grant (the zero-message fast path included) and every
        message acted on.  A process resumed after a long SIGSTOP runs whatever is ready
        before its lease keeper: found by the 30-minute chaos run, where a paused master
        granted a lock within 7 ms of waking, overlapping the grant of the master that
        had replaced it; and a GRANT accepted then would overlap the new master's too.
        """
        if self.fenced:
            return False
        if self.lease_valid is not None and not self.lease_valid():
            self._fence("membership lease expired")
            return False
        return True

    def _fence(self, why: str) -> None:
        if self.fenced:
            return
        log.warning("lock agent %s fenced: %s; all its locks are lost", self.node_id, why)
        self.fenced = True
        for h in list(self.handles.values()):
            was_held = h.state in (H_GRANTED, H_CONVERTING)
            self._finish(h, LockLost(f"lock on {h.name!r} lost: {why}; token {h.token} is stale"))
            if was_held:
                h.lost.set()
        # everything this node knew is void: others rebuild without it
        self.table = LockTable(self.epoch)
        self.master_of.clear()
        self.recovering.clear()
        self.resolving.clear()
        self.buffered.clear()
        self.unconfirmed.clear()
        self.dir_entries.clear()
        self.dir_copies.clear()
        self.tomb_copies.clear()
        self.tombstones.clear()
        self.dir_syncs.clear()
        self.dir_waiting.clear()
        self.future_msgs.clear()
        self._searches.clear()

    # ================================================================ messages
    def _on_message(self, src: str, msg: list[Any]) -> None:
        if not self._may_act():
            return
        op = msg[0]
        if op in _EPOCH_OPS and msg[1] > self.epoch:
            # sent by a node that already knows a newer membership: hold until we do
            self.future_msgs.append((src, msg))
            return
        if src != self.node_id and src not in self.members:
            return  # from a node that is not (or no longer) a member
        if op == REL:
            self._m_rel(src, msg)
        elif op == REQ:
            self._m_req(src, msg)
        elif op == GRANT:
            _, lid, mode, token, value, valid, dead = msg
            self._granted(lid, mode, token, value, valid, dead)
        elif op == DENY:
            self._denied(msg[1], msg[2], msg[3])
        elif op == BAST:
            self._blocking(msg[1], msg[2])
        elif op == CVT:
            self._m_cvt(src, msg)
        elif op == CANCEL:
            self._m_cancel(src, msg)
        elif op == NOTMASTER:
            self._m_notmaster(src, msg)
        elif op == LOOKUP:
            self._m_lookup(src, msg)
        elif op == LOOKUP_R:
            self._m_lookup_r(src, msg)
        elif op == DIRCOPY:
            if msg[1] == self.epoch:
                for root, m in msg[2]:
                    self.dir_copies[root] = m
                    self.tomb_copies.pop(root, None)
                for root, m in msg[3]:
                    self.tomb_copies[root] = m
        elif op in (DIRSYNC, ORPHAN, RECOVER, RECOVERED):
            if msg[1] == self.epoch:
                if op == DIRSYNC:
                    self._m_dirsync(src, msg)
                elif op == ORPHAN:
                    self._m_orphan(src, msg)
                elif op == RECOVER:
                    self._m_recover(src, msg)
                else:
                    self.unconfirmed.discard(msg[2])
        elif op == DLQ:
            self._send(src, [DLA, msg[1], [list(e) for e in self._edges()]])
        elif op == DLA:
            self._m_dla(src, msg)
        elif op == VICTIM:
            _, _name, node, lid = msg
            if (node, lid) in self.table.locks:
                self._dispatch(self.table.cancel((node, lid), "deadlock"))

    def _master_state(self, root: str, src: str, msg: list[Any]) -> bool:
        """True if this node can act as master of ``root`` now; otherwise the message
        is buffered (recovery or own lookup in progress) or answered NOTMASTER."""
        if self.master_of.get(root) == self.node_id:
            rec = self.recovering.get(root)
            if rec is None:
                return True
            rec.buffered.append((src, msg))
            return False
        if root in self.resolving:
            self.buffered.setdefault(root, []).append((src, msg))
            return False
        if msg[0] in (REQ, CVT):
            self._send(src, [NOTMASTER, msg[2]])
        return False

    def _m_req(self, src: str, msg: list[Any]) -> None:
        _, name, lid, mode, flags, start, end, owner = msg
        if type(owner) is list:
            owner = _frozen(owner)
        if not self._master_state(name.split(SEP, 1)[0], src, msg):
            return
        self._dispatch(
            self.table.request(
                name,
                (src, lid),
                mode,
                node=src,
                owner=(src, owner),
                flags=flags,
                start=0 if start is None else start,
                end=RANGE_MAX if end is None else end,
            )
        )

    def _m_cvt(self, src: str, msg: list[Any]) -> None:
        _, name, lid, mode, flags, value = msg
        if not self._master_state(name.split(SEP, 1)[0], src, msg):
            return
        key = (src, lid)
        if key not in self.table.locks:
            self._send(src, [DENY, lid, "lost", False])
            return
        self._dispatch(self.table.convert(key, mode, flags=flags, value=value))

    def _m_rel(self, src: str, msg: list[Any]) -> None:
        _, name, lid, value = msg
        if not self._master_state(name.split(SEP, 1)[0], src, msg):
            return
        events = self.table.release((src, lid), value)
        if events:
            self._dispatch(events)

    def _m_cancel(self, src: str, msg: list[Any]) -> None:
        _, name, lid, reason = msg
        if not self._master_state(name.split(SEP, 1)[0], src, msg):
            return
        self._dispatch(self.table.cancel((src, lid), reason))

    def _m_notmaster(self, src: str, msg: list[Any]) -> None:
        h = self.handles.get(msg[1])
        if h is None or h.master != src:
            return  # already re-homed (e.g. by recovery) since the request was sent
        if self.master_of.get(h.root) == src:
            del self.master_of[h.root]
        h.master = None
        if h.state == H_PENDING:
            if h.abandoned:
                self._finish(h, denial_error("cancelled", h.name))
            else:
                self._resolve(h)
        else:
            # a conversion reached a node that no longer masters the resource
            self._finish(h, LockLost(f"lock on {h.name!r} lost in recovery"))
            h.lost.set()

    # ---------------------------------------------------------------- directory
    def _m_lookup(self, src: str, msg: list[Any]) -> None:
        _, e, root = msg
        if e > self.epoch:
            self.future_msgs.append((src, msg))
            return
        if e < self.epoch:
            return  # the requester re-looks-up when it learns the new epoch
        if not self.dir_ready:
            self.dir_waiting.append((src, msg))
            return
        master = self.dir_entries.get(root)
        dead = None
        if master is None:
            master = self.dir_entries[root] = src
            # the previous master died with nobody else interested: tell the new one
            dead = self.tombstones.pop(root, None)
            backup = rendezvous_backup(root, self._member_list)
            if backup is not None:
                self._send(backup, [DIRCOPY, e, [[root, master]], []])
        self._send(src, [LOOKUP_R, e, root, master, dead])

    def _m_lookup_r(self, src: str, msg: list[Any]) -> None:
        _, e, root, master, dead = msg
        if e != self.epoch or root not in self.resolving or master is None:
            return
        if master == self.node_id:
            self.master_of[root] = master
            if dead is not None:
                res = self.table.resource(root)
                res.valid = False
                res.dead_holder = dead
        self._resolved(root, master)

    # ---------------------------------------------------------------- recovery
    def _recover(self, dead: set[str]) -> None:
        """Start recovery for the new epoch (see the module docstring)."""
        me = self.node_id
        # 1. masters drop dead nodes' locks; abandon unfinished recoveries
        for node in sorted(dead):
            self._dispatch(self.table.drop_node(node))
        held_roots = {h.root for h in self.handles.values() if h.master is not None}
        old_dead = {r: d for r, d in self._dead_masters.items()}
        self._dead_masters = {}
        claims: set[str] = set()
        for root, rec in list(self.recovering.items()):
            # unfinished recovery: start over in this epoch.  Requests that waited for
            # it are sent back (NOTMASTER: look the master up again); our own
            # withdrawn requests are finished here.
            self._drop_tree(root)
            del self.recovering[root]
            for bsrc, bmsg in rec.buffered:
                if bsrc != me and bmsg[0] in (REQ, CVT, CANCEL):
                    self._send(bsrc, [NOTMASTER, bmsg[2]])
                elif bsrc == me and bmsg[0] == CANCEL:
                    bh = self.handles.get(bmsg[2])
                    if bh is not None and bh.state == H_PENDING:
                        self._finish(bh, denial_error(bmsg[3], bh.name))
            self.master_of.pop(root, None)
            self._dead_masters[root] = rec.dead
            claims.add(root)
        # 2. which roots do we master, which do we claim
        masters: dict[str, list[str]] = {}
        for root, m in list(self.master_of.items()):
            if m == me:
                masters.setdefault(self._directory(root), []).append(root)
            elif m in dead or root in self.unconfirmed:
                del self.master_of[root]
                claims.add(root)
                if m in dead:
                    self._dead_masters[root] = m
                else:
                    self._dead_masters.setdefault(root, old_dead.get(root))
        claims |= self.unconfirmed - set(self.master_of)
        self.unconfirmed.clear()
        claims &= held_roots
        orphans: dict[str, list[str]] = {}
        for root in sorted(claims):
            orphans.setdefault(self._directory(root), []).append(root)
            self._dead_masters.setdefault(root, None)
        # pending requests whose master died: re-sent in RECOVER; those still looking
        # up: look up again once the directory is ready
        for root in claims:
            self.resolving.setdefault(root, [])
        # 3. the directory: rebuild from every member's DIRSYNC; remember roots whose
        # master died (if this node stays their directory) so that the next master is
        # told even if no survivor held a lock on them
        for entries in (self.dir_entries, self.dir_copies):
            for root, m in entries.items():
                if m in dead and self._directory(root) == me:
                    self.tombstones[root] = m
        for root, m in self.tomb_copies.items():
            if self._directory(root) == me:
                self.tombstones.setdefault(root, m)
        for root in [r for r in self.tombstones if self._directory(r) != me]:
            del self.tombstones[root]
        self.dir_copies = {}
        self.tomb_copies = {}
        self.dir_entries = {}
        self.dir_syncs = {}
        self.dir_waiting = []
        self.dir_ready = False
        for m in self._member_list:
            self._send(m, [DIRSYNC, self.epoch, masters.get(m, []), orphans.get(m, [])])
        for root in list(self.resolving):
            if root not in claims:
                self._lookup(root)  # the directory holds it until it is ready
        # 4. abort deadlock searches of older epochs
        self._searches.clear()
        # 5. messages that arrived early for this epoch
        early, self.future_msgs = self.future_msgs, []
        for src, msg in early:
            self._on_message(src, msg)

    def _drop_tree(self, root: str) -> None:
        t = self.table
        for name in [n for n in t.resources if n == root or n.startswith(root + SEP)]:
            res = t.resources.pop(name)
            for lk in list(res.granted.values()) + res.waiting:
                t.locks.pop(lk.key, None)

    def _m_dirsync(self, src: str, msg: list[Any]) -> None:
        _, e, masters, orphans = msg
        self.dir_syncs[src] = [masters, orphans]
        if self.dir_ready or set(self.dir_syncs) != set(self._member_list):
            return
        claimants: dict[str, set[str]] = {}
        for node in sorted(self.dir_syncs):
            ms, os_ = self.dir_syncs[node]
            for root in ms:
                self.dir_entries.setdefault(root, node)
            for root in os_:
                claimants.setdefault(root, set()).add(node)
        for root in sorted(claimants):
            cl = claimants[root]
            master = self.dir_entries.get(root)
            self.tombstones.pop(root, None)
            if master is None:
                master = self.dir_entries[root] = min(cl)
            for node in sorted(cl | {master}):
                self._send(node, [ORPHAN, e, root, master, sorted(cl)])
        self.dir_ready = True
        self.dir_syncs = {}
        # refresh the backups' copies (one message per backup node)
        copies: dict[str, list[list[Any]]] = {}
        tombs: dict[str, list[list[Any]]] = {}
        for root, m in self.dir_entries.items():
            b = rendezvous_backup(root, self._member_list)
            if b is not None:
                copies.setdefault(b, []).append([root, m])
        for root, m in self.tombstones.items():
            b = rendezvous_backup(root, self._member_list)
            if b is not None:
                tombs.setdefault(b, []).append([root, m])
        for b in sorted(set(copies) | set(tombs)):
            self._send(b, [DIRCOPY, e, copies.get(b, []), tombs.get(b, [])])
        waiting, self.dir_waiting = self.dir_waiting, []
        for src_, msg_ in waiting:
            self._m_lookup(src_, msg_)

    def _my_lock_records(self, root: str) -> list[list[Any]]:
        out: list[list[Any]] = []
        for h in self.handles.values():
            if h.root != root or h.state == H_DONE:
                continue
            if h.state == H_PENDING and (h.abandoned or h.master is None):
                continue  # never sent (still resolving) or given up
            mode = (
                int(h.mode) if h.state in (H_GRANTED, H_CONVERTING) and h.mode is not None else -1
            )
            val = h.value if h.state != H_PENDING else None
            out.append(
                [h.name, h.lid, h.owner, mode, h.rqmode, h.flags, h.start, h.end, h.token, val]
            )
        return out

    def _m_orphan(self, src: str, msg: list[Any]) -> None:
        _, e, root, master, claimants = msg
        me = self.node_id
        dead = self._dead_masters.get(root)
        if master == me and self.master_of.get(root) == me and root not in self.recovering:
            # already active here (a claimant re-sends after an interrupted recovery):
            # its RECOVER is merged on arrival, nothing to wait for
            return
        if self.node_id not in claimants and master != me:
            return
        records = self._my_lock_records(root)
        sent = {r[1] for r in records}
        for h in self.handles.values():
            if h.root == root and h.lid in sent:
                h.master = master
        self.master_of[root] = master
        if master != me:
            self.unconfirmed.add(root)
            self._send(master, [RECOVER, e, root, dead, records])
            self._resolved(root, master)
            return
        # this node is the new master: wait for every other claimant's locks
        rec = _Recovering(e, set(claimants) - {me}, dead)
        self.recovering[root] = rec
        self._insert_records(me, records, rec)
        self._maybe_finish_recovery(root)

    def _insert_records(self, node: str, records: list[list[Any]], rec: _Recovering | None) -> None:
        for name, lid, owner, mode, rqmode, flags, start, end, token, val in records:
            self.table.insert_recovered(
                name,
                (node, lid),
                node=node,
                owner=(node, _frozen(owner)),
                mode=mode,
                rqmode=rqmode,
                flags=flags,
                start=start,
                end=end,
                token=token,
            )
            if rec is not None and mode >= 0 and val is not None:
                rec.values.setdefault(name, []).append((mode, val))

    def _m_recover(self, src: str, msg: list[Any]) -> None:
        _, e, root, dead, records = msg
        rec = self.recovering.get(root)
        if rec is None:
            if self.master_of.get(root) == self.node_id:
                # active resource: merge (keys already present are ignored)
                self._insert_records(src, records, None)
                self._dispatch(self.table.settle(self._tree(root)))
                self._send(src, [RECOVERED, e, root])
            return
        if dead is not None and rec.dead is None:
            rec.dead = dead
        self._insert_records(src, records, rec)
        rec.waiting_for.discard(src)
        self._maybe_finish_recovery(root)

    def _tree(self, root: str) -> list[str]:
        return [n for n in self.table.resources if n == root or n.startswith(root + SEP)]

    def _maybe_finish_recovery(self, root: str) -> None:
        rec = self.recovering.get(root)
        if rec is None or rec.waiting_for:
            return
        del self.recovering[root]
        names = self._tree(root)
        for name in names:
            res = self.table.resources[name]
            modes = [lk.mode for lk in res.granted.values()]
            vals = [v for m, v in rec.values.get(name, []) if m >= Mode.PR]
            # a surviving PR/PW/EX holder's copy is current (no writer could coexist
            # with it); otherwise the value died with the old master
            res.valid = bool(vals)
            res.value = vals[0] if vals else b""
            if rec.dead is not None and all(m <= Mode.CR for m in modes):
                # the dead master may have held PW/EX: whoever writes next replays it
                res.dead_holder = rec.dead
                res.valid = False
            if res.token < (self.epoch << 32):
                res.token = self.epoch << 32
        self._dispatch(self.table.settle(names))
        for node in rec.claimants:
            self._send(node, [RECOVERED, rec.epoch, root])
        handles = self.resolving.pop(root, [])
        for src, m in rec.buffered:
            self._on_message(src, m)
        for h in handles:
            if h.state == H_PENDING and h.master is None:
                self._send_req(h, self.node_id)

    # ---------------------------------------------------------------- deadlocks
    def _edges(self) -> list[tuple[Any, ...]]:
        return [
            (w[0], w[1], wo[0], wo[1], bo[0], bo[1], name)
            for w, wo, bo, name in self.table.wait_for_edges()
        ]

    def _start_search(self, h: Handle) -> None:
        """Deadlock search for ``h`` (still waiting after ``deadlock_wait``)."""
        if h.state not in (H_PENDING, H_CONVERTING) or self.fenced:
            return
        qid = next(self._qids)
        self.stats["searches"] += 1
        self._searches[qid] = (h, set(self._member_list), [])
        for m in self._member_list:
            self._send(m, [DLQ, qid])

    def detect_deadlocks(self) -> None:
        """Start a deadlock search for every waiting local request (simulation use)."""
        for h in list(self.handles.values()):
            if h.state in (H_PENDING, H_CONVERTING):
                self._start_search(h)

    def _m_dla(self, src: str, msg: list[Any]) -> None:
        _, qid, edges = msg
        s = self._searches.get(qid)
        if s is None:
            return
        h, waiting_for, got = s
        waiting_for.discard(src)
        got.extend((src, e) for e in edges)
        if waiting_for:
            return
        del self._searches[qid]
        victim = _find_victim(got, (self.node_id, h.owner))
        if victim is not None:
            master, name, node, lid = victim
            self.stats["deadlocks"] += 1
            self._send(master, [VICTIM, name, node, lid])
        elif h.state in (H_PENDING, H_CONVERTING) and self.deadlock_wait is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(self.deadlock_wait, self._start_search, h)


def _frozen(x: Any) -> Any:
    """Lists (as msgpack decodes tuples) -> tuples, so owners can be dict keys."""
    if isinstance(x, list):
        return tuple(_frozen(i) for i in x)
    return x


def _find_victim(
    reported: list[tuple[str, list[Any]]], start: tuple[str, Any]
) -> tuple[str, str, str, int] | None:
    """Find a wait-for cycle through owner ``start``; return the victim lock as
    ``(master, resource, node, lid)``: the largest (node, lid) waiting on the cycle, so
    concurrent searches agree on a single victim."""
    graph: dict[tuple[str, Any], list[tuple[tuple[str, Any], tuple[str, str, str, int]]]] = {}
    for master, (wn, wl, won, wok, bon, bok, name) in reported:
        graph.setdefault((won, _frozen(wok)), []).append(
            ((bon, _frozen(bok)), (master, name, wn, wl))
        )
    # DFS for a path start -> ... -> start
    path: list[tuple[str, str, str, int]] = []
    seen: set[tuple[str, Any]] = set()

    def dfs(node: tuple[str, Any]) -> bool:
        for nxt, lock in graph.get(node, []):
            path.append(lock)
            if nxt == start:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if dfs(nxt):
                    return True
            path.pop()
        return False

    if not dfs(start):
        return None
    return max(path, key=lambda v: (v[2], v[3]))


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.002) -> None:
    """Poll ``pred`` until true (tests and tools); raises TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached in time")
        await asyncio.sleep(step)


__all__ = ["Handle", "LockAgent", "LockCall", "LostFlag", "rendezvous", "wait_until"]
_EPOCH_OPS = frozenset({LOOKUP, DIRSYNC, ORPHAN, RECOVER, RECOVERED, DIRCOPY})
