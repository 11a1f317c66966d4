"""Multipart uploads, conditional writes and presigned URLs with boto3 and plain HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import requests
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

MiB = 1024 * 1024


def code_of(e: ClientError) -> str:
    return str(e.response["Error"]["Code"])


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    s3.create_bucket(Bucket="more")
    return "more"


def test_upload_and_download_file_multipart(s3: Any, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(17 * MiB + 12345)
    src.write_bytes(data)
    cfg = TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
    )
    s3.upload_file(str(src), bucket, "big/file.bin", Config=cfg)
    head = s3.head_object(Bucket=bucket, Key="big/file.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-4")
    # the multipart ETag is md5 of the parts' md5s
    md5s = b"".join(
        hashlib.md5(data[i : i + 5 * MiB]).digest() for i in range(0, len(data), 5 * MiB)
    )
    assert head["ETag"].strip('"') == f"{hashlib.md5(md5s).hexdigest()}-4"
    dst = tmp_path / "dst.bin"
    s3.download_file(bucket, "big/file.bin", str(dst), Config=cfg)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()
    # a range that spans a part boundary
    r = s3.get_object(
        Bucket=bucket, Key="big/file.bin", Range=f"bytes={5 * MiB - 10}-{5 * MiB + 9}"
    )
    assert r["Body"].read() == data[5 * MiB - 10 : 5 * MiB + 10]
    # copying a multipart object yields an identical body
    s3.copy_object(Bucket=bucket, Key="big/copy.bin", CopySource=f"{bucket}/big/file.bin")
    got = s3.get_object(Bucket=bucket, Key="big/copy.bin")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_multipart_low_level_and_errors(s3: Any, bucket: str) -> None:
    up = s3.create_multipart_upload(
        Bucket=bucket, Key="mp", ContentType="text/x-mp", Metadata={"a": "b"}
    )
    uid = up["UploadId"]
    p1 = os.urandom(5 * MiB)
    p2 = b"tail"
    e1 = s3.upload_part(Bucket=bucket, Key="mp", UploadId=uid, PartNumber=1, Body=p1)["ETag"]
    e2 = s3.upload_part(Bucket=bucket, Key="mp", UploadId=uid, PartNumber=2, Body=p2)["ETag"]
    parts = s3.list_parts(Bucket=bucket, Key="mp", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, 5 * MiB), (2, 4)]
    uploads = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert any(u["UploadId"] == uid and u["Key"] == "mp" for u in uploads)
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="mp",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e2}]},
        )
    assert code_of(e.value) == "InvalidPart"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="mp",
            UploadId=uid,
            MultipartUpload={
                "Parts": [{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]
            },
        )
    assert code_of(e.value) == "InvalidPartOrder"
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="mp",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]},
    )
    g = s3.get_object(Bucket=bucket, Key="mp")
    assert (
        g["Body"].read() == p1 + p2
        and g["ContentType"] == "text/x-mp"
        and g["Metadata"] == {"a": "b"}
    )
    with pytest.raises(ClientError) as e:
        s3.list_parts(Bucket=bucket, Key="mp", UploadId=uid)
    assert code_of(e.value) == "NoSuchUpload"
    # small non-last part
    up = s3.create_multipart_upload(Bucket=bucket, Key="small")
    uid = up["UploadId"]
    a = s3.upload_part(Bucket=bucket, Key="small", UploadId=uid, PartNumber=1, Body=b"x")["ETag"]
    b = s3.upload_part(Bucket=bucket, Key="small", UploadId=uid, PartNumber=2, Body=b"y")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket=bucket,
            Key="small",
            UploadId=uid,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": a}, {"PartNumber": 2, "ETag": b}]},
        )
    assert code_of(e.value) == "EntityTooSmall"
    s3.abort_multipart_upload(Bucket=bucket, Key="small", UploadId=uid)
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket=bucket, Key="small", UploadId=uid, PartNumber=3, Body=b"z")
    assert code_of(e.value) == "NoSuchUpload"


def test_upload_part_copy(s3: Any, bucket: str) -> None:
    src = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="copysrc", Body=src)
    uid = s3.create_multipart_upload(Bucket=bucket, Key="assembled")["UploadId"]
    r1 = s3.upload_part_copy(
        Bucket=bucket,
        Key="assembled",
        UploadId=uid,
        PartNumber=1,
        CopySource={"Bucket": bucket, "Key": "copysrc"},
        CopySourceRange=f"bytes=0-{5 * MiB - 1}",
    )
    r2 = s3.upload_part_copy(
        Bucket=bucket,
        Key="assembled",
        UploadId=uid,
        PartNumber=2,
        CopySource={"Bucket": bucket, "Key": "copysrc"},
        CopySourceRange=f"bytes={5 * MiB}-{6 * MiB - 1}",
    )
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key="assembled",
        UploadId=uid,
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": r1["CopyPartResult"]["ETag"]},
                {"PartNumber": 2, "ETag": r2["CopyPartResult"]["ETag"]},
            ]
        },
    )
    assert s3.get_object(Bucket=bucket, Key="assembled")["Body"].read() == src


def test_conditional_writes_are_atomic(s3: Any, bucket: str) -> None:
    """Many clients race to create one key with If-None-Match: * - exactly one wins."""

    def attempt(i: int) -> bool:
        try:
            s3.put_object(Bucket=bucket, Key="once", Body=str(i).encode(), IfNoneMatch="*")
            return True
        except ClientError as e:
            assert code_of(e) == "PreconditionFailed"
            return False

    with cf.ThreadPoolExecutor(8) as ex:
        wins = list(ex.map(attempt, range(16)))
    assert wins.count(True) == 1
    etag = s3.head_object(Bucket=bucket, Key="once")["ETag"]
    # compare-and-swap with If-Match
    s3.put_object(Bucket=bucket, Key="once", Body=b"v2", IfMatch=etag)
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="once", Body=b"v3", IfMatch=etag)
    assert code_of(e.value) == "PreconditionFailed"
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"v2"


def test_conditional_reads(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="cond", Body=b"abc")
    etag = s3.head_object(Bucket=bucket, Key="cond")["ETag"]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="cond", IfNoneMatch=etag)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="cond", IfMatch='"0000"')
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket, Key="cond", IfMatch=etag)["Body"].read() == b"abc"


def test_presigned_urls(cluster: Any, bucket: str) -> None:
    from tests.conftest import s3_client

    s3 = s3_client(cluster, signature_version="s3v4")
    put_url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "pre"}, ExpiresIn=60
    )
    assert requests.put(put_url, data=b"presigned body", timeout=10).status_code == 200
    get_url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "pre"}, ExpiresIn=60
    )
    r = requests.get(get_url, timeout=10)
    assert r.status_code == 200 and r.content == b"presigned body"
    tampered = get_url.replace("pre?", "prf?")
    assert requests.get(tampered, timeout=10).status_code == 403
