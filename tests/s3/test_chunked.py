"""aws-chunked decoding: the AWS example, trailers, split-invariance, error paths."""

from __future__ import annotations

import base64
import io
import zlib
from datetime import UTC, datetime

import pytest
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from cohort.s3 import sigv4
from cohort.s3.chunked import AwsChunkedDecoder, encode_aws_chunked
from cohort.s3.errors import S3Error

from .test_sigv4 import AK, SK, T0, chunked_example_headers, secret_for

SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
SIG1 = "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"
SIG2 = "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"
SIG3 = "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"


def example_auth() -> sigv4.AuthResult:
    return sigv4.verify(
        "PUT", "/examplebucket/chunkObject.txt", [], chunked_example_headers(), secret_for, now=T0
    )


def example_body() -> bytes:
    return (
        f"10000;chunk-signature={SIG1}\r\n".encode()
        + b"a" * 65536
        + b"\r\n"
        + f"400;chunk-signature={SIG2}\r\n".encode()
        + b"a" * 1024
        + b"\r\n"
        + f"0;chunk-signature={SIG3}\r\n\r\n".encode()
    )


def decode_all(dec: AwsChunkedDecoder, body: bytes, step: int | None = None) -> bytes:
    out = []
    if step is None:
        out += dec.feed(body)
    else:
        for i in range(0, len(body), step):
            out += dec.feed(body[i : i + step])
    return b"".join(out)


def test_aws_chunked_example() -> None:
    auth = example_auth()
    body = example_body()
    assert len(body) == 66824
    dec = AwsChunkedDecoder(auth, auth.payload_mode, decoded_length=66560)
    assert decode_all(dec, body, 1000) == b"a" * 66560
    assert dec.finish() == {}
    assert dec.done
    # our encoder reproduces the documented body byte for byte
    enc = b"".join(encode_aws_chunked([b"a" * 65536, b"a" * 1024], auth))
    assert enc == body


def test_aws_chunked_example_tampered() -> None:
    auth = example_auth()
    body = bytearray(example_body())
    body[200] = ord("b")
    dec = AwsChunkedDecoder(auth, auth.payload_mode)
    with pytest.raises(S3Error) as ei:
        decode_all(dec, bytes(body))
    assert ei.value.code == "SignatureDoesNotMatch"
    # chunks cannot be reordered/dropped either: the chain breaks
    body2 = example_body().replace(
        f"10000;chunk-signature={SIG1}\r\n".encode() + b"a" * 65536 + b"\r\n", b""
    )
    with pytest.raises(S3Error):
        decode_all(AwsChunkedDecoder(auth, auth.payload_mode), body2)


def test_truncated_and_length_mismatch() -> None:
    auth = example_auth()
    body = example_body()
    dec = AwsChunkedDecoder(auth, auth.payload_mode)
    decode_all(dec, body[:-2])  # only the final CRLF missing: tolerated
    assert dec.finish() == {}
    for cut in (3, 90, 1000, 66000):
        dec = AwsChunkedDecoder(auth, auth.payload_mode)
        decode_all(dec, body[:-cut])
        with pytest.raises(S3Error) as ei:
            dec.finish()
        assert ei.value.code == "IncompleteBody"
    dec = AwsChunkedDecoder(auth, auth.payload_mode, decoded_length=70000)
    decode_all(dec, body)
    with pytest.raises(S3Error) as ei:
        dec.finish()
    assert ei.value.code == "IncompleteBody"
    dec = AwsChunkedDecoder(auth, auth.payload_mode, decoded_length=100)
    with pytest.raises(S3Error) as ei:
        decode_all(dec, body)
    assert ei.value.code == "InvalidRequest"
    dec = AwsChunkedDecoder(auth, auth.payload_mode)
    with pytest.raises(S3Error) as ei:
        decode_all(dec, body + b"x")
    assert ei.value.code == "InvalidArgument"


@pytest.mark.parametrize(
    "bad",
    [
        b"zz\r\nab\r\n0\r\n\r\n",  # bad hex
        b"2\r\nabX\n0\r\n\r\n",  # no CRLF after data
        b"2\nab\r\n0\r\n\r\n",  # bare LF header
        b"1" * 5000,  # header line too long
        b"0\r\nno-colon\r\n\r\n",
    ],
)
def test_malformed_unsigned(bad: bytes) -> None:
    dec = AwsChunkedDecoder(None, sigv4.STREAMING_UNSIGNED_TRAILER)
    with pytest.raises(S3Error) as ei:
        decode_all(dec, bad)
        dec.finish()
    assert ei.value.code == "InvalidArgument"


def test_signed_mode_requires_signature() -> None:
    auth = example_auth()
    with pytest.raises(S3Error):
        decode_all(AwsChunkedDecoder(auth, sigv4.STREAMING_SIGNED), b"1\r\na\r\n0\r\n\r\n")
    with pytest.raises(ValueError):
        AwsChunkedDecoder(None, sigv4.STREAMING_SIGNED)
    with pytest.raises(ValueError):
        AwsChunkedDecoder(None, sigv4.UNSIGNED_PAYLOAD)


def _trailer_auth() -> sigv4.AuthResult:
    now = datetime(2024, 5, 1, tzinfo=UTC)
    hdrs = sigv4.sign_request(
        "PUT",
        "http://h/b/k",
        {"x-amz-trailer": "x-amz-checksum-crc32"},
        sigv4.STREAMING_SIGNED_TRAILER,
        AK,
        SK,
        "us-east-1",
        now=now,
    )
    hdrs["x-amz-trailer"] = "x-amz-checksum-crc32"
    return sigv4.verify("PUT", "/b/k", [], hdrs, secret_for, now=now)


