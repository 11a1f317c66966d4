"""Checksum vectors and request-checksum negotiation."""

from __future__ import annotations

import base64
import hashlib

import pytest
from botocore.httpchecksum import Crc32Checksum, Sha1Checksum, Sha256Checksum

from cohort.s3 import checksums
from cohort.s3.checksums import ChecksumSet, new_hasher, parse_checksum_headers
from cohort.s3.errors import S3Error

CHECK = b"123456789"


@pytest.mark.parametrize(
    ("alg", "expected"),
    [
        ("CRC32", "cbf43926"),
        ("CRC32C", "e3069283"),
        ("CRC64NVME", "ae8b14860a799888"),
        ("SHA1", hashlib.sha1(CHECK).hexdigest()),
        ("SHA256", hashlib.sha256(CHECK).hexdigest()),
        ("MD5", hashlib.md5(CHECK).hexdigest()),
    ],
)
def test_vectors_incremental(alg: str, expected: str) -> None:
    h = new_hasher(alg)
    h.update(b"1234")
    c = h.copy()
    h.update(memoryview(b"56789"))
    assert h.digest().hex() == expected
    assert h.b64digest() == base64.b64encode(bytes.fromhex(expected)).decode()
    c.update(b"5678")
    assert c.digest().hex() != expected


def test_crc64nvme_pure_python_matches() -> None:
    data = bytes(range(256)) * 40
    assert checksums._crc64nvme_py(CHECK) == 0xAE8B14860A799888
    assert checksums._crc64nvme_py(data) == checksums.crc64nvme(data)
    assert checksums._crc64nvme_py(data[100:], checksums._crc64nvme_py(data[:100])) == (
        checksums.crc64nvme(data)
    )
    # AWS SDK test vectors (all-zero and all-0xff 32-byte inputs)
    assert checksums._crc64nvme_py(b"\x00" * 32) == 0xCF3473434D4ECF3B
    assert checksums._crc64nvme_py(b"\xff" * 32) == 0xA0A06974C34D63C4


def test_matches_botocore() -> None:
    data = b"hello world" * 1000
    for alg, cls in (("CRC32", Crc32Checksum), ("SHA1", Sha1Checksum), ("SHA256", Sha256Checksum)):
        ours = new_hasher(alg)
        ours.update(data)
        theirs = cls()
        theirs.update(data)
        assert ours.b64digest() == theirs.b64digest()


def _b64(alg: str, data: bytes) -> str:
    h = new_hasher(alg)
    h.update(data)
    return h.b64digest()


def test_negotiation_header_checksum() -> None:
    body = b"payload"
    req = parse_checksum_headers(
        {
            "Content-MD5": _b64("MD5", body),
            "x-amz-checksum-crc32c": _b64("CRC32C", body),
            "x-amz-sdk-checksum-algorithm": "crc32c",
        }
    )
    assert req.algorithm == "CRC32C"
    assert req.algorithms() == ["MD5", "CRC32C"]
    s = req.new_set()
    s.update(body)
    assert req.verify(s) == {"CRC32C": _b64("CRC32C", body)}
    s2 = req.new_set()
    s2.update(b"other")
    with pytest.raises(S3Error) as ei:
        req.verify(s2)
    assert ei.value.code == "BadDigest"


def test_negotiation_trailer() -> None:
    body = b"abc" * 100
    req = parse_checksum_headers(
        {"X-Amz-Trailer": "x-amz-checksum-crc64nvme", "x-amz-sdk-checksum-algorithm": "CRC64NVME"}
    )
    assert req.trailer == "CRC64NVME" and req.algorithm == "CRC64NVME"
    s = req.new_set(include_md5=False)
    s.update(body)
    good = {"x-amz-checksum-crc64nvme": _b64("CRC64NVME", body)}
    assert req.verify(s, good) == {"CRC64NVME": good["x-amz-checksum-crc64nvme"]}
    with pytest.raises(S3Error) as ei:
        req.verify(s, {})
    assert ei.value.code == "InvalidRequest"
    with pytest.raises(S3Error) as ei:
        req.verify(s, {"x-amz-checksum-crc64nvme": _b64("CRC64NVME", b"x")})
    assert ei.value.code == "BadDigest"


