"""Issue 5 polish against a real cluster: Signature V2, virtual-hosted-style addressing,
canned ACL sub-resources, GET/HEAD by part number, the background cleaner (expired
uploads, orphan blobs) and bucket-deletion races."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config

from cohort.cluster import LocalCluster
from cohort.s3.sigv2 import presign_url_v2, sign_request_v2
from tests.conftest import s3_client, start_cluster, wait_for

DOMAIN = "cohort.test"
UPLOAD_EXPIRY = 8  # seconds: short, so the background cleaner can be watched at work
ORPHAN_AGE = 2


@pytest.fixture(scope="module")
def pc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("polish"),
        director_args=["--domain", DOMAIN],
        server_args=[
            "--upload-expiry-seconds",
            str(UPLOAD_EXPIRY),
            "--orphan-age-seconds",
            str(ORPHAN_AGE),
        ],
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def s3(pc: LocalCluster) -> Any:
    return s3_client(pc)


def _bucket(s3: Any) -> str:
    name = "p" + uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=name)
    return name


def _port(pc: LocalCluster) -> int:
    return int(pc.s3_endpoint.rpartition(":")[2])


# -- Signature V2 ------------------------------------------------------------------------
def _v2_client(pc: LocalCluster, **s3cfg: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=pc.s3_endpoint,
        aws_access_key_id=pc.creds["access_key"],
        aws_secret_access_key=pc.creds["secret_key"],
        region_name="us-east-1",
        config=Config(signature_version="s3", s3={"addressing_style": "path", **s3cfg}),
    )


def test_sigv2_boto3_round_trip(pc: LocalCluster, s3: Any) -> None:
    v2 = _v2_client(pc)
    b = "v2" + uuid.uuid4().hex[:10]
    v2.create_bucket(Bucket=b)
    v2.put_object(Bucket=b, Key="dir/hello world+.txt", Body=b"hi v2", Metadata={"a": "1"})
    got = v2.get_object(Bucket=b, Key="dir/hello world+.txt")
    assert got["Body"].read() == b"hi v2" and got["Metadata"] == {"a": "1"}
    keys = [o["Key"] for o in v2.list_objects_v2(Bucket=b)["Contents"]]
    assert keys == ["dir/hello world+.txt"]
    # multipart upload signs uploadId / partNumber sub-resources
    up = v2.create_multipart_upload(Bucket=b, Key="mp")
    e = v2.upload_part(Bucket=b, Key="mp", UploadId=up["UploadId"], PartNumber=1, Body=b"x")
    v2.complete_multipart_upload(
        Bucket=b,
        Key="mp",
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e["ETag"]}]},
    )
    assert v2.get_object(Bucket=b, Key="mp")["Body"].read() == b"x"
    # a V2 presigned URL fetched with plain HTTP
    url = v2.generate_presigned_url(
        "get_object", Params={"Bucket": b, "Key": "dir/hello world+.txt"}, ExpiresIn=60
    )
    assert "AWSAccessKeyId=" in url and "Signature=" in url
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.content == b"hi v2"
    # wrong secret: SignatureDoesNotMatch
    bad = boto3.client(
        "s3",
        endpoint_url=pc.s3_endpoint,
        aws_access_key_id=pc.creds["access_key"],
        aws_secret_access_key="wrong",
        region_name="us-east-1",
        config=Config(signature_version="s3", s3={"addressing_style": "path"}),
    )
    with pytest.raises(Exception) as ei:
        bad.head_bucket(Bucket=b)
    assert "403" in str(ei.value)


def test_sigv2_presigned_expired_and_tampered(pc: LocalCluster, s3: Any) -> None:
    b = _bucket(s3)
    s3.put_object(Bucket=b, Key="k", Body=b"data")
    ak, sk = pc.creds["access_key"], pc.creds["secret_key"]
    url = presign_url_v2("GET", f"/{b}/k", ak, sk, expires=int(time.time()) + 60)
    r = requests.get(pc.s3_endpoint + url, timeout=10)
    assert r.status_code == 200 and r.content == b"data"
    old = presign_url_v2("GET", f"/{b}/k", ak, sk, expires=int(time.time()) - 5)
    r = requests.get(pc.s3_endpoint + old, timeout=10)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    assert b"expired" in r.content
    r = requests.get(pc.s3_endpoint + url.replace("/k?", "/other?"), timeout=10)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    # header form by hand
    hdrs = sign_request_v2("GET", f"/{b}/k", "", {}, ak, sk)
    r = requests.get(f"{pc.s3_endpoint}/{b}/k", headers=hdrs, timeout=10)
    assert r.status_code == 200 and r.content == b"data"
    hdrs = sign_request_v2("GET", f"/{b}/k", "", {}, "NOSUCHKEY", sk)
    r = requests.get(f"{pc.s3_endpoint}/{b}/k", headers=hdrs, timeout=10)
    assert r.status_code == 403 and b"InvalidAccessKeyId" in r.content


# -- virtual-hosted style ----------------------------------------------------------------
def test_virtual_hosted_raw_http(pc: LocalCluster, s3: Any) -> None:
    b = _bucket(s3)
    ak, sk = pc.creds["access_key"], pc.creds["secret_key"]
    host = f"{b}.{DOMAIN}:{_port(pc)}"
    hdrs = {"Host": host, "Content-Type": "text/plain"}
    hdrs.update(sign_request_v2("PUT", "/a/b.txt", "", hdrs, ak, sk, bucket=b))
    r = requests.put(f"{pc.s3_endpoint}/a/b.txt", data=b"vh", headers=hdrs, timeout=10)
    assert r.status_code == 200, r.text
    # visible path-style
    assert s3.get_object(Bucket=b, Key="a/b.txt")["Body"].read() == b"vh"
    hdrs = {"Host": host}
    hdrs.update(sign_request_v2("GET", "/", "", hdrs, ak, sk, bucket=b))
    r = requests.get(f"{pc.s3_endpoint}/", headers=hdrs, timeout=10)
    assert r.status_code == 200 and b"<Key>a/b.txt</Key>" in r.content
    # the base domain itself is path style
    hdrs = {"Host": f"{DOMAIN}:{_port(pc)}"}
    hdrs.update(sign_request_v2("GET", f"/{b}/a/b.txt", "", hdrs, ak, sk))
    r = requests.get(f"{pc.s3_endpoint}/{b}/a/b.txt", headers=hdrs, timeout=10)
    assert r.status_code == 200 and r.content == b"vh"


@pytest.fixture
def resolve_domain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve DOMAIN and every name under it to 127.0.0.1, in this process only."""
    real = socket.getaddrinfo

    def fake(host: Any, *a: Any, **kw: Any) -> Any:
        if isinstance(host, str) and (host == DOMAIN or host.endswith("." + DOMAIN)):
            host = "127.0.0.1"
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


