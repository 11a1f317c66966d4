"""A partition's operation log on shared storage, with fencing and checkpoints.

Layout under ``parts/<pppp>/``::

    log/<seq:016d>    one segment per group commit, written create-if-absent
    ckpt/<seq:016d>   the partition state after applying every segment <= seq
    quarantine/...    corrupt segments moved aside (reported, never applied)

Fencing.  Every append creates segment ``next_seq`` *if absent*.  A new owner, before it
replays, claims ``max(existing)+1`` with a ``fence`` segment carrying its epoch.  A former
owner that wakes up (a zombie) can only ever try to create the sequence number it expected
next, which now exists, so its append fails with :class:`Fenced` and it stops: no segment
can be written by an old epoch after the fence.  An owner never skips ahead to another
number after a conflict.

Checkpoints.  ``checkpoint(seq, state)`` writes ``ckpt/seq`` and then deletes older
checkpoints and segments ``<= seq``.  Recovery loads the newest readable checkpoint and
replays the segments after it; if a segment vanishes mid-recovery (a zombie checkpointed
concurrently) recovery starts over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cohort.oplog import segment
from cohort.storage.base import NotFound, PreconditionFailed, Store

log = logging.getLogger("cohort.oplog")


class Fenced(Exception):
    """Another owner has claimed the log: this owner must stop serving the partition."""


@dataclass
class Recovery:
    """What :meth:`PartitionLog.recover` found."""

    checkpoint: Any | None
    checkpoint_seq: int
    records: list[Any] = field(default_factory=list)
    segments_replayed: int = 0
    fence_seq: int = 0
    previous_epochs: list[int] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


def _seq_of(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


class PartitionLog:
    def __init__(self, store: Store, partition: int, owner: str) -> None:
        self.store = store
        self.partition = partition
        self.owner = owner
        self.base = f"parts/{partition:04d}"
        self.epoch = -1
        self.next_seq = -1  # set by recover(); appends are refused before that
        self.segments_since_checkpoint = 0
        self.last_checkpoint_seq = 0

    def _log_key(self, seq: int) -> str:
        return f"{self.base}/log/{seq:016d}"

    def _ckpt_key(self, seq: int) -> str:
        return f"{self.base}/ckpt/{seq:016d}"

    async def _list_seqs(self, sub: str) -> list[int]:
        return [_seq_of(k) async for k in self.store.list(f"{self.base}/{sub}/")]

    async def recover(self, epoch: int) -> Recovery:
        """Fence the log for ``epoch``, then load the checkpoint and the records after it."""
        for _attempt in range(20):
            try:
                return await self._recover_once(epoch)
            except NotFound:
                log.warning(
                    "segment vanished during recovery; retrying",
                    extra={"partition": self.partition},
                )
        raise RuntimeError(f"partition {self.partition}: log kept changing during recovery")

    async def _recover_once(self, epoch: int) -> Recovery:
        ckpts = sorted(await self._list_seqs("ckpt"), reverse=True)
        ckpt_state: Any | None = None
        ckpt_seq = 0
        ckpt_epoch = -1
        corrupt: list[str] = []
        for c in ckpts:
            try:
                hdr, body = segment.decode(await self.store.get(self._ckpt_key(c)))
                ckpt_state = body[0] if body else None
                ckpt_seq = c
                ckpt_epoch = int(hdr.get("epoch", -1))
                break
            except segment.CorruptSegment as e:
                corrupt.append(f"checkpoint {c}: {e}")
                log.error("corrupt checkpoint %d: %s", c, e, extra={"partition": self.partition})
            except NotFound:
                continue
        seqs = sorted(await self._list_seqs("log"))
        records: list[Any] = []
        epochs: list[int] = []
        replayed = 0
        max_seen = max([ckpt_seq, *seqs])
        damaged_from: int | None = None
        for s in seqs:
            if s <= ckpt_seq:
                continue
            data = await self.store.get(self._log_key(s))
            if damaged_from is not None:
                await self._quarantine(s, data)
                continue
            try:
                hdr, recs = segment.decode(data)
            except segment.CorruptSegment as e:
                # Never apply a damaged segment nor anything after it: report and move aside.
                corrupt.append(f"segment {s}: {e}")
                log.error(
                    "corrupt log segment %d (%s); truncating the log there",
                    s,
                    e,
                    extra={"partition": self.partition},
                )
                damaged_from = s
                await self._quarantine(s, data)
                continue
            epochs.append(int(hdr.get("epoch", -1)))
            records.extend(recs)
            replayed += 1
        self._check_not_superseded([ckpt_epoch, *epochs], epoch)
        # Fence: claim the next sequence number for our epoch.
        fence_seq = max_seen + 1
        while True:
            hdr = {"seq": fence_seq, "epoch": epoch, "owner": self.owner, "kind": "fence"}
            try:
                await self.store.put(
                    self._log_key(fence_seq), segment.encode(hdr, []), if_absent=True
                )
                break
            except PreconditionFailed:
                # The previous owner appended once more before our fence: read it and
                # include it (it may have been acknowledged), then fence after it.
                data = await self.store.get(self._log_key(fence_seq))
                try:
                    h2, recs = segment.decode(data)
                    epochs.append(int(h2.get("epoch", -1)))
                    # ...unless it is a newer owner's fence: then we were superseded
                    self._check_not_superseded(epochs, epoch)
                    records.extend(recs)
                    replayed += 1
                except segment.CorruptSegment as e:
                    corrupt.append(f"segment {fence_seq}: {e}")
                    await self._quarantine(fence_seq, data)
                fence_seq += 1
        self.epoch = epoch
        self.next_seq = fence_seq + 1
        self.last_checkpoint_seq = ckpt_seq
        self.segments_since_checkpoint = replayed + 1
        return Recovery(ckpt_state, ckpt_seq, records, replayed, fence_seq, epochs, corrupt)

    def _check_not_superseded(self, epochs: list[int], epoch: int) -> None:
        """A segment of a newer epoch means a newer owner has claimed the log: an older
        owner (a slow recovery, a zombie) must not fence after it and serve.  Found by a
        30-minute chaos run: a recovery at epoch 19, slower than the epoch-20 owner's,
        took the latter's fence for "the previous owner appended once more" and fenced
        after it, so two servers served the partition until one append failed."""
        newer = max(epochs, default=-1)
        if newer > epoch:
            self.next_seq = -1
            raise Fenced(
                f"partition {self.partition}: the log was claimed by epoch {newer}, "
                f"newer than ours ({epoch})"
            )

    async def load_readonly(self) -> Recovery:
        """Checkpoint + records after it, *without* fencing or repairing anything.

        For a read replica holding the partition lock in PR: the owner holds it in PR
        too, so nobody appends while the replica exists and the log is stable.  A
        damaged segment ends the load (the owner quarantines it on its next recovery).
        """
        for _attempt in range(20):
            try:
                ckpt_state: Any | None = None
                ckpt_seq = 0
                for c in sorted(await self._list_seqs("ckpt"), reverse=True):
                    try:
                        _hdr, body = segment.decode(await self.store.get(self._ckpt_key(c)))
                    except (segment.CorruptSegment, NotFound):
                        continue
                    ckpt_state = body[0] if body else None
                    ckpt_seq = c
                    break
                records: list[Any] = []
                replayed = 0
                corrupt: list[str] = []
                for s in sorted(await self._list_seqs("log")):
                    if s <= ckpt_seq:
                        continue
                    try:
                        _hdr, recs = segment.decode(await self.store.get(self._log_key(s)))
                    except segment.CorruptSegment as e:
                        corrupt.append(f"segment {s}: {e}")
                        break
                    records.extend(recs)
                    replayed += 1
                return Recovery(ckpt_state, ckpt_seq, records, replayed, 0, [], corrupt)
            except NotFound:
                continue  # a checkpoint removed segments under us: load again
        raise RuntimeError(f"partition {self.partition}: log kept changing during a read-only load")

    async def _quarantine(self, seq: int, data: bytes) -> None:
        await self.store.put(f"{self.base}/quarantine/{seq:016d}", data)
        await self.store.delete(self._log_key(seq))

    async def append(self, records: list[Any]) -> int:
        """Durably append one segment holding ``records``; returns its sequence number.

        Raises :class:`Fenced` if another owner has claimed the log.
        """
        if self.next_seq < 0:
            raise Fenced("log not recovered")
        seq = self.next_seq
        hdr = {"seq": seq, "epoch": self.epoch, "owner": self.owner, "kind": "data"}
        try:
            await self.store.put(self._log_key(seq), segment.encode(hdr, records), if_absent=True)
        except PreconditionFailed:
            self.next_seq = -1
            raise Fenced(
                f"partition {self.partition}: segment {seq} claimed by a newer owner"
            ) from None
        self.next_seq = seq + 1
        self.segments_since_checkpoint += 1
        return seq

    async def checkpoint(self, state: Any) -> int:
        """Write ``state`` (which must reflect every segment appended so far) as a checkpoint
        and delete what it supersedes.  Returns the checkpoint's sequence number."""
        seq = self.next_seq - 1
        hdr = {"seq": seq, "epoch": self.epoch, "owner": self.owner, "kind": "checkpoint"}
        try:
            await self.store.put(self._ckpt_key(seq), segment.encode(hdr, [state]), if_absent=True)
        except PreconditionFailed:
            return seq  # already checkpointed at this point
        for c in await self._list_seqs("ckpt"):
            if c < seq:
                await self.store.delete(self._ckpt_key(c))
        for s in await self._list_seqs("log"):
            if s <= seq:
                await self.store.delete(self._log_key(s))
        self.last_checkpoint_seq = seq
        self.segments_since_checkpoint = 0
        return seq


async def segment_epochs(store: Store, partition: int) -> list[tuple[int, int, str]]:
    """``(seq, epoch, kind)`` of every segment of a partition, in order (for audits)."""
    out = []
    async for k in store.list(f"parts/{partition:04d}/log/"):
        try:
            hdr, _ = segment.decode(await store.get(k))
        except (segment.CorruptSegment, NotFound):
            continue
        out.append((_seq_of(k), int(hdr.get("epoch", -1)), str(hdr.get("kind", ""))))
    return out