def test_negotiation_no_checksum_computes_nothing_extra() -> None:
    req = parse_checksum_headers({})
    assert req.algorithm is None and req.algorithms() == ["MD5"]
    s = req.new_set()
    s.update(b"x")
    assert req.verify(s) == {}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Content-MD5": "notbase64!"}, "InvalidDigest"),
        ({"Content-MD5": base64.b64encode(b"short").decode()}, "InvalidDigest"),
        ({"x-amz-checksum-crc32": "AAAA"}, "InvalidRequest"),
        (
            {"x-amz-checksum-crc32": "AAAAAA==", "x-amz-checksum-sha1": _b64("SHA1", b"")},
            "InvalidRequest",
        ),
        ({"x-amz-sdk-checksum-algorithm": "CRC32"}, "InvalidRequest"),
        (
            {"x-amz-sdk-checksum-algorithm": "MD4", "x-amz-checksum-crc32": "AAAAAA=="},
            "InvalidRequest",
        ),
        (
            {"x-amz-sdk-checksum-algorithm": "SHA1", "x-amz-checksum-crc32": "AAAAAA=="},
            "InvalidRequest",
        ),
        ({"x-amz-trailer": "x-amz-meta-foo"}, "InvalidRequest"),
        ({"x-amz-checksum-type": "weird"}, "InvalidRequest"),
    ],
)
def test_negotiation_errors(headers: dict[str, str], code: str) -> None:
    with pytest.raises(S3Error) as ei:
        parse_checksum_headers(headers)
    assert ei.value.code == code
    if "x-amz-checksum-crc32" in headers and len(headers) == 1:
        assert ei.value.message == "Value for x-amz-checksum-crc32 header is invalid."


def test_md5_mismatch_is_bad_digest() -> None:
    req = parse_checksum_headers({"content-md5": _b64("MD5", b"a")})
    s = ChecksumSet(req.algorithms())
    s.update(b"b")
    with pytest.raises(S3Error) as ei:
        req.verify(s)
    assert ei.value.code == "BadDigest" and ei.value.status == 400


def test_multipart_etag_and_composite() -> None:
    parts = [b"a" * 10, b"b" * 20]
    md5s = [hashlib.md5(p).digest() for p in parts]
    expected = hashlib.md5(b"".join(md5s)).hexdigest() + "-2"
    assert checksums.multipart_etag(md5s) == expected
    crcs = [_b64("CRC32", p) for p in parts]
    raw = b"".join(base64.b64decode(c) for c in crcs)
    assert checksums.composite_checksum("CRC32", crcs) == _b64("CRC32", raw) + "-2"


def test_verify_small_body() -> None:
    body = b"<Delete><Object><Key>k</Key></Object></Delete>"
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    crc = Crc32Checksum()
    crc.update(body)
    checksums.verify_small_body({"Content-MD5": md5}, body, required=True)
    checksums.verify_small_body({"x-amz-checksum-crc32": crc.b64digest()}, body, required=True)
    checksums.verify_small_body(
        {"Content-MD5": md5, "x-amz-checksum-crc32": crc.b64digest()}, body, required=True
    )
    checksums.verify_small_body({}, body, required=False)
    other = base64.b64encode(hashlib.md5(b"x").digest()).decode()
    for headers, code in (
        ({}, "InvalidRequest"),
        ({"Content-MD5": other}, "BadDigest"),
        ({"Content-MD5": "bm90IDE2IGJ5dGVz"}, "InvalidDigest"),
        ({"x-amz-checksum-crc32": "AAAAAA=="}, "BadDigest"),
        ({"x-amz-checksum-sha256": base64.b64encode(b"\0" * 32).decode()}, "BadDigest"),
        ({"x-amz-sdk-checksum-algorithm": "CRC32"}, "InvalidRequest"),
        ({"x-amz-trailer": "x-amz-checksum-crc32"}, "InvalidRequest"),  # no value to check
        ({"Content-MD5": md5, "x-amz-checksum-crc32": "AAAAAA=="}, "BadDigest"),
    ):
        with pytest.raises(S3Error) as ei:
            checksums.verify_small_body(headers, body, required=True)
        assert ei.value.code == code, headers
