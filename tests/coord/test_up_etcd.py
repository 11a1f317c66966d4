"""`cohort up --coordinator etcd --etcd-members 3 --standby 1`, used as a user would: the
multi-machine mode on one box.  Kill an etcd member, an active server, and lock from
several servers at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from cohort.auth import tenant_credential
from cohort.daemons import free_port
from cohort.dlm.client import DlmClient
from cohort.dlm.errors import NotQueued
from cohort.etcd_server import etcd_available
from cohort.rpc import RpcError
from tests.conftest import wait_for

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.slow,
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
]

CLI = str(Path(sys.executable).with_name("cohort"))


def _status(data: Path) -> dict[str, Any]:
    r = subprocess.run(
        [CLI, "status", "--json", "-d", str(data)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def _serving(doc: dict[str, Any]) -> dict[str, int]:
    return {m["id"]: m["serving"] for m in doc["members"] if m["role"] == "server"}


def test_up_on_etcd_survives_an_etcd_member_and_a_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = subprocess.Popen(
        [CLI, "up", "--coordinator", "etcd", "--etcd-members", "3", "--standby", "1",
         "--partitions", "32", "--lease-ttl", "2", "--port", str(free_port()),
         "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (data / "cluster.json").exists(), timeout=90, what="cluster.json")
        doc = json.loads((data / "cluster.json").read_text())
        wait_for(lambda: _status(data)["verdict"] == "healthy", timeout=60, what="healthy on etcd")
        st = _status(data)
        assert len(st["etcd"]) == 3 and all(e["healthy"] for e in st["etcd"])
        assert sum(1 for e in st["etcd"] if e["leader"]) == 1
        s3 = boto3.client(
            "s3", endpoint_url=doc["s3_endpoint"], aws_access_key_id=doc["access_key"],
            aws_secret_access_key=doc["secret_key"], region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 3}),
        )  # fmt: skip
        s3.create_bucket(Bucket="probe")
        for i in range(30):
            s3.put_object(Bucket="probe", Key=f"k{i}", Body=f"v{i}".encode())

        # an etcd member dies: reported, and nothing else notices
        etcd = [m for m in doc["members"] if m["role"] == "etcd"]
        os.kill(etcd[0]["pid"], signal.SIGKILL)
        wait_for(
            lambda: any(not e["healthy"] for e in _status(data)["etcd"]),
            timeout=20,
            what="the dead etcd member reported",
        )
        for i in range(30, 40):
            s3.put_object(Bucket="probe", Key=f"k{i}", Body=f"v{i}".encode())

        # an active server dies: the standby takes its share
        victim = next(m for m in doc["members"] if m["id"] == "server-1")
        os.kill(victim["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        wait_for(
            lambda: _serving(_status(data)).get("standby-1", 0) > 0,
            timeout=30,
            what="the standby serving",
        )
        print(f"\nstandby serving {time.monotonic() - t0:.1f} s after kill -9 of server-1")
        for i in range(40):
            assert s3.get_object(Bucket="probe", Key=f"k{i}")["Body"].read() == f"v{i}".encode()

        # locks from every live server at once: one holder at a time, growing tokens
        cred = tenant_credential(doc["access_key"], doc["secret_key"])
        servers = [
            m["address"] for m in _status(data)["members"]
            if m["role"] == "server" and m["state"] == "alive"
        ]  # fmt: skip

        async def locks() -> None:
            clients = [DlmClient(a, cred) for a in servers]
            try:

                async def take(c: DlmClient) -> Any:
                    deadline = time.monotonic() + 20
                    while True:
                        try:
                            return await c.lock("probe/lock", "EX", noqueue=True)
                        except NotQueued:
                            return None
                        except RpcError as e:
                            if e.code != "LockManagerUnavailable" or time.monotonic() > deadline:
                                raise
                            await asyncio.sleep(0.1)

                got = await asyncio.gather(*(take(c) for c in clients))
                held = [h for h in got if h is not None]
                assert len(held) == 1, f"{len(held)} clients hold EX at once"
                token = held[0].token
                await held[0].release()
                for c in clients:
                    h = await c.lock("probe/lock", "EX", timeout=10)
                    assert h.token > token
                    token = h.token
                    await h.release()
            finally:
                for c in clients:
                    await c.close()

        asyncio.run(locks())
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
