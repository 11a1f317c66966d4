"""A whole Cohort cluster on a real Ceph: ``LocalCluster(ceph=True)`` (RADOS) and
``LocalCluster(ceph=True, storage="s3")`` (radosgw).  boto3 through Cohort's S3 front end:
PUT, GET, listings, multipart, delete; tenants' keys through the registry on RADOS; kill -9
of a server under load (failover, no acknowledged write lost); the whole cluster stopped
and started again on the same pool, everything read back.

Skipped with the reason when Ceph is not installed (scripts/debian-packages.txt).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cohort.ceph_server import ceph_available, missing
from cohort.cluster import LocalCluster
from tests.conftest import cluster_ready, s3_client, wait_for
from tests.trunk.test_failover import partitions_moved, setup_load
from tests.trunk.test_tenants import client as tenant_client

pytestmark = [
    pytest.mark.ceph,
    pytest.mark.skipif(
        not ceph_available(rgw=True),
        reason=f"Ceph is not installed ({', '.join(missing()) or 'radosgw'}): apt-get install "
        "ceph-mon ceph-osd radosgw ceph-common python3-rados, then scripts/bootstrap.sh",
    ),
]

PARTITIONS = 32
MiB = 1 << 20


def start(data: Path, **kw: Any) -> LocalCluster:
    c = LocalCluster(data, port=0, partitions=PARTITIONS, **kw)
    try:
        c.start()
        wait_for(lambda: cluster_ready(c), timeout=60, what="all partitions owned")
    except BaseException:
        c.stop()
        raise
    return c


def smoke(c: LocalCluster, bucket: str) -> dict[str, str]:
    """PUT, GET, ranges, listings, multipart, copy, delete through boto3; returns
    key -> sha256 of what stays."""
    s3 = s3_client(c)
    s3.create_bucket(Bucket=bucket)
    kept: dict[str, str] = {}
    for i in range(40):
        body = os.urandom(50 + 97 * i)
        key = f"dir{i % 3}/obj-{i:03d}"
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        kept[key] = hashlib.sha256(body).hexdigest()
    big = os.urandom(2 * MiB + 12345)  # one blob beyond the inline sizes
    s3.put_object(Bucket=bucket, Key="big/one", Body=big)
    kept["big/one"] = hashlib.sha256(big).hexdigest()
    assert s3.get_object(Bucket=bucket, Key="big/one")["Body"].read() == big
    r = s3.get_object(Bucket=bucket, Key="big/one", Range="bytes=1048570-1048589")
    assert r["Body"].read() == big[1048570:1048590]
    # multipart: 3 parts of 5 MiB and a tail
    parts_data = [os.urandom(5 * MiB) for _ in range(3)] + [os.urandom(1234)]
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp/video")
    parts = [
        {
            "PartNumber": n,
            "ETag": s3.upload_part(
                Bucket=bucket, Key="mp/video", UploadId=up["UploadId"], PartNumber=n, Body=d
            )["ETag"],
        }
        for n, d in enumerate(parts_data, 1)
    ]
    s3.complete_multipart_upload(
        Bucket=bucket, Key="mp/video", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    whole = b"".join(parts_data)
    got = s3.get_object(Bucket=bucket, Key="mp/video")
    assert got["ContentLength"] == len(whole)
    assert hashlib.sha256(got["Body"].read()).hexdigest() == hashlib.sha256(whole).hexdigest()
    kept["mp/video"] = hashlib.sha256(whole).hexdigest()
    s3.copy_object(Bucket=bucket, Key="copies/c1", CopySource=f"{bucket}/dir0/obj-000")
    kept["copies/c1"] = kept["dir0/obj-000"]
    # listings: prefixes, delimiters, pagination
    listing = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in listing["CommonPrefixes"]] == [
        "big/", "copies/", "dir0/", "dir1/", "dir2/", "mp/"
    ]  # fmt: skip
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="dir1/", PaginationConfig={"PageSize": 4}
    )
    listed = [o["Key"] for p in pages for o in p.get("Contents", [])]
    assert listed == sorted(k for k in kept if k.startswith("dir1/"))
    # delete
    s3.delete_object(Bucket=bucket, Key="dir2/obj-002")
    del kept["dir2/obj-002"]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="dir2/obj-002")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"
    r = s3.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": "dir2/obj-005"}, {"Key": "dir2/obj-008"}]}
    )
    assert len(r["Deleted"]) == 2
    del kept["dir2/obj-005"], kept["dir2/obj-008"]
    return kept


def read_back(c: LocalCluster, bucket: str, kept: dict[str, str]) -> None:
    s3 = s3_client(c)
    listed = [
        o["Key"]
        for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in p.get("Contents", [])
    ]
    assert listed == sorted(kept)
    for key, digest in kept.items():
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, f"{key} lost or changed"


def cohort_cli(c: LocalCluster, *args: str) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("cohort")
    r = subprocess.run(
        [str(exe), *args, "--data-dir", str(c.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def raw_rados_objects(c: LocalCluster) -> list[str]:
    with c.ceph.client().open_ioctx(c.ceph.pool) as io:
        return sorted(o.key for o in io.list_objects())


@pytest.fixture
def on_rados(tmp_path: Path) -> Iterator[LocalCluster]:
    c = start(tmp_path / "data", servers=3, ceph=True, ceph_options={"osds": 3})
    yield c
    c.stop()


def test_cohort_on_rados(on_rados: LocalCluster) -> None:
    c = on_rados
    spec = json.loads(c.cluster_json.read_text())["storage"]
    assert spec.startswith("rados://") and spec == c.storage_spec
    assert not c.storage.exists()  # nothing in a local directory
    kept = smoke(c, "photos")
    objs = raw_rados_objects(c)
    assert any(o.startswith("parts/") and "/log/" in o for o in objs)
    assert any(o.startswith("blobs/") for o in objs)

    # tenants: the registry on RADOS (written by the CLI), read by the director's cache
    t = cohort_cli(c, "tenant", "create", "acme", "--json")
    acme = tenant_client(c, t["access_key"], t["secret_key"])

    def acme_lists() -> bool:
        try:
            acme.list_buckets()
            return True
        except ClientError:
            return False

    t0 = time.monotonic()
    wait_for(acme_lists, timeout=10, what="the new key to work")
    seen_after = time.monotonic() - t0
    assert "system/tenants.json" in raw_rados_objects(c)
    cohort_cli(c, "key", "revoke", t["access_key"])
    t0 = time.monotonic()
    wait_for(lambda: not acme_lists(), timeout=10, what="the revoked key to stop")
    revoked_after = time.monotonic() - t0
    print(f"\ntenant key usable after {seen_after:.2f} s, revoked after {revoked_after:.2f} s")
    assert revoked_after < 3.0  # the documented bound: refresh interval (1 s) + a read

    # kill -9 a server under load: failover, no acknowledged write lost
    load = setup_load(c, "server-2")
    load.start()
    wait_for(lambda: len(load.acked) > 60, timeout=60, what="load warmed up")
    t_fail = time.monotonic()
    c.kill("server-2")
    wait_for(lambda: partitions_moved(c, "server-2", load.victims), timeout=30,
             what="partitions moved")  # fmt: skip
    wait_for(lambda: any(ok and i >= t_fail for i, _c, ok in load.victim_ops), timeout=30,
             what="a write to the failed server's partitions")  # fmt: skip
    time.sleep(1.0)  # the load runs on a little after the recovery
    load.finish()
    window = load.window_after(t_fail)
    print(
        f"kill -9 on RADOS: partitions of server-2 unavailable for {window:.2f} s; "
        f"{len(load.acked)} acknowledged writes; {len(load.errors)} client errors"
    )
    assert not load.wrong, f"reads returned wrong bodies: {load.wrong[:5]}"
    load.verify_all()
    assert window < 8.0
    c.restart("server-2")
    wait_for(lambda: cluster_ready(c), timeout=60, what="partitions owned again")

    # the whole cluster stopped and started again on the same pool
    ceph = c.ceph
    c.stop(keep_ceph=True)
    assert ceph.mon.alive()
    c2 = start(c.data_dir, servers=3, ceph=ceph)
    try:
        assert c2.storage_spec == spec
        read_back(c2, "photos", kept)
        s3 = s3_client(c2)
        for key, digest in load.acked.items():
            body = s3.get_object(Bucket=load.bucket, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == digest, f"{key} lost after restart"
        s3.put_object(Bucket="photos", Key="after/restart", Body=b"still writable")
        assert s3.get_object(Bucket="photos", Key="after/restart")["Body"].read() == (
            b"still writable"
        )
    finally:
        c2.stop()
    assert c.ceph is ceph  # given to c2, so c2 did not stop it; c's stop() will


def test_cohort_on_radosgw(tmp_path: Path) -> None:
    """The s3 backend against Ceph's radosgw: the same smoke test, and a restart."""
    c = start(tmp_path / "data", servers=2, ceph=True, storage="s3")
    try:
        spec = json.loads(c.cluster_json.read_text())["storage"]
        assert spec.startswith("s3://cohort/data?endpoint=http://127.0.0.1:")
        assert "secret" not in spec  # the credentials are in a 0600 file, not the URL
        assert (c.data_dir / "ceph-s3.json").stat().st_mode & 0o077 == 0
        kept = smoke(c, "docs")
        # what radosgw holds: the log segments and blobs under the prefix
        import boto3

        rgw = boto3.client(
            "s3", endpoint_url=c.ceph.s3_endpoint, region_name="us-east-1",
            aws_access_key_id=c.ceph.s3_credentials["access_key"],
            aws_secret_access_key=c.ceph.s3_credentials["secret_key"],
        )  # fmt: skip
        names = [
            o["Key"]
            for p in rgw.get_paginator("list_objects_v2").paginate(Bucket="cohort", Prefix="data/")
            for o in p.get("Contents", [])
        ]
        assert any(n.startswith("data/parts/") for n in names)
        assert any(n.startswith("data/blobs/") for n in names)
        ceph = c.ceph
        c.stop(keep_ceph=True)
        c2 = start(c.data_dir, servers=2, ceph=ceph, storage="s3")
        try:
            read_back(c2, "docs", kept)
        finally:
            c2.stop()
    finally:
        c.stop()
