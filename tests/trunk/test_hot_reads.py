"""Hot read-only spreading: a partition read hard while nobody writes gets read replicas
on other servers (PR locks next to the owner's PR); a write converts the owner back to EX,
the DLM's blocking notifications make every replica drop its copy first, so no read after
the write ever returns the old value."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cohort.cluster import LocalCluster
from cohort.rpc import ClientPool
from tests.conftest import s3_client, start_cluster, wait_for


def dlm_views(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    async def get() -> dict[str, dict[str, Any]]:
        pool = ClientPool(cluster.credential())
        try:
            return {
                pid: await pool.get(p.address).call("dlm.status", None)
                for pid, p in cluster.procs.items()
                if p.role == "server"
            }
        finally:
            await pool.close()

    return asyncio.run(get())


def replica_servers(cluster: LocalCluster) -> list[str]:
    return sorted(s for s, st in dlm_views(cluster).items() if st["read_replicas"])


@pytest.fixture
def hot_cluster(tmp_path: Path) -> Any:
    c = start_cluster(tmp_path / "c", partitions=16, extra_env={"COHORT_HOT_READS": "5"})
    yield c
    c.stop()


def test_readers_multiply_and_never_serve_stale_data_after_a_write(
    hot_cluster: LocalCluster,
) -> None:
    cluster = hot_cluster
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="hot")
    s3.put_object(Bucket="hot", Key="k", Body=b"v1")
    stop = threading.Event()
    reads: list[tuple[float, float, bytes]] = []  # (invoke, complete, body)
    errors: list[str] = []

    def reader() -> None:
        c = s3_client(cluster, max_attempts=1)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                body = c.get_object(Bucket="hot", Key="k")["Body"].read()
            except Exception as e:
                errors.append(str(e))
                continue
            reads.append((t0, time.monotonic(), body))

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # the hot partition gets replicas on both other servers
        wait_for(lambda: len(replica_servers(cluster)) >= 2, timeout=30, what="two read replicas")
        views = dlm_views(cluster)
        owner_shared = [s for s, st in views.items() if st["shared"]]
        assert len(owner_shared) == 1, views
        wait_for(
            lambda: (
                sum(sum(st["read_replicas"].values()) for st in dlm_views(cluster).values()) > 20
            ),
            timeout=30,
            what="replicas serve reads",
        )
        # a write lands: owner converts PR -> EX, replicas drop their copies first
        s3.put_object(Bucket="hot", Key="k", Body=b"v2")
        acked = time.monotonic()
        wait_for(
            lambda: sum(1 for r in reads if r[0] > acked) > 50,
            timeout=30,
            what="reads after the write",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    stale = [r for r in reads if r[0] > acked and r[2] != b"v2"]
    print(
        f"\n{len(reads)} reads, {sum(1 for r in reads if r[0] > acked)} after the write, "
        f"{len(stale)} stale, {len(errors)} errors"
    )
    assert stale == []
    assert errors == []
    # the replicas were told and let go (they may come back later, sharing again)
    assert all(b in (b"v1", b"v2") for _, _, b in reads)


def test_balancing_rules_send_replica_reads_to_tagged_servers(tmp_path: Path) -> None:
    """``--balance`` with a rule: reads of a hot partition go to the candidate tagged
    ``batch`` (server-3, ``--tag batch``), never to the untagged replica.  (With
    ``round-robin`` the untagged replica serves its share: this test then fails.)"""
    import json

    from cohort.partitioning import partition_of

    rules = {"policy": "rules", "rules": [{"tag": "batch"}]}
    cluster = start_cluster(
        tmp_path / "c",
        servers=2,
        partitions=16,
        extra_env={"COHORT_HOT_READS": "5"},
        director_args=["--balance", json.dumps(rules)],
    )
    try:
        cluster.add_server("server-3", tags=["batch"])
        s3 = s3_client(cluster)
        s3.create_bucket(Bucket="hot")
        wait_for(
            lambda: {p[0] for p in cluster.view()["partitions"]} >= {"server-3"},
            timeout=30,
            what="server-3 owns partitions",
        )
        view = cluster.view()
        tags = next(m for m in view["members"] if m["id"] == "server-3")["meta"]["tags"]
        assert tags == ["batch"]
        bid = next(b["id"] for b in view["buckets"] if b["name"] == "hot")
        # a key whose partition server-3 does not own: it can only be a replica of it
        key = next(
            k
            for k in (f"k{i}" for i in range(1000))
            if view["partitions"][partition_of(bid, k, 16)][0] != "server-3"
        )
        s3.put_object(Bucket="hot", Key=key, Body=b"v")
        stop = threading.Event()

        def reader() -> None:
            c = s3_client(cluster, max_attempts=1)
            while not stop.is_set():
                c.get_object(Bucket="hot", Key=key)["Body"].read()

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()

        def replica_reads() -> dict[str, int]:
            return {s: sum(st["read_replicas"].values()) for s, st in dlm_views(cluster).items()}

        try:
            wait_for(
                lambda: len(replica_servers(cluster)) >= 2, timeout=30, what="two read replicas"
            )
            before = replica_reads()
            wait_for(
                lambda: replica_reads().get("server-3", 0) - before.get("server-3", 0) > 20,
                timeout=30,
                what="the tagged replica serves reads",
            )
            after = replica_reads()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        untagged = {s: after[s] - before.get(s, 0) for s in after if s != "server-3"}
        assert all(n == 0 for n in untagged.values()), (before, after)
    finally:
        cluster.stop()