@pytest.mark.usefixtures("resolve_domain")
@pytest.mark.parametrize("sig", ["s3v4", "s3"])
def test_virtual_hosted_boto3(pc: LocalCluster, s3: Any, sig: str) -> None:
    b = _bucket(s3)
    vh = boto3.client(
        "s3",
        endpoint_url=f"http://{DOMAIN}:{_port(pc)}",
        aws_access_key_id=pc.creds["access_key"],
        aws_secret_access_key=pc.creds["secret_key"],
        region_name="us-east-1",
        config=Config(signature_version=sig, s3={"addressing_style": "virtual"}),
    )
    seen: list[str] = []
    vh.meta.events.register("before-send.s3", lambda request, **kw: seen.append(request.url))
    vh.put_object(Bucket=b, Key="x/y z.txt", Body=b"virtual")
    assert seen and seen[-1].startswith(f"http://{b}.{DOMAIN}:")
    assert vh.get_object(Bucket=b, Key="x/y z.txt")["Body"].read() == b"virtual"
    assert [o["Key"] for o in vh.list_objects_v2(Bucket=b)["Contents"]] == ["x/y z.txt"]
    vh.head_bucket(Bucket=b)
    vh.delete_object(Bucket=b, Key="x/y z.txt")
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == 0


# -- canned ACLs ---------------------------------------------------------------------------
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


def _grants(acl: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (g["Grantee"].get("URI") or g["Grantee"].get("ID", ""), g["Permission"])
        for g in acl["Grants"]
    }


