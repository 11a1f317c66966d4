"""Everything a cluster writes is private: files 0600, directories 0700 (umask 077)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cohort.etcd_server import etcd_available
from tests.conftest import s3_client, start_cluster


def _exposed(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_mode & 0o077:
                bad.append(f"{p.relative_to(root)} {stat.filemode(st.st_mode)}")
    return bad


@pytest.mark.parametrize(
    "coordinator",
    [
        "embedded",
        pytest.param(
            "etcd",
            marks=[
                pytest.mark.etcd,
                pytest.mark.skipif(not etcd_available(), reason="etcd-server is not installed"),
            ],
        ),
    ],
)
def test_data_logs_sqlite_and_secrets_are_private(tmp_path: Path, coordinator: str) -> None:
    old = os.umask(0o022)  # a typical login shell: the cluster must not depend on it
    try:
        cluster = start_cluster(tmp_path / "data", servers=2, coordinator=coordinator)
    finally:
        os.umask(old)
    try:
        s3 = s3_client(cluster)
        s3.create_bucket(Bucket="bkt")
        for i in range(20):
            s3.put_object(Bucket="bkt", Key=f"k{i}", Body=b"x" * 5000, Metadata={"a": "b"})
        up = s3.create_multipart_upload(Bucket="bkt", Key="big")
        part = s3.upload_part(
            Bucket="bkt", Key="big", UploadId=up["UploadId"], PartNumber=1, Body=b"y" * 1000
        )
        s3.complete_multipart_upload(
            Bucket="bkt",
            Key="big",
            UploadId=up["UploadId"],
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
        )
    finally:
        cluster.stop()
    root = tmp_path / "data"
    names = {p.name for p in root.rglob("*")}
    # the things the check is about are really there
    assert {"cluster.key", "master.key", "credentials.json", "cluster.json"} <= names
    assert any(n.endswith(".log") for n in names)
    if coordinator == "embedded":
        assert any(n.endswith(".sqlite") for n in names)
    else:
        assert any(n.endswith(".key") for n in (root / "etcd").rglob("*") for n in [n.name])
    assert _exposed(root) == []
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
