"""Load-aware rebalancing on a real cluster: a skewed client load makes a partition move.

Servers report per-partition request rates with their heartbeats; the coordinator sees
one server carrying both hot partitions and swaps one of them for a cold partition of
the other server.  Clients see no errors while it happens.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

from cohort.partitioning import partition_of
from tests.conftest import s3_client, start_cluster, wait_for
from tests.trunk.test_elastic import view


def test_skewed_load_moves_a_hot_partition(tmp_path: Path) -> None:
    cluster = start_cluster(
        tmp_path / "c",
        servers=2,
        partitions=8,
        coordinator_args=[
            "--load-period", "0.5", "--load-ticks", "3", "--load-cooldown", "2",
            "--load-min-rate", "5",
        ],
    )  # fmt: skip
    try:
        s3 = s3_client(cluster)
        s3.create_bucket(Bucket="skew")
        v = view(cluster)
        bid = next(b["id"] for b in v["buckets"] if b["name"] == "skew")
        parts = v["partitions"]
        on_s1 = sorted(p for p in range(8) if parts[p][0] == "server-1")
        assert len(on_s1) == 4
        hot = on_s1[:2]  # two hot partitions, both on server-1
        keys: dict[int, str] = {}
        i = 0
        while len(keys) < 2:
            k = f"k{i}"
            p = partition_of(bid, k, 8)
            if p in hot and p not in keys:
                keys[p] = k
                s3.put_object(Bucket="skew", Key=k, Body=b"x" * 100)
            i += 1
        stop = threading.Event()
        errors: list[str] = []

        def hammer(n: int) -> None:
            c = s3_client(cluster, max_attempts=1)
            j = 0
            while not stop.is_set():
                k = keys[hot[j % 2]]
                try:
                    c.get_object(Bucket="skew", Key=k)["Body"].read()
                except Exception as e:
                    errors.append(str(e))
                j += 1

        threads = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(3)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        try:
            wait_for(
                lambda: any(view(cluster)["partitions"][p][0] == "server-2" for p in hot),
                timeout=30,
                interval=0.3,
                what="a hot partition moved to server-2",
            )
            moved_after = time.monotonic() - t0
            # balanced now (one hot partition per server): nothing more moves
            wait_for(lambda: view(cluster)["load"]["moves"] >= 2, timeout=5, what="swap done")
            moves = view(cluster)["load"]["moves"]
            watch_until = time.monotonic() + 4.0
            while time.monotonic() < watch_until:
                assert view(cluster)["load"]["moves"] == moves, "load moves kept going"
                time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        v = view(cluster)
        owners = [p[0] for p in v["partitions"]]
        print(f"\nhot partition moved after {moved_after:.1f} s; loads {v['load']}")
        assert v["load"]["moves"] == 2  # one swap, then still
        assert sorted(owners[p] for p in hot) == ["server-1", "server-2"]  # one each now
        assert owners.count("server-1") == owners.count("server-2") == 4  # a swap
        assert errors == []
        # the hand-over work is visible in metrics: lock messages, checkpoint bytes read
        meta = next(m["meta"] for m in v["members"] if m["id"] == "server-2")
        text = urllib.request.urlopen(f"http://{meta['metrics']}/metrics", timeout=5).read()
        assert b"cohort_dlm_messages_sent_total" in text
        assert b'cohort_store_bytes_total{direction="read",kind="ckpt"}' in text
    finally:
        cluster.stop()
