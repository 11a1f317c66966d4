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


async def test_an_owner_whose_lease_ran_out_appends_nothing(tmp_path: Path) -> None:
    """A server resumed after a long pause may flush a queued batch before its lease
    keeper runs: the partition host checks the lease around every append, so nothing
    reaches the log (or is acknowledged) once the lease may have expired."""
    from cohort.oplog.log import segment_epochs
    from cohort.server.host import NotServing, PartitionHost

    store = LocalStore(str(tmp_path))
    valid = [True]
    h = PartitionHost(store, 3, "server-1", 5, lambda _freed: None, lease_valid=lambda: valid[0])
    await h.recover()
    await h.commit({"op": "put", "b": "b", "k": "k1", "m": [1, "e", 0.0, None], "rid": "r1"})
    before = await segment_epochs(store, 3)
    valid[0] = False
    with pytest.raises(NotServing):
        await h.commit({"op": "put", "b": "b", "k": "k2", "m": [1, "e", 0.0, None], "rid": "r2"})
    assert await segment_epochs(store, 3) == before  # nothing appended
    assert h.state.get("b", "k2") is None and not h.serving


async def test_a_server_whose_lock_agent_fenced_itself_rejoins(tmp_path: Path) -> None:
    """Regression (20-minute chaos run): a late lease renewal can extend a lease the
    lock agent already saw lapse; the agent had fenced itself for good, the server
    kept its lease and never locked a partition again.  A fenced agent now counts as
    a lost lease: the server re-joins as a new incarnation with a fresh agent."""
    import asyncio

    from cohort.coord import connect
    from cohort.coord.embedded import EmbeddedCoordinator
    from cohort.server.service import Server
    from tests.keys import KEY

    coord = EmbeddedCoordinator(tmp_path / "coord", partitions=4, lease_ttl=2.0, cluster_key=KEY)
    port = await coord.start("127.0.0.1", 0)
    server = Server(
        "s1",
        LocalStore(str(tmp_path / "storage")),
        connect(f"127.0.0.1:{port}", KEY.member("s1")),
        cluster_key=KEY,
    )
    await server.start()
    try:
        first = server.incarnation
        assert server.agent is not None
        server.agent.lease_lost()  # what _may_act does when it sees the lease lapse
        deadline = asyncio.get_running_loop().time() + 10
        while server.incarnation == first or server.agent.fenced:
            assert asyncio.get_running_loop().time() < deadline, "never re-joined"
            await asyncio.sleep(0.05)
        while len([h for h in server.hosts.values() if h.serving]) < 4:
            assert asyncio.get_running_loop().time() < deadline, "partitions not served"
            await asyncio.sleep(0.05)
    finally:
        await server.stop()
        await coord.close()
