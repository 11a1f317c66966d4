"""Elastic operations by routing alone: scale-out, drain, standby failover and failback,
under client load, with no failed request (add, drain) and no object data copied."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cohort.cluster import LocalCluster
from cohort.coord import connect
from tests.conftest import cluster_ready, s3_client, start_cluster, wait_for


def view(cluster: LocalCluster) -> dict[str, Any]:
    return cluster.view()


def owners(cluster: LocalCluster) -> Counter[str | None]:
    return Counter(p[0] for p in cluster.view()["partitions"])


def set_state(cluster: LocalCluster, member: str, state: str) -> None:
    async def go() -> None:
        c = connect(cluster.coordinator_address, cluster.credential())
        try:
            await c.set_state(member, state)
        finally:
            await c.close()

    asyncio.run(go())


def blob_bytes(storage: Path) -> int:
    return sum(p.stat().st_size for p in (storage / "blobs").rglob("*") if p.is_file())


class Traffic:
    """Writers and readers that record every failure and the longest request."""

    def __init__(self, cluster: LocalCluster, bucket: str) -> None:
        self.cluster = cluster
        self.bucket = bucket
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.longest = 0.0
        self.ok = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(4)]

    def run(self, n: int) -> None:
        s3 = s3_client(self.cluster, max_attempts=1, read_timeout=30)
        i = 0
        while not self.stop.is_set():
            key = f"t{n}/{i % 50}"
            t0 = time.monotonic()
            try:
                if i % 2 == 0:
                    s3.put_object(Bucket=self.bucket, Key=key, Body=os.urandom(2000))
                else:
                    s3.list_objects_v2(Bucket=self.bucket, Prefix=f"t{n}/", MaxKeys=5)
                self.ok += 1
            except Exception as e:
                self.errors.append(f"{key}: {e}")
            self.longest = max(self.longest, time.monotonic() - t0)
            i += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture
def elastic(tmp_path: Path) -> Any:
    c = start_cluster(tmp_path / "c", servers=2, partitions=32)
    yield c
    c.stop()


def test_scale_out_and_drain_without_errors_or_copying(elastic: LocalCluster) -> None:
    cluster = elastic
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="elastic")
    for i in range(40):
        s3.put_object(Bucket="elastic", Key=f"seed/{i}", Body=os.urandom(50_000))
    seed_bytes = blob_bytes(cluster.storage)
    with Traffic(cluster, "elastic") as traffic:
        wait_for(lambda: traffic.ok > 20, what="traffic running")
        t0 = time.monotonic()
        cluster.add_server("server-3")
        wait_for(
            lambda: owners(cluster).get("server-3", 0) >= 10 and cluster_ready(cluster),
            timeout=30,
            what="new server carries its share",
        )
        add_time = time.monotonic() - t0
        t0 = time.monotonic()
        set_state(cluster, "server-1", "draining")
        wait_for(
            lambda: owners(cluster).get("server-1", 0) == 0 and cluster_ready(cluster),
            timeout=30,
            what="server-1 drained",
        )
        drain_time = time.monotonic() - t0
        wait_for(lambda: traffic.ok > 200, timeout=60, what="more traffic after the moves")
    print(
        f"\nscale-out: share carried after {add_time:.2f} s; drain: {drain_time:.2f} s; "
        f"{traffic.ok} requests, {len(traffic.errors)} errors, longest {traffic.longest:.2f} s"
    )
    assert traffic.errors == []
    assert owners(cluster) == {"server-2": 16, "server-3": 16}
    # moving ownership copied no object data: the seed blobs are exactly where they were
    assert blob_bytes(cluster.storage) >= seed_bytes
    for i in range(40):
        assert len(s3.get_object(Bucket="elastic", Key=f"seed/{i}")["Body"].read()) == 50_000


def test_standby_takes_over_and_fails_back(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path / "c", servers=2, standby=1, partitions=32)
    try:
        assert owners(cluster) == {"server-1": 16, "server-2": 16}
        s3 = s3_client(cluster)
        s3.create_bucket(Bucket="standby")
        for i in range(30):
            s3.put_object(Bucket="standby", Key=str(i), Body=str(i).encode())
        cluster.kill("server-1")
        wait_for(
            lambda: owners(cluster).get("standby-1", 0) == 16 and cluster_ready(cluster),
            timeout=30,
            what="standby took over server-1's share",
        )
        assert owners(cluster)["server-2"] == 16  # the survivor was not loaded with it
        for i in range(30):
            assert s3.get_object(Bucket="standby", Key=str(i))["Body"].read() == str(i).encode()
        cluster.restart("server-1")
        wait_for(
            lambda: owners(cluster) == {"server-1": 16, "server-2": 16} and cluster_ready(cluster),
            timeout=30,
            what="failback to server-1",
        )
        for i in range(30):
            assert s3.get_object(Bucket="standby", Key=str(i))["Body"].read() == str(i).encode()
    finally:
        cluster.stop()