def _crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_signed_trailer_roundtrip_and_tamper() -> None:
    auth = _trailer_auth()
    assert auth.has_trailer and auth.is_signed_streaming
    payload = [b"x" * 9000, b"y" * 100]
    trailers = {"x-amz-checksum-crc32": _crc32_b64(b"".join(payload))}
    body = b"".join(encode_aws_chunked(payload, auth, trailers))
    dec = AwsChunkedDecoder(auth, auth.payload_mode, decoded_length=9100)
    assert decode_all(dec, body, 7) == b"".join(payload)
    assert dec.finish() == trailers
    # a forged trailer value is caught by the trailer signature
    forged = body.replace(trailers["x-amz-checksum-crc32"].encode(), b"AAAAAA==")
    dec = AwsChunkedDecoder(auth, auth.payload_mode)
    with pytest.raises(S3Error) as ei:
        decode_all(dec, forged)
        dec.finish()
    assert ei.value.code == "SignatureDoesNotMatch"
    # a missing trailer signature too
    stripped = b"".join(encode_aws_chunked(payload, None, trailers))
    dec = AwsChunkedDecoder(auth, auth.payload_mode)
    with pytest.raises(S3Error):
        decode_all(dec, stripped)
        dec.finish()


def test_botocore_unsigned_trailer_body() -> None:
    data = bytes(range(256)) * 5000
    wrapper = AwsChunkedWrapper(
        io.BytesIO(data),
        checksum_cls=Crc32Checksum,
        checksum_name="x-amz-checksum-crc32",
        chunk_size=65536,
    )
    body = wrapper.read()
    dec = AwsChunkedDecoder(None, sigv4.STREAMING_UNSIGNED_TRAILER, decoded_length=len(data))
    assert decode_all(dec, body, 10000) == data
    assert dec.finish() == {"x-amz-checksum-crc32": _crc32_b64(data)}


def test_missing_final_crlf_after_trailers_is_tolerated() -> None:
    body = b"3\r\nabc\r\n0\r\nx-amz-checksum-crc32:" + _crc32_b64(b"abc").encode() + b"\r\n"
    dec = AwsChunkedDecoder(None, sigv4.STREAMING_UNSIGNED_TRAILER)
    assert decode_all(dec, body) == b"abc"
    assert "x-amz-checksum-crc32" in dec.finish()


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=300), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
    signed=st.booleans(),
    with_trailer=st.booleans(),
)
def test_split_invariance(
    chunks: list[bytes], cuts: list[int], signed: bool, with_trailer: bool
) -> None:
    auth = _trailer_auth() if signed and with_trailer else example_auth()
    if signed:
        mode = sigv4.STREAMING_SIGNED_TRAILER if with_trailer else sigv4.STREAMING_SIGNED
    else:
        mode = sigv4.STREAMING_UNSIGNED_TRAILER
    payload = b"".join(chunks)
    trailers = {"x-amz-checksum-crc32": _crc32_b64(payload)} if with_trailer else None
    if not signed and not with_trailer:
        trailers = None
    body = b"".join(encode_aws_chunked(chunks, auth if signed else None, trailers))
    points = sorted({c % (len(body) + 1) for c in cuts})
    dec = AwsChunkedDecoder(auth if signed else None, mode, decoded_length=len(payload))
    out: list[bytes] = []
    prev = 0
    for p in [*points, len(body)]:
        out += dec.feed(body[prev:p])
        prev = p
    assert b"".join(out) == payload
    assert dec.finish() == (trailers or {})


def test_client_streaming_upload_end_to_end() -> None:
    from cohort.s3.chunked import chunk_context_from_signed_headers

    payload = [b"p" * 8192, b"q" * 8192, b"r" * 10]
    data = b"".join(payload)
    req_headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
        "x-amz-trailer": "x-amz-checksum-crc32",
    }
    signed = sigv4.sign_request(
        "PUT", "http://h:9000/b/k", req_headers, sigv4.STREAMING_SIGNED_TRAILER, AK, SK, "us-east-1"
    )
    ctx = chunk_context_from_signed_headers(signed, SK)
    body = b"".join(encode_aws_chunked(payload, ctx, {"x-amz-checksum-crc32": _crc32_b64(data)}))
    auth = sigv4.verify("PUT", "/b/k", [], {**req_headers, **signed}, secret_for)
    assert auth.seed_signature == ctx.seed_signature
    dec = AwsChunkedDecoder(auth, auth.payload_mode, decoded_length=len(data))
    assert decode_all(dec, body, 4096) == data
    assert dec.finish()["x-amz-checksum-crc32"] == _crc32_b64(data)


def test_split_content_encoding() -> None:
    from cohort.s3.chunked import split_content_encoding

    assert split_content_encoding(None) == (False, None)
    assert split_content_encoding("aws-chunked") == (True, None)
    assert split_content_encoding("aws-chunked, gzip") == (True, "gzip")
    assert split_content_encoding("gzip") == (False, "gzip")


def test_long_line_rejected_without_buffering() -> None:
    dec = AwsChunkedDecoder(None, sigv4.STREAMING_UNSIGNED_TRAILER)
    with pytest.raises(S3Error):
        dec.feed(b"a" * 1_000_000)
    dec = AwsChunkedDecoder(None, sigv4.STREAMING_UNSIGNED_TRAILER)
    dec.feed(b"1" * 4000)
    with pytest.raises(S3Error):
        dec.feed(b"1" * 200)
