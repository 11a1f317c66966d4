"""Application locks on etcd: never granted in conflict.

Until the etcd backend publishes the lock manager's membership (issue 13), each server's
lock agent would be an island, and two programs locking one name through two servers
would both hold EX.  So a lock agent that has no cluster membership refuses lock
requests (``LockManagerUnavailable``) instead of granting them locally.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cohort.auth import tenant_credential
from cohort.cluster import LocalCluster
from cohort.dlm.client import DlmClient
from cohort.dlm.errors import NotQueued
from cohort.etcd_server import etcd_available
from cohort.rpc import RpcError
from tests.conftest import cluster_ready, wait_for

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
]


def test_two_servers_never_both_grant_ex(tmp_path: Path) -> None:
    with LocalCluster(tmp_path, port=0, servers=2, coordinator="etcd", lease_ttl=2) as cluster:
        wait_for(lambda: cluster_ready(cluster), timeout=60, what="etcd cluster ready")
        cred = tenant_credential(cluster.creds["access_key"], cluster.creds["secret_key"])
        s1, s2 = (p.address for p in cluster.procs.values() if p.role == "server")

        async def scenario() -> None:
            a, b = DlmClient(s1, cred), DlmClient(s2, cred)
            try:
                held = []
                for c in (a, b):
                    try:
                        held.append(await c.lock("orders", "EX", timeout=2, noqueue=True))
                    except NotQueued:
                        pass
                    except RpcError as e:
                        assert e.code == "LockManagerUnavailable", e
                assert len(held) <= 1, "two servers granted EX on one name"
            finally:
                await a.close()
                await b.close()

        asyncio.run(scenario())
