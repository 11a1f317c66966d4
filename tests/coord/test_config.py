"""Node config files and the single-role commands (``cohort server|director|coordinator``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cohort.auth import ClusterKey
from cohort.cluster import _read_ready, load_credentials
from cohort.config import ConfigError, load_config, parse_config
from cohort.coord import connect
from cohort.etcd_server import EtcdCluster, etcd_available, free_port
from tests.conftest import wait_for

EXAMPLE = """
[cluster]
coordinator = "etcd://10.0.0.1:2379,10.0.0.2:2379/prod"
partitions = 64
lease_ttl = 2
credentials = "/etc/cohort/credentials.json"

[storage]
path = "/mnt/cohort"

[node]
id = "m1"
address = "10.0.0.1"
roles = ["server", "director"]

[server]
port = 7001
"""


def test_parse_example() -> None:
    cfg = parse_config(EXAMPLE)
    assert cfg.node_id == "m1" and cfg.roles == ["server", "director"]
    assert cfg.server_id == "m1" and cfg.director_id == "director-m1"
    assert cfg.server_port == 7001 and cfg.director_port == 9000
    assert cfg.uses_etcd
    assert cfg.coordinator_address() == (
        "etcd://10.0.0.1:2379,10.0.0.2:2379/prod?partitions=64&lease_ttl=2"
    )
    emb = parse_config(EXAMPLE.replace("etcd://10.0.0.1:2379,10.0.0.2:2379/prod", "10.0.0.9:7100"))
    assert not emb.uses_etcd and emb.coordinator_address() == "10.0.0.9:7100"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[storage]\npath", "[storage]\nbackend = 's3'\npath"), "backend"),
        (('roles = ["server", "director"]', 'roles = ["server", "cook"]'), "unknown"),
        (('id = "m1"\n', ""), "missing `id` in [node]"),
        (("partitions = 64", 'partitions = "many"'), "partitions must be a int"),
        (("[cluster]", "[cluster"), "not valid TOML"),
    ],
)
def test_config_errors_say_what_to_fix(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(EXAMPLE.replace(*change))


def test_tags_and_balancing_policy() -> None:
    cfg = parse_config(EXAMPLE)
    assert cfg.tags == [] and cfg.balance == "round-robin"
    cfg = parse_config(
        EXAMPLE.replace("port = 7001", 'port = 7001\ntags = ["eu", "batch"]')
        + '[director]\nbalance = { policy = "rules", then = "weighted", '
        'rules = [{ hours = "08-18", tag = "eu" }] }\n'
    )
    assert cfg.tags == ["eu", "batch"]
    assert json.loads(cfg.balance) == {
        "policy": "rules", "then": "weighted", "rules": [{"hours": "08-18", "tag": "eu"}],
    }  # fmt: skip
    with pytest.raises(ConfigError, match="unknown policy 'fastest'"):
        parse_config(EXAMPLE + '[director]\nbalance = "fastest"\n')
    with pytest.raises(ConfigError, match="hours must be HH-HH"):
        parse_config(EXAMPLE + '[director]\nbalance = { policy = "rules", rules = '
                     '[{ hours = "9am", tag = "eu" }] }\n')  # fmt: skip


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    if not etcd_available():
        pytest.skip("etcd is not installed (etcd-server)")
    with EtcdCluster(1) as e:
        yield e


@pytest.mark.etcd
def test_roles_from_config_serve_s3(tmp_path: Path, etcd: EtcdCluster) -> None:
    """``cohort coordinator``, two ``cohort server`` and a ``cohort director`` from config files."""
    load_credentials(tmp_path)
    ClusterKey.create_file(tmp_path / "cluster.key")
    (tmp_path / "storage").mkdir()
    s3_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def config(node: str) -> Path:
        p = tmp_path / f"{node}.toml"
        p.write_text(
            f"""
[cluster]
coordinator = "{etcd.address("cfgtest")}"
partitions = 16
lease_ttl = 2
credentials = "{tmp_path / "credentials.json"}"
key = "{tmp_path / "cluster.key"}"
[storage]
path = "{tmp_path / "storage"}"
[node]
id = "{node}"
address = "127.0.0.1"
log_dir = "{tmp_path / "logs"}"
[server]
port = 0
[director]
port = {s3_port}
"""
        )
        return p

    def start(role: str, node: str) -> str:
        p = subprocess.Popen(
            [sys.executable, "-m", "cohort.admin.cli", role, "--config", str(config(node))],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(p)
        return _read_ready(p, f"{role} {node}", 30)

    try:
        start("coordinator", "m0")
        start("server", "m1")
        start("server", "m2")
        start("director", "m1")
        address = load_config(tmp_path / "m1.toml").coordinator_address()

        def ready() -> bool:
            async def check() -> bool:
                c = connect(address, ClusterKey.load(tmp_path / "cluster.key").member("t"))
                try:
                    v: dict[str, Any] = await c.view()
                finally:
                    await c.close()
                return len(v["partitions"]) == 16 and all(
                    p[0] in ("m1", "m2") and p[0] == p[2] for p in v["partitions"]
                )

            return asyncio.run(check())

        wait_for(ready, 30, what="partitions owned by m1 and m2")
        import boto3

        creds = json.loads((tmp_path / "credentials.json").read_text())
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3_port}",
            aws_access_key_id=creds["access_key"],
            aws_secret_access_key=creds["secret_key"],
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="from-config")
        s3.put_object(Bucket="from-config", Key="k", Body=b"v")
        assert s3.get_object(Bucket="from-config", Key="k")["Body"].read() == b"v"
        assert (tmp_path / "logs" / "m1.log").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
