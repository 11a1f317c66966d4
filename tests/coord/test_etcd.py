"""etcd-only properties: the single primary, endpoint fail-over, a whole cluster on etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cohort.cluster import LocalCluster
from cohort.coord import connect
from cohort.coord.etcd import EtcdCoordinator, parse_address
from cohort.etcd_server import EtcdCluster, etcd_available
from cohort.rpc import RpcError, RpcTimeout
from tests.conftest import s3_client, wait_for

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
]


@pytest.fixture(scope="module")
def etcd3() -> Iterator[EtcdCluster]:
    with EtcdCluster(3) as e:
        yield e


def test_parse_address() -> None:
    eps, ns, opts = parse_address("etcd://a:1,b:2/prod?lease_ttl=3")
    assert eps == ["a:1", "b:2"] and ns == "prod" and opts == {"lease_ttl": "3"}
    assert parse_address("etcd://a:1")[1] == "default"
    _, _, opts = parse_address("etcd://a:1/p?lease_ttl=2&ca=/x/ca.crt&cert=/x/c.crt&key=/x/c.key")
    assert opts == {"lease_ttl": "2", "ca": "/x/ca.crt", "cert": "/x/c.crt", "key": "/x/c.key"}
    with pytest.raises(ValueError):
        parse_address("a:1")
    assert isinstance(connect("etcd://127.0.0.1:1"), EtcdCoordinator)


async def test_two_primaries_never_both_write(etcd3: EtcdCluster) -> None:
    addr = etcd3.address("p" + uuid.uuid4().hex[:8], partitions=8, lease_ttl=2)
    a = EtcdCoordinator(addr, name="cand-a")
    b = EtcdCoordinator(addr, name="cand-b")
    try:
        a.start_primary()
        b.start_primary()
        inc = (await a.join({"id": "s1", "role": "server", "address": "x:1"}))["incarnation"]

        async def one_primary() -> bool:
            return a.is_primary != b.is_primary

        deadline = time.monotonic() + 10
        while not await one_primary():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        leader, other = (a, b) if a.is_primary else (b, a)
        deadline = time.monotonic() + 10
        v = await a.view()
        while not all(p[0] == "s1" and p[1] == 1 for p in v["partitions"]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            v = await a.view()
        # A zombie primary (it thinks it leads at revision 1, and its rules start from
        # nothing) computes a whole new map: its guarded write never lands.
        other.rules = other._engine(await other.config(), None)
        other._loaded_at = other._state_rev = other._map_rev = 0
        writes = other.primary_writes
        assert await other._step(my_rev=1) is False
        assert other.primary_writes == writes and other.rules is None
        assert (await a.view())["partitions"] == v["partitions"]
        # the primary dies (its task stops, its lease is revoked): the other takes over
        await leader.close()
        deadline = time.monotonic() + 10
        while not other.is_primary:
            assert time.monotonic() < deadline
            await other.heartbeat("s1", inc)
            await asyncio.sleep(0.1)
        await other.heartbeat("s1", inc)
        assert all(p[0] == "s1" for p in (await other.view())["partitions"])
    finally:
        for c in (a, b):
            await c.close()


async def test_client_survives_a_dead_etcd_member(etcd3: EtcdCluster) -> None:
    addr = etcd3.address("f" + uuid.uuid4().hex[:8], partitions=4, lease_ttl=2)
    c = EtcdCoordinator(addr)
    try:
        inc = (await c.join({"id": "s1", "role": "server", "address": "x:1"}))["incarnation"]
        etcd3.kill_member(0)  # the endpoint the client uses first
        t0 = time.monotonic()
        # A call that was already on its way to the dead member may time out (a server
        # treats that as one failed renewal and tries again); the next one must succeed
        # through a live member, well within the lease.
        while True:
            try:
                await c.heartbeat("s1", inc)
                break
            except RpcTimeout:
                assert time.monotonic() - t0 < 2.0, "no live etcd member answered"
        b = await c.create_bucket("after-kill")
        assert time.monotonic() - t0 < 3.0
        # the informer's stream moves to a live member and delivers the change
        v = await c.watch(-1, timeout=2.0)
        while b not in v["buckets"]:
            assert time.monotonic() - t0 < 8.0, "watch did not move to a live endpoint"
            v = await c.watch(v["version"], timeout=2.0)
    finally:
        await c.close()
        etcd3.start_member(0)
        etcd3.wait_ready(30, members=[0])


def test_local_cluster_on_etcd_fails_over(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, port=0, coordinator="etcd", lease_ttl=2) as cluster:
        # the launcher's etcd speaks TLS with client certificates, and the address every
        # member gets (unchanged cluster.py) carries the CA, the certificate and its key
        opts = parse_address(cluster.coordinator_address)[2]
        assert {"ca", "cert", "key", "partitions", "lease_ttl"} <= set(opts)
        assert cluster.etcd.members[0].client_url.startswith("https://")

        def ready() -> bool:
            async def check() -> bool:
                c = connect(cluster.coordinator_address)
                try:
                    v: dict[str, Any] = await c.view()
                    return all(p[0] is not None and p[0] == p[2] for p in v["partitions"])
                except RpcError:
                    return False
                finally:
                    await c.close()

            return asyncio.run(check())

        wait_for(ready, 30, what="every partition owned and locked")
        s3 = s3_client(cluster)
        s3.create_bucket(Bucket="bkt")
        for i in range(30):
            s3.put_object(Bucket="bkt", Key=f"k{i}", Body=b"v%d" % i)
        cluster.kill("server-1")
        t0 = time.monotonic()
        for i in range(30):
            assert s3.get_object(Bucket="bkt", Key=f"k{i}")["Body"].read() == b"v%d" % i
        print(f"reads served again {time.monotonic() - t0:.2f}s after SIGKILL of server-1")
        with contextlib.suppress(Exception):
            s3.close()
