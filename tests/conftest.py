"""Shared fixtures: real clusters of real processes on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cohort.cluster import LocalCluster
from cohort.s3.sigv4 import sign_request


def wait_for(
    cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``cond`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


def s3_client(cluster: LocalCluster, **config: Any) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": config.pop("max_attempts", 3), "mode": "standard"},
        connect_timeout=config.pop("connect_timeout", 5),
        read_timeout=config.pop("read_timeout", 20),
        **config,
    )
    return boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        aws_access_key_id=cluster.creds["access_key"],
        aws_secret_access_key=cluster.creds["secret_key"],
        region_name="us-east-1",
        config=cfg,
    )


def cluster_ready(cluster: LocalCluster) -> bool:
    """Every partition has an owner that holds its lock."""
    return all(p[0] is not None and p[0] == p[2] for p in cluster.view()["partitions"])


def dlm_status(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """Every live server's ``status``, with its lock agent's ``dlm.status`` as ``dlm``."""
    import asyncio

    from cohort.rpc import ClientPool

    async def get() -> dict[str, dict[str, Any]]:
        pool = ClientPool(cluster.credential())
        try:
            out = {}
            for pid, p in cluster.procs.items():
                if p.role == "server" and p.alive():
                    st = await pool.get(p.address).call("status", None, timeout=3)
                    dlm = await pool.get(p.address).call("dlm.status", None, timeout=3)
                    out[pid] = {**st, "dlm": dlm}
            return out
        finally:
            await pool.close()

    return asyncio.run(get())


def signed(
    cluster: LocalCluster,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    secret: str | None = None,
) -> requests.Response:
    """A SigV4-signed raw HTTP request to the cluster's S3 endpoint (``secret``: sign
    with another secret, to test refusals)."""
    url = cluster.s3_endpoint + path
    h = dict(headers or {})
    h.update(
        sign_request(
            method,
            url,
            h,
            hashlib.sha256(body).hexdigest(),
            cluster.creds["access_key"],
            secret or cluster.creds["secret_key"],
            "us-east-1",
        )
    )
    return requests.request(method, url, data=body, headers=h, timeout=10)


def start_cluster(tmp: Path, **kw: Any) -> LocalCluster:
    kw.setdefault("port", 0)
    kw.setdefault("partitions", 64)
    c = LocalCluster(tmp, **kw).start()
    wait_for(lambda: cluster_ready(c), what="all partitions owned")
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def s3(cluster: LocalCluster) -> Any:
    return s3_client(cluster)
