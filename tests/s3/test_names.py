"""Bucket/key validation, Range parsing, conditional requests, dates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohort.s3 import names
from cohort.s3.errors import S3Error


@pytest.mark.parametrize(
    "name", ["abc", "my-bucket.v2", "a" * 63, "0bucket9", "docexamplebucket1", "a.b.c"]
)
def test_valid_bucket_names(name: str) -> None:
    names.validate_bucket_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "a" * 64,
        "MyBucket",
        "bucket_",
        "-bucket",
        "bucket-",
        ".bucket",
        "bucket.",
        "my..bucket",
        "192.168.5.4",
        "xn--bucket",
        "bucket-s3alias",
        "bu cket",
        "buck/et",
        "my.-bucket",
        "sthree-x",
        "b--ol-s3",
        "010.001.001.001",
        "über",
    ],
)
def test_invalid_bucket_names(name: str) -> None:
    with pytest.raises(S3Error) as ei:
        names.validate_bucket_name(name)
    assert ei.value.code == "InvalidBucketName" and ei.value.status == 400


def test_keys() -> None:
    names.validate_key("a" * 1024)
    names.validate_key("é" * 512)
    for bad, code in [
        ("a" * 1025, "KeyTooLongError"),
        ("é" * 513, "KeyTooLongError"),
        ("", "InvalidArgument"),
        ("\udc80", "InvalidArgument"),
    ]:
        with pytest.raises(S3Error) as ei:
            names.validate_key(bad)
        assert ei.value.code == code


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-9", 10, (0, 9)),
        ("bytes=0-0", 10, (0, 0)),
        ("bytes=2-100", 10, (2, 9)),
        ("bytes=5-", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=9-9", 10, (9, 9)),
        ("bytes=5-2", 10, None),  # invalid -> whole object
        ("bytes=a-b", 10, None),
        ("items=0-1", 10, None),
        ("bytes=0-1,3-4", 10, None),
        ("bytes=-", 10, None),
        ("bytes = 1 - 2", 10, (1, 2)),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert names.parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-5", 0)],
)
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(S3Error) as ei:
        names.parse_range(header, size)
    assert ei.value.code == "InvalidRange" and ei.value.status == 416
    assert ei.value.headers["Content-Range"] == f"bytes */{size}"


@given(size=st.integers(0, 10_000), a=st.integers(0, 20_000), b=st.integers(0, 20_000))
def test_range_properties(size: int, a: int, b: int) -> None:
    for header in (f"bytes={a}-{b}", f"bytes={a}-", f"bytes=-{b}"):
        try:
            r = names.parse_range(header, size)
        except S3Error:
            continue
        if r is not None:
            start, end = r
            assert 0 <= start <= end < size


LM = datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
ETAG = '"abc123"'


def _ev(method: str = "GET", **h: str) -> int | None:
    headers = {k.replace("_", "-"): v for k, v in h.items()}
    return names.evaluate_conditions(headers, ETAG, LM, method=method)


def test_conditions() -> None:
    before = names.format_http_date(LM - timedelta(hours=1))
    same = names.format_http_date(LM)
    after = names.format_http_date(LM + timedelta(hours=1))
    assert _ev() is None
    assert _ev(If_Match='"abc123"') is None
    assert _ev(If_Match="abc123") is None
    assert _ev(If_Match='"x", "abc123"') is None
    assert _ev(If_Match="*") is None
    assert _ev(If_Match='"nope"') == 412
    assert _ev(If_None_Match='"abc123"') == 304
    assert _ev("HEAD", If_None_Match="*") == 304
    assert _ev("PUT", If_None_Match="*") == 412
    assert _ev(If_None_Match='"nope"') is None
    assert _ev(If_Modified_Since=same) == 304  # sub-second mtime truncated
    assert _ev(If_Modified_Since=after) == 304
    assert _ev(If_Modified_Since=before) is None
    assert _ev("PUT", If_Modified_Since=after) is None
    assert _ev(If_Unmodified_Since=before) == 412
    assert _ev(If_Unmodified_Since=same) is None
    assert _ev(If_Modified_Since="garbage") is None
    # S3-documented combinations
    assert _ev(If_Match=ETAG, If_Unmodified_Since=before) is None
    assert _ev(If_None_Match=ETAG, If_Modified_Since=before) == 304
    assert _ev(If_None_Match='"other"', If_Modified_Since=after) is None
    assert _ev(If_Match='"nope"', If_None_Match=ETAG) == 412
    # missing object: conditional write semantics
    assert names.evaluate_conditions({"If-None-Match": "*"}, None, None, method="PUT") is None
    assert names.evaluate_conditions({"If-Match": "*"}, None, None, method="PUT") == 412


def test_check_conditions_raises() -> None:
    with pytest.raises(S3Error) as ei:
        names.check_conditions({"if-none-match": ETAG}, "abc123", LM)
    assert ei.value.code == "NotModified" and ei.value.status == 304
    assert ei.value.headers["ETag"] == ETAG
    with pytest.raises(S3Error) as ei:
        names.check_conditions({"if-match": '"x"'}, "abc123", LM)
    assert ei.value.code == "PreconditionFailed" and ei.value.extra["Condition"] == "If-Match"
    names.check_conditions({}, "abc123", LM)


def test_dates() -> None:
    dt = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
    assert names.format_http_date(dt) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert names.format_http_date(dt.timestamp()) == "Sun, 06 Nov 1994 08:49:37 GMT"
    for s in (
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ):
        assert names.parse_http_date(s) == dt, s
    assert names.parse_http_date("nonsense") is None
    assert names.parse_http_date(None) is None
    assert names.format_iso8601(datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == (
        "2024-01-02T03:04:05.678Z"
    )
    assert names.format_iso8601(0) == "1970-01-01T00:00:00.000Z"
    assert names.quote_etag("abc") == '"abc"' and names.quote_etag('"abc"') == '"abc"'


def test_int_params_and_part_number() -> None:
    assert names.parse_int_param(None, "max-keys", default=1000, maximum=1000) == 1000
    assert names.parse_int_param("5000", "max-keys", default=1000, maximum=1000) == 1000
    assert names.parse_int_param("0", "max-keys", default=1000, maximum=1000) == 0
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(S3Error) as ei:
            names.parse_int_param(bad, "max-keys", default=1000, maximum=1000)
        assert ei.value.code == "InvalidArgument"
    assert names.parse_part_number("10000") == 10000
    for bad_p in ("0", "10001", "abc", None):
        with pytest.raises(S3Error):
            names.parse_part_number(bad_p)


def test_copy_source() -> None:
    assert names.parse_copy_source("/bkt/dir/a%20b") == ("bkt", "dir/a b", None)
    assert names.parse_copy_source("bkt/k%3Fx?versionId=v1") == ("bkt", "k?x", "v1")
    for bad in ("bkt", "/bkt/", "/"):
        with pytest.raises(S3Error) as ei:
            names.parse_copy_source(bad)
        assert ei.value.code == "InvalidArgument"
    assert names.parse_copy_source_range("bytes=0-9", 10) == (0, 9)
    with pytest.raises(S3Error) as ei:
        names.parse_copy_source_range("bytes=0-10", 10)
    assert ei.value.code == "InvalidRange"
    for bad in ("bytes=5-", "bytes=-5", "bytes=5-1", "0-1"):
        with pytest.raises(S3Error) as ei:
            names.parse_copy_source_range(bad, 10)
        assert ei.value.code == "InvalidArgument"


def test_user_metadata() -> None:
    meta = names.extract_user_metadata(
        {"X-Amz-Meta-Color": "red", "Content-Type": "x", "x-amz-meta-n": "ü"}
    )
    assert meta == {"x-amz-meta-color": "red", "x-amz-meta-n": "ü"}
    with pytest.raises(S3Error) as ei:
        names.extract_user_metadata({"x-amz-meta-big": "x" * 2046})
    assert ei.value.code == "MetadataTooLarge"
    names.extract_user_metadata({"x-amz-meta-big": "x" * 2045})


def test_bucket_from_host() -> None:
    bases = ["s3.example.com", "localhost"]
    assert names.bucket_from_host("bkt.s3.example.com", bases) == "bkt"
    assert names.bucket_from_host("my.dotted.bkt.s3.example.com:9000", bases) == "my.dotted.bkt"
    assert names.bucket_from_host("s3.example.com", bases) is None
    assert names.bucket_from_host("bkt.localhost:8080", bases) == "bkt"
    assert names.bucket_from_host("127.0.0.1:9000", bases) is None
    assert names.bucket_from_host("[::1]:9000", bases) is None
    assert names.bucket_from_host(None, bases) is None


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_format_iso8601_float_matches_datetime(ts: float) -> None:
    """The float path (a per-second cache, for listings) agrees with the datetime path."""
    secs = int(ts)
    ms = min(999, int((ts - secs) * 1000))
    dt = datetime.fromtimestamp(secs, UTC).replace(microsecond=ms * 1000)
    assert names.format_iso8601(ts) == names.format_iso8601(dt)
    assert names.format_iso8601(ts) == names.format_iso8601(ts)  # cached: same answer


def test_user_metadata_counts_utf8_bytes_and_survives_non_utf8() -> None:
    # 700 x "é" is 1400 bytes in UTF-8; with 700 more and the name, over 2 KB
    with pytest.raises(S3Error) as ei:
        names.extract_user_metadata({"x-amz-meta-k": "é" * 700 + "a" * 700})
    assert ei.value.code == "MetadataTooLarge" and ei.value.status == 400
    # header text with surrogate escapes (bytes that were not UTF-8) is counted, not a crash
    assert names.extract_user_metadata({"x-amz-meta-k": "a\udcff"}) == {"x-amz-meta-k": "a\udcff"}


def test_decode_path_is_strict_utf8() -> None:
    assert names.decode_path("/b/plain-key") == "/b/plain-key"
    assert names.decode_path("/b/a%20b/%C3%BC%E2%82%AC") == "/b/a b/ü€"
    assert names.decode_path("/b/100%") == "/b/100%"  # not an escape: kept
    assert names.decode_path("/b/ü") == "/b/ü"  # raw UTF-8 (aiohttp gives text)
    for raw in ("/b/u%ff", "/b/u%FE", "/b/%C3", "/b/%80", "/b/%ED%A0%80", "/b/u\udcff"):
        with pytest.raises(S3Error) as ei:
            names.decode_path(raw)
        assert ei.value.code == "InvalidURI" and ei.value.status == 400, raw
    with pytest.raises(S3Error) as ei:
        names.parse_copy_source("/bkt/u%FF")
    assert ei.value.code == "InvalidURI"


def test_check_new_key() -> None:
    for ok in ("a", "tab\there", "ctl\x01\x1f\x7f", "ü€😀", "sp ace"):
        names.check_new_key(ok)
    for bad in ("a\rb", "a\nb", "a\r\nb", "nul\x00"):
        with pytest.raises(S3Error) as ei:
            names.check_new_key(bad)
        assert ei.value.code == "InvalidArgument"


def test_check_upload_size() -> None:
    limit = names.MAX_SINGLE_PUT
    assert limit == 5 * 1024**3
    names.check_upload_size({"Content-Length": str(limit)}, streaming=False)
    names.check_upload_size({}, streaming=False)
    names.check_upload_size({"Content-Length": "junk"}, streaming=False)
    for headers, streaming in (
        ({"Content-Length": str(limit + 1)}, False),
        ({"Content-Length": "10", "x-amz-decoded-content-length": str(limit + 1)}, False),
        ({"Content-Length": "10", "x-amz-decoded-content-length": str(limit + 1)}, True),
    ):
        with pytest.raises(S3Error) as ei:
            names.check_upload_size(headers, streaming=streaming)
        assert ei.value.code == "EntityTooLarge" and ei.value.status == 400
        assert ei.value.extra["MaxSizeAllowed"] == str(limit)
    # aws-chunked: Content-Length also counts chunk signatures; the decoded length rules
    names.check_upload_size(
        {"Content-Length": str(limit + 100000), "x-amz-decoded-content-length": str(limit)},
        streaming=True,
    )
