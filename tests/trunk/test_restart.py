"""Stop the whole cluster, start it again on the same data directory: every object is back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cohort.cluster import LocalCluster
from tests.conftest import s3_client, start_cluster


def test_full_restart_keeps_every_object(tmp_path: Path) -> None:
    data = tmp_path / "data"
    c = start_cluster(data, partitions=32)
    s3 = s3_client(c)
    s3.create_bucket(Bucket="keep")
    s3.create_bucket(Bucket="also")
    written = {}
    for i in range(200):
        body = os.urandom(100 + i)
        key = f"k/{i:03d}"
        s3.put_object(Bucket="keep", Key=key, Body=body)
        written[key] = hashlib.md5(body).hexdigest()
    s3.put_object(Bucket="also", Key="x", Body=b"y")
    s3.delete_object(Bucket="keep", Key="k/000")
    del written["k/000"]
    c.stop()

    c2 = LocalCluster(data, port=0, partitions=32)
    try:
        from tests.conftest import cluster_ready, wait_for

        c2.start()
        wait_for(lambda: cluster_ready(c2), what="partitions owned after restart")
        s3 = s3_client(c2)
        assert sorted(b["Name"] for b in s3.list_buckets()["Buckets"]) == ["also", "keep"]
        listed = {
            o["Key"]: o["ETag"].strip('"')
            for p in s3.get_paginator("list_objects_v2").paginate(Bucket="keep")
            for o in p.get("Contents", [])
        }
        assert listed == written
        for key, md5 in written.items():
            assert (
                hashlib.md5(s3.get_object(Bucket="keep", Key=key)["Body"].read()).hexdigest() == md5
            )
        assert s3.get_object(Bucket="also", Key="x")["Body"].read() == b"y"
    finally:
        c2.stop()


def test_restart_after_kill_9_of_everything(tmp_path: Path) -> None:
    """A crash of every process at once (no graceful shutdown) loses no acknowledged write."""
    data = tmp_path / "data"
    c = start_cluster(data, partitions=16)
    s3 = s3_client(c)
    s3.create_bucket(Bucket="crash")
    for i in range(50):
        s3.put_object(Bucket="crash", Key=f"{i}", Body=str(i).encode())
    for pid in [p.pid for p in c.procs.values()]:
        os.kill(pid, 9)
    for p in c.procs.values():
        assert p.popen is not None
        p.popen.wait()
    c2 = LocalCluster(data, port=0, partitions=16)
    try:
        from tests.conftest import cluster_ready, wait_for

        c2.start()
        wait_for(lambda: cluster_ready(c2), what="partitions owned after crash restart")
        s3 = s3_client(c2)
        for i in range(50):
            assert s3.get_object(Bucket="crash", Key=f"{i}")["Body"].read() == str(i).encode()
    finally:
        c2.stop()
