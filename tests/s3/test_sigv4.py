"""SigV4 verification: AWS published examples, botocore cross-checks, error paths."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from multidict import CIMultiDict

from cohort.s3 import sigv4
from cohort.s3.errors import S3Error

AK = "AKIAIOSFODNN7EXAMPLE"
SK = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
T0 = datetime(2013, 5, 24, 0, 0, 0, tzinfo=UTC)


def secret_for(key: str) -> str | None:
    return SK if key == AK else None


def _auth(signed: str, sig: str) -> str:
    return (
        f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={signed},Signature={sig}"
    )


# ------------------------------------------------------------------ AWS doc examples


def test_aws_example_get_object() -> None:
    headers = CIMultiDict(
        {
            "Host": "examplebucket.s3.amazonaws.com",
            "Range": "bytes=0-9",
            "x-amz-content-sha256": sigv4.EMPTY_SHA256,
            "x-amz-date": "20130524T000000Z",
            "Authorization": _auth(
                "host;range;x-amz-content-sha256;x-amz-date",
                "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
            ),
        }
    )
    r = sigv4.verify("GET", "/test.txt", [], headers, secret_for, region="us-east-1", now=T0)
    assert r.access_key == AK
    assert r.scope == "20130524/us-east-1/s3/aws4_request"
    assert r.timestamp == "20130524T000000Z"
    assert r.payload_mode == sigv4.EMPTY_SHA256
    assert r.payload_sha256 == sigv4.EMPTY_SHA256
    assert not r.is_streaming and not r.presigned


def test_aws_example_put_object_encoded_path() -> None:
    body = b"Welcome to Amazon S3."
    digest = hashlib.sha256(body).hexdigest()
    assert digest == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    headers = {
        "Host": "examplebucket.s3.amazonaws.com",
        "Date": "Fri, 24 May 2013 00:00:00 GMT",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": digest,
        "Authorization": _auth(
            "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        ),
    }
    r = sigv4.verify("PUT", "/test%24file.text", [], headers, secret_for, now=T0)
    assert r.payload_sha256 == digest


def test_aws_example_get_lifecycle_and_list() -> None:
    base = {
        "Host": "examplebucket.s3.amazonaws.com",
        "x-amz-date": "20130524T000000Z",
        "x-amz-content-sha256": sigv4.EMPTY_SHA256,
    }
    h1 = {
        **base,
        "Authorization": _auth(
            "host;x-amz-content-sha256;x-amz-date",
            "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        ),
    }
    sigv4.verify("GET", "/?lifecycle", [("lifecycle", "")], h1, secret_for, now=T0)
    h2 = {
        **base,
        "Authorization": _auth(
            "host;x-amz-content-sha256;x-amz-date",
            "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        ),
    }
    sigv4.verify("GET", "/", [("max-keys", "2"), ("prefix", "J")], h2, secret_for, now=T0)


def test_aws_example_presigned() -> None:
    url = (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    headers = {"Host": "examplebucket.s3.amazonaws.com"}
    r = sigv4.verify("GET", parts.path, query, headers, secret_for, now=T0 + timedelta(hours=1))
    assert r.presigned and r.payload_mode == sigv4.UNSIGNED_PAYLOAD
    with pytest.raises(S3Error) as ei:
        sigv4.verify("GET", parts.path, query, headers, secret_for, now=T0 + timedelta(days=2))
    assert ei.value.code == "AccessDenied" and ei.value.message == "Request has expired"
    # our own presigner produces exactly the documented URL
    assert sigv4.presign_url(
        "GET", "https://examplebucket.s3.amazonaws.com/test.txt", AK, SK, "us-east-1", 86400, now=T0
    ).endswith("X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404")


def chunked_example_headers() -> dict[str, str]:
    return {
        "Host": "s3.amazonaws.com",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": sigv4.STREAMING_SIGNED,
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560",
        "Content-Length": "66824",
        "Authorization": _auth(
            "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
            "x-amz-decoded-content-length;x-amz-storage-class",
            "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
        ),
    }


def test_aws_example_chunked_seed() -> None:
    r = sigv4.verify(
        "PUT", "/examplebucket/chunkObject.txt", [], chunked_example_headers(), secret_for, now=T0
    )
    assert r.seed_signature == "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
    assert r.is_streaming and r.is_signed_streaming and not r.has_trailer
    assert r.payload_sha256 is None


# ------------------------------------------------------------------ botocore cross-checks

KEYS = [
    "plain.txt",
    "dir/sub dir/file with spaces.bin",
    "weird+chars=&?#!'()*,;:@$~_.-",
    "unicodé/ключ/日本語",
    "a//double//slash",
    "trailing/",
    "percent%20literal",
]


def _botocore_sign(
    method: str, url: str, headers: dict[str, str], body: bytes, now: datetime
) -> AWSRequest:
    req = AWSRequest(method=method, url=url, headers=headers, data=body)
    req.context["timestamp"] = now.strftime("%Y%m%dT%H%M%SZ")
    signer = S3SigV4Auth(Credentials(AK, SK), "s3", "eu-west-3")
    # botocore reads the clock itself; freeze it through the request timestamp
    import botocore.auth as ba

    orig = ba.datetime.datetime
    try:

        class _Frozen(orig):  # type: ignore[misc, valid-type]
            @classmethod
            def utcnow(cls) -> datetime:
                return now.replace(tzinfo=None)

            @classmethod
            def now(cls, tz: object = None) -> datetime:  # type: ignore[override]
                return now if tz else now.replace(tzinfo=None)

        ba.datetime.datetime = _Frozen  # type: ignore[misc]
        signer.add_auth(req)
    finally:
        ba.datetime.datetime = orig  # type: ignore[misc]
    return req


@pytest.mark.parametrize("key", KEYS)
def test_botocore_header_signing_verifies(key: str) -> None:
    now = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    path = "/bucket/" + sigv4.uri_encode(key, encode_slash=False)
    url = "http://localhost:9000" + path + "?tagging=&x-id=Put%20x"
    body = b"hello world"
    req = _botocore_sign("PUT", url, {"Content-Type": "text/plain"}, body, now)
    prepared = req.prepare()
    parts = urlsplit(prepared.url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    headers = CIMultiDict({**dict(prepared.headers.items()), "Host": "localhost:9000"})
    r = sigv4.verify("PUT", parts.path, query, headers, secret_for, region="eu-west-3", now=now)
    assert r.payload_sha256 == hashlib.sha256(body).hexdigest()
    assert r.region == "eu-west-3"
    # tampering with the path breaks it
    with pytest.raises(S3Error) as ei:
        sigv4.verify("PUT", parts.path + "x", query, headers, secret_for, now=now)
    assert ei.value.code == "SignatureDoesNotMatch"
    assert "StringToSign" in ei.value.extra and "CanonicalRequest" in ei.value.extra


@pytest.mark.parametrize("key", KEYS)
def test_boto3_presigned_urls_verify(key: str) -> None:
    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9000",
        aws_access_key_id=AK,
        aws_secret_access_key=SK,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": key}, ExpiresIn=600
    )
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    r = sigv4.verify("GET", parts.path, query, {"host": "127.0.0.1:9000"}, secret_for)
    assert r.presigned and r.payload_mode == sigv4.UNSIGNED_PAYLOAD
    with pytest.raises(S3Error) as ei:
        sigv4.verify("HEAD", parts.path, query, {"host": "127.0.0.1:9000"}, secret_for)
    assert ei.value.code == "SignatureDoesNotMatch"
    later = datetime.now(UTC) + timedelta(seconds=700)
    with pytest.raises(S3Error) as ei:
        sigv4.verify("GET", parts.path, query, {"host": "127.0.0.1:9000"}, secret_for, now=later)
    assert ei.value.code == "AccessDenied"


def test_sign_request_matches_botocore() -> None:
    now = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
    url = "http://localhost:9000/bucket/some%20key?uploads="
    body_hash = hashlib.sha256(b"").hexdigest()
    ours = sigv4.sign_request(
        "POST", url, {"Content-Type": "application/xml"}, body_hash, AK, SK, "eu-west-3", now=now
    )
    theirs = _botocore_sign("POST", url, {"Content-Type": "application/xml"}, b"", now)
    assert ours["Authorization"] == theirs.headers["Authorization"]
    assert ours["host"] == "localhost:9000"


def test_sign_request_roundtrip_unicode_query() -> None:
    now = datetime.now(UTC)
    url = "https://h.example/b?list-type=2&prefix=%C3%A9t%C3%A9%2F&delimiter=%2F&start-after="
    hdrs = sigv4.sign_request("GET", url, {}, sigv4.UNSIGNED_PAYLOAD, AK, SK, "us-east-1")
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    r = sigv4.verify("GET", parts.path, query, hdrs, secret_for, now=now)
    assert r.payload_mode == sigv4.UNSIGNED_PAYLOAD


def test_presign_url_roundtrip_with_signed_header() -> None:
    url = sigv4.presign_url(
        "PUT",
        "http://h:81/b/k%2Bplus",
        AK,
        SK,
        "us-east-1",
        60,
        headers={"Content-Type": "text/plain"},
    )
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    sigv4.verify(
        "PUT", parts.path, query, {"host": "h:81", "content-type": "text/plain"}, secret_for
    )
    with pytest.raises(S3Error):
        sigv4.verify("PUT", parts.path, query, {"host": "h:81", "content-type": "x/y"}, secret_for)


def test_unencoded_path_variant_accepted() -> None:
    # signer encoded '!' ('%21') but the client sent it raw (or vice versa)
    now = datetime.now(UTC)
    hdrs = sigv4.sign_request("GET", "http://h/b/a%21b", {}, sigv4.UNSIGNED_PAYLOAD, AK, SK, "r")
    sigv4.verify("GET", "/b/a!b", [], hdrs, secret_for, now=now)


def test_repeated_headers_joined() -> None:
    now = datetime.now(UTC)
    url = "http://h/b/k"
    hdrs = sigv4.sign_request(
        "GET", url, {"x-amz-meta-a": "1,2"}, sigv4.UNSIGNED_PAYLOAD, AK, SK, "r", now=now
    )
    md: CIMultiDict[str] = CIMultiDict(hdrs)
    md.add("X-Amz-Meta-A", "1")
    md.add("x-amz-meta-a", " 2 ")
    sigv4.verify("GET", "/b/k", [], md, secret_for, now=now)


# ------------------------------------------------------------------ error paths


def _signed(now: datetime, **extra: str) -> dict[str, str]:
    return {
        "host": "h",
        **sigv4.sign_request(
            "GET", "http://h/b/k", dict(extra), sigv4.UNSIGNED_PAYLOAD, AK, SK, "us-east-1", now=now
        ),
    }


def test_errors() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    good = _signed(now)
    sigv4.verify("GET", "/b/k", [], good, secret_for, now=now)

    def code(headers: dict[str, str], **kw: object) -> str:
        with pytest.raises(S3Error) as ei:
            sigv4.verify("GET", "/b/k", [], headers, secret_for, **kw)  # type: ignore[arg-type]
        return ei.value.code

    assert code(good, now=now + timedelta(minutes=16)) == "RequestTimeTooSkewed"
    assert code(good, now=now - timedelta(minutes=16)) == "RequestTimeTooSkewed"
    assert code(good, now=now, region="eu-west-1") == "AuthorizationHeaderMalformed"
    bad_key = {**good, "Authorization": good["Authorization"].replace(AK, "NOPE")}
    assert code(bad_key, now=now) == "InvalidAccessKeyId"
    assert code({**good, "Authorization": "AWS4-HMAC-SHA256 garbage"}, now=now) == (
        "AuthorizationHeaderMalformed"
    )
    assert code({**good, "Authorization": "AWS AKID:sig"}, now=now) == "InvalidRequest"
    no_sha = {k: v for k, v in good.items() if k != "x-amz-content-sha256"}
    assert code(no_sha, now=now) == "InvalidRequest"
    assert code({**good, "x-amz-content-sha256": "nope"}, now=now) == "InvalidArgument"
    assert code({"host": "h"}, now=now) == "AccessDenied"
    svc = {**good, "Authorization": good["Authorization"].replace("/s3/", "/ec2/")}
    assert code(svc, now=now) == "AuthorizationHeaderMalformed"
    wrong_date = {**good, "Authorization": good["Authorization"].replace("20240101", "20240102")}
    assert code(wrong_date, now=now) == "AuthorizationHeaderMalformed"
    e = S3Error("SignatureDoesNotMatch")
    assert e.status == 403


def test_presign_limits() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    url = sigv4.presign_url("GET", "http://h/b/k", AK, SK, "us-east-1", 604800, now=now)
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    sigv4.verify("GET", "/b/k", query, {"host": "h"}, secret_for, now=now + timedelta(days=6))
    too_long = [(k, "604801" if k == "X-Amz-Expires" else v) for k, v in query]
    with pytest.raises(S3Error) as ei:
        sigv4.verify("GET", "/b/k", too_long, {"host": "h"}, secret_for, now=now)
    assert ei.value.code == "AuthorizationQueryParametersError"
    missing = [(k, v) for k, v in query if k != "X-Amz-Date"]
    with pytest.raises(S3Error) as ei:
        sigv4.verify("GET", "/b/k", missing, {"host": "h"}, secret_for, now=now)
    assert ei.value.code == "AuthorizationQueryParametersError"
    with pytest.raises(S3Error) as ei:
        sigv4.verify("GET", "/b/k", query, {"host": "h"}, secret_for, now=now - timedelta(hours=1))
    assert ei.value.code == "AccessDenied"
    with pytest.raises(ValueError):
        sigv4.presign_url("GET", "http://h/b/k", AK, SK, "us-east-1", 604801)


def test_check_payload_sha256_and_double_auth() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    body = b"abc"
    digest = hashlib.sha256(body).hexdigest()
    hdrs = {
        "host": "h",
        **sigv4.sign_request("PUT", "http://h/b/k", {}, digest, AK, SK, "r", now=now),
    }
    r = sigv4.verify("PUT", "/b/k", [], hdrs, secret_for, now=now)
    sigv4.check_payload_sha256(r, digest)
    with pytest.raises(S3Error) as ei:
        sigv4.check_payload_sha256(r, hashlib.sha256(b"abd").hexdigest())
    assert ei.value.code == "XAmzContentSHA256Mismatch"
    with pytest.raises(S3Error) as ei:
        sigv4.verify(
            "PUT", "/b/k", [("X-Amz-Algorithm", "AWS4-HMAC-SHA256")], hdrs, secret_for, now=now
        )
    assert ei.value.code == "InvalidArgument"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=80, deadline=None)
@given(key=_text, query=st.lists(st.tuples(_text, st.text(max_size=10)), max_size=4))
def test_sign_verify_roundtrip_arbitrary(key: str, query: list[tuple[str, str]]) -> None:
    from urllib.parse import urlencode

    now = datetime(2024, 1, 1, tzinfo=UTC)
    path = "/bkt/" + sigv4.uri_encode(key, encode_slash=False)
    qs = urlencode(query, quote_via=lambda s, *a: sigv4.uri_encode(s))  # type: ignore[arg-type]
    url = "http://h" + path + ("?" + qs if qs else "")
    hdrs = sigv4.sign_request("GET", url, {}, sigv4.UNSIGNED_PAYLOAD, AK, SK, "r", now=now)
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    assert sorted(pairs) == sorted(query)
    sigv4.verify("GET", parts.path, pairs, hdrs, secret_for, now=now)
    presigned = urlsplit(sigv4.presign_url("GET", url, AK, SK, "r", now=now))
    sigv4.verify(
        "GET",
        presigned.path,
        parse_qsl(presigned.query, keep_blank_values=True),
        {"host": "h"},
        secret_for,
        now=now,
    )
