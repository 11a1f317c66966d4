"""S3 limits and errors like AWS, against a real cluster with real clients (boto3,
requests, raw sockets): metadata and upload sizes, key encoding, what aiohttp refuses,
DeleteObjects integrity, SigV2 presigned expiry, the header-read timeout, and the
dashboard login throttle.  Every error is S3 XML, never a plain-text page."""

from __future__ import annotations

import base64
import hashlib
import http.client
import socket
import time
import urllib.parse
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from botocore.auth import HmacV1QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from cohort.admin.web import LoginThrottle
from cohort.cluster import LocalCluster
from cohort.s3.sigv2 import presign_url_v2
from cohort.s3.sigv4 import STREAMING_UNSIGNED_TRAILER, UNSIGNED_PAYLOAD, sign_request
from tests.conftest import signed, start_cluster

HEADER_TIMEOUT = 2.0
GIB = 1024**3
BUCKET = "limits"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("limits"),
        director_args=["--header-timeout", str(HEADER_TIMEOUT)],
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="precious", Body=b"do not lose me")
    return BUCKET


# -- helpers --------------------------------------------------------------------------------


def addr(cluster: LocalCluster) -> tuple[str, int]:
    host, port = urllib.parse.urlsplit(cluster.s3_endpoint).netloc.split(":")
    return host, int(port)


def xml_error(body: bytes) -> str:
    """The code of an S3 XML error document (asserting it is one)."""
    root = ET.fromstring(body)
    assert root.tag == "Error", body
    assert root.findtext("Message") and root.findtext("RequestId"), body
    return str(root.findtext("Code"))


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (status, lower-cased headers, body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if status == 100:  # an interim response: the caller reads the final one next
        return status, headers, body
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def raw_exchange(cluster: LocalCluster, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(addr(cluster), timeout=10) as sock:
        sock.sendall(data)
        return read_response(sock)


def signed_head(
    cluster: LocalCluster,
    method: str,
    path: str,
    headers: dict[str, str],
    payload: str = UNSIGNED_PAYLOAD,
) -> bytes:
    """A SigV4-signed request head (no body) for a raw socket."""
    host, port = addr(cluster)
    h = dict(headers)
    h.update(
        sign_request(
            method,
            cluster.s3_endpoint + path,
            h,
            payload,
            cluster.creds["access_key"],
            cluster.creds["secret_key"],
            "us-east-1",
        )
    )
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in h.items() if k.lower() != "host"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def still_fine(s3: Any) -> None:
    assert s3.get_object(Bucket=BUCKET, Key="precious")["Body"].read() == b"do not lose me"


def code_of(e: pytest.ExceptionInfo[ClientError]) -> str:
    return str(e.value.response["Error"]["Code"])


# -- 1. user metadata -----------------------------------------------------------------------


def test_user_metadata_over_2kb_is_refused(s3: Any, bucket: str) -> None:
    # 2 KB of names + values (without the x-amz-meta- prefix) is the limit, inclusive
    s3.put_object(Bucket=bucket, Key="meta-ok", Body=b"x", Metadata={"a": "v" * 2047})
    got = s3.head_object(Bucket=bucket, Key="meta-ok")["Metadata"]
    assert got == {"a": "v" * 2047}
    too_big = {"a": "v" * 1000, "b": "w" * 1048}  # 2050 bytes
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="meta-big", Body=b"x", Metadata=too_big)
    assert code_of(e) == "MetadataTooLarge"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as e:
        s3.create_multipart_upload(Bucket=bucket, Key="meta-big", Metadata=too_big)
    assert code_of(e) == "MetadataTooLarge"
    with pytest.raises(ClientError) as e:
        s3.copy_object(
            Bucket=bucket,
            Key="meta-big",
            CopySource={"Bucket": bucket, "Key": "precious"},
            Metadata=too_big,
            MetadataDirective="REPLACE",
        )
    assert code_of(e) == "MetadataTooLarge"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket=bucket, Key="meta-big")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    still_fine(s3)


# -- 2. single PUT / part over 5 GiB ----------------------------------------------------------


