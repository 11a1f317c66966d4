"""The ``cohort`` operator commands against a real running cluster (human and --json)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cohort.admin.cli import app
from cohort.auth import ClusterKey
from cohort.cluster import LocalCluster
from tests.conftest import cluster_ready, s3_client, start_cluster, wait_for

runner = CliRunner()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("cli"))
    yield c
    c.stop()


def cli(cluster: LocalCluster, *args: str) -> Any:
    return runner.invoke(app, [*args, "--data-dir", str(cluster.data_dir)])


def cli_json(cluster: LocalCluster, *args: str) -> Any:
    r = cli(cluster, *args, "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return json.loads(r.stdout)


def test_status_json_shape(cluster: LocalCluster) -> None:
    doc = cli_json(cluster, "status")
    assert doc["verdict"] == "healthy", doc["reasons"]
    assert doc["reasons"] == []
    assert doc["coordinator"] == cluster.coordinator_address
    assert doc["coordinator_health"]["reachable"] is True
    assert doc["coordinator_health"]["metrics"]
    assert doc["layers"]["servers"] == {
        "total": 3,
        "alive": 3,
        "draining": 0,
        "dead": 0,
        "left": 0,
    }
    assert doc["layers"]["directors"]["alive"] == 1
    assert doc["layers"]["storage"]["path"] == str(cluster.storage)
    assert doc["partitions"] == 64 and doc["unassigned_partitions"] == 0
    servers = [m for m in doc["members"] if m["role"] == "server"]
    assert sorted(m["id"] for m in servers) == ["server-1", "server-2", "server-3"]
    assert sum(m["partitions"] for m in servers) == 64
    for m in servers:
        assert m["reachable"] and m["lease_valid"]
        assert m["serving"] == m["partitions"] == m["locks_held"]
        assert m["metrics"] and ":" in m["metrics"]
        for k in ("address", "pid", "objects", "requests", "capacity", "recovering"):
            assert k in m


def test_status_human(cluster: LocalCluster) -> None:
    r = cli(cluster, "status")
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    for word in ("coordinator", "directors", "server-1", "server-2", "server-3", "director-1"):
        assert word in out
    assert out.strip().splitlines()[-1].startswith("healthy: 3 servers serve all 64 partitions")


def test_status_counts_load(cluster: LocalCluster) -> None:
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="cli-load")
    for i in range(10):
        s3.put_object(Bucket="cli-load", Key=f"k{i}", Body=b"x")
    doc = cli_json(cluster, "status")
    servers = [m for m in doc["members"] if m["role"] == "server"]
    assert sum(m["objects"] for m in servers) >= 10
    assert sum(m["requests"] for m in servers) >= 10
    assert doc["buckets"] >= 1


def test_partitions(cluster: LocalCluster) -> None:
    doc = cli_json(cluster, "partitions")
    assert doc["total"] == 64 and len(doc["partitions"]) == 64
    row = doc["partitions"][0]
    assert set(row) == {"partition", "owner", "epoch", "holder", "state"}
    assert all(r["state"] == "serving" and r["owner"] == r["holder"] for r in doc["partitions"])
    only = cli_json(cluster, "partitions", "--owner", "server-1")
    assert only["partitions"] and all(r["owner"] == "server-1" for r in only["partitions"])
    human = cli(cluster, "partitions")
    assert human.exit_code == 0 and "server-2" in human.stdout and "64 of 64" in human.stdout
    listed = cli(cluster, "partitions", "--list", "--owner", "server-3")
    assert listed.exit_code == 0 and "serving" in listed.stdout


def test_events(cluster: LocalCluster) -> None:
    evs = cli_json(cluster, "events")
    kinds = {e["kind"] for e in evs}
    assert {"join", "rebalance"} <= kinds
    assert all(set(e) == {"time", "kind", "detail"} for e in evs)
    joins = cli_json(cluster, "events", "--kind", "join", "-n", "2")
    assert len(joins) == 2 and all(e["kind"] == "join" for e in joins)
    human = cli(cluster, "events", "-n", "3")
    assert human.exit_code == 0 and len(human.stdout.strip().splitlines()) == 3


def test_top_json(cluster: LocalCluster) -> None:
    doc = cli_json(cluster, "top", "--interval", "0.5")
    members = doc["members"]
    assert {"coordinator", "director-1", "server-1", "server-2", "server-3"} <= set(members)
    assert doc["unreachable"] == []
    assert members["coordinator"]["heartbeats_ps"] > 0  # lease renewals arrive all the time
    for k in ("rps", "errors_ps", "p99_ms", "lock_ops_ps", "log_appends_ps", "partitions"):
        assert k in members["server-1"]
    human = cli(cluster, "top", "--interval", "0.3", "--count", "1")
    assert human.exit_code == 0 and "server-2" in human.stdout


def test_locks_says_what_is_missing(cluster: LocalCluster) -> None:
    r = cli(cluster, "locks", "--json")
    doc = json.loads(r.stdout)
    assert set(doc) >= {"dlm_available", "reason", "agents", "partition_locks"}
    assert len(doc["partition_locks"]) == 64
    if not doc["dlm_available"]:  # until the DLM runs inside the servers: say so, exit 1
        assert r.exit_code == 1
        assert "DLM" in doc["reason"]
        human = cli(cluster, "locks")
        assert human.exit_code == 1 and "no DLM view" in human.stderr


def test_bad_address(cluster: LocalCluster) -> None:
    r = runner.invoke(app, ["status", "--coordinator", "not-an-address"])
    assert r.exit_code == 2
    assert "bad coordinator address 'not-an-address'" in r.stderr and "HOST:PORT" in r.stderr
    key = {"COHORT_CLUSTER_KEY": str(cluster.cluster_key_path)}
    r = runner.invoke(app, ["status", "--coordinator", "127.0.0.1:1"], env=key)
    assert r.exit_code == 2
    assert "cannot reach the coordinator at 127.0.0.1:1" in r.stderr
    assert "is the cluster running?" in r.stderr
    # no key, and the wrong key: said so, with what to do
    r = runner.invoke(app, ["status", "--coordinator", cluster.coordinator_address])
    assert r.exit_code == 2 and "no cluster key" in r.stderr and "COHORT_CLUSTER_KEY" in r.stderr
    other = cluster.data_dir.parent / "other.key"
    ClusterKey.create_file(other)
    r = runner.invoke(
        app,
        ["status", "--coordinator", cluster.coordinator_address],
        env={"COHORT_CLUSTER_KEY": str(other)},
    )
    assert r.exit_code == 2 and "refused this machine's cluster key" in r.stderr, r.stderr
    r = runner.invoke(app, ["partitions", "--data-dir", "/nonexistent/cohort"])
    assert r.exit_code == 2 and "no cluster description" in r.stderr and "--coordinator" in r.stderr


def test_unknown_server(cluster: LocalCluster) -> None:
    for cmd in ("drain", "undrain"):
        r = cli(cluster, cmd, "server-99")
        assert r.exit_code == 2
        assert "unknown server 'server-99'" in r.stderr
        assert "known servers: server-1, server-2, server-3" in r.stderr
    r = cli(cluster, "partitions", "--owner", "server-99")
    assert r.exit_code == 2 and "unknown server" in r.stderr


def test_entry_point_subprocess(cluster: LocalCluster) -> None:
    exe = Path(sys.executable).with_name("cohort")
    r = subprocess.run(
        [str(exe), "status", "--json", "-d", str(cluster.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verdict"] in ("healthy", "degraded")
    r = subprocess.run(
        [
            str(exe),
            "drain",
            "nobody",
            "-c",
            cluster.coordinator_address,
            "-d",
            str(cluster.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "unknown server 'nobody'" in r.stderr and not r.stdout


def test_drain_and_undrain(cluster: LocalCluster) -> None:
    """Last: drain moves every partition off server-3 (with no data copied), undrain
    brings partitions back."""
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="drain-data")
    for i in range(20):
        s3.put_object(Bucket="drain-data", Key=f"o{i}", Body=f"v{i}".encode())
    doc = cli_json(cluster, "drain", "server-3", "--timeout", "30")
    assert doc["done"] and doc["server"] == "server-3" and doc["state"] == "draining"
    assert doc["partitions_before"] > 0 and doc["partitions_now"] == 0
    st = cli_json(cluster, "status")
    s3m = next(m for m in st["members"] if m["id"] == "server-3")
    assert s3m["state"] == "draining" and s3m["partitions"] == 0
    # drain returns once every partition is served elsewhere: a drained server is no fault
    assert st["verdict"] == "healthy", st["reasons"]
    assert st["moving_partitions"] == 0
    assert "drain" in {e["kind"] for e in cli_json(cluster, "events")}
    for i in range(20):  # every object is still there, served by the others
        assert s3.get_object(Bucket="drain-data", Key=f"o{i}")["Body"].read() == f"v{i}".encode()
    human = cli(cluster, "undrain", "server-3", "--wait")
    assert human.exit_code == 0 and "alive again" in human.stdout
    wait_for(lambda: cluster_ready(cluster), what="partitions owned after undrain")
    assert cli_json(cluster, "status")["verdict"] == "healthy"
