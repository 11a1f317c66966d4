"""Bad input gets the proper S3 XML error, the cluster keeps serving, nothing is lost."""

from __future__ import annotations

import hashlib
import socket
import urllib.parse
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError

from cohort.cluster import LocalCluster
from cohort.s3.sigv4 import sign_request
from tests.conftest import signed


def error_code(resp: requests.Response) -> str:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(resp.content)
    assert root.tag == "Error", resp.text
    code = root.findtext("Code")
    assert root.findtext("Message") and root.findtext("RequestId")
    return str(code)


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    s3.create_bucket(Bucket="bad")
    s3.put_object(Bucket="bad", Key="precious", Body=b"do not lose me")
    return "bad"


def still_fine(s3: Any) -> None:
    assert s3.get_object(Bucket="bad", Key="precious")["Body"].read() == b"do not lose me"


def test_malformed_xml(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    for body in (
        b"<Delete><Object><Key>x</Key>",
        b"not xml at all",
        b"<Wrong/>",
        b'<!DOCTYPE d [<!ENTITY a "aaaa">]><Delete>&a;</Delete>',
    ):
        r = signed(
            cluster,
            "POST",
            "/bad?delete",
            body,
            {"Content-MD5": __import__("base64").b64encode(hashlib.md5(body).digest()).decode()},
        )
        assert r.status_code == 400, r.text
        assert error_code(r) == "MalformedXML"
    still_fine(s3)


def test_bad_signature(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    r = signed(cluster, "GET", "/bad/precious", secret="wrong-secret")
    assert r.status_code == 403 and error_code(r) == "SignatureDoesNotMatch"
    r = signed(cluster, "PUT", "/bad/precious", b"overwritten!", secret="wrong-secret")
    assert r.status_code == 403
    r = requests.get(cluster.s3_endpoint + "/bad/precious", timeout=10)  # anonymous
    assert r.status_code == 403 and error_code(r) == "AccessDenied"
    bad_key = sign_request(
        "GET",
        cluster.s3_endpoint + "/bad/precious",
        {},
        hashlib.sha256(b"").hexdigest(),
        "NOSUCHKEY",
        "x",
        "us-east-1",
    )
    r = requests.get(cluster.s3_endpoint + "/bad/precious", headers=bad_key, timeout=10)
    assert r.status_code == 403 and error_code(r) == "InvalidAccessKeyId"
    still_fine(s3)


def test_payload_hash_mismatch(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    url = cluster.s3_endpoint + "/bad/precious"
    h = sign_request(
        "PUT",
        url,
        {},
        hashlib.sha256(b"claimed").hexdigest(),
        cluster.creds["access_key"],
        cluster.creds["secret_key"],
        "us-east-1",
    )
    r = requests.put(url, data=b"actual body", headers=h, timeout=10)
    assert r.status_code == 400 and error_code(r) == "XAmzContentSHA256Mismatch"
    still_fine(s3)


def test_unknown_operations(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    r = signed(cluster, "GET", "/bad?policy")
    assert r.status_code == 501 and error_code(r) == "NotImplemented"
    r = signed(cluster, "PATCH", "/bad/precious")
    assert r.status_code == 405 and error_code(r) == "MethodNotAllowed"
    r = signed(cluster, "POST", "/bad")
    assert r.status_code == 405 and error_code(r) == "MethodNotAllowed"
    still_fine(s3)


def test_bad_content_md5(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.put_object(
            Bucket="bad", Key="precious", Body=b"new", ContentMD5="AAAAAAAAAAAAAAAAAAAAAA=="
        )
    assert e.value.response["Error"]["Code"] == "BadDigest"
    still_fine(s3)


def test_key_too_long(s3: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="bad", Key="k" * 1025, Body=b"x")
    assert e.value.response["Error"]["Code"] == "KeyTooLongError"


def test_truncated_body(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    """The client promises 1000 bytes, sends 500 and closes: nothing is stored."""
    host, port = urllib.parse.urlsplit(cluster.s3_endpoint).netloc.split(":")
    path = "/bad/truncated"
    url = cluster.s3_endpoint + path
    h = sign_request(
        "PUT",
        url,
        {"content-length": "1000"},
        "UNSIGNED-PAYLOAD",
        cluster.creds["access_key"],
        cluster.creds["secret_key"],
        "us-east-1",
    )
    lines = [f"PUT {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 1000"]
    lines += [f"{k}: {v}" for k, v in h.items() if k.lower() not in ("host",)]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"x" * 500)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if data:  # the server may answer 400 IncompleteBody or just close
        assert b" 400 " in data.split(b"\r\n")[0] and b"IncompleteBody" in data, data
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket="bad", Key="truncated")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    still_fine(s3)


def test_garbage_requests_do_not_hurt(cluster: LocalCluster, s3: Any, bucket: str) -> None:
    host, port = urllib.parse.urlsplit(cluster.s3_endpoint).netloc.split(":")
    for junk in (
        b"\x00\x01\x02 garbage\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    ):
        data = b""
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(junk)  # (no half-close: the server answers, then closes)
            while chunk := sock.recv(65536):
                data += chunk
        # an S3 XML error, not aiohttp's plain-text page
        head, _, body = data.partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0], data
        assert b"content-type: application/xml" in head.lower(), data
        code = error_code_of(body)
        assert code in ("InvalidRequest", "RequestHeaderSectionTooLarge"), data
    still_fine(s3)


def error_code_of(body: bytes) -> str:
    import xml.etree.ElementTree as ET

    root = ET.fromstring(body)
    assert root.tag == "Error" and root.findtext("RequestId"), body
    return str(root.findtext("Code"))
