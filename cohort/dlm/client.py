"""Network access to a lock agent for programs that are not Cohort servers.

Server side: :class:`ClientService` registers ``dlm.c.*`` methods on the agent host's
:class:`~cohort.rpc.RpcServer`.  Each client opens a *session*; the agent holds the
locks on the session's behalf.  The client long-polls ``dlm.c.poll`` (which is also its
keep-alive): blocking notifications and lock losses come back that way.  A session not
heard from for ``session_timeout`` seconds is closed and its locks released, so a
crashed client never keeps a lock for long.

Who may lock what: every connection is authenticated (:mod:`cohort.rpc`).  A tenant's
session (an application with a tenant's access key) sees only its own namespace: the
name ``jobs/42`` it asks for is the agent's ``tenant/<tenant>/jobs/42``, so no tenant can
see, take or block another tenant's names or the system's ``partition/*`` locks.  A
session belongs to the principal that opened it; another principal's calls on it are
answered as for an unknown session.  A session holds at most ``max_locks`` locks and
requests at once, and a tenant at most ``max_sessions`` sessions per agent.  Members of
the cluster (its own processes) lock names as given.

Client side: :class:`DlmClient`::

    client = DlmClient("127.0.0.1:7000", tenant_credential(access_key, secret_key))
    async with client.lock("jobs/42", "EX", timeout=5) as h:
        ...  # h.token, h.value, h.set_value(), await h.convert("PR")
    await client.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any

from cohort.auth import Credential, Principal
from cohort.dlm.agent import Handle, LockAgent, LostFlag
from cohort.dlm.call import AcquireCall
from cohort.dlm.errors import (
    Cancelled,
    DeadlockError,
    DlmError,
    LockLost,
    LockTimeout,
    NotQueued,
    UsageError,
)
from cohort.dlm.modes import Mode, parse_mode
from cohort.rpc import RpcClient, RpcError, RpcServer, current_peer

MAX_NAME = 255
TENANT_PREFIX = "tenant/"

_ERRORS: dict[str, type[DlmError]] = {
    "NotQueued": NotQueued,
    "LockTimeout": LockTimeout,
    "DeadlockError": DeadlockError,
    "LockLost": LockLost,
    "Cancelled": Cancelled,
    "UsageError": UsageError,
    "DlmError": DlmError,
}


def _set_value(h: Handle, value: Any) -> None:
    if not isinstance(value, bytes) or len(value) > 64:
        raise RpcError("UsageError", "a lock value block is at most 64 bytes")
    h.set_value(value)


class _Session:
    def __init__(self, sid: int, owner: Principal) -> None:
        self.sid = sid
        self.owner = owner
        self.pending = 0  # lock requests waiting
        self.handles: dict[int, Handle] = {}
        self.events: list[list[Any]] = []
        self.wake = asyncio.Event()
        self.seen = time.monotonic()


class ClientService:
    """Serves lock requests of remote clients through ``agent``."""

    def __init__(
        self,
        agent: LockAgent,
        server: RpcServer,
        *,
        session_timeout: float = 5.0,
        lease_remaining: Callable[[], float] | None = None,
        max_locks: int = 1000,
        max_sessions: int = 64,
        cluster_wide: Callable[[], bool] | None = None,
    ) -> None:
        self.agent = agent
        # False while the agent is not part of the cluster's lock manager (no membership
        # from the coordinator): a grant then would be local only and could conflict
        # with another server's, so lock requests are refused instead
        self.cluster_wide = cluster_wide
        self.session_timeout = session_timeout
        self.max_locks = max_locks
        self.max_sessions = max_sessions
        # Seconds the host's membership lease still runs (None: no leases).  Every
        # answer carries it, so a client knows how long its locks are good for without
        # hearing from us again (see DlmClient.valid_until).
        self.lease_remaining = lease_remaining
        self.sessions: dict[int, _Session] = {}
        self._reaper: asyncio.Task[None] | None = None
        for name in ("open", "lock", "release", "convert", "poll", "close"):
            server.register(f"dlm.c.{name}", getattr(self, f"_c_{name}"), tenants=True)

    @staticmethod
    def _peer() -> Principal:
        # handlers run only on authenticated connections (cohort.rpc sets the peer)
        return current_peer.get()

    def _session(self, sid: Any) -> _Session:
        s = self.sessions.get(sid) if isinstance(sid, int) else None
        if s is None or s.owner != self._peer():
            # another principal's session is answered as an unknown one: sessions of
            # others can be neither seen nor used
            raise RpcError("LockLost", f"session {sid} expired; its locks were released")
        s.seen = time.monotonic()
        return s

    @staticmethod
    def resource_name(owner: Principal, name: Any) -> str:
        """The agent's resource for ``name`` asked by ``owner`` (a tenant's namespace)."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\0" in name:
            raise RpcError("UsageError", f"a lock name is 1 to {MAX_NAME} characters, no NUL")
        if owner.is_member:
            return name
        return f"{TENANT_PREFIX}{owner.name}/{name}"

    async def _c_open(self, params: Any) -> int:
        owner = self._peer()
        if not owner.is_member:
            mine = sum(1 for s in self.sessions.values() if s.owner == owner)
            if mine >= self.max_sessions:
                raise RpcError(
                    "TooManySessions",
                    f"tenant {owner.name} has {mine} lock sessions on this server "
                    f"(at most {self.max_sessions}); close some",
                )
        sid = secrets.randbits(62) + 1  # unguessable: not that it matters, sessions are owned
        self.sessions[sid] = _Session(sid, owner)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return sid

    async def _c_lock(self, params: Any) -> list[Any]:
        try:
            sid, name, mode, timeout, noqueue, blocking = params
            mode = Mode(mode)
        except (TypeError, ValueError):
            raise RpcError("UsageError", "malformed lock request") from None
        s = self._session(sid)
        resource = self.resource_name(s.owner, name)
        if self.cluster_wide is not None and not self.cluster_wide():
            raise RpcError(
                "LockManagerUnavailable",
                "this server's lock agent is not (yet) part of a cluster-wide lock manager: "
                "it has no membership from the coordinator (on etcd, cluster-wide locks "
                "are not built yet); no lock was granted",
            )
        if len(s.handles) + s.pending >= self.max_locks:
            raise RpcError(
                "TooManyLocks",
                f"this session holds or waits for {len(s.handles) + s.pending} locks "
                f"(at most {self.max_locks}); release some first",
            )
        cb: Callable[[Mode], None] | None = None
        box: list[Handle] = []
        if blocking:

            def cb(m: Mode) -> None:
                if box:
                    s.events.append(["blocking", box[0].lid, int(m)])
                    s.wake.set()

        s.pending += 1
        try:
            h = await self.agent.lock(
                resource,
                mode,
                timeout=timeout,
                noqueue=noqueue,
                on_blocking=cb,
                owner=("client", sid),
            )
        except DlmError as e:
            raise RpcError(type(e).__name__, self._unprefix(s.owner, str(e))) from None
        finally:
            s.pending -= 1
        box.append(h)
        if sid not in self.sessions:  # session expired while waiting
            await h.release()
            raise RpcError("LockLost", "session expired")
        s.handles[h.lid] = h
        asyncio.get_running_loop().create_task(self._watch_lost(s, h))
        return [
            h.lid,
            int(h.mode or 0),
            h.token,
            h.value,
            h.value_valid,
            h.previous_holder_died,
            self._lease(),
        ]

    @staticmethod
    def _unprefix(owner: Principal, text: str) -> str:
        # error messages name resources: a tenant sees its own names only
        return text if owner.is_member else text.replace(f"{TENANT_PREFIX}{owner.name}/", "")

    def _lease(self) -> float | None:
        return None if self.lease_remaining is None else max(0.0, self.lease_remaining())

    async def _watch_lost(self, s: _Session, h: Handle) -> None:
        await h.lost.wait()
        s.events.append(["lost", h.lid, 0])
        s.wake.set()

    async def _c_release(self, params: Any) -> None:
        sid, lid, value = params
        s = self._session(sid)
        h = s.handles.pop(lid, None)
        if h is not None:
            if value is not None:
                _set_value(h, value)
            await h.release()

    async def _c_convert(self, params: Any) -> list[Any]:
        sid, lid, mode, timeout, noqueue, value = params
        s = self._session(sid)
        h = s.handles.get(lid)
        if h is None:
            raise RpcError("LockLost", "lock not held")
        if value is not None:
            _set_value(h, value)
        try:
            await h.convert(Mode(mode), timeout=timeout, noqueue=noqueue)
        except DlmError as e:
            raise RpcError(type(e).__name__, self._unprefix(s.owner, str(e))) from None
        except ValueError:
            raise RpcError("UsageError", f"no lock mode {mode!r}") from None
        return [int(h.mode or 0), h.token, h.value, h.value_valid, h.previous_holder_died]

    async def _c_poll(self, params: Any) -> dict[str, Any]:
        sid, wait = params
        s = self._session(sid)
        if not s.events:
            s.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.wake.wait(), min(float(wait), self.session_timeout / 2))
        s.seen = time.monotonic()
        ev, s.events = s.events, []
        return {"events": ev, "lease": self._lease()}

    async def _c_close(self, params: Any) -> None:
        self._session(params)
        await self._close_session(params)

    async def _close_session(self, sid: int) -> None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            for h in s.handles.values():
                await h.release()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.session_timeout / 4)
            now = time.monotonic()
            for sid, s in list(self.sessions.items()):
                if now - s.seen > self.session_timeout:
                    await self._close_session(sid)

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()


