"""Drive a real three-layer cluster with boto3 through every trunk S3 operation."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cohort.cluster import LocalCluster


def code_of(exc: ClientError) -> str:
    return str(exc.response["Error"]["Code"])


def test_bucket_lifecycle(s3: Any) -> None:
    s3.create_bucket(Bucket="life")
    s3.head_bucket(Bucket="life")
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert "life" in names
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket="life")
    assert code_of(e.value) == "BucketAlreadyOwnedByYou"
    s3.put_object(Bucket="life", Key="k", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="life")
    assert code_of(e.value) == "BucketNotEmpty"
    s3.delete_object(Bucket="life", Key="k")
    s3.delete_bucket(Bucket="life")
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket="life")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as e:
        s3.list_objects_v2(Bucket="life")
    assert code_of(e.value) == "NoSuchBucket"


def test_bucket_location_and_versioning(s3: Any) -> None:
    s3.create_bucket(Bucket="loc")
    assert s3.get_bucket_location(Bucket="loc").get("LocationConstraint") in (None, "us-east-1", "")
    assert "Status" not in s3.get_bucket_versioning(Bucket="loc")


@pytest.mark.parametrize(
    "name", ["ab", "UPPER", "has_underscore", "-start", "end-", "a..b", "192.168.1.1", "x" * 64]
)
def test_invalid_bucket_names(s3: Any, name: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket=name)
    assert code_of(e.value) == "InvalidBucketName"


def test_put_get_head_delete(s3: Any) -> None:
    s3.create_bucket(Bucket="objs")
    body = os.urandom(10_000)
    r = s3.put_object(
        Bucket="objs",
        Key="dir/file.bin",
        Body=body,
        ContentType="application/x-test",
        Metadata={"colour": "blue"},
    )
    assert r["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    g = s3.get_object(Bucket="objs", Key="dir/file.bin")
    assert g["Body"].read() == body
    assert g["ContentType"] == "application/x-test"
    assert g["Metadata"] == {"colour": "blue"}
    assert g["ContentLength"] == len(body)
    h = s3.head_object(Bucket="objs", Key="dir/file.bin")
    assert h["ContentLength"] == len(body) and h["ETag"] == r["ETag"]
    s3.delete_object(Bucket="objs", Key="dir/file.bin")
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/file.bin")
    assert code_of(e.value) == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket="objs", Key="dir/file.bin")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    # deleting a missing key is not an error in S3
    s3.delete_object(Bucket="objs", Key="never-existed")


def test_overwrite_and_empty_object(s3: Any) -> None:
    s3.create_bucket(Bucket="over")
    s3.put_object(Bucket="over", Key="k", Body=b"first")
    s3.put_object(Bucket="over", Key="k", Body=b"second")
    assert s3.get_object(Bucket="over", Key="k")["Body"].read() == b"second"
    s3.put_object(Bucket="over", Key="empty", Body=b"")
    g = s3.get_object(Bucket="over", Key="empty")
    assert g["Body"].read() == b"" and g["ETag"] == f'"{hashlib.md5(b"").hexdigest()}"'


def test_unicode_and_odd_keys(s3: Any) -> None:
    s3.create_bucket(Bucket="odd")
    keys = [
        "ünïcödé/файл.txt",
        "space in name",
        "plus+sign",
        "percent%20",
        "a//double",
        "q?mark&amp",
        "~tilde*star",
    ]
    for k in keys:
        s3.put_object(Bucket="odd", Key=k, Body=k.encode())
    for k in keys:
        assert s3.get_object(Bucket="odd", Key=k)["Body"].read() == k.encode()
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket="odd")["Contents"]]
    assert listed == sorted(keys, key=lambda s: s.encode())


def test_range_requests(s3: Any) -> None:
    s3.create_bucket(Bucket="ranges")
    body = bytes(range(256)) * 10
    s3.put_object(Bucket="ranges", Key="r", Body=body)
    g = s3.get_object(Bucket="ranges", Key="r", Range="bytes=10-19")
    assert g["Body"].read() == body[10:20]
    assert g["ContentRange"] == f"bytes 10-19/{len(body)}"
    assert g["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert s3.get_object(Bucket="ranges", Key="r", Range="bytes=-5")["Body"].read() == body[-5:]
    assert (
        s3.get_object(Bucket="ranges", Key="r", Range="bytes=2550-")["Body"].read() == body[2550:]
    )
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="ranges", Key="r", Range=f"bytes={len(body)}-")
    assert code_of(e.value) == "InvalidRange"


def test_large_object_streams(s3: Any) -> None:
    s3.create_bucket(Bucket="large")
    body = os.urandom(6 * 1024 * 1024 + 123)
    s3.put_object(Bucket="large", Key="big", Body=body)
    got = s3.get_object(Bucket="large", Key="big")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    part = s3.get_object(Bucket="large", Key="big", Range="bytes=3000000-5000000")["Body"].read()
    assert part == body[3000000:5000001]


def test_copy_object(s3: Any) -> None:
    s3.create_bucket(Bucket="src")
    s3.create_bucket(Bucket="dst")
    s3.put_object(
        Bucket="src", Key="a", Body=b"copy me", Metadata={"m": "1"}, ContentType="text/plain"
    )
    r = s3.copy_object(Bucket="dst", Key="b", CopySource={"Bucket": "src", "Key": "a"})
    assert r["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"copy me").hexdigest()}"'
    g = s3.get_object(Bucket="dst", Key="b")
    assert (
        g["Body"].read() == b"copy me"
        and g["Metadata"] == {"m": "1"}
        and g["ContentType"] == "text/plain"
    )
    s3.copy_object(
        Bucket="dst",
        Key="c",
        CopySource="src/a",
        MetadataDirective="REPLACE",
        Metadata={"m": "2"},
        ContentType="text/x-new",
    )
    g = s3.get_object(Bucket="dst", Key="c")
    assert g["Metadata"] == {"m": "2"} and g["ContentType"] == "text/x-new"
    # the copy is independent of its source
    s3.delete_object(Bucket="src", Key="a")
    assert s3.get_object(Bucket="dst", Key="b")["Body"].read() == b"copy me"
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket="dst", Key="d", CopySource="src/missing")
    assert code_of(e.value) == "NoSuchKey"


def test_delete_objects(s3: Any) -> None:
    s3.create_bucket(Bucket="multi")
    keys = [f"k{i:03d}" for i in range(50)]
    for k in keys:
        s3.put_object(Bucket="multi", Key=k, Body=b"x")
    r = s3.delete_objects(
        Bucket="multi", Delete={"Objects": [{"Key": k} for k in keys[:30]] + [{"Key": "nope"}]}
    )
    assert sorted(d["Key"] for d in r["Deleted"]) == sorted([*keys[:30], "nope"])
    left = [o["Key"] for o in s3.list_objects_v2(Bucket="multi")["Contents"]]
    assert left == keys[30:]
    r = s3.delete_objects(
        Bucket="multi", Delete={"Objects": [{"Key": k} for k in keys[30:]], "Quiet": True}
    )
    assert not r.get("Deleted")
    assert s3.list_objects_v2(Bucket="multi")["KeyCount"] == 0


def test_listing_across_partitions(s3: Any, cluster: LocalCluster) -> None:
    s3.create_bucket(Bucket="lst")
    keys = sorted({f"{d}/{i:04d}" for d in ("a", "b", "c") for i in range(150)} | {"top1", "top2"})
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket="lst", Key=k, Body=k.encode()), keys))
    # the keys really are spread over many partitions and all three servers
    from cohort.partitioning import partition_of  # noqa: F401  (documentation of intent)

    # full listing with pagination
    got: list[str] = []
    pages = 0
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="lst", PaginationConfig={"PageSize": 100}
    ):
        got.extend(o["Key"] for o in page.get("Contents", []))
        pages += 1
    assert got == keys and pages == 5
    # delimiter: common prefixes, merged across partitions
    r = s3.list_objects_v2(Bucket="lst", Delimiter="/")
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "b/", "c/"]
    assert [o["Key"] for o in r["Contents"]] == ["top1", "top2"]
    assert r["KeyCount"] == 5
    # prefix + max-keys + continuation
    r = s3.list_objects_v2(Bucket="lst", Prefix="b/", MaxKeys=7)
    assert [o["Key"] for o in r["Contents"]] == [f"b/{i:04d}" for i in range(7)]
    assert r["IsTruncated"]
    r2 = s3.list_objects_v2(
        Bucket="lst", Prefix="b/", MaxKeys=7, ContinuationToken=r["NextContinuationToken"]
    )
    assert [o["Key"] for o in r2["Contents"]] == [f"b/{i:04d}" for i in range(7, 14)]
    # start-after
    r = s3.list_objects_v2(Bucket="lst", StartAfter="c/0147")
    assert [o["Key"] for o in r["Contents"]] == ["c/0148", "c/0149", "top1", "top2"]
    # delimiter pagination: prefixes count toward max-keys and resume correctly
    r = s3.list_objects_v2(Bucket="lst", Delimiter="/", MaxKeys=2)
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "b/"] and r["IsTruncated"]
    r = s3.list_objects_v2(
        Bucket="lst", Delimiter="/", MaxKeys=2, ContinuationToken=r["NextContinuationToken"]
    )
    assert [p["Prefix"] for p in r.get("CommonPrefixes", [])] == ["c/"]
    assert [o["Key"] for o in r["Contents"]] == ["top1"]
    # V1 listing with marker
    r = s3.list_objects(Bucket="lst", Prefix="a/", MaxKeys=3, Marker="a/0010")
    assert [o["Key"] for o in r["Contents"]] == ["a/0011", "a/0012", "a/0013"]


def test_errors_for_missing_things(s3: Any) -> None:
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="no-such-bucket-here", Key="x")
    assert code_of(e.value) == "NoSuchBucket"
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="no-such-bucket-here", Key="x", Body=b"1")
    assert code_of(e.value) == "NoSuchBucket"
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="no-such-bucket-here")
    assert code_of(e.value) == "NoSuchBucket"


def model_list(keys: list[str], prefix: str, delimiter: str, start_after: str) -> list[str]:
    """S3's listing semantics, written out naively: the oracle for the cluster."""
    out: list[str] = []
    for k in sorted(keys):
        if not k.startswith(prefix) or k <= start_after:
            continue
        if delimiter:
            i = k.find(delimiter, len(prefix))
            if i >= 0:
                cp = k[: i + len(delimiter)]
                if cp <= start_after or (out and out[-1] == cp):
                    continue
                out.append(cp)
                continue
        out.append(k)
    return out


def test_listing_matches_model_randomized(s3: Any) -> None:
    import random

    rng = random.Random(7)
    s3.create_bucket(Bucket="rand")
    alphabet = ["a", "b", "/", "c", "é"]
    keys = sorted(
        {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(300)}
    )
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket="rand", Key=k, Body=b""), keys))
    for _ in range(25):
        prefix = rng.choice(["", "a", "a/", "b", "/", "é"])
        delimiter = rng.choice(["", "/", "b"])
        page = rng.choice([1, 2, 7, 50, 1000])
        want = model_list(keys, prefix, delimiter, "")
        got: list[str] = []
        kw: dict[str, Any] = {"Bucket": "rand", "Prefix": prefix, "MaxKeys": page}
        if delimiter:
            kw["Delimiter"] = delimiter
        while True:
            r = s3.list_objects_v2(**kw)
            entries = [o["Key"] for o in r.get("Contents", [])] + [
                p["Prefix"] for p in r.get("CommonPrefixes", [])
            ]
            assert len(entries) == r["KeyCount"] <= page
            got.extend(sorted(entries))
            if not r["IsTruncated"]:
                break
            kw["ContinuationToken"] = r["NextContinuationToken"]
        assert got == want, (prefix, delimiter, page)