def test_object_acl(pc: LocalCluster, s3: Any) -> None:
    b = _bucket(s3)
    s3.put_object(Bucket=b, Key="o", Body=b"body", Metadata={"m": "v"})
    etag = s3.head_object(Bucket=b, Key="o")["ETag"]
    url = f"{pc.s3_endpoint}/{b}/o"
    acl = s3.get_object_acl(Bucket=b, Key="o")
    assert acl["Owner"]["ID"] == "default"
    assert _grants(acl) == {("default", "FULL_CONTROL")}
    assert requests.get(url, timeout=10).status_code == 403
    s3.put_object_acl(Bucket=b, Key="o", ACL="public-read")
    assert _grants(s3.get_object_acl(Bucket=b, Key="o")) == {
        ("default", "FULL_CONTROL"),
        (ALL_USERS, "READ"),
    }
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.content == b"body"
    # the ACL change rewrote metadata only: same body, ETag, user metadata
    h = s3.head_object(Bucket=b, Key="o")
    assert h["ETag"] == etag and h["Metadata"] == {"m": "v"}
    s3.put_object_acl(Bucket=b, Key="o", ACL="private")
    assert _grants(s3.get_object_acl(Bucket=b, Key="o")) == {("default", "FULL_CONTROL")}
    assert requests.get(url, timeout=10).status_code == 403
    # an AccessControlPolicy body works too
    s3.put_object_acl(
        Bucket=b,
        Key="o",
        AccessControlPolicy={
            "Owner": {"ID": "default"},
            "Grants": [
                {
                    "Grantee": {"Type": "CanonicalUser", "ID": "default"},
                    "Permission": "FULL_CONTROL",
                },
                {"Grantee": {"Type": "Group", "URI": ALL_USERS}, "Permission": "READ"},
            ],
        },
    )
    assert requests.get(url, timeout=10).status_code == 200
    # public-read set at upload time shows in GET ?acl
    s3.put_object(Bucket=b, Key="p", Body=b"x", ACL="public-read")
    assert (ALL_USERS, "READ") in _grants(s3.get_object_acl(Bucket=b, Key="p"))
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.get_object_acl(Bucket=b, Key="missing")
    with pytest.raises(s3.exceptions.NoSuchKey):
        s3.put_object_acl(Bucket=b, Key="missing", ACL="public-read")
    with pytest.raises(Exception) as ei:
        s3.put_object_acl(Bucket=b, Key="o", ACL="authenticated-read")
    assert "NotImplemented" in str(ei.value)


def test_bucket_acl(pc: LocalCluster, s3: Any) -> None:
    b = _bucket(s3)
    s3.put_object(Bucket=b, Key="k", Body=b"v")
    assert _grants(s3.get_bucket_acl(Bucket=b)) == {("default", "FULL_CONTROL")}
    assert requests.get(f"{pc.s3_endpoint}/{b}?list-type=2", timeout=10).status_code == 403
    s3.put_bucket_acl(Bucket=b, ACL="public-read")
    assert (ALL_USERS, "READ") in _grants(s3.get_bucket_acl(Bucket=b))
    r = requests.get(f"{pc.s3_endpoint}/{b}?list-type=2", timeout=10)
    assert r.status_code == 200 and b"<Key>k</Key>" in r.content
    # READ on the bucket is listing, not reading its private objects (as in S3)
    assert requests.get(f"{pc.s3_endpoint}/{b}/k", timeout=10).status_code == 403
    # anonymous callers still cannot read or change the ACL itself
    assert requests.get(f"{pc.s3_endpoint}/{b}?acl", timeout=10).status_code == 403
    assert requests.put(f"{pc.s3_endpoint}/{b}?acl", timeout=10).status_code == 403
    s3.put_bucket_acl(Bucket=b, ACL="private")
    assert _grants(s3.get_bucket_acl(Bucket=b)) == {("default", "FULL_CONTROL")}
    assert requests.get(f"{pc.s3_endpoint}/{b}?list-type=2", timeout=10).status_code == 403


