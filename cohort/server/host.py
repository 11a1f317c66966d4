"""One partition served by this server: recovery, group commit, checkpoints, hand-over.

Life cycle::

    RECOVERING --(fence + replay done)--> SERVING --(map moved it / lease lost)--> CLOSED
                                             \\--(log fenced by a newer owner)--> CLOSED

Mutations go through :meth:`PartitionHost.commit`: records queue up and one flusher task
writes everything queued as a single log segment (group commit), then applies the records
to the in-memory state and only then acknowledges them.  So a value is visible to readers
only once it is durable, and an acknowledged write is always in the log.

A request whose record depends on the state (a conditional PUT, a part of an upload that
must still exist, a completion built from the parts) passes ``prepare`` to ``commit``: it
runs after the last ``await`` before the record is queued (in particular after the owner
converted a shared partition back to EX), against the state as it will be once every
queued record is applied (:meth:`PartitionHost.current`, :meth:`PartitionHost.upload`).
Records apply in queue order, so what ``prepare`` saw is exactly what the record meets.

Blobs the records free are deleted by the partition's :class:`BlobReclaimer`, which
knows about readers (leases) and moves with the partition (hand-over checkpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec

from cohort.oplog.log import Fenced, PartitionLog
from cohort.server.state import (
    ObjectMeta,
    Part,
    PartitionState,
    Upload,
    blob_grace,
    meta_from_wire,
    with_acl,
)
from cohort.storage.base import Store

log = logging.getLogger("cohort.server.host")

CHECKPOINT_EVERY_SEGMENTS = 1000


class NotServing(Exception):
    """The partition is not (or no longer) served here; the caller should re-route."""


class BlobReclaimer:
    """When the blobs a partition's records freed may be deleted from shared storage.

    Blobs are immutable and never reused, so a freed blob is garbage for good; the only
    question is whether a reader may still be reading it.  Directors read bodies
    themselves, after asking the owner (or a read replica) for the metadata:

    * a read that holds no lease finishes within half the grace period of its lookup,
      and every freed blob waits ``grace`` after the record that freed it;
    * a longer read leases the blobs it reads from the owner (``obj.lease``, renewed
      every third of the lease) and is aborted by its director if it cannot renew in
      time; a leased blob is never deleted;
    * a new owner deletes nothing during its first ``grace`` seconds (``not_before``;
      unless the log was empty, so there were no earlier readers): that covers every
      lease, and every read without one, that a previous owner answered (leases are
      granted for at most ``grace``).  A graceful hand-over passes the queue on in its
      checkpoint
      (:meth:`export` / :meth:`load`); after a crash the blobs are orphans for the
      sweeper, which asks :meth:`busy` first.

    All times are this process's monotonic clock.
    """

    def __init__(self, grace: float, now: float | None = None) -> None:
        self.grace = grace
        now = time.monotonic() if now is None else now
        self.not_before = now + grace
        self._due: list[tuple[float, str]] = []  # heap of (deletable from, blob)
        self._queued: set[str] = set()
        self._leases: dict[str, float] = {}  # blob -> lease end

    def free(self, keys: list[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for k in keys:
            if k not in self._queued:
                self._queued.add(k)
                heapq.heappush(self._due, (max(now + self.grace, self.not_before), k))

    def lease(self, keys: list[str], seconds: float, now: float | None = None) -> float:
        """Keep ``keys`` from deletion for ``seconds`` (at most the grace period, so a
        lease granted here ends within ``grace`` of this owner's last answer).  Returns
        the seconds granted."""
        now = time.monotonic() if now is None else now
        seconds = max(0.0, min(float(seconds), self.grace))
        until = now + seconds
        for k in keys:
            if self._leases.get(k, 0.0) < until:
                self._leases[k] = until
        return seconds

    def busy(self, key: str, now: float | None = None) -> bool:
        """Whether ``key`` must not be deleted now (queued here, or leased)."""
        now = time.monotonic() if now is None else now
        return key in self._queued or self._leases.get(key, 0.0) > now or now < self.not_before

    def due(self, now: float | None = None) -> list[str]:
        """Blobs that may be deleted now (removed from the queue)."""
        now = time.monotonic() if now is None else now
        out: list[str] = []
        while self._due and self._due[0][0] <= now:
            _, k = heapq.heappop(self._due)
            lease = self._leases.get(k, 0.0)
            if lease > now:
                heapq.heappush(self._due, (lease, k))  # a reader has it: look again then
                continue
            self._queued.discard(k)
            out.append(k)
        for k in [k for k, t in self._leases.items() if t <= now]:
            del self._leases[k]
        return out

    def pending(self) -> int:
        """Freed blobs not deleted yet."""
        return len(self._queued)

    def leased(self) -> int:
        """Blobs with a reader lease (live or not yet pruned)."""
        return len(self._leases)

    def export(self, now: float | None = None) -> list[list[Any]]:
        """``[[blob, seconds until deletable], ...]`` for a hand-over checkpoint."""
        now = time.monotonic() if now is None else now
        return [
            [k, round(max(0.0, t - now, self._leases.get(k, 0.0) - now), 3)]
            for t, k in sorted(self._due)
        ]

    def load(self, items: Any, now: float | None = None) -> None:
        """Queue what a previous owner's checkpoint left to reclaim (no sooner than it
        said, and never before ``not_before``)."""
        now = time.monotonic() if now is None else now
        if not isinstance(items, list):
            return
        for item in items:
            try:
                k, remaining = str(item[0]), float(item[1])
            except (TypeError, ValueError, IndexError):
                continue
            if k not in self._queued:
                self._queued.add(k)
                heapq.heappush(self._due, (max(now + remaining, self.not_before), k))


class PartitionHost:
    def __init__(
        self,
        store: Store,
        partition: int,
        owner: str,
        epoch: int,
        on_freed: Callable[[list[str]], None],
        lease_valid: Callable[[], bool] | None = None,
        grace: float | None = None,
    ) -> None:
        self.store = store
        # deletes what the records free, once no reader can need it (see BlobReclaimer)
        self.reclaim = BlobReclaimer(blob_grace() if grace is None else grace)
        # The server's membership lease.  Checked around every log append: a process
        # resumed after a long pause can flush a queued batch before its lease keeper
        # runs, and a new owner may already have fenced (and checkpointed) the log.
        self.lease_valid = lease_valid
        self.partition = partition
        self.epoch = epoch
        self.log = PartitionLog(store, partition, owner)
        self.state = PartitionState()
        self.status = "recovering"
        self.accepting = True  # False once a graceful hand-over has begun
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        # the batch being written: not applied yet, but conditional writes must see it
        self._inflight: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._on_freed = on_freed
        self.ready = asyncio.Event()
        self.recovery_seconds = 0.0
        self.replayed_records = 0
        self.ops = 0  # requests served, for load reporting
        self.bytes_written = 0
        # Hot read-only spreading: while ``shared`` the owner holds the partition lock in
        # PR next to read replicas on other servers, and must not write.  A commit first
        # calls ``make_exclusive`` (set by the server), which converts back to EX; the
        # DLM's blocking notifications make every replica drop its copy before that.
        self.shared = False
        self.make_exclusive: Callable[[], Awaitable[None]] | None = None
        # a read replica asked to share while we could not (writes, or converting to EX)
        self.share_wanted = False
        self.last_write = 0.0

    @property
    def serving(self) -> bool:
        return self.status == "serving"

    async def recover(self) -> None:
        t0 = time.monotonic()
        rec = await self.log.recover(self.epoch)
        state = PartitionState.from_checkpoint(rec.checkpoint)
        if rec.checkpoint is None and not rec.records:
            # a partition nothing was ever written to: no earlier owner can have answered
            # a lookup of one of its blobs, so no reader of theirs needs protecting
            self.reclaim.not_before = time.monotonic()
        elif isinstance(rec.checkpoint, dict):
            self.reclaim.load(rec.checkpoint.get("reclaim"))  # a hand-over's leftovers
        for r in rec.records:
            state.apply(r)  # blobs freed by replayed records were freed before (or are orphans)
        self.state = state
        self.replayed_records = len(rec.records)
        self.recovery_seconds = time.monotonic() - t0
        if rec.corrupt:
            log.error(
                "partition %d recovered past corruption: %s",
                self.partition,
                rec.corrupt,
                extra={"partition": self.partition, "epoch": self.epoch},
            )
        self.status = "serving"
        self.ready.set()
        log.info(
            "serving partition %d: fenced at seq %d, checkpoint %d + %d records in %.3fs",
            self.partition,
            rec.fence_seq,
            rec.checkpoint_seq,
            len(rec.records),
            self.recovery_seconds,
            extra={"partition": self.partition, "epoch": self.epoch},
        )

    def check(self) -> None:
        if self.status != "serving" or not self.accepting:
            raise NotServing(f"partition {self.partition} is {self.status}")

    def _queued(self, bucket_id: str) -> Iterator[dict[str, Any]]:
        """The queued (in flight, then pending) records of a bucket that will take
        effect, in the order they will apply: retries of applied requests are skipped,
        as ``PartitionState.apply`` skips them."""
        seen: set[str] = set()
        for rec, _ in itertools.chain(self._inflight, self._pending):
            if rec.get("b") != bucket_id:
                continue
            rid = rec.get("rid")
            if rid is not None:
                if rid in seen or self.state.seen(rid):
                    continue
                seen.add(rid)
            yield rec

    def current(self, bucket_id: str, key: str) -> ObjectMeta | None:
        """The object as it will be once every queued commit is applied.

        Conditional writes are checked against this in ``commit``'s ``prepare``, right
        before their record is queued, so the check and the write are atomic with respect
        to every other request on this partition.
        """
        meta = self.state.get(bucket_id, key)
        dropped = bucket_id in self.state.dropped
        for rec in self._queued(bucket_id):
            op = rec["op"]
            if op == "drop":
                meta, dropped = None, True
            elif rec.get("k") != key:
                continue
            elif op == "put":
                if not dropped:  # a PUT into a dropped bucket is discarded
                    meta = meta_from_wire(rec["m"])
            elif op == "mpu_complete":
                # queued only after its upload was checked with upload(): it applies
                meta = meta_from_wire(rec["m"])
            elif op == "del":
                meta = None
            elif op == "acl" and meta is not None:
                meta = with_acl(meta, rec.get("acl"))
        return meta

    def upload(self, bucket_id: str, upload_id: str) -> Upload | None:
        """The multipart upload as it will be once every queued commit is applied (None
        once a queued completion, abort or bucket drop ends it)."""
        up = self.state.upload(bucket_id, upload_id)
        dropped = bucket_id in self.state.dropped
        for rec in self._queued(bucket_id):
            op = rec["op"]
            if op == "drop":
                up, dropped = None, True
            elif rec.get("u") != upload_id:
                continue
            elif op == "mpu_create":
                if not dropped:
                    up = Upload(
                        key=rec["k"],
                        initiated=float(rec["t"]),
                        meta=meta_from_wire(rec["m"]),
                        parts={},
                    )
            elif op in ("mpu_complete", "mpu_abort"):
                up = None
            elif op == "mpu_part" and up is not None:
                parts = dict(up.parts)
                parts[int(rec["n"])] = msgspec.convert(rec["p"], Part)
                up = msgspec.structs.replace(up, parts=parts)
        return up

    def quiet(self, seconds: float) -> bool:
        """No write queued, in flight, or done in the last ``seconds``."""
        return (
            not self._pending
            and not self._inflight
            and time.monotonic() - self.last_write >= seconds
        )

    async def commit(
        self, record: dict[str, Any], prepare: Callable[[], None] | None = None
    ) -> bool:
        """Make ``record`` durable and apply it; returns once both are done.

        ``prepare`` (if given) runs synchronously just before ``record`` is queued, after
        every ``await`` of this call: it checks the request against :meth:`current` /
        :meth:`upload` (raising refuses it, and nothing is queued) and may complete the
        record.  Returns False, without running ``prepare``, when ``record`` is a retry
        of a request that committed (or is being committed) already.
        """
        self.check()
        self.last_write = time.monotonic()
        if self.shared:
            if self.make_exclusive is None:
                raise NotServing(f"partition {self.partition} is shared read-only")
            await self.make_exclusive()
            self.check()
        # From here to the enqueue nothing awaits (but a retry's wait, which returns):
        # the state prepare() sees is the state the record will meet.
        rid = record.get("rid")
        if self.state.seen(rid):
            return False  # a retry of a request that already committed
        if rid is not None:
            for r, f in itertools.chain(self._inflight, self._pending):
                if r.get("rid") == rid:  # a retry of a request still being committed
                    await asyncio.shield(f)
                    return False
        if prepare is not None:
            prepare()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await fut
        return True

    async def _flush_loop(self) -> None:
        while self._pending and self.status == "serving":
            batch, self._pending = self._pending, []
            self._inflight = batch
            if self.lease_valid is not None and not self.lease_valid():
                self._fail(batch, NotServing("lease expired"), "fenced")
                return
            try:
                await self.log.append([r for r, _ in batch])
                if self.lease_valid is not None and not self.lease_valid():
                    # durable, but a new owner may have recovered without it: not ours to
                    # acknowledge (the outcome is unknown to the client; the log decides)
                    raise Fenced(f"partition {self.partition}: lease expired during append")
            except Fenced as e:
                self._fail(batch, NotServing(str(e)), "fenced")
                return
            except Exception as e:
                # Unknown whether the segment landed: stop serving; the server re-acquires
                # and replays the log, which is the only source of truth.
                log.exception(
                    "log append failed for partition %d",
                    self.partition,
                    extra={"partition": self.partition, "epoch": self.epoch},
                )
                self._fail(batch, NotServing(f"log write failed: {e}"), "failed")
                return
            freed: list[str] = []
            self._inflight = []
            for rec, fut in batch:
                freed.extend(self.state.apply(rec))
                if not fut.done():
                    fut.set_result(None)
            if freed:
                self.reclaim.free(freed)
                self._on_freed(freed)
            if self.log.segments_since_checkpoint >= CHECKPOINT_EVERY_SEGMENTS:
                await self._checkpoint()

    def _fail(
        self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]], exc: Exception, status: str
    ) -> None:
        self.status = status
        self._inflight = []
        for _, fut in batch + self._pending:
            if not fut.done():
                fut.set_exception(exc)
        self._pending = []

    async def _checkpoint(self) -> None:
        try:
            data = self.state.to_checkpoint()
            # what is left to reclaim goes with the partition (a hand-over's new owner
            # queues it instead of leaving it to the orphan sweeper)
            data["reclaim"] = self.reclaim.export()
            seq = await self.log.checkpoint(data)
            log.info(
                "checkpoint of partition %d at seq %d",
                self.partition,
                seq,
                extra={"partition": self.partition, "epoch": self.epoch},
            )
        except Exception:
            log.exception("checkpoint of partition %d failed", self.partition)

    async def close(self, *, graceful: bool) -> None:
        """Stop serving.  Graceful: finish queued commits and checkpoint first, so the next
        owner replays nothing."""
        self.accepting = False
        if graceful and self.status == "serving":
            if self._flusher is not None and not self._flusher.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._flusher)
            if self.status == "serving" and self.log.segments_since_checkpoint > 1:
                await self._checkpoint()
        if self.status in ("serving", "recovering"):
            self.status = "closed"
        self.ready.set()
        if self._pending:
            self._fail([], NotServing(f"partition {self.partition} moved"), self.status)
