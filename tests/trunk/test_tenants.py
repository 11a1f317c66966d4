"""Tenants: each sees and touches only its own buckets; revoked keys stop at once;
public-read lets anonymous clients read; secrets are encrypted at rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from cohort.cluster import LocalCluster


def cohort_cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cohort")
    return subprocess.run(
        [str(exe), *args, "--data-dir", str(cluster.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def new_tenant(cluster: LocalCluster, name: str) -> dict[str, str]:
    r = cohort_cli(cluster, "tenant", "create", name, "--json")
    assert r.returncode == 0, r.stderr
    doc: dict[str, str] = json.loads(r.stdout)
    return doc


def client(cluster: LocalCluster, access: str, secret: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=cluster.s3_endpoint,
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def denied(fn: Any, *args: Any, **kw: Any) -> None:
    with pytest.raises(ClientError) as e:
        fn(*args, **kw)
    status = e.value.response["ResponseMetadata"]["HTTPStatusCode"]
    assert status == 403, e.value.response


def test_cross_tenant_isolation(cluster: LocalCluster) -> None:
    a = new_tenant(cluster, "alice")
    b = new_tenant(cluster, "bob")
    sa = client(cluster, a["access_key"], a["secret_key"])
    sb = client(cluster, b["access_key"], b["secret_key"])
    sa.create_bucket(Bucket="alice-data")
    sa.put_object(Bucket="alice-data", Key="secret.txt", Body=b"alice only")
    assert [x["Name"] for x in sb.list_buckets()["Buckets"]] == []
    assert [x["Name"] for x in sa.list_buckets()["Buckets"]] == ["alice-data"]
    # every operation of bob on alice's bucket is refused
    denied(sb.get_object, Bucket="alice-data", Key="secret.txt")
    denied(sb.head_object, Bucket="alice-data", Key="secret.txt")
    denied(sb.put_object, Bucket="alice-data", Key="x", Body=b"intrusion")
    denied(sb.delete_object, Bucket="alice-data", Key="secret.txt")
    denied(sb.list_objects_v2, Bucket="alice-data")
    denied(sb.head_bucket, Bucket="alice-data")
    denied(sb.delete_bucket, Bucket="alice-data")
    denied(sb.create_multipart_upload, Bucket="alice-data", Key="m")
    denied(sb.copy_object, Bucket="alice-data", Key="c", CopySource="alice-data/secret.txt")
    sb.create_bucket(Bucket="bob-data")
    denied(sb.copy_object, Bucket="bob-data", Key="stolen", CopySource="alice-data/secret.txt")
    r = sb.delete_objects(Bucket="bob-data", Delete={"Objects": [{"Key": "k"}]})
    assert r["Deleted"]  # own bucket works
    with pytest.raises(ClientError) as e:
        sb.create_bucket(Bucket="alice-data")
    assert e.value.response["Error"]["Code"] == "BucketAlreadyExists"
    # alice's data is untouched
    assert sa.get_object(Bucket="alice-data", Key="secret.txt")["Body"].read() == b"alice only"


def test_revoked_key_stops_at_once(cluster: LocalCluster) -> None:
    t = new_tenant(cluster, "carol")
    s = client(cluster, t["access_key"], t["secret_key"])
    s.create_bucket(Bucket="carol-bucket")
    r = cohort_cli(cluster, "key", "create", "carol", "--json")
    second = json.loads(r.stdout)
    s2 = client(cluster, second["access_key"], second["secret_key"])
    assert [x["Name"] for x in s2.list_buckets()["Buckets"]] == ["carol-bucket"]
    r = cohort_cli(cluster, "key", "revoke", t["access_key"])
    assert r.returncode == 0, r.stderr
    with pytest.raises(ClientError) as e:
        s.list_buckets()
    assert e.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    s2.list_buckets()  # the other key still works
    # secrets are not stored in the clear
    registry = (cluster.storage / "system" / "tenants.json").read_text()
    assert second["secret_key"] not in registry and t["secret_key"] not in registry


def test_public_read_acl(cluster: LocalCluster, s3: Any) -> None:
    s3.create_bucket(Bucket="pub-objects")
    s3.put_object(Bucket="pub-objects", Key="open.txt", Body=b"hello world", ACL="public-read")
    s3.put_object(Bucket="pub-objects", Key="closed.txt", Body=b"private")
    base = cluster.s3_endpoint
    r = requests.get(f"{base}/pub-objects/open.txt", timeout=10)
    assert r.status_code == 200 and r.content == b"hello world"
    assert requests.get(f"{base}/pub-objects/closed.txt", timeout=10).status_code == 403
    assert requests.get(f"{base}/pub-objects?list-type=2", timeout=10).status_code == 403
    assert requests.put(f"{base}/pub-objects/new.txt", data=b"x", timeout=10).status_code == 403
    s3.create_bucket(Bucket="pub-bucket", ACL="public-read")
    s3.put_object(Bucket="pub-bucket", Key="any.txt", Body=b"listed")
    r = requests.get(f"{base}/pub-bucket?list-type=2", timeout=10)
    assert r.status_code == 200 and b"<Key>any.txt</Key>" in r.content
    # a public-read bucket lets anyone list it, not read its private objects (as in S3;
    # it used to serve them to anonymous GETs)
    assert requests.get(f"{base}/pub-bucket/any.txt", timeout=10).status_code == 403
    assert requests.delete(f"{base}/pub-bucket/any.txt", timeout=10).status_code == 403
    s3.put_object(Bucket="pub-bucket", Key="shared.txt", Body=b"for all", ACL="public-read")
    assert requests.get(f"{base}/pub-bucket/shared.txt", timeout=10).content == b"for all"


def test_public_read_for_other_tenants(cluster: LocalCluster, s3: Any) -> None:
    """Another authenticated tenant gets what S3 gives AllUsers: public-read objects and
    listings of public-read buckets; nothing else (and no hint of what exists)."""
    other = new_tenant(cluster, "acl-reader")
    sc = client(cluster, other["access_key"], other["secret_key"])
    s3.create_bucket(Bucket="acl-private")
    s3.put_object(Bucket="acl-private", Key="open", Body=b"o", ACL="public-read")
    s3.put_object(Bucket="acl-private", Key="closed", Body=b"c")
    s3.create_bucket(Bucket="acl-public", ACL="public-read")
    s3.put_object(Bucket="acl-public", Key="closed", Body=b"c")
    assert sc.get_object(Bucket="acl-private", Key="open")["Body"].read() == b"o"
    assert sc.head_object(Bucket="acl-private", Key="open")["ContentLength"] == 1
    denied(sc.get_object, Bucket="acl-private", Key="closed")
    denied(sc.get_object, Bucket="acl-private", Key="missing")  # not NoSuchKey: no listing
    denied(sc.list_objects_v2, Bucket="acl-private")
    denied(sc.put_object, Bucket="acl-private", Key="x", Body=b"x")
    listed = sc.list_objects_v2(Bucket="acl-public")
    assert [o["Key"] for o in listed["Contents"]] == ["closed"]
    denied(sc.get_object, Bucket="acl-public", Key="closed")
    with pytest.raises(ClientError) as e:
        sc.get_object(Bucket="acl-public", Key="missing")  # may list: may know it is absent
    assert e.value.response["Error"]["Code"] == "NoSuchKey"
    denied(sc.delete_object, Bucket="acl-public", Key="closed")


def test_cli_errors(cluster: LocalCluster, tmp_path: Path) -> None:
    r = cohort_cli(cluster, "tenant", "create", "Bad_Name")
    assert r.returncode == 2 and "invalid tenant name" in r.stderr
    r = cohort_cli(cluster, "key", "revoke", "NOSUCHKEY")
    assert r.returncode == 2 and "no access key" in r.stderr
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("cohort")),
            "tenant",
            "list",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "not a Cohort data directory" in r.stderr