def _refused_before_body(cluster: LocalCluster, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a head promising gigabytes and 10 bytes of body; the answer must come now."""
    with socket.create_connection(addr(cluster), timeout=5) as sock:
        sock.sendall(head + b"0123456789")
        t0 = time.monotonic()
        try:
            status, headers, body = read_response(sock)
        except TimeoutError:
            pytest.fail("no answer within 5 s: the server waits for the 6 GiB body")
        assert time.monotonic() - t0 < 5
    return status, headers, body


def test_put_over_5gib_is_refused_before_the_body(
    cluster: LocalCluster, s3: Any, bucket: str
) -> None:
    six = str(6 * GIB)
    head = signed_head(cluster, "PUT", f"/{bucket}/huge", {"Content-Length": six})
    status, _, body = _refused_before_body(cluster, head)
    assert status == 400 and xml_error(body) == "EntityTooLarge"
    assert b"<MaxSizeAllowed>5368709120</MaxSizeAllowed>" in body
    # with Expect: 100-continue the refusal replaces the 100 (the body is never invited)
    head = signed_head(
        cluster, "PUT", f"/{bucket}/huge", {"Content-Length": six, "Expect": "100-continue"}
    )
    with socket.create_connection(addr(cluster), timeout=5) as sock:
        sock.sendall(head)
        status, _, body = read_response(sock)
    assert status == 400 and xml_error(body) == "EntityTooLarge"
    # aws-chunked: the decoded length is what counts
    head = signed_head(
        cluster,
        "PUT",
        f"/{bucket}/huge",
        {
            "Content-Length": str(6 * GIB + 4096),
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": six,
            "x-amz-trailer": "x-amz-checksum-crc32",
        },
        payload=STREAMING_UNSIGNED_TRAILER,
    )
    status, _, body = _refused_before_body(cluster, head)
    assert status == 400 and xml_error(body) == "EntityTooLarge"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="huge")
    still_fine(s3)


def test_upload_part_over_5gib_is_refused_before_the_body(
    cluster: LocalCluster, s3: Any, bucket: str
) -> None:
    up = s3.create_multipart_upload(Bucket=bucket, Key="huge-mpu")["UploadId"]
    path = f"/{bucket}/huge-mpu?partNumber=1&uploadId={urllib.parse.quote(up)}"
    head = signed_head(cluster, "PUT", path, {"Content-Length": str(5 * GIB + 1)})
    status, _, body = _refused_before_body(cluster, head)
    assert status == 400 and xml_error(body) == "EntityTooLarge"
    assert s3.list_parts(Bucket=bucket, Key="huge-mpu", UploadId=up).get("Parts", []) == []
    s3.abort_multipart_upload(Bucket=bucket, Key="huge-mpu", UploadId=up)


def test_expect_100_continue_still_works(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    """The 100 Continue is now sent by the S3 handler after its checks: uploads that
    pass still get it, then their body is read."""
    body = b"continued body"
    head = signed_head(
        cluster,
        "PUT",
        f"/{bucket}/continued",
        {"Content-Length": str(len(body)), "Expect": "100-continue"},
        payload=hashlib.sha256(body).hexdigest(),
    )
    with socket.create_connection(addr(cluster), timeout=10) as sock:
        sock.sendall(head)
        status, _, rest = read_response(sock)
        assert status == 100 and rest == b""
        sock.sendall(body)
        status, headers, _ = read_response(sock)
    assert status == 200 and headers["etag"] == f'"{hashlib.md5(body).hexdigest()}"'
    # boto3 sends Expect: 100-continue for bodies over 1 MB
    big = b"b" * (2 * 1024 * 1024)
    s3.put_object(Bucket=bucket, Key="continued-big", Body=big)
    assert s3.get_object(Bucket=bucket, Key="continued-big")["Body"].read() == big
    assert s3.get_object(Bucket=bucket, Key="continued")["Body"].read() == body


# -- 3. keys: invalid UTF-8, CR/LF, what aiohttp refuses --------------------------------------


def test_invalid_utf8_keys_do_not_collide(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    # upper-case escapes: requests normalizes them so, and the signature must match
    for raw in ("u%FF", "u%FE", "u%C3", "u%80x"):
        r = signed(cluster, "PUT", f"/{bucket}/{raw}", b"data")
        assert r.status_code == 400, (raw, r.text)
        assert xml_error(r.content) == "InvalidURI"
        r = signed(cluster, "GET", f"/{bucket}/{raw}")
        assert r.status_code == 400 and xml_error(r.content) == "InvalidURI"
    r = signed(
        cluster, "PUT", f"/{bucket}/copy-target", headers={"x-amz-copy-source": f"/{bucket}/u%FF"}
    )
    assert r.status_code == 400 and xml_error(r.content) == "InvalidURI"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="u").get("Contents", [])]
    assert keys == []
    # valid UTF-8, percent-encoded, still works
    s3.put_object(Bucket=bucket, Key="u-ü-ключ-😀", Body=b"ok")
    assert s3.get_object(Bucket=bucket, Key="u-ü-ключ-😀")["Body"].read() == b"ok"
    still_fine(s3)


def test_cr_lf_nul_in_new_keys_are_refused(s3: Any, bucket: str) -> None:
    for key in ("line\r\nbreak", "only\nlf", "only\rcr", "nul\x00byte"):
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        assert code_of(e) == "InvalidArgument", key
        with pytest.raises(ClientError) as e:
            s3.create_multipart_upload(Bucket=bucket, Key=key)
        assert code_of(e) == "InvalidArgument", key
    # other control characters are allowed, as in S3, and round-trip through listings
    odd = "tab\there\x01\x1f\x7f"
    s3.put_object(Bucket=bucket, Key=odd, Body=b"odd")
    assert s3.get_object(Bucket=bucket, Key=odd)["Body"].read() == b"odd"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="tab")["Contents"]]
    assert keys == [odd]
    s3.delete_object(Bucket=bucket, Key=odd)


@pytest.mark.parametrize(
    ("what", "request_bytes", "code"),
    [
        ("CR in the target", b"GET /limits/a\rb HTTP/1.1\r\nHost: x\r\n\r\n", "InvalidRequest"),
        ("LF in the target", b"GET /limits/a\nb HTTP/1.1\r\nHost: x\r\n\r\n", "InvalidRequest"),
        ("NUL in the target", b"GET /limits/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", "InvalidRequest"),
        (
            "raw 0xff in the target",
            b"GET /limits/u\xff HTTP/1.1\r\nHost: x\r\n\r\n",
            "InvalidRequest",
        ),
        (
            "CR in a header",
            b"GET /limits/a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            "InvalidRequest",
        ),
        (
            "oversized header",
            b"GET /limits/a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            "RequestHeaderSectionTooLarge",
        ),
        (
            "too many headers",
            b"GET /limits/a HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: 1\r\n" % i for i in range(300))
            + b"\r\n",
            "RequestHeaderSectionTooLarge",
        ),
        (
            "oversized request line",
            b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            "RequestHeaderSectionTooLarge",
        ),
        ("not HTTP", b"\x00\x01\x02 garbage\r\n\r\n", "InvalidRequest"),
        ("bad version", b"GET / HTTP/9.9\r\n\r\n", "InvalidRequest"),
    ],
)
def test_requests_aiohttp_refuses_get_s3_xml(
    cluster: LocalCluster, s3: Any, bucket: str, what: str, request_bytes: bytes, code: str
) -> None:
    status, headers, body = raw_exchange(cluster, request_bytes)
    assert status == 400, (what, body)
    assert headers["content-type"].startswith("application/xml"), (what, headers)
    assert xml_error(body) == code, what
    assert headers.get("x-amz-request-id")
    assert b"\r" not in body and b"\x00" not in body and b"Traceback" not in body
    still_fine(s3)


def test_long_keys_fit_the_request_line(s3: Any, bucket: str) -> None:
    """A 1024-byte key of 3-byte characters is 3 KB percent-encoded: still served."""
    key = "€" * 341 + "x"  # 1024 UTF-8 bytes
    s3.put_object(Bucket=bucket, Key=key, Body=b"long")
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"long"
    s3.delete_object(Bucket=bucket, Key=key)


# -- 4. DeleteObjects integrity -----------------------------------------------------------------


def _delete_body(*keys: str) -> bytes:
    objs = "".join(f"<Object><Key>{k}</Key></Object>" for k in keys)
    return f"<Delete><Quiet>false</Quiet>{objs}</Delete>".encode()


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_delete_objects_checks_content_md5_and_checksums(
    cluster: LocalCluster, s3: Any, bucket: str
) -> None:
    s3.put_object(Bucket=bucket, Key="victim", Body=b"v")
    body = _delete_body("victim")
    cases = [
        ({}, "InvalidRequest"),  # neither Content-MD5 nor a checksum: S3 refuses
        ({"Content-MD5": _md5(b"other body")}, "BadDigest"),
        ({"Content-MD5": "not-base64!"}, "InvalidDigest"),
        ({"Content-MD5": base64.b64encode(b"short").decode()}, "InvalidDigest"),
        ({"x-amz-checksum-crc32": base64.b64encode(b"\0\0\0\0").decode()}, "BadDigest"),
        ({"x-amz-sdk-checksum-algorithm": "CRC32"}, "InvalidRequest"),
    ]
    for headers, code in cases:
        r = signed(cluster, "POST", f"/{bucket}?delete", body, headers)
        assert r.status_code == 400, (headers, r.text)
        assert xml_error(r.content) == code, headers
        assert s3.get_object(Bucket=bucket, Key="victim")["Body"].read() == b"v"
    # right Content-MD5: deleted
    r = signed(cluster, "POST", f"/{bucket}?delete", body, {"Content-MD5": _md5(body)})
    assert r.status_code == 200 and b"<Deleted><Key>victim</Key>" in r.content, r.text
    # right CRC32 (what current boto3 sends)
    s3.put_object(Bucket=bucket, Key="victim", Body=b"v")
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    r = signed(
        cluster,
        "POST",
        f"/{bucket}?delete",
        body,
        {"x-amz-checksum-crc32": crc, "x-amz-sdk-checksum-algorithm": "CRC32"},
    )
    assert r.status_code == 200 and b"<Deleted><Key>victim</Key>" in r.content, r.text
    # boto3 itself keeps working
    s3.put_object(Bucket=bucket, Key="victim", Body=b"v")
    out = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "victim"}]})
    assert [d["Key"] for d in out["Deleted"]] == ["victim"]
    still_fine(s3)


def test_delete_objects_body_is_bounded(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    body = b"<Delete>" + b" " * (9 * 1024 * 1024) + b"</Delete>"
    r = signed(cluster, "POST", f"/{bucket}?delete", body, {"Content-MD5": _md5(body)})
    assert r.status_code == 400 and xml_error(r.content) == "MaxMessageLengthExceeded"
    still_fine(s3)


# -- 5. SigV2 presigned URLs: at most 7 days ----------------------------------------------------


def test_sigv2_presigned_expiry_is_capped(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    creds = Credentials(cluster.creds["access_key"], cluster.creds["secret_key"])
    url = f"{cluster.s3_endpoint}/{bucket}/precious"

    def presigned(seconds: int) -> str:
        req = AWSRequest(method="GET", url=url)
        HmacV1QueryAuth(creds, expires=seconds).add_auth(req)  # what boto3's "s3" signer does
        return str(req.url)

    r = requests.get(presigned(3600), timeout=10)
    assert r.status_code == 200 and r.content == b"do not lose me"
    r = requests.get(presigned(6 * 86400), timeout=10)
    assert r.status_code == 200
    for seconds in (8 * 86400, 365 * 86400, 10**9):
        r = requests.get(presigned(seconds), timeout=10)
        assert r.status_code == 400, (seconds, r.text)
        assert xml_error(r.content) == "AuthorizationQueryParametersError"
    # Cohort's own V2 presigner, far in the future: refused too
    rel = presign_url_v2(
        "GET",
        f"/{bucket}/precious",
        cluster.creds["access_key"],
        cluster.creds["secret_key"],
        expires=int(time.time()) + 30 * 86400,
    )
    r = requests.get(cluster.s3_endpoint + rel, timeout=10)
    assert r.status_code == 400 and xml_error(r.content) == "AuthorizationQueryParametersError"


# -- 6. header-read timeout (slowloris) ---------------------------------------------------------


def test_slowloris_headers_are_cut_off(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    """One header byte per second: the connection is answered and closed once the head
    is not complete after the header timeout (2 s here)."""
    head = f"GET /{bucket}/precious HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode() + b"z" * 60
    t0 = time.monotonic()
    received = b""
    closed_at = None
    with socket.create_connection(addr(cluster), timeout=10) as sock:
        sock.settimeout(1.0)
        for i in range(len(head)):
            try:
                sock.sendall(head[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic() - t0
                break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue  # one byte a second
            except ConnectionResetError:
                closed_at = time.monotonic() - t0
                break
            if not chunk:
                closed_at = time.monotonic() - t0
                break
            received += chunk
            if time.monotonic() - t0 > 15:
                break
    assert closed_at is not None, f"still open after {time.monotonic() - t0:.1f} s"
    assert closed_at < HEADER_TIMEOUT + 3, closed_at
    if received:  # the 400 RequestTimeout sent before closing
        _, _, body = received.partition(b"\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 400 ") and xml_error(body) == "RequestTimeout"
    still_fine(s3)


def test_silent_connections_are_closed(cluster: LocalCluster) -> None:
    with socket.create_connection(addr(cluster), timeout=10) as sock:
        t0 = time.monotonic()
        assert sock.recv(65536) == b""  # closed by the server, nothing sent
        assert time.monotonic() - t0 < HEADER_TIMEOUT + 3


def test_idle_keepalive_outlives_the_header_timeout(cluster: LocalCluster, bucket: str) -> None:
    """The header timeout counts from a request's first byte, not from the previous
    response: an idle kept-alive connection is governed by the keep-alive timeout."""
    host, port = addr(cluster)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", f"/{bucket}/precious")
        r = conn.getresponse()
        assert r.status == 403 and xml_error(r.read()) == "AccessDenied"  # anonymous
        sock = conn.sock
        time.sleep(HEADER_TIMEOUT + 1.5)
        conn.request("GET", f"/{bucket}/precious")
        r = conn.getresponse()
        assert r.status == 403 and xml_error(r.read()) == "AccessDenied"
        assert conn.sock is sock  # the same connection served both
    finally:
        conn.close()


# -- 7. dashboard login throttle ----------------------------------------------------------------


def test_login_throttle_unit() -> None:
    now = [1000.0]
    t = LoginThrottle(clock=lambda: now[0], burst=1000)
    for _ in range(5):
        assert t.retry_after("a") == 0
        t.failed("a")
    assert t.retry_after("a") == pytest.approx(1.0)  # 5 failures: locked 1 s
    assert t.retry_after("b") == 0  # another address is not affected
    now[0] += 1.0
    assert t.retry_after("a") == 0
    t.failed("a")
    assert t.retry_after("a") == pytest.approx(2.0)  # then 2, 4, ... s
    for _ in range(20):
        t.failed("a")
    assert t.retry_after("a") == pytest.approx(300.0)  # capped
    t.succeeded("a")
    assert t.retry_after("a") == 0
    # records are forgotten after a quiet period
    t.failed("c")
    now[0] += 901
    assert t.retry_after("c") == 0 and "c" not in t.failures
    # overall: a burst of 30 failures from many addresses, then 1 a second
    g = LoginThrottle(clock=lambda: now[0])
    for i in range(30):
        assert g.retry_after(f"10.0.0.{i}") == 0
        g.failed(f"10.0.0.{i}")
    assert g.retry_after("10.9.9.9") == pytest.approx(1.0)
    now[0] += 1.0
    assert g.retry_after("10.9.9.9") == 0
    # memory stays bounded
    m = LoginThrottle(clock=lambda: now[0], max_tracked=100, burst=10**6)
    for i in range(1000):
        m.failed(f"addr-{i}")
    assert len(m.failures) <= 100


def _login(
    cluster: LocalCluster, secret: str, source: str = "127.0.0.1"
) -> tuple[int, dict[str, str], str]:
    host, port = addr(cluster)
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        form = urllib.parse.urlencode(
            {"access_key": cluster.creds["access_key"], "secret_key": secret}
        )
        conn.request(
            "POST",
            "/_cohort/login",
            form,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def test_dashboard_login_is_throttled_per_address(cluster: LocalCluster) -> None:
    good = cluster.creds["secret_key"]
    statuses = [_login(cluster, "wrong")[0] for _ in range(5)]
    assert statuses == [401] * 5
    status, headers, text = _login(cluster, "wrong")
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert "Too many failed sign-ins" in text
    # while locked, even the right secret is not looked at
    assert _login(cluster, good)[0] == 429
    # a burst of guesses: almost all are refused unanswered
    t0 = time.monotonic()
    answered = sum(_login(cluster, f"guess-{i}")[0] == 401 for i in range(40))
    # only when a lock expires during the burst is a guess answered (locks of 1, 2, 4 s:
    # a fourth answer would need a burst of over 7 s)
    assert answered <= 3, answered
    assert time.monotonic() - t0 < 20
    # after Retry-After, the right secret gets in and clears the record
    status, headers, _ = _login(cluster, "wrong")
    wait = int(headers.get("retry-after", "0"))
    assert status == 429 and 1 <= wait <= 300
    time.sleep(wait + 0.2)
    status, headers, _ = _login(cluster, good)
    assert status == 303 and headers["location"] == "/_cohort/dashboard"
    assert _login(cluster, "wrong")[0] == 401  # the counter started again


def test_dashboard_login_is_throttled_overall(cluster: LocalCluster) -> None:
    """Guesses spread over many client addresses are bounded too (30 in a burst)."""
    statuses = []
    t0 = time.monotonic()
    for i in range(2, 14):  # 12 addresses x 5 free failures = 60 > 30
        for _ in range(5):
            statuses.append(_login(cluster, "wrong", source=f"127.0.0.{i}")[0])
    elapsed = time.monotonic() - t0
    # the burst plus the refill (1/s) during the run
    assert statuses.count(401) <= 30 + elapsed + 1, (statuses, elapsed)
    assert 429 in statuses
    status, headers, _ = _login(cluster, "wrong", source="127.0.0.77")  # a fresh address
    assert status == 429 and int(headers["retry-after"]) >= 1