class RemoteHandle:
    """A lock held through :class:`DlmClient`; the same surface as
    :class:`~cohort.dlm.agent.Handle`."""

    def __init__(self, client: DlmClient, name: str, lid: int, r: list[Any]) -> None:
        self.client = client
        self.name = name
        self.lid = lid
        self.lost = LostFlag()
        self._write: bytes | None = None
        self._update(r)

    def _update(self, r: list[Any]) -> None:
        mode, self.token, value, self.value_valid, self.previous_holder_died = r[:5]
        self.mode = Mode(mode)
        self.value: bytes = value or b""

    def set_value(self, value: bytes) -> None:
        if len(value) > 64:
            raise ValueError("lock value block is at most 64 bytes")
        self._write = bytes(value)

    @property
    def valid_until(self) -> float:
        """``time.monotonic()`` past which this lock may already be granted to someone
        else (the agent's lease, as last confirmed; ``inf`` without leases).  Act on the
        lock only before it; :attr:`lost` is set when it passes unconfirmed."""
        return self.client.valid_until

    async def release(self) -> None:
        if self.lid in self.client._handles:
            del self.client._handles[self.lid]
            value, self._write = self._write, None
            await self.client._call("dlm.c.release", [self.client.sid, self.lid, value])

    async def convert(
        self, mode: Mode | str, *, timeout: float | None = None, noqueue: bool = False
    ) -> None:
        value, self._write = self._write, None
        r = await self.client._call(
            "dlm.c.convert",
            [self.client.sid, self.lid, int(parse_mode(mode)), timeout, noqueue, value],
        )
        self._update(r)

    async def __aenter__(self) -> RemoteHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class DlmClient:
    """Takes locks from a running agent at ``address`` ("host:port") over TCP.

    ``credential`` is a tenant's (:func:`cohort.auth.tenant_credential` from an access
    key and its secret: names are then in that tenant's namespace) or a member's.
    """

    def __init__(self, address: str, credential: Credential, *, poll_interval: float = 1.0) -> None:
        host, _, port = address.rpartition(":")
        self.rpc = RpcClient(host, int(port), credential)
        self.sid = 0
        self.poll_interval = poll_interval
        self._handles: dict[int, RemoteHandle] = {}
        self._callbacks: dict[int, Callable[[Mode], Any]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._open_lock = asyncio.Lock()
        # Until when (our clock) the agent's lease was last confirmed to run: a lease
        # remaining L in an answer to a request sent at t is good until t + L at least.
        self.valid_until = float("inf")
        self._bg: set[asyncio.Task[Any]] = set()

    async def _call(self, method: str, params: Any, timeout: float | None = None) -> Any:
        try:
            return await self.rpc.call(method, params, timeout=timeout if timeout else 3600.0)
        except RpcError as e:
            cls = _ERRORS.get(e.code)
            if cls is not None:
                raise cls(e.message) from None
            raise

    async def connect(self) -> None:
        async with self._open_lock:
            if self.sid:
                return
            self.sid = await self._call("dlm.c.open", None)
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def lock(
        self,
        name: str,
        mode: Mode | str,
        *,
        timeout: float | None = None,
        noqueue: bool = False,
        on_blocking: Callable[[Mode], Any] | None = None,
    ) -> AcquireCall[RemoteHandle]:
        """Like :meth:`LockAgent.lock` (await it or use ``async with``)."""
        args = [name, int(parse_mode(mode)), timeout, noqueue, on_blocking is not None]
        return AcquireCall(lambda: self._lock(args, on_blocking), RemoteHandle.release)

    async def _lock(
        self, args: list[Any], on_blocking: Callable[[Mode], Any] | None
    ) -> RemoteHandle:
        if not self.sid:
            await self.connect()
        sent = time.monotonic()
        r = await self._call(
            "dlm.c.lock", [self.sid, *args], timeout=None if args[2] is None else args[2] + 30
        )
        lid = r[0]
        self._confirmed(sent, r[6] if len(r) > 6 else None)
        h = RemoteHandle(self, args[0], lid, r[1:])
        self._handles[lid] = h
        if on_blocking is not None:
            self._callbacks[lid] = on_blocking
        return h

    def _confirmed(self, sent: float, lease: float | None) -> None:
        if lease is None:
            self.valid_until = float("inf")
        elif self.valid_until == float("inf") or sent + lease > self.valid_until:
            self.valid_until = sent + lease

    def _lose_all(self) -> None:
        """Every lock is lost: tell the holders, and give the locks back in case the
        agent still holds them for us (a transient failure; otherwise a no-op)."""
        for lid, h in list(self._handles.items()):
            h.lost.set()
            t = asyncio.get_running_loop().create_task(self._release_quietly(lid))
            self._bg.add(t)
            t.add_done_callback(self._bg.discard)
        self._handles.clear()

    async def _release_quietly(self, lid: int) -> None:
        with contextlib.suppress(Exception):
            await self.rpc.call("dlm.c.release", [self.sid, lid, None], timeout=5)

    async def _poll(self) -> None:
        while True:
            sent = time.monotonic()
            # give up waiting when the lease runs out: from then on the locks may be
            # granted elsewhere, whatever the agent would still answer
            budget = min(self.poll_interval + 10, max(0.0, self.valid_until - sent))
            try:
                if self._handles and budget <= 0:
                    raise TimeoutError("agent lease not confirmed in time")
                # the agent answers within ``wait``: often enough to renew before the end
                # (with no lock held there is nothing to renew: the plain interval)
                wait = self.poll_interval
                if self._handles:
                    wait = min(wait, max(0.05, budget / 3))
                r = await asyncio.wait_for(
                    self.rpc.call("dlm.c.poll", [self.sid, wait], timeout=wait + 10),
                    budget if self._handles else self.poll_interval + 10,
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                # the agent is gone, our session expired, or its lease may have: every
                # lock is lost
                self._lose_all()
                await asyncio.sleep(self.poll_interval)
                continue
            events = r["events"] if isinstance(r, dict) else r
            self._confirmed(sent, r.get("lease") if isinstance(r, dict) else None)
            for kind, lid, mode in events:
                rh = self._handles.get(lid)
                if rh is None:
                    continue
                if kind == "lost":
                    rh.lost.set()
                    self._handles.pop(lid, None)
                elif kind == "blocking":
                    cb = self._callbacks.get(lid)
                    if cb is not None:
                        r = cb(Mode(mode))
                        if asyncio.iscoroutine(r):
                            await r

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
        if self.sid:
            with contextlib.suppress(Exception):
                await self.rpc.call("dlm.c.close", self.sid, timeout=2)
        await self.rpc.close()
