"""A lock workload for chaos runs: DLM EX locks through random servers, fenced writes.

Each of ``clients`` tasks loops: connect a :class:`~cohort.dlm.client.DlmClient` to a
random server (addresses re-read each time, so restarted servers are found), take
``resource`` in EX, and while holding it write its fencing token into an S3 object
(``fence_key``) — reading the object first, so every write records which token it
replaced.  It holds briefly, then releases.  Every grant becomes a
:class:`~cohort.chaos.lock_check.LockInterval` (for ``run_chaos(lock_intervals=...)``).

A lost lock (the server holding it for us was killed, paused past its lease, or our
session expired) ends the interval when the client *learns* of the loss; a holder that
has learned of it does not write any more.  The protected writes are checked by
:meth:`LockWorkload.fence_violations`: in the order the writes landed (each write saw the
previous one's token), tokens must never go backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cohort.auth import Credential, tenant_credential
from cohort.chaos.lock_check import LockInterval, Violation, fenced_writes
from cohort.chaos.runner import CheckOutcome, ClusterInfo, KVClient, OpOutcome


@dataclass(frozen=True, slots=True)
class FenceWrite:
    """A write of ``token`` acknowledged at ``acked``; it read ``prev`` just before."""

    holder: str
    token: int
    prev: int | None
    acked: float


class LockWorkload:
    def __init__(
        self,
        servers: Callable[[], Sequence[str]],
        *,
        clients: int = 3,
        seed: int = 0,
        resource: str = "chaos/lock",
        hold: tuple[float, float] = (0.02, 0.15),
        lock_timeout: float = 5.0,
        kv_factory: Callable[[], KVClient] | None = None,
        fence_key: str = "chaos/fence",
        credential: Credential | None = None,
    ) -> None:
        # a tenant's credential (its lock names are in its namespace on every server)
        self.credential = credential
        self.servers = servers
        self.clients = clients
        self.rng = random.Random(seed)
        self.resource = resource
        self.hold = hold
        self.lock_timeout = lock_timeout
        self.kv_factory = kv_factory
        self.fence_key = fence_key
        self._intervals: list[LockInterval] = []
        self.writes: list[FenceWrite] = []
        self.errors: dict[str, int] = {}
        self.lost = 0
        self.refused = 0  # fenced writes the object refused (a newer holder had written)
        self.conditional = False  # the writes were conditional PUTs (set on first use)

    def intervals(self) -> list[LockInterval]:
        return list(self._intervals)

    async def run(self, duration: float) -> None:
        stop_at = time.monotonic() + duration
        await asyncio.gather(*(self._client(i, stop_at) for i in range(self.clients)))

    def _err(self, e: BaseException) -> None:
        k = type(e).__name__
        self.errors[k] = self.errors.get(k, 0) + 1

    async def _client(self, i: int, stop_at: float) -> None:
        from cohort.dlm.client import DlmClient

        kv = self.kv_factory() if self.kv_factory else None
        n = 0
        while time.monotonic() < stop_at:
            addrs = list(self.servers())
            if not addrs:
                await asyncio.sleep(0.1)
                continue
            addr = self.rng.choice(addrs)
            holder = f"c{i}.{n}@{addr}"
            n += 1
            if self.credential is None:
                raise RuntimeError("LockWorkload needs a credential to lock with")
            client = DlmClient(addr, self.credential, poll_interval=0.5)
            try:
                await self._one(client, holder, kv)
            except Exception as e:
                self._err(e)
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 3)

    async def _one(self, client: object, holder: str, kv: KVClient | None) -> None:
        from cohort.dlm.client import DlmClient

        assert isinstance(client, DlmClient)
        h = await asyncio.wait_for(
            client.lock(self.resource, "EX", timeout=self.lock_timeout), self.lock_timeout + 5
        )
        granted = time.monotonic()
        lost_at: list[float] = []
        watcher = asyncio.get_running_loop().create_task(h.lost.wait())
        watcher.add_done_callback(lambda _t: lost_at.append(time.monotonic()))

        def gone() -> bool:  # lost, or the agent's lease may have run out unconfirmed
            return h.lost.is_set() or time.monotonic() >= h.valid_until

        try:
            if kv is not None and not gone():
                await self._fenced_write(kv, holder, int(h.token), gone)
            if not gone():
                await asyncio.sleep(self.rng.uniform(*self.hold))
        finally:
            end = time.monotonic()  # release starts: from here on we no longer act as owner
            if lost_at or gone():
                end = min(end, lost_at[0]) if lost_at else end
                end = min(end, h.valid_until)
                self.lost += 1
            watcher.cancel()
            self._intervals.append(
                LockInterval(holder, self.resource, "EX", granted, end, int(h.token))
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(h.release(), 3)

    async def _fenced_write(
        self, kv: KVClient, holder: str, token: int, lost: Callable[[], bool]
    ) -> None:
        """Write ``token`` into the protected object, fenced the way a resource must
        fence: only over the version just read (a conditional PUT), and only if the
        token found there is lower than ours.  A holder deposed while its write was in
        flight (a pause, a slow network) is then refused by the object itself; the lock
        service alone cannot stop a write already on its way."""
        get_versioned = getattr(kv, "get_versioned", None)
        put_if = getattr(kv, "put_if", None)
        etag: str | None = None
        try:
            if get_versioned is not None:
                cur, etag = await asyncio.to_thread(get_versioned, self.fence_key)
            else:
                cur = await asyncio.to_thread(kv.get, self.fence_key)
        except OpOutcome:
            return  # nothing written: nothing to check
        prev = int(cur) if isinstance(cur, str) and cur.isdigit() else None
        if lost():
            return
        self.conditional = put_if is not None
        if put_if is not None and prev is not None and prev >= token:
            self.refused += 1  # a newer holder already wrote: we were deposed
            return
        try:
            if put_if is not None:
                await asyncio.to_thread(put_if, self.fence_key, str(token), etag)
            else:
                await asyncio.to_thread(kv.put, self.fence_key, str(token))
        except OpOutcome as o:
            if o.result == "fail":
                self.refused += 1  # the object changed since we read it
            return  # not counted as landed
        self.writes.append(FenceWrite(holder, token, prev, time.monotonic()))

    def fence_violations(self) -> list[Violation]:
        """Tokens of the protected writes, in landing order, never go backwards: each
        write's token exceeds the token it read just before writing (a lower one means
        a deposed holder's write landed after a newer holder's), and in acknowledgement
        order tokens never decrease."""
        out = [
            Violation(
                "fenced-write",
                f"{w.holder} wrote token {w.token} over token {w.prev} already there",
                ({"holder": w.holder, "token": w.token, "read": w.prev},),
            )
            for w in self.writes
            if w.prev is not None and w.prev >= w.token
        ]
        if self.conditional:
            # each write replaced exactly the version it read: that chain is the landing
            # order, and the check above covers it (acknowledgements can arrive out of
            # landing order, so they are no order to check against)
            return out
        ordered = sorted(self.writes, key=lambda w: w.acked)
        out += fenced_writes([(i, w.token) for i, w in enumerate(ordered)])
        return out

    def check(self) -> CheckOutcome:
        """The ``fenced-writes`` check for a :class:`~cohort.chaos.runner.ChaosReport`."""
        vs = self.fence_violations()
        what = (
            f"{len(self.writes)} fenced writes ({self.refused} refused as stale), "
            f"{len(self._intervals)} grants, {self.lost} lost locks"
        )
        if not self.writes:
            return CheckOutcome("fenced-writes", "skipped", what)
        if not vs:
            return CheckOutcome("fenced-writes", "pass", what)
        return CheckOutcome(
            "fenced-writes", "fail", f"{what}; {len(vs)} violations: {vs[0].detail}",
            [v.to_dict() for v in vs],
        )  # fmt: skip


def tenant_credential_of(data_dir: str | Path) -> Credential:
    """The admin tenant's lock credential from ``cluster.json`` (its access key)."""
    info = ClusterInfo.load(data_dir)
    return tenant_credential(info.access_key, info.secret_key)


def server_addresses(data_dir: str | Path) -> Callable[[], list[str]]:
    """Servers' addresses from ``cluster.json``, re-read on each call (restarts move them)."""

    def get() -> list[str]:
        try:
            info = ClusterInfo.load(data_dir)
        except (OSError, ValueError, KeyError):
            return []
        return [m.address for m in info.members if m.role == "server" and m.address]

    return get
