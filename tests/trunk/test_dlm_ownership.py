"""Partition ownership runs on the distributed lock manager: every served partition is an
EX lock on ``partition/<p>`` held by its server, hand-overs travel as blocking
notifications, and in steady state the lock traffic falls to zero (seed 000: sharing is
kept off the hot path).  Every test runs on both coordinator backends: on etcd the elected
primary publishes the lock managers' membership, and the same figures must hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cohort.auth import tenant_credential
from cohort.cluster import LocalCluster
from cohort.coord import connect
from cohort.etcd_server import etcd_available
from tests.conftest import cluster_ready, dlm_status, s3_client, start_cluster, wait_for

_ETCD = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
]


@pytest.fixture(scope="module", params=["embedded", pytest.param("etcd", marks=_ETCD)])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp(f"dlm-{request.param}"), coordinator=request.param, lease_ttl=2
    )
    yield c
    c.stop()


def messages(cluster: LocalCluster) -> int:
    return sum(int(s["dlm"].get("messages_sent", 0)) for s in dlm_status(cluster).values())


def test_every_served_partition_is_a_dlm_ex_lock(cluster: LocalCluster) -> None:
    wait_for(lambda: cluster_ready(cluster), what="cluster ready")
    status = dlm_status(cluster)
    served: list[int] = []
    for st in status.values():
        locks = st["dlm"]["partition_locks"]
        assert sorted(int(p) for p in locks) == st["serving"]
        assert all(v["mode"].endswith("EX") and v["token"] > 0 for v in locks.values())
        served += st["serving"]
    assert sorted(served) == list(range(cluster.partitions))  # each exactly once


def test_lock_traffic_is_quiet_in_steady_state_and_moves_on_drain(cluster: LocalCluster) -> None:
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="quiet")
    wait_for(lambda: cluster_ready(cluster), what="cluster ready")
    before = messages(cluster)
    t0 = time.monotonic()
    for i in range(100):  # object traffic does not touch the lock manager
        s3.put_object(Bucket="quiet", Key=f"k{i}", Body=b"x")
    while time.monotonic() - t0 < 2.0:  # a measured window, not a wait for a condition
        time.sleep(0.1)
    steady = messages(cluster) - before
    print(f"\nDLM messages in a 2 s steady-state window with 100 PUTs: {steady}")
    assert steady == 0

    async def drain() -> None:
        c = connect(cluster.coordinator_address, cluster.credential())
        try:
            await c.set_state("server-1", "draining")
        finally:
            await c.close()

    asyncio.run(drain())
    wait_for(
        lambda: cluster_ready(cluster) and not dlm_status(cluster)["server-1"]["serving"],
        what="server-1 drained",
    )
    moved = messages(cluster) - before
    print(f"DLM messages to hand over server-1's partitions: {moved}")
    assert moved > 0
    assert dlm_status(cluster)["server-1"]["dlm"]["partition_locks"] == {}
    for i in range(100):
        assert s3.get_object(Bucket="quiet", Key=f"k{i}")["Body"].read() == b"x"


def test_programs_take_cluster_locks_through_any_server(cluster: LocalCluster) -> None:
    """A program that is not a Cohort server uses the cluster's lock manager: two
    clients on different servers exclude each other, with growing fencing tokens, and
    the value block travels with the lock."""
    from cohort.dlm.client import DlmClient
    from cohort.dlm.errors import NotQueued

    servers = [p.address for p in cluster.procs.values() if p.role == "server"]

    async def scenario() -> None:
        cred = tenant_credential(cluster.creds["access_key"], cluster.creds["secret_key"])
        a, b = DlmClient(servers[0], cred), DlmClient(servers[1], cred)
        try:
            h = await a.lock("app/orders", "EX", timeout=5)
            with pytest.raises(NotQueued):
                await b.lock("app/orders", "EX", noqueue=True)
            h.set_value(b"generation=7")
            await h.release()
            h2 = await b.lock("app/orders", "PR", timeout=5)
            assert h2.token > h.token
            assert h2.value == b"generation=7"
            await h2.release()
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
