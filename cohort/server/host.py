"""One partition served by this server: recovery, group commit, checkpoints, hand-over.

Life cycle::

    RECOVERING --(fence + replay done)--> SERVING --(map moved it / lease lost)--> CLOSED
                                             \\--(log fenced by a newer owner)--> CLOSED

Mutations go through :meth:`PartitionHost.commit`: records queue up and one flusher task
writes everything queued as a single log segment (group commit), then applies the records
to the in-memory state and only then acknowledges them.  So a value is visible to readers
only once it is durable, and an acknowledged write is always in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cohort.oplog.log import Fenced, PartitionLog
from cohort.server.state import ObjectMeta, PartitionState, meta_from_wire
from cohort.storage.base import Store

log = logging.getLogger("cohort.server.host")

CHECKPOINT_EVERY_SEGMENTS = 1000


class NotServing(Exception):
    """The partition is not (or no longer) served here; the caller should re-route."""


class PartitionHost:
    def __init__(
        self,
        store: Store,
        partition: int,
        owner: str,
        epoch: int,
        on_freed: Callable[[list[str]], None],
        lease_valid: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
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
        self.last_write = 0.0

    @property
    def serving(self) -> bool:
        return self.status == "serving"

    async def recover(self) -> None:
        t0 = time.monotonic()
        rec = await self.log.recover(self.epoch)
        state = PartitionState.from_checkpoint(rec.checkpoint)
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

    def current(self, bucket_id: str, key: str) -> ObjectMeta | None:
        """The object as it will be once every queued commit is applied.

        Conditional writes are checked against this, at enqueue time, so the check and
        the write are atomic with respect to every other request on this partition.
        """
        for rec, _ in reversed(self._inflight + self._pending):
            if rec.get("b") == bucket_id and rec.get("k") == key:
                if rec["op"] in ("put", "mpu_complete"):
                    return meta_from_wire(rec["m"])
                if rec["op"] == "del":
                    return None
        return self.state.get(bucket_id, key)

    def quiet(self, seconds: float) -> bool:
        """No write queued, in flight, or done in the last ``seconds``."""
        return (
            not self._pending
            and not self._inflight
            and time.monotonic() - self.last_write >= seconds
        )

    async def commit(self, record: dict[str, Any]) -> None:
        """Make ``record`` durable and apply it; returns once both are done."""
        self.check()
        self.last_write = time.monotonic()
        if self.shared:
            if self.make_exclusive is None:
                raise NotServing(f"partition {self.partition} is shared read-only")
            await self.make_exclusive()
            self.check()
        rid = record.get("rid")
        if self.state.seen(rid):
            return  # a retry of a request that already committed
        if rid is not None:
            for r, f in self._pending:
                if r.get("rid") == rid:  # a retry of a request still being committed
                    await asyncio.shield(f)
                    return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await fut

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
            seq = await self.log.checkpoint(self.state.to_checkpoint())
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