# -- GET/HEAD by part number ---------------------------------------------------------------
def test_get_and_head_by_part_number(pc: LocalCluster, s3: Any) -> None:
    from botocore.exceptions import ClientError

    b = _bucket(s3)
    p1, p2, p3 = b"a" * (5 << 20), b"b" * (5 << 20), b"tail"
    up = s3.create_multipart_upload(Bucket=b, Key="mp")
    parts = []
    for n, data in enumerate((p1, p2, p3), 1):
        e = s3.upload_part(Bucket=b, Key="mp", UploadId=up["UploadId"], PartNumber=n, Body=data)
        parts.append({"PartNumber": n, "ETag": e["ETag"]})
    s3.complete_multipart_upload(
        Bucket=b, Key="mp", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    total = len(p1) + len(p2) + len(p3)
    h = s3.head_object(Bucket=b, Key="mp")
    # like S3, the parts count comes only with a request by part number
    assert "PartsCount" not in h and h["ContentLength"] == total
    assert s3.head_object(Bucket=b, Key="mp", PartNumber=1)["PartsCount"] == 3
    g = s3.get_object(Bucket=b, Key="mp", PartNumber=2)
    assert g["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert g["PartsCount"] == 3
    assert g["ContentRange"] == f"bytes {len(p1)}-{len(p1) + len(p2) - 1}/{total}"
    assert g["Body"].read() == p2
    h3 = s3.head_object(Bucket=b, Key="mp", PartNumber=3)
    assert (
        h3["ContentLength"] == 4 and h3["ContentRange"] == f"bytes {total - 4}-{total - 1}/{total}"
    )
    assert s3.get_object(Bucket=b, Key="mp", PartNumber=3)["Body"].read() == b"tail"
    with pytest.raises(ClientError) as ei:
        s3.get_object(Bucket=b, Key="mp", PartNumber=4)
    assert ei.value.response["Error"]["Code"] == "InvalidPartNumber"
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416
    with pytest.raises(ClientError) as ei:
        s3.get_object(Bucket=b, Key="mp", PartNumber=1, Range="bytes=0-1")
    assert ei.value.response["Error"]["Code"] == "InvalidRequest"
    with pytest.raises(ClientError) as ei:
        s3.get_object(Bucket=b, Key="mp", PartNumber=0)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    # a simple object is its own single part
    s3.put_object(Bucket=b, Key="plain", Body=b"0123456789")
    assert "PartsCount" not in s3.head_object(Bucket=b, Key="plain")
    g = s3.get_object(Bucket=b, Key="plain", PartNumber=1)
    assert g["Body"].read() == b"0123456789" and g["ContentRange"] == "bytes 0-9/10"
    with pytest.raises(ClientError) as ei:
        s3.head_object(Bucket=b, Key="plain", PartNumber=2)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416


# -- background cleaner --------------------------------------------------------------------
def _blob_files(pc: LocalCluster) -> set[str]:
    root = pc.storage / "blobs"
    return {str(f.relative_to(pc.storage)) for f in root.rglob("*") if f.is_file()}


def test_cleaner_expires_uploads_and_sweeps_orphans(pc: LocalCluster, s3: Any) -> None:
    from cohort.partitioning import blob_key

    b = _bucket(s3)
    start = _blob_files(pc)
    s3.put_object(Bucket=b, Key="kept", Body=b"keep me")
    up = s3.create_multipart_upload(Bucket=b, Key="kept-mp")
    e = s3.upload_part(Bucket=b, Key="kept-mp", UploadId=up["UploadId"], PartNumber=1, Body=b"m")
    s3.complete_multipart_upload(
        Bucket=b,
        Key="kept-mp",
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": e["ETag"]}]},
    )
    before = _blob_files(pc)
    referenced = before - start  # the bodies of "kept" and "kept-mp"
    assert len(referenced) == 2
    # an upload that is started, given a part, and left
    left = s3.create_multipart_upload(Bucket=b, Key="left")
    s3.upload_part(Bucket=b, Key="left", UploadId=left["UploadId"], PartNumber=1, Body=b"p" * 100)
    part_blobs = _blob_files(pc) - before
    assert len(part_blobs) == 1
    # a blob written without a commit (a director that crashed before committing)
    orphan = blob_key(3, uuid.uuid4().hex)
    (pc.storage / orphan).parent.mkdir(parents=True, exist_ok=True)
    (pc.storage / orphan).write_bytes(b"orphan")
    wait_for(lambda: not (pc.storage / orphan).exists(), timeout=20, what="orphan swept")
    # the upload is still young: listed, and its part kept
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=b).get("Uploads", [])] == [
        left["UploadId"]
    ]
    assert part_blobs <= _blob_files(pc)
    wait_for(
        lambda: not s3.list_multipart_uploads(Bucket=b).get("Uploads"),
        timeout=30,
        what="expired upload aborted",
    )
    wait_for(lambda: not (part_blobs & _blob_files(pc)), timeout=20, what="part blob freed")
    assert referenced <= _blob_files(pc)
    assert s3.get_object(Bucket=b, Key="kept")["Body"].read() == b"keep me"
    assert s3.get_object(Bucket=b, Key="kept-mp")["Body"].read() == b"m"


