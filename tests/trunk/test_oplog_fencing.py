"""The operation log's fence against owners of an older epoch (real files, LocalStore)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cohort.oplog.log import Fenced, PartitionLog
from cohort.storage.local import LocalStore


async def test_an_older_epoch_cannot_fence_after_a_newer_one(tmp_path: Path) -> None:
    """Regression (30-minute chaos run): a recovery at epoch 19 that lost the race to
    the epoch-20 owner found its fence and, taking it for the previous owner's last
    append, fenced after it and served too.  Every way an older recovery can meet the
    newer owner's mark now raises Fenced."""
    store = LocalStore(str(tmp_path))
    new = PartitionLog(store, 8, "server-3")
    await new.recover(20)
    await new.append([{"op": "put", "k": "a"}])

    # 1. the newer owner's segments are there when the older one lists the log
    with pytest.raises(Fenced, match="epoch 20"):
        await PartitionLog(store, 8, "server-2").recover(19)

    # 2. the race: the older one listed the log before the newer one's fence landed,
    #    and meets it only when its own fence attempt finds the sequence number taken
    old = PartitionLog(store, 8, "server-2")

    async def stale_listing(sub: str) -> list[int]:
        return []  # listed before the newer owner had written anything

    old._list_seqs = stale_listing  # type: ignore[method-assign]
    with pytest.raises(Fenced, match="epoch 20"):
        await old.recover(19)
    with pytest.raises(Fenced):
        await old.append([{"op": "put", "k": "zombie"}])

    # 3. the newer owner checkpointed (its segments are gone, its checkpoint is not)
    await new.checkpoint({"state": 1})
    with pytest.raises(Fenced, match="epoch 20"):
        await PartitionLog(store, 8, "server-2").recover(19)

    # the same or a newer epoch still recovers
    rec = await PartitionLog(store, 8, "server-1").recover(21)
    assert rec.checkpoint == {"state": 1}
