"""The middle-layer server process: membership, partition ownership, object RPCs.

A server

* joins the coordinator and renews its lease by heartbeat; if it cannot renew in time it
  *self-fences*: it stops serving every partition before the coordinator can declare it
  dead and give the partitions away (its own deadline is measured from when it *sent*
  the last successful heartbeat, minus a margin, so it always expires first);
* follows the partition map by watching the coordinator; for each partition the map gives
  it, it takes the partition lock (fencing token = epoch), fences the log, replays it and
  serves; for each partition the map takes away, it finishes queued commits, writes a
  checkpoint and releases the lock (so the next owner replays nothing);
* answers the directors' object RPCs for the partitions it serves, and ``NotOwner`` (or
  ``Recovering``) for the rest, which makes directors re-route.

Object bodies are written to shared storage by the directors (immutable blobs under fresh
names) before the metadata record that references them is committed here.  Replaced blobs
are deleted by each partition's reclaimer once no reader can need them: after the grace
period that covers reads without a lease, and never while a director's reader lease on
them (``obj.lease``) lasts (see :class:`cohort.server.host.BlobReclaimer`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from cohort.auth import ClusterKey, TenantLookup, Verifier
from cohort.coord import connect
from cohort.coord.base import Coordinator
from cohort.dlm import Handle, LockAgent, Mode, TcpTransport
from cohort.dlm.client import ClientService
from cohort.dlm.errors import DlmError, LockTimeout
from cohort.dlm.transport import RPC_METHOD as DLM_RPC_METHOD
from cohort.logs import setup_logging
from cohort.metrics import InstrumentedStore, ServerMetrics, start_metrics_server
from cohort.oplog.log import PartitionLog
from cohort.partitioning import partition_of
from cohort.rpc import ClientPool, RpcClient, RpcError, RpcServer
from cohort.server.host import NotServing, PartitionHost
from cohort.server.state import ObjectMeta, PartitionState, Upload, blob_grace, meta_to_wire
from cohort.storage import SPEC_HELP, StorageUnavailable, aclose_store, open_store
from cohort.storage.base import EtagStore, Store

if TYPE_CHECKING:
    from cohort.tenants import KeyCache

log = logging.getLogger("cohort.server")

LEASE_MARGIN = 0.4  # seconds before the coordinator could expire us that we stop serving
UPLOAD_EXPIRY = 7 * 86400.0  # multipart uploads older than this are aborted
ORPHAN_AGE = 3600.0  # unreferenced blobs seen for this long are deleted


MIN_PART_SIZE = 5 * 1024 * 1024


def check_condition(current: ObjectMeta | None, cond: dict[str, Any]) -> None:
    """Conditional write (``If-None-Match: *`` / ``If-Match: etag``) against the current
    object, evaluated atomically at the owner."""
    inm = cond.get("if_none_match")
    if inm is not None and current is not None and (inm == "*" or inm == current.etag):
        raise RpcError("PreconditionFailed", "If-None-Match")
    im = cond.get("if_match")
    if im is not None:
        if current is None:
            raise RpcError("NoSuchKey", "The specified key does not exist.")
        if im != "*" and im != current.etag:
            raise RpcError("PreconditionFailed", "If-Match")


def complete_upload(up: Upload, listed: list[tuple[int, str]]) -> ObjectMeta:
    """The object a CompleteMultipartUpload with parts ``listed`` produces (S3's rules:
    ascending part numbers, every part present with its ETag, every part but the last at
    least 5 MiB; ETag = md5 of the parts' binary md5s, then ``-N``)."""
    if not listed:
        raise RpcError("MalformedXML", "You must specify at least one part")
    prev = 0
    segments: list[tuple[str, int]] = []
    md5s = b""
    size = 0
    for i, (n, etag) in enumerate(listed):
        if n <= prev:
            raise RpcError("InvalidPartOrder", "The list of parts was not in ascending order.")
        prev = n
        part = up.parts.get(n)
        if part is None or part.etag != etag.strip('"'):
            raise RpcError(
                "InvalidPart", f"One or more of the specified parts could not be found (part {n})."
            )
        if part.size < MIN_PART_SIZE and i != len(listed) - 1:
            raise RpcError(
                "EntityTooSmall",
                "Your proposed upload is smaller than the minimum allowed object size.",
            )
        if part.blob:
            segments.append((part.blob, part.size))
        md5s += bytes.fromhex(part.etag)
        size += part.size
    etag = f"{hashlib.md5(md5s).hexdigest()}-{len(listed)}"
    t = up.meta
    return ObjectMeta(
        size=size,
        etag=etag,
        mtime=time.time(),
        blob=None,
        content_type=t.content_type,
        user_meta=dict(t.user_meta),
        checksums={},
        headers=dict(t.headers),
        parts=len(listed),
        segments=segments,
    )


DLM_ACQUIRE_TIMEOUT = 5.0  # seconds before a partition-lock request is withdrawn and retried
DLM_ACQUIRE_ATTEMPTS = 2  # then ownership falls back to the coordinator's lock alone
WRITE_QUIET = 1.0  # seconds without writes before an owner shares a partition read-only
REPLICA_IDLE = 20.0  # seconds without reads before a read replica lets go


class ReadReplica:
    """A read-only copy of a partition held under a PR lock (hot read-only spreading)."""

    def __init__(self, state: PartitionState, handle: Handle) -> None:
        self.state = state
        self.handle = handle
        self.last_read = time.monotonic()
        self.reads = 0


class Server:
    def __init__(
        self,
        member_id: str,
        store: Store,
        coordinator: Coordinator,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        capacity: float = 1.0,
        standby: bool = False,
        advertise: str | None = None,
        tags: list[str] | None = None,
        cluster_key: ClusterKey,
        tenants: TenantLookup | None = None,
    ) -> None:
        self.id = member_id
        # who may talk to us: members with the cluster key; tenants (by access key, for
        # DLM sessions only); and what we prove to peers
        self.cluster_key = cluster_key
        self.credential = cluster_key.member(member_id)
        # labels directors' balancing rules can select (``[director] balance``)
        self.tags = sorted(set(tags or []))
        # the address peers and directors are told to dial (default: where we listen);
        # a fault proxy in front of this server advertises its own
        self.advertise = advertise
        self.listen_address = ""
        self.metrics = ServerMetrics(member_id)
        self.metrics_address = ""
        self._metrics_runner: Any = None
        self.store: Store = InstrumentedStore(store, self.metrics)
        self.coord = coordinator
        self.bind = (host, port)
        self.capacity = capacity
        self.standby = standby
        self.rpc = RpcServer(Verifier(cluster_key, tenants))
        for name in (
            "obj.put",
            "obj.get",
            "obj.delete",
            "obj.set_acl",
            "obj.list",
            "bucket.count",
            "bucket.drop",
            "status",
            "obj.import",
            "mpu.create",
            "mpu.part",
            "mpu.complete",
            "mpu.abort",
            "mpu.get",
            "mpu.list",
            "dlm.status",
            "part.read",
            "part.shared",
        ):
            handler = getattr(self, "rpc_" + name.replace(".", "_"))
            self.rpc.register(name, self.metrics.instrument(name, handler))
        self.metrics.watch_server(self)
        self.address = ""
        self.incarnation = ""
        self.lease_ttl = 2.5
        self.lease_deadline = 0.0
        self.view: dict[str, Any] = {"version": -1, "partitions": []}
        self.partition_count = 0
        self.hosts: dict[int, PartitionHost] = {}
        self.acquiring: dict[int, asyncio.Task[None]] = {}
        self.releasing: dict[int, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._load_t = time.monotonic()
        self._load_last: dict[int, tuple[int, int, int]] = {}
        self._rejoin = asyncio.Event()
        self.requests = 0
        # The lock manager: one agent per incarnation (a re-joined server is a new DLM
        # node, so nothing it held before can be mistaken for its own).
        self.agent: LockAgent | None = None
        self.dlm_transport: TcpTransport | None = None
        self.dlm_locks: dict[int, Handle] = {}
        self._dlm_epoch = -1
        self._conv_locks: dict[int, asyncio.Lock] = {}
        self.replicas: dict[int, ReadReplica] = {}
        self._replica_loading: set[int] = set()
        # DLM messages can arrive between our join and the agent's creation (peers learn
        # of us from the coordinator at once): keep them for the agent instead of dropping
        self._early_dlm: list[Any] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self.rpc.register(DLM_RPC_METHOD, self._buffer_dlm)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> str:
        # reader leases on blobs (directors streaming long reads; see BlobReclaimer)
        self.rpc.register("obj.lease", self.metrics.instrument("obj.lease", self.rpc_obj_lease))
        port = await self.rpc.start(*self.bind)
        self.listen_address = f"{self.bind[0]}:{port}"
        self.address = self.advertise or self.listen_address
        self._metrics_runner, self.metrics_address = await start_metrics_server(
            self.metrics, self.bind[0]
        )
        await self._join()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._watch_loop()),
            asyncio.create_task(self._gc_loop()),
        ]
        return self.address

    async def _join(self) -> None:
        # until the new incarnation's agent exists, keep DLM messages for it
        self.rpc.register(DLM_RPC_METHOD, self._buffer_dlm)
        while True:
            try:
                t_send = time.monotonic()
                r = await self.coord.join(
                    {
                        "id": self.id,
                        "role": "server",
                        "address": self.address,
                        "capacity": self.capacity,
                        "standby": self.standby,
                        "pid": os.getpid(),
                        "meta": {"metrics": self.metrics_address, "tags": self.tags},
                    }
                )
                break
            except RpcError as e:
                log.warning("cannot join coordinator (%s); retrying", e)
                await asyncio.sleep(0.3)
        self.incarnation = r["incarnation"]
        self.lease_ttl = float(r["lease_ttl"])
        self.lease_deadline = t_send + self.lease_ttl - LEASE_MARGIN
        log.info("joined as %s incarnation %s", self.id, self.incarnation)
        self._new_agent()
        self._apply_view(r["view"])

    @property
    def dlm_node(self) -> str:
        return f"{self.id}~{self.incarnation}"

    def _new_agent(self) -> None:
        if self.agent is not None:
            self.agent.close()  # every lock of the old incarnation is lost (and told so)
        self.dlm_locks.clear()
        self.dlm_transport = TcpTransport(self.rpc, ClientPool(self.credential), own_pool=True)
        agent = LockAgent(self.dlm_node, self.dlm_transport, lease_valid=self.lease_valid)
        self.agent = agent
        # programs that are not Cohort servers take cluster locks through any server
        # (cohort.dlm.client.DlmClient); the sessions belong to this incarnation
        self.dlm_clients = ClientService(
            agent,
            self.rpc,
            lease_remaining=lambda: self.lease_deadline - time.monotonic(),
            cluster_wide=lambda: agent.in_cluster,
        )
        self._dlm_epoch = -1
        early, self._early_dlm = self._early_dlm, []
        for frame in early:
            self.dlm_transport.receive(frame)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, keeping a reference until it finishes."""
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    async def _buffer_dlm(self, params: Any) -> None:
        # (dropping them would be safe too: unacknowledged frames are sent again)
        if len(self._early_dlm) < 10_000:
            self._early_dlm.append(params)

    def lease_valid(self) -> bool:
        return time.monotonic() < self.lease_deadline

    async def stop(self) -> None:
        """Graceful stop: finish in-flight commits, checkpoint, release partition locks."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in list(self.acquiring.values()):
            t.cancel()
        hosts = list(self.hosts.items())
        await asyncio.gather(*(h.close(graceful=True) for _, h in hosts), return_exceptions=True)
        if self.lease_valid():
            for p, _ in hosts:
                with contextlib.suppress(Exception):
                    await self.coord.release_partition(self.id, self.incarnation, p)
                await self._release_dlm(p)
        if self.agent is not None:
            self.agent.close()
        self.hosts.clear()
        await self.rpc.close()
        await self.coord.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    # -- membership ------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._heartbeat_once()
            except Exception:
                # the lease keeper must never die: without it the server could neither
                # renew its lease nor notice having lost it
                log.exception("heartbeat round failed")

    async def _heartbeat_once(self) -> None:
        """One lease renewal (and the reaction to a lost lease or a dead verdict)."""
        interval = self.lease_ttl / 6
        await asyncio.sleep(interval)
        t_send = time.monotonic()
        try:
            r = await self.coord.heartbeat(self.id, self.incarnation, load=self._load_report())
            self.metrics.lease_renewals.inc()
            # Only a reply proves the lease was renewed, and only from when we sent it.
            self.lease_deadline = max(self.lease_deadline, t_send + self.lease_ttl - LEASE_MARGIN)
            if r.get("version", -1) > self.view.get("version", -1):
                self._rejoin.set()  # nudge: the watch loop will catch up anyway
        except RpcError as e:
            self.metrics.lease_failures.inc()
            if e.code == "UnknownMember":
                log.error("coordinator declared us dead; dropping all partitions and re-joining")
                await self._drop_all("declared dead")
                await self._join()
                return
            log.warning("heartbeat failed: %s", e)
        # The lock agent fences itself if it ever sees the lease lapse, even briefly
        # (a renewal that arrives late extends the lease again); a fenced agent never
        # locks again, so that is a lease loss too: found by a 20-minute chaos run,
        # where a server kept serving nothing behind its fenced agent.
        agent_fenced = self.agent is not None and self.agent.fenced
        if not self.lease_valid() or agent_fenced:
            log.error(
                "lease lost (%s): self-fencing %d partitions",
                "the lock agent fenced itself" if agent_fenced else "no renewal in time",
                len(self.hosts),
            )
            self.metrics.lease_lost.inc()
            await self._drop_all("lease lost")
            # Come back as a new incarnation: the coordinator then records the old one
            # as gone, so every lock agent drops what it held, and ours starts fresh.
            # (Keeping the old incarnation would leave the fenced agent unable to lock
            # again, and other agents believing it still holds its locks.)
            await self._join()
            return
        self._reap_failed_hosts()

    def _load_report(self) -> list[list[float]]:
        """Per-partition ``[partition, requests/s, bytes/s]`` since the last report, for
        the coordinator's load-aware rebalancing (idle partitions are left out)."""
        now = time.monotonic()
        dt = max(now - self._load_t, 1e-3)
        self._load_t = now
        last, self._load_last = self._load_last, {}
        out: list[list[float]] = []
        for p, h in self.hosts.items():
            self._load_last[p] = (id(h), h.ops, h.bytes_written)
            hid, ops0, b0 = last.get(p, (id(h), 0, 0))
            if hid != id(h):
                ops0 = b0 = 0  # a new host object for p: its counters started at zero
            if h.ops > ops0:
                out.append([p, (h.ops - ops0) / dt, (h.bytes_written - b0) / dt])
        return out

    async def _drop_all(self, why: str) -> None:
        for t in list(self.acquiring.values()):
            t.cancel()
        self.acquiring.clear()
        if self.agent is not None:
            self.agent.lease_lost()  # every DLM holder here is told its lock is lost
        self.dlm_locks.clear()
        self.replicas.clear()
        hosts, self.hosts = self.hosts, {}
        for h in hosts.values():
            await h.close(graceful=False)
        if hosts:
            log.warning("stopped serving %d partitions: %s", len(hosts), why)

    async def _watch_loop(self) -> None:
        while True:
            try:
                view = await self.coord.watch(self.view.get("version", -1), timeout=2.0)
                self._apply_view(view)
            except RpcError as e:
                log.warning("watch failed: %s", e)
                await asyncio.sleep(0.2)
            except Exception:
                # never let the loop that follows the map die: a server that stops
                # following it would keep serving partitions it no longer owns
                log.exception("applying the cluster view failed")
                await asyncio.sleep(0.2)

    def _apply_view(self, view: dict[str, Any]) -> None:
        if view["version"] < self.view.get("version", -1):
            return
        self.view = view
        parts = view["partitions"]
        self.partition_count = len(parts)
        if self._stopping:
            return
        self._dlm_membership(view)
        for p, (owner, epoch, holder) in enumerate(parts):
            h = self.hosts.get(p)
            if (
                holder == self.id
                and owner != self.id
                and h is None
                and p not in self.releasing
                and p not in self.acquiring
            ):
                # We hold a lock we do not use (an acquire raced with a map change):
                # give it back, or the new owner would wait for our lease to expire.
                self.releasing[p] = asyncio.create_task(self._release_lock(p))
            if owner == self.id:
                if h is not None and h.epoch != epoch:
                    # Reassigned away and back: our lock may have been taken meanwhile.
                    self._start_release(p, graceful=False)
                    h = None
                if h is None and p not in self.acquiring and p not in self.releasing:
                    self.acquiring[p] = asyncio.create_task(self._acquire(p))
            else:
                t = self.acquiring.pop(p, None)
                if t is not None:
                    t.cancel()
                if h is not None:
                    self._start_release(p, graceful=True)

    def _dlm_membership(self, view: dict[str, Any]) -> None:
        """Feed the coordinator's membership to the lock agent (its epoch changes exactly
        when the set of live servers does, so every agent agrees on the numbering)."""
        epoch = view.get("membership_epoch")
        if self.agent is None or epoch is None or epoch <= self._dlm_epoch:
            return
        members = view.get("dlm_members") or {
            f"{m['id']}~{m['incarnation']}": m["address"]
            for m in view["members"]
            if m["role"] == "server" and m["state"] in ("alive", "draining")
        }
        self.agent.set_membership(int(epoch), members)
        # the agent decides whether the epoch is ours (it ignores memberships from before
        # it was first named, e.g. etcd's primary adds us a moment after our join)
        if self.agent.epoch == epoch:
            self._dlm_epoch = epoch

    async def _lock_partition(self, p: int) -> Handle | None:
        """Take ``partition/p`` in EX from the DLM.  The holder in our way gets a blocking
        notification and hands over (flush, checkpoint, release).  None if the DLM does
        not run here (no membership epoch from this coordinator backend)."""
        if self.agent is None or self._dlm_epoch < 0:
            return None

        def blocking(mode: Mode) -> None:
            self._on_blocking(p, mode)

        # Bounded: a request caught in a lock-manager recovery that never completes is
        # withdrawn and asked again (found by the chaos harness: a coordinator outage
        # longer than the lease could leave a partition unserved for good).  If the lock
        # manager still cannot grant it, serve under the coordinator's partition lock
        # alone: that lock (with the log fence) is what keeps two servers from serving
        # one partition, so safety holds; only the DLM's hand-over help is lost.  (The
        # chaos harness used to strand DLM resources by resetting server-to-server
        # connections, before the DLM's transport retransmitted lost messages.)
        for attempt in range(DLM_ACQUIRE_ATTEMPTS):
            try:
                h = await self.agent.lock(
                    f"partition/{p}", Mode.EX, on_blocking=blocking, timeout=DLM_ACQUIRE_TIMEOUT
                )
                break
            except LockTimeout:
                if attempt + 1 == DLM_ACQUIRE_ATTEMPTS:
                    log.error(
                        "partition %d: the lock manager did not grant partition/%d in %.0f s; "
                        "serving under the coordinator's partition lock alone",
                        p, p, DLM_ACQUIRE_TIMEOUT * DLM_ACQUIRE_ATTEMPTS,
                        extra={"partition": p},
                    )  # fmt: skip
                    self.metrics.dlm_fallbacks.inc()
                    return None
        if h.previous_holder_died:
            log.info(
                "partition %d: previous holder %s died; its log will be replayed",
                p,
                h.previous_holder_died,
                extra={"partition": p},
            )
        return h

    def _on_blocking(self, p: int, mode: Mode = Mode.EX) -> None:
        h = self.hosts.get(p)
        if h is None:
            return
        if self.view["partitions"][p][0] != self.id:
            # Someone wants partition p and the map agrees it is no longer ours: hand over.
            self._start_release(p, graceful=True)
        elif mode in (Mode.PR, Mode.CR) and h.serving:
            # A read replica wants to share the partition: go down to PR once nobody has
            # written for WRITE_QUIET seconds.  (The DLM notifies a holder once per grant,
            # so the wait for quiet happens here, not by waiting for another notification,
            # and a notification that cannot be acted on now is remembered.)
            if h.shared:
                # converting back to EX for a write (shared, we would not be told about
                # PR): share again after it, or the partition never would be
                h.share_wanted = True
            else:
                self._spawn(self._share(p, h))

    def _conv_lock(self, p: int) -> asyncio.Lock:
        lock = self._conv_locks.get(p)
        if lock is None:
            lock = self._conv_locks[p] = asyncio.Lock()
        return lock

    async def _share(self, p: int, h: PartitionHost) -> None:
        """Owner EX -> PR so read replicas can be granted PR next to it.  If writes keep
        coming, give up for now but remember the request (``share_wanted``): the cleaner
        loop tries again once the partition is quiet.  (The DLM does not notify a holder
        again for the same grant, so a forgotten request would keep the partition from
        ever being shared again: found by tests/trunk/test_races.py.)"""
        h.share_wanted = False
        give_up = time.monotonic() + 5 * WRITE_QUIET
        while not h.quiet(WRITE_QUIET):
            if not h.serving:
                return
            if time.monotonic() > give_up:
                h.share_wanted = True  # writes keep coming: not read-only now
                return
            await asyncio.sleep(WRITE_QUIET / 4)
        async with self._conv_lock(p):
            dlm = self.dlm_locks.get(p)
            if dlm is None or h.shared or not h.serving:
                return
            if not h.quiet(WRITE_QUIET):
                h.share_wanted = True
                return
            h.shared = True  # from here on, a commit waits for make_exclusive
            try:
                await dlm.convert(Mode.PR)
                log.info("partition %d shared read-only with replicas", p, extra={"partition": p})
            except DlmError as e:
                log.warning("partition %d: down-conversion failed: %s", p, e)
                h.shared = False

    async def _make_exclusive(self, p: int, h: PartitionHost) -> None:
        """Owner PR -> EX before a write: every replica is told (blocking notification),
        drops its copy and releases, and only then does the conversion complete."""
        async with self._conv_lock(p):
            dlm = self.dlm_locks.get(p)
            if not h.shared:
                return
            if dlm is None:
                raise NotServing(f"partition {p} lost its lock")
            try:
                await dlm.convert(Mode.EX)
            except DlmError as e:
                raise NotServing(f"partition {p}: cannot convert to EX: {e}") from None
            h.shared = False
            log.info("partition %d exclusive again for a write", p, extra={"partition": p})
            if h.share_wanted:  # a replica asked again during the conversion
                self._spawn(self._share(p, h))

    # -- read replicas (hot read-only spreading) ----------------------------------------------
    async def rpc_part_read(self, params: dict[str, Any]) -> dict[str, Any]:
        """Become a read replica of partition ``p``: hold ``partition/p`` in PR, load its
        state read-only, serve ``obj.get`` from it until the owner needs to write."""
        p = int(params["p"])
        if p in self.hosts:
            return {"role": "owner"}
        if p in self.replicas:
            return {"role": "reader"}
        if (
            self.agent is None
            or self._dlm_epoch < 0  # no cluster-wide lock manager here: no replicas
            or not self.lease_valid()
            or p in self._replica_loading
        ):
            raise RpcError("Busy", f"cannot replicate partition {p} now")
        self._replica_loading.add(p)
        try:
            blocked = False

            def on_blocking(mode: Mode) -> None:
                nonlocal blocked
                blocked = True
                self._drop_replica(p, "the owner needs to write")

            try:
                h = await self.agent.lock(
                    f"partition/{p}",
                    Mode.PR,
                    timeout=float(params.get("timeout", 2.0)),
                    on_blocking=on_blocking,
                )
            except DlmError as e:
                raise RpcError("Busy", f"partition {p} is not shareable now ({e})") from None
            try:
                rec = await PartitionLog(self.store, p, self.id).load_readonly()
                state = PartitionState.from_checkpoint(rec.checkpoint)
                for r in rec.records:
                    state.apply(r)
            except Exception:
                await h.release()
                raise
            if blocked or h.lost.is_set() or not self.lease_valid():
                await h.release()
                raise RpcError("Busy", f"partition {p} changed while loading")
            # Our PR lock keeps the owner from writing only if the owner itself holds the
            # partition's lock (in PR): it may be serving under the coordinator's lock
            # alone (a lock-manager fallback).  Ask it, while we hold PR.
            if not await self._owner_shares(p):
                await h.release()
                raise RpcError("Busy", f"the owner of partition {p} is not sharing it")
            self.replicas[p] = ReadReplica(state, h)
            self._spawn(self._watch_replica(p, h))
            log.info(
                "read replica of partition %d (%d records replayed)",
                p,
                len(rec.records),
                extra={"partition": p},
            )
            return {"role": "reader"}
        finally:
            self._replica_loading.discard(p)

    async def _owner_shares(self, p: int) -> bool:
        owner = self.view["partitions"][p][0]
        addr = next(
            (
                m["address"]
                for m in self.view["members"]
                if m["id"] == owner and m["role"] == "server"
            ),
            None,
        )
        if addr is None:
            return False
        host, _, port = addr.rpartition(":")
        client = RpcClient(host, int(port), self.credential, connect_timeout=1.0)
        try:
            r = await client.call("part.shared", {"p": p}, timeout=2.0)
            return bool(r.get("shared"))
        except RpcError:
            return False
        finally:
            await client.close()

    async def rpc_part_shared(self, params: dict[str, Any]) -> dict[str, Any]:
        """Whether this server owns partition ``p`` and holds its DLM lock in PR (so a
        write here must first revoke every read replica)."""
        p = int(params["p"])
        h = self.hosts.get(p)
        return {"shared": bool(h is not None and h.serving and h.shared and p in self.dlm_locks)}

    def _drop_replica(self, p: int, why: str) -> None:
        r = self.replicas.pop(p, None)
        if r is not None:
            log.info("dropping read replica of partition %d: %s", p, why, extra={"partition": p})
            self._spawn(r.handle.release())

    async def _watch_replica(self, p: int, h: Handle) -> None:
        await h.lost.wait()
        r = self.replicas.get(p)
        if r is not None and r.handle is h:
            self._drop_replica(p, "lock lost")

    def _expire_replicas(self) -> None:
        now = time.monotonic()
        for p, r in list(self.replicas.items()):
            if now - r.last_read > REPLICA_IDLE:
                self._drop_replica(p, "idle")

    async def _release_dlm(self, p: int) -> None:
        h = self.dlm_locks.pop(p, None)
        if h is not None and not h.lost.is_set():
            with contextlib.suppress(Exception):
                await h.release()

    async def _watch_dlm_lock(self, p: int, h: Handle) -> None:
        """A lost DLM lock (lease lost, agent fenced) ends our service of the partition."""
        await h.lost.wait()
        if self.dlm_locks.get(p) is h:
            log.error("lost the DLM lock of partition %d; stopping it", p, extra={"partition": p})
            self.dlm_locks.pop(p, None)
            self._start_release(p, graceful=False)

    def _start_release(self, p: int, *, graceful: bool) -> None:
        h = self.hosts.pop(p, None)
        if h is None or p in self.releasing:
            return
        self.releasing[p] = asyncio.create_task(self._release(p, h, graceful))

    async def _release(self, p: int, h: PartitionHost, graceful: bool) -> None:
        try:
            await h.close(graceful=graceful)
            await self.coord.release_partition(self.id, self.incarnation, p)
            await self._release_dlm(p)
            log.info("released partition %d", p, extra={"partition": p, "epoch": h.epoch})
        except Exception as e:
            log.warning("release of partition %d: %s", p, e)
        finally:
            self.releasing.pop(p, None)
            if not self._stopping and self.view["partitions"][p][0] == self.id:
                self._apply_view(self.view)

    async def _release_lock(self, p: int) -> None:
        try:
            await self.coord.release_partition(self.id, self.incarnation, p)
        except RpcError as e:
            log.warning("release of unused lock %d: %s", p, e)
        finally:
            self.releasing.pop(p, None)

    async def _acquire(self, p: int) -> None:
        dlm: Handle | None = None
        try:
            try:
                dlm = await self._lock_partition(p)
            except DlmError as e:
                log.warning("DLM lock of partition %d failed (%s); retrying", p, e)
                await asyncio.sleep(0.2)
                asyncio.get_running_loop().call_soon(self._apply_view, self.view)
                return
            while True:
                if not self.lease_valid():
                    await asyncio.sleep(0.05)
                    continue
                try:
                    token = await self.coord.acquire_partition(self.id, self.incarnation, p)
                    break
                except RpcError as e:
                    if e.code in ("NotOwner", "UnknownMember"):
                        return
                    await asyncio.sleep(0.05 if e.code == "Busy" else 0.2)
            host = PartitionHost(
                self.store,
                p,
                self.id,
                token,
                self._count_freed,
                lease_valid=self.lease_valid,
                grace=self.blob_grace(),
            )
            host.make_exclusive = lambda p=p, host=host: self._make_exclusive(p, host)
            self.hosts[p] = host
            if dlm is not None:
                self.dlm_locks[p] = dlm
                self._spawn(self._watch_dlm_lock(p, dlm))
                dlm = None  # owned by the host now
            try:
                await host.recover()
                self.metrics.acquisitions.inc()
                self.metrics.replay_seconds.observe(host.recovery_seconds)
                self.metrics.replay_records.inc(host.replayed_records)
            except Exception:
                log.exception("recovery of partition %d failed", p, extra={"partition": p})
                self.hosts.pop(p, None)
                await host.close(graceful=False)
                # give the partition's DLM lock back too, or the next attempt would queue
                # behind our own lock until the fallback (found with storage faults)
                await self._release_dlm(p)
                await asyncio.sleep(0.5)
                asyncio.get_running_loop().call_soon(self._apply_view, self.view)
        finally:
            if dlm is not None and not dlm.lost.is_set():
                # not serving after all (cancelled, map moved): give the DLM lock back
                self._spawn(dlm.release())
            if self.acquiring.get(p) is asyncio.current_task():
                del self.acquiring[p]

    def _reap_failed_hosts(self) -> None:
        for p, h in list(self.hosts.items()):
            if h.status in ("fenced", "failed"):
                log.warning("partition %d %s; releasing", p, h.status, extra={"partition": p})
                self._start_release(p, graceful=False)

    # -- blob garbage --------------------------------------------------------------------------
    # Each partition's host reclaims the blobs its records free (host.reclaim): the queue
    # and the readers' leases move with the partition, so a former owner never deletes a
    # blob that a reader now renews its lease on at the new owner.
    blobs_freed = 0
    blobs_deleted = 0

    def blob_grace(self) -> float:
        """How long a freed blob stays readable without a lease: ``COHORT_BLOB_GRACE``,
        but never longer than the orphan age (a blob unreferenced for that long is
        garbage whatever its history; a short orphan age is for tests)."""
        return min(blob_grace(), self.orphan_age)

    def _count_freed(self, keys: list[str]) -> None:
        self.blobs_freed += len(keys)

    async def _reclaim_blobs(self) -> int:
        """Delete the blobs that every served partition's reclaimer says are due."""
        deleted = 0
        now = time.monotonic()
        for h in list(self.hosts.values()):
            for key in h.reclaim.due(now):
                with contextlib.suppress(Exception):
                    await self.store.delete(key)
                    deleted += 1
        self.blobs_deleted += deleted
        return deleted

    # The background cleaner (see clean_once); servers set these from the command line.
    upload_expiry: float = UPLOAD_EXPIRY
    orphan_age: float = ORPHAN_AGE

    def clean_interval(self) -> float:
        return min(600.0, max(1.0, min(self.upload_expiry, self.orphan_age) / 4))

    async def _gc_loop(self) -> None:
        orphans: dict[int, dict[str, float]] = {}
        next_clean = time.monotonic() + self.clean_interval()
        while True:
            await asyncio.sleep(1.0)
            self._expire_replicas()
            for p, h in list(self.hosts.items()):
                if h.share_wanted and not h.shared and h.serving and h.quiet(WRITE_QUIET):
                    self._spawn(self._share(p, h))
            try:
                await self._reclaim_blobs()
            except Exception:
                log.exception("blob reclamation failed; retrying later")
            if time.monotonic() >= next_clean:
                try:
                    await self.clean_once(orphans)
                except Exception:
                    log.exception("background cleaner failed; retrying later")
                next_clean = time.monotonic() + self.clean_interval()

    async def clean_once(self, orphans: dict[int, dict[str, float]]) -> dict[str, int]:
        """One pass of the background cleaner over the partitions served here.

        * Multipart uploads initiated more than ``upload_expiry`` seconds ago are aborted
          through the log (an ``mpu_abort`` record), which frees their part blobs.
        * Orphan blobs: directors write a blob before the record that references it is
          committed, so a crashed director or a failed commit leaves blobs under
          ``blobs/<pppp>/`` that nothing references.  A blob no object or upload of its
          partition references is remembered in ``orphans`` (partition -> blob -> when
          first seen unreferenced) and deleted once it has stayed unreferenced for
          ``orphan_age`` seconds.  Blobs appear only complete (temp file, then rename)
          and their commit follows at once, so the age only has to cover a slow commit.
          A blob the partition's reclaimer is busy with (queued after a record freed it,
          leased by a reader, or any blob in a new owner's first grace period) is left
          to it.
        """
        expired = 0
        swept = 0
        deadline = time.time() - self.upload_expiry
        for p in list(self.hosts):
            try:
                h = self._host_for(p)
            except RpcError:
                continue
            stale = [
                (b, u)
                for b, ups in h.state.uploads.items()
                for u, up in ups.items()
                if up.initiated < deadline
            ]
            for b, u in stale:
                try:
                    await self._commit(h, {"op": "mpu_abort", "b": b, "u": u})
                except RpcError:
                    break  # the partition moved away meanwhile
                expired += 1
                log.info("aborted expired multipart upload %s", u, extra={"partition": p})
        for p in list(orphans):
            if p not in self.hosts:
                del orphans[p]
        for p in list(self.hosts):
            try:
                self._host_for(p)
            except RpcError:
                continue
            keys = [k async for k in self.store.list(f"blobs/{p:04d}/")]
            try:
                h = self._host_for(p)
            except RpcError:
                continue
            used: set[str] = set()
            for objs in h.state.buckets.values():
                for meta in objs.values():
                    used.update(meta.blobs())
            for ups in h.state.uploads.values():
                for up in ups.values():
                    used.update(part.blob for part in up.parts.values() if part.blob)
            seen = orphans.setdefault(p, {})
            now = time.monotonic()
            unused = [k for k in keys if k not in used]
            for k in set(seen) - set(unused):
                del seen[k]
            for k in unused:
                first = seen.setdefault(k, now)
                if now - first >= self.orphan_age and not h.reclaim.busy(k, now):
                    with contextlib.suppress(Exception):
                        await self.store.delete(k)
                        swept += 1
                    del seen[k]
            if swept:
                log.info("deleted %d orphan blobs", swept, extra={"partition": p})
        return {"expired_uploads": expired, "orphan_blobs": swept}

    # -- RPC handlers ----------------------------------------------------------------------
    def _host_for(self, p: int) -> PartitionHost:
        if not self.lease_valid():
            raise RpcError("NotOwner", f"{self.id} has no valid lease")
        h = self.hosts.get(p)
        if h is None:
            raise RpcError("NotOwner", f"partition {p} is not served by {self.id}")
        if h.status == "recovering":
            raise RpcError("Recovering", f"partition {p} is recovering on {self.id}")
        if not h.serving or not h.accepting:
            raise RpcError("NotOwner", f"partition {p} is {h.status} on {self.id}")
        return h

    def _owned(self, parts: list[int]) -> tuple[list[PartitionHost], list[int]]:
        """The hosts of ``parts`` served here, and the partitions that are not (for
        scatter-gather RPCs: the director retries those elsewhere)."""
        hosts: list[PartitionHost] = []
        not_owned: list[int] = []
        for p in parts:
            try:
                hosts.append(self._host_for(p))
            except RpcError:
                not_owned.append(p)
        return hosts, not_owned

    def _partition(self, params: dict[str, Any]) -> int:
        return partition_of(params["b"], params["k"], self.partition_count)

    async def _commit(
        self, h: PartitionHost, rec: dict[str, Any], prepare: Callable[[], None] | None = None
    ) -> bool:
        """Commit ``rec`` at ``h``; ``prepare`` checks the request against the partition as
        the record will find it (see :meth:`PartitionHost.commit`).  False: ``rec`` was a
        retry of a request already committed."""
        try:
            return await h.commit(rec, prepare)
        except NotServing as e:
            raise RpcError("NotOwner", str(e)) from None

    async def rpc_obj_put(self, params: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        h = self._host_for(self._partition(params))
        h.ops += 1
        m = params["m"]
        h.bytes_written += int(m[0]) if isinstance(m, list) and m else 0  # array-like: size
        cond = params.get("cond")
        prepare = None
        if cond:
            # checked after any conversion back to EX, atomically with the enqueue
            def prepare() -> None:
                check_condition(h.current(params["b"], params["k"]), cond)

        await self._commit(
            h,
            {
                "op": "put",
                "b": params["b"],
                "k": params["k"],
                "m": params["m"],
                "rid": params.get("rid"),
            },
            prepare,
        )
        return {"epoch": h.epoch}

    async def rpc_obj_get(self, params: dict[str, Any]) -> dict[str, Any] | None:
        self.requests += 1
        p = self._partition(params)
        replica = self.replicas.get(p)
        if replica is not None and p not in self.hosts:
            if not self.lease_valid() or replica.handle.lost.is_set():
                raise RpcError("NotReader", f"no valid read replica of partition {p} here")
            replica.last_read = time.monotonic()
            replica.reads += 1
            m = replica.state.get(params["b"], params["k"])
            return None if m is None else {"m": meta_to_wire(m)}
        if params.get("replica"):
            raise RpcError("NotReader", f"{self.id} holds no read replica of partition {p}")
        h = self._host_for(p)
        h.ops += 1
        m = h.state.get(params["b"], params["k"])
        if not self.lease_valid():  # never answer from a partition we may have lost
            raise RpcError("NotOwner", "lease expired")
        return None if m is None else {"m": meta_to_wire(m)}

    async def rpc_obj_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        h = self._host_for(self._partition(params))
        h.ops += 1
        # as queued records leave it (a DELETE after a queued PUT must follow it)
        existed = h.current(params["b"], params["k"]) is not None
        if existed:
            await self._commit(
                h, {"op": "del", "b": params["b"], "k": params["k"], "rid": params.get("rid")}
            )
        return {"existed": existed}

    async def rpc_obj_lease(self, params: dict[str, Any]) -> dict[str, Any]:
        """A director's reader lease on blobs it is reading (``blobs``, all in the
        partition of ``b``/``k``) for ``s`` seconds: none of them is deleted before the
        lease ends, even if the object was replaced or deleted meanwhile.  The reply's
        ``s`` is what was granted (at most the grace period; the director renews every
        third of it, and aborts its read if it cannot renew in time)."""
        p = self._partition(params)
        h = self._host_for(p)
        prefix = f"blobs/{p:04d}/"
        blobs = [str(b) for b in params.get("blobs", [])]
        if any(not b.startswith(prefix) for b in blobs):
            raise RpcError("InvalidArgument", f"a lease names blobs of partition {p} only")
        granted = h.reclaim.lease(blobs, float(params.get("s", 0.0)))
        if not self.lease_valid():  # never promise anything for a partition we may have lost
            raise RpcError("NotOwner", "lease expired")
        return {"s": granted, "grace": h.reclaim.grace}

    async def rpc_obj_set_acl(self, params: dict[str, Any]) -> dict[str, Any]:
        """PutObjectAcl: rewrite the object's canned ACL through the log (an ``acl`` record
        changes only its metadata, in log order with every other write of the key)."""
        self.requests += 1
        h = self._host_for(self._partition(params))
        h.ops += 1

        def prepare() -> None:
            if h.current(params["b"], params["k"]) is None:
                raise RpcError("NoSuchKey", "The specified key does not exist.")

        await self._commit(
            h,
            {
                "op": "acl",
                "b": params["b"],
                "k": params["k"],
                "acl": params.get("acl"),
                "rid": params.get("rid"),
            },
            prepare,
        )
        return {}

    async def rpc_obj_list(self, params: dict[str, Any]) -> dict[str, Any]:
        """One merged, sorted page over the given partitions this server owns.

        Entries are ``[key, size, etag, mtime]`` or ``[common_prefix]``; only what the page
        needs is read from each partition (a lazy k-way merge).
        """
        self.requests += 1
        not_owned: list[int] = []
        limit = int(params.get("limit", 1000))
        iters = []
        hosts, owned_not = self._owned(params["parts"])
        not_owned.extend(owned_not)
        for h in hosts:
            iters.append(
                h.state.iter_list(
                    params["b"],
                    params.get("prefix", ""),
                    params.get("delimiter", ""),
                    params.get("start_after", ""),
                )
            )
        out: list[list[Any]] = []
        last = None
        for key, meta in heapq.merge(*iters, key=lambda e: e[0]):
            if key == last:
                continue  # the same common prefix from several partitions
            last = key
            out.append([key] if meta is None else [key, meta.size, meta.etag, meta.mtime])
            if len(out) >= limit:
                break
        if not self.lease_valid():
            raise RpcError("NotOwner", "lease expired")
        return {"entries": out, "not_owned": not_owned}

    async def rpc_obj_import(self, params: dict[str, Any]) -> dict[str, Any]:
        """Bulk metadata import: ``items`` = ``[[key, meta], ...]`` for one bucket, committed
        through the log like any PUT (group commit makes one segment per partition).  Keys
        whose partition is not served here come back in ``not_owned``."""
        by_part: dict[int, list[dict[str, Any]]] = {}
        for key, meta in params["items"]:
            p = partition_of(params["b"], key, self.partition_count)
            by_part.setdefault(p, []).append({"op": "put", "b": params["b"], "k": key, "m": meta})
        not_owned: list[str] = []
        waits: list[Awaitable[Any]] = []
        for p, recs in by_part.items():
            try:
                h = self._host_for(p)
            except RpcError:
                not_owned.extend(r["k"] for r in recs)
                continue
            waits.extend(self._commit(h, r) for r in recs)
        await asyncio.gather(*waits)
        return {"not_owned": not_owned}

    async def rpc_bucket_count(self, params: dict[str, Any]) -> dict[str, Any]:
        total = 0
        not_owned: list[int] = []
        hosts, owned_not = self._owned(params["parts"])
        not_owned.extend(owned_not)
        for h in hosts:
            total += h.state.count(params["b"])
        return {"count": total, "not_owned": not_owned}

    async def rpc_bucket_drop(self, params: dict[str, Any]) -> dict[str, Any]:
        """After DeleteBucket: a ``drop`` record in each given partition served here.  It
        forgets the bucket's objects and uploads (freeing their blobs) and leaves a
        tombstone, so a PUT that raced with the deletion is discarded when it commits."""
        dropped = 0
        not_owned: list[int] = []
        waits: list[Awaitable[Any]] = []
        t = time.time()
        hosts, owned_not = self._owned(params["parts"])
        not_owned.extend(owned_not)
        for h in hosts:
            dropped += h.state.count(params["b"])
            waits.append(self._commit(h, {"op": "drop", "b": params["b"], "t": t}))
        await asyncio.gather(*waits)
        return {"dropped": dropped, "not_owned": not_owned}

    # -- multipart uploads -------------------------------------------------------------------
    def _upload(self, h: PartitionHost, params: dict[str, Any], *, queued: bool = False) -> Upload:
        """The upload ``params`` names (as committed; ``queued``: as every queued record
        will leave it, for checks made in a commit's ``prepare``)."""
        if queued:
            up = h.upload(params["b"], params["u"])
        else:
            up = h.state.upload(params["b"], params["u"])
        if up is None or up.key != params["k"]:
            raise RpcError("NoSuchUpload", "The specified upload does not exist.")
        return up

    def _upload_exists(self, h: PartitionHost, params: dict[str, Any]) -> Callable[[], None]:
        """A commit's ``prepare``: NoSuchUpload unless the upload survives every queued
        record."""

        def check() -> None:
            self._upload(h, params, queued=True)

        return check

    async def rpc_mpu_create(self, params: dict[str, Any]) -> dict[str, Any]:
        h = self._host_for(self._partition(params))
        await self._commit(
            h,
            {
                "op": "mpu_create",
                "b": params["b"],
                "k": params["k"],
                "u": params["u"],
                "m": params["m"],
                "t": time.time(),
                "rid": params["u"],
            },
        )
        return {}

    async def rpc_mpu_part(self, params: dict[str, Any]) -> dict[str, Any]:
        """A part (a new blob) of an upload that must still exist when its record is
        queued: a part for an upload whose completion or abort is queued (or done) is
        refused with NoSuchUpload, so the director deletes its blob at once."""
        h = self._host_for(self._partition(params))
        await self._commit(
            h,
            {
                "op": "mpu_part",
                "b": params["b"],
                "k": params["k"],
                "u": params["u"],
                "n": int(params["n"]),
                "p": params["p"],
                "rid": params.get("rid"),
            },
            self._upload_exists(h, params),
        )
        return {}

    async def rpc_mpu_complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """The object is built from the parts as every queued part record leaves them
        (a re-upload of a part still being committed is the part it uses), in the same
        synchronous step that queues the completion, so no part record can land between
        the two and free a blob the object uses."""
        h = self._host_for(self._partition(params))
        rec: dict[str, Any] = {
            "op": "mpu_complete",
            "b": params["b"],
            "k": params["k"],
            "u": params["u"],
            "rid": params.get("rid"),
        }
        listed = [(int(n), str(e)) for n, e in params["parts"]]

        def prepare() -> None:
            rec["m"] = meta_to_wire(complete_upload(self._upload(h, params, queued=True), listed))

        if not await self._commit(h, rec, prepare):
            m = h.state.get(params["b"], params["k"])  # a retry of a completion that committed
            return {"m": None if m is None else meta_to_wire(m)}
        return {"m": rec["m"]}

    async def rpc_mpu_abort(self, params: dict[str, Any]) -> dict[str, Any]:
        h = self._host_for(self._partition(params))
        await self._commit(
            h,
            {"op": "mpu_abort", "b": params["b"], "u": params["u"]},
            self._upload_exists(h, params),
        )
        return {}

    async def rpc_mpu_get(self, params: dict[str, Any]) -> dict[str, Any]:
        h = self._host_for(self._partition(params))
        up = self._upload(h, params)
        return msgspec.to_builtins(up)  # type: ignore[no-any-return]

    async def rpc_mpu_list(self, params: dict[str, Any]) -> dict[str, Any]:
        out: list[Any] = []
        not_owned: list[int] = []
        prefix = params.get("prefix", "")
        hosts, owned_not = self._owned(params["parts"])
        not_owned.extend(owned_not)
        for h in hosts:
            for uid, up in h.state.uploads.get(params["b"], {}).items():
                if up.key.startswith(prefix):
                    out.append([up.key, uid, up.initiated])
        return {"uploads": out, "not_owned": not_owned}

    async def rpc_dlm_status(self, params: Any) -> dict[str, Any]:
        """The lock agent's view: resources mastered, locks held, message counts."""
        st: dict[str, Any] = self.agent.status() if self.agent is not None else {}
        st["partition_locks"] = {
            str(p): {"mode": h.mode.name if h.mode is not None else None, "token": h.token}
            for p, h in self.dlm_locks.items()
        }
        st["read_replicas"] = {str(p): r.reads for p, r in self.replicas.items()}
        st["shared"] = sorted(p for p, h in self.hosts.items() if h.shared)
        if self.dlm_transport is not None:
            st["messages_sent"] = self.dlm_transport.messages
            st["bytes_sent"] = self.dlm_transport.bytes
        return st

    async def rpc_status(self, params: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "incarnation": self.incarnation,
            "lease_valid": self.lease_valid(),
            "serving": sorted(p for p, h in self.hosts.items() if h.serving),
            "recovering": sorted(p for p, h in self.hosts.items() if h.status == "recovering"),
            "acquiring": sorted(self.acquiring),
            "releasing": sorted(self.releasing),
            "epochs": {str(p): h.epoch for p, h in self.hosts.items()},
            "objects": sum(h.state.object_count() for h in self.hosts.values()),
            "requests": self.requests,
            "blobs": {
                "freed": self.blobs_freed,
                "deleted": self.blobs_deleted,
                "queued": sum(h.reclaim.pending() for h in self.hosts.values()),
                "leased": sum(h.reclaim.leased() for h in self.hosts.values()),
            },
        }


def _faulty(store: Store, spec: str) -> Store:
    """``--faulty-store SEED[:RATE]``: wrap ``store`` in the chaos harness's FaultyStore,
    failing about RATE (default 0.02) of the writes on a seeded schedule: EIO before or
    after the write, ENOSPC, slow fsync."""
    from cohort.chaos.faulty_store import FaultSchedule, FaultyStore

    seed, _, rate_s = spec.partition(":")
    rate = float(rate_s or 0.02)
    schedule = FaultSchedule(
        seed=int(seed), eio=rate * 0.3, eio_after=rate * 0.1, enospc=rate * 0.2,
        slow=rate * 0.4, slow_seconds=0.3,
    )  # fmt: skip
    log.warning("storage faults injected: seed %s, %.1f%% of writes", seed, rate * 100)
    return FaultyStore(store, schedule=schedule)


async def _tenant_keys(args: argparse.Namespace, store: EtagStore) -> KeyCache | None:
    """Tenants' access keys, for their DLM sessions (None: members only).  On a remote
    store the cache refreshes itself in the background (cohort.tenants)."""
    if not args.master_key:
        return None
    import json
    from pathlib import Path

    bootstrap: dict[str, str] = {}
    if args.credentials:
        creds = json.loads(Path(args.credentials).read_text())
        bootstrap = {creds["access_key"]: creds["secret_key"]}
    from cohort.tenants import KeyCache

    master = Path(args.master_key).read_bytes().strip()
    return await KeyCache(store, master, bootstrap=bootstrap).start()


async def serve(args: argparse.Namespace) -> None:
    raw = await open_store(args.storage)
    keys = await _tenant_keys(args, raw)
    store: Store = raw
    spec = args.faulty_store or os.environ.get("COHORT_FAULTY_STORE")
    if spec:
        store = _faulty(store, spec)
    cluster_key = ClusterKey.load(args.cluster_key)
    coord = connect(args.coordinator, cluster_key.member(args.id))
    server = Server(
        args.id,
        store,
        coord,
        host=args.host,
        port=args.port,
        capacity=args.capacity,
        standby=args.standby,
        advertise=args.advertise,
        tags=args.tag,
        cluster_key=cluster_key,
        tenants=keys.lookup if keys is not None else None,
    )
    server.upload_expiry = args.upload_expiry_seconds
    server.orphan_age = args.orphan_age_seconds
    await server.start()
    print(f"READY {server.listen_address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: flushing and releasing partitions")
    await server.stop()
    if keys is not None:
        await keys.close()
    await aclose_store(raw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cohort-server")
    ap.add_argument("--id", required=True)
    ap.add_argument(
        "--coordinator",
        required=True,
        help="host:port of the coordinator, or etcd://h1:p1,h2:p2[/ns]",
    )
    ap.add_argument("--storage", required=True, help=f"shared storage: {SPEC_HELP}")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--capacity", type=float, default=1.0)
    ap.add_argument("--standby", action="store_true")
    ap.add_argument(
        "--tag",
        action="append",
        default=[],
        help="a label for directors' balancing rules (e.g. batch, eu); repeatable",
    )
    ap.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        default=None,
        help="address to give the coordinator for peers and directors to dial "
        "(default: the listening address), e.g. a proxy in front of this server",
    )
    ap.add_argument(
        "--upload-expiry-seconds",
        type=float,
        default=UPLOAD_EXPIRY,
        help="abort multipart uploads older than this (default 7 days)",
    )
    ap.add_argument(
        "--orphan-age-seconds",
        type=float,
        default=ORPHAN_AGE,
        help="delete blobs that nothing references after this long (default 1 hour)",
    )
    ap.add_argument(
        "--faulty-store",
        metavar="SEED[:RATE]",
        default=None,
        help="chaos testing only: fail about RATE (0.02) of storage writes with EIO/ENOSPC/"
        "slow fsync on a seeded schedule (also env COHORT_FAULTY_STORE)",
    )
    ap.add_argument(
        "--cluster-key", required=True, help="the cluster key file (0600), see docs/security.md"
    )
    ap.add_argument(
        "--master-key",
        default=None,
        help="the key that encrypts tenant secrets: lets tenants take DLM locks here",
    )
    ap.add_argument("--credentials", default=None, help="the admin tenant's credentials.json")
    ap.add_argument("--log-file", default=None)
    args = ap.parse_args(argv)
    os.umask(0o077)  # data, logs and secrets are private to the cluster's user
    setup_logging(args.id, args.log_file)
    import uvloop

    try:
        uvloop.run(serve(args))
    except StorageUnavailable as e:
        log.error("storage unavailable: %s", e)
        print(f"cohort-server: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