# -- bucket deletion races -------------------------------------------------------------------
def _with_router(pc: LocalCluster, fn: Any) -> Any:
    import asyncio

    from cohort.coord import connect
    from cohort.director.router import Router

    async def run() -> Any:
        cred = pc.credential()
        router = Router(connect(pc.coordinator_address, cred), credential=cred)
        await router.start()
        try:
            return await fn(router)
        finally:
            await router.close()

    return asyncio.run(run())


def _stray_put(
    router: Any, pc: LocalCluster, bid: str, key: str
) -> tuple[int, str, dict[str, Any]]:
    """What a PUT that passed the bucket check before DeleteBucket does next: write its
    blob, then commit at the owner."""
    from cohort.partitioning import blob_key, partition_of
    from cohort.server.state import ObjectMeta, meta_to_wire

    p = partition_of(bid, key, router.partition_count)
    blob = blob_key(p, uuid.uuid4().hex)
    (pc.storage / blob).parent.mkdir(parents=True, exist_ok=True)
    (pc.storage / blob).write_bytes(b"stray")
    meta = ObjectMeta(size=5, etag="x" * 32, mtime=time.time(), blob=blob)
    return p, blob, {"b": bid, "k": key, "m": meta_to_wire(meta), "rid": uuid.uuid4().hex}


def test_bucket_drop_reclaims_strays(pc: LocalCluster, s3: Any) -> None:
    # 1. a PUT that landed between the emptiness check and the deletion: bucket.drop
    #    (what DeleteBucket scatters) forgets it and frees its blob
    bid = "dead" + uuid.uuid4().hex

    async def landed(router: Any) -> Any:
        p, blob, params = _stray_put(router, pc, bid, "stray")
        await router.call(p, "obj.put", params)
        assert (await router.call(p, "obj.get", {"b": bid, "k": "stray"})) is not None
        rs = await router.scatter("bucket.drop", {"b": bid})
        assert sum(r["dropped"] for r in rs) == 1
        assert (await router.call(p, "obj.get", {"b": bid, "k": "stray"})) is None
        return blob

    blob = _with_router(pc, landed)
    wait_for(lambda: not (pc.storage / blob).exists(), timeout=40, what="stray blob freed")

    # 2. a PUT still in flight when DeleteBucket finished: the tombstone discards it
    b = _bucket(s3)
    bid2 = _with_router(pc, lambda r: _bucket_id(r, b))
    s3.delete_bucket(Bucket=b)

    async def late(router: Any) -> Any:
        p, blob, params = _stray_put(router, pc, bid2, "late")
        await router.call(p, "obj.put", params)
        assert (await router.call(p, "obj.get", {"b": bid2, "k": "late"})) is None
        return blob

    blob2 = _with_router(pc, late)
    wait_for(lambda: not (pc.storage / blob2).exists(), timeout=40, what="late blob freed")
    # a new bucket of the same name starts empty and works
    s3.create_bucket(Bucket=b)
    assert s3.list_objects_v2(Bucket=b)["KeyCount"] == 0
    s3.put_object(Bucket=b, Key="late", Body=b"new")
    assert s3.get_object(Bucket=b, Key="late")["Body"].read() == b"new"


async def _bucket_id(router: Any, name: str) -> str:
    await router.refresh()
    return str(router.buckets[name]["id"])
