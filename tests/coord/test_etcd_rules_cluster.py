"""The rules on etcd with real server processes: a standby takes over a killed server's
partitions and serves them, the failed server gets them back when it returns, and a
drain and an undrain through ``set_state`` move partitions between real servers.

(The same rules on both backends without processes: tests/coord/test_rules_both.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cohort.cluster import LocalCluster
from cohort.coord import connect
from cohort.etcd_server import etcd_available
from tests.conftest import cluster_ready, s3_client, wait_for

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
]


def _owned(v: dict[str, Any], mid: str) -> set[int]:
    return {p for p, (o, _e, _h) in enumerate(v["partitions"]) if o == mid}


def _served(v: dict[str, Any], want: dict[str, set[int]]) -> bool:
    """Each named server owns exactly these partitions and holds their locks."""
    return all(
        {p for p, (o, _e, h) in enumerate(v["partitions"]) if o == mid and h == mid} == ps
        for mid, ps in want.items()
    )


def _set_state(cluster: LocalCluster, mid: str, state: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        c = connect(cluster.coordinator_address)
        try:
            return await c.set_state(mid, state)
        finally:
            await c.close()

    return asyncio.run(go())


def test_standby_takes_over_on_etcd_and_fails_back(tmp_path: Path) -> None:
    with LocalCluster(
        tmp_path, port=0, servers=2, standby=1, partitions=16, coordinator="etcd", lease_ttl=2
    ) as cluster:
        wait_for(lambda: cluster_ready(cluster), timeout=60, what="etcd cluster ready")
        v = cluster.view()
        assert not _owned(v, "standby-1")  # a standby carries nothing while all is well
        failed = _owned(v, "server-1")
        assert len(failed) == 8
        s3 = s3_client(cluster)
        s3.create_bucket(Bucket="bkt")
        for i in range(20):
            s3.put_object(Bucket="bkt", Key=f"k{i}", Body=b"v%d" % i)
        cluster.kill("server-1")
        t0 = time.monotonic()
        wait_for(
            lambda: _served(cluster.view(), {"standby-1": failed}),
            timeout=30,
            what="the standby to serve server-1's partitions",
        )
        took = time.monotonic() - t0
        for i in range(20):
            assert s3.get_object(Bucket="bkt", Key=f"k{i}")["Body"].read() == b"v%d" % i
        print(f"\nstandby serves server-1's 8 partitions {took:.2f} s after SIGKILL (etcd)")
        assert _owned(cluster.view(), "server-2") == set(range(16)) - failed
        cluster.restart("server-1")  # immediate failback
        wait_for(
            lambda: _served(cluster.view(), {"server-1": failed, "standby-1": set()}),
            timeout=30,
            what="server-1 to serve its partitions again",
        )
        # drain and undrain through the primary's rules
        assert _set_state(cluster, "server-2", "draining")["state"] == "draining"
        wait_for(
            lambda: not _owned(cluster.view(), "server-2") and cluster_ready(cluster),
            timeout=30,
            what="server-2 drained",
        )
        assert not _owned(cluster.view(), "standby-1")  # a drain does not fill the standby
        _set_state(cluster, "server-2", "alive")
        wait_for(
            lambda: (
                cluster_ready(cluster)
                and Counter(o for o, _e, _h in cluster.view()["partitions"])
                == {"server-1": 8, "server-2": 8}
            ),
            timeout=30,
            what="server-2 back to its share",
        )
        for i in range(20):
            assert s3.get_object(Bucket="bkt", Key=f"k{i}")["Body"].read() == b"v%d" % i
        s3.close()
