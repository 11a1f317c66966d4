"""S3Error defaults and XML rendering."""

from __future__ import annotations

from defusedxml import ElementTree

from cohort.s3.errors import ERROR_TABLE, S3Error

REQUIRED = [
    "AccessDenied",
    "AuthorizationHeaderMalformed",
    "BadDigest",
    "BucketAlreadyExists",
    "BucketAlreadyOwnedByYou",
    "BucketNotEmpty",
    "EntityTooLarge",
    "EntityTooSmall",
    "IncompleteBody",
    "InternalError",
    "InvalidArgument",
    "InvalidBucketName",
    "InvalidDigest",
    "InvalidPart",
    "InvalidPartOrder",
    "InvalidRange",
    "InvalidRequest",
    "InvalidAccessKeyId",
    "KeyTooLongError",
    "MalformedXML",
    "MethodNotAllowed",
    "MissingContentLength",
    "NoSuchBucket",
    "NoSuchKey",
    "NoSuchUpload",
    "NotImplemented",
    "PreconditionFailed",
    "RequestTimeTooSkewed",
    "SignatureDoesNotMatch",
    "ServiceUnavailable",
    "SlowDown",
    "XAmzContentSHA256Mismatch",
    "ExpiredToken",
    "NotModified",
]


def test_table_complete() -> None:
    for code in REQUIRED:
        assert code in ERROR_TABLE, code
    assert ERROR_TABLE["NoSuchKey"][0] == 404
    assert ERROR_TABLE["InvalidRange"][0] == 416
    assert ERROR_TABLE["NotModified"][0] == 304
    assert ERROR_TABLE["PreconditionFailed"][0] == 412


def test_defaults_and_overrides() -> None:
    e = S3Error("NoSuchBucket")
    assert (e.code, e.status) == ("NoSuchBucket", 404)
    assert e.message == "The specified bucket does not exist"
    e = S3Error("SlowDown", "busy", status=429)
    assert (e.message, e.status) == ("busy", 429)
    e = S3Error("WeirdUnknown")
    assert e.status == 500 and e.message == "WeirdUnknown"


def test_to_xml_escapes_and_parses() -> None:
    e = S3Error(
        "SignatureDoesNotMatch",
        resource="/bucket/a&b<c>\x01",
        extra={"StringToSign": "AWS4-HMAC-SHA256\n2013<>", "AWSAccessKeyId": "AK"},
    )
    doc = e.to_xml("req-1")
    assert doc.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    root = ElementTree.fromstring(doc)
    assert root.tag == "Error"
    assert root.findtext("Code") == "SignatureDoesNotMatch"
    assert root.findtext("Resource") == "/bucket/a&b<c>\ufffd"
    assert root.findtext("StringToSign") == "AWS4-HMAC-SHA256\n2013<>"
    assert root.findtext("RequestId") == "req-1"
    assert [c.tag for c in root][:2] == ["Code", "Message"]
