"""XML parsing safety and rendering, checked with botocore's own response parser."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import botocore.session
import pytest
from botocore.parsers import RestXMLParser

from cohort.s3 import xmlio
from cohort.s3.errors import S3Error

NS = xmlio.S3_NS
T = datetime(2024, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
_MODEL = botocore.session.get_session().get_service_model("s3")


def parse(op: str, body: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    shape = _MODEL.operation_model(op).output_shape
    result: dict[str, Any] = RestXMLParser().parse(
        {"body": body, "headers": headers or {}, "status_code": 200}, shape
    )
    return result


# ------------------------------------------------------------------ parsing


def test_parse_delete() -> None:
    body = (
        f'<Delete xmlns="{NS}"><Object><Key>a&amp;b</Key></Object>'
        "<Object><Key>c</Key><VersionId>v1</VersionId></Object><Quiet>true</Quiet></Delete>"
    ).encode()
    req = xmlio.parse_delete(body)
    assert req.quiet
    assert req.objects == [xmlio.ObjectIdentifier("a&b"), xmlio.ObjectIdentifier("c", "v1")]
    # no namespace is fine too
    assert not xmlio.parse_delete(b"<Delete><Object><Key>k</Key></Object></Delete>").quiet


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<Delete>",
        b"<Delete></Delete>",
        b"<Other><Object><Key>k</Key></Object></Other>",
        b"<Delete><Object></Object></Delete>",
        b"<Delete><Object><Key>k</Key></Object><Quiet>maybe</Quiet></Delete>",
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x "y">]><Delete><Object><Key>&x;</Key>'
        b"</Object></Delete>",
        b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1001 + b"</Delete>",
    ],
)
def test_parse_delete_malformed(body: bytes) -> None:
    with pytest.raises(S3Error) as ei:
        xmlio.parse_delete(body)
    assert ei.value.code == "MalformedXML"


def test_parse_delete_1000_ok() -> None:
    body = b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1000 + b"</Delete>"
    assert len(xmlio.parse_delete(body).objects) == 1000


def test_parse_complete_multipart() -> None:
    body = (
        f'<CompleteMultipartUpload xmlns="{NS}">'
        '<Part><PartNumber>1</PartNumber><ETag>"aaa"</ETag></Part>'
        "<Part><ETag>bbb</ETag><PartNumber>3</PartNumber><ChecksumCRC32>AAAAAA==</ChecksumCRC32>"
        "</Part></CompleteMultipartUpload>"
    ).encode()
    parts = xmlio.parse_complete_multipart(body)
    assert parts == [
        xmlio.CompletedPart(1, "aaa"),
        xmlio.CompletedPart(3, "bbb", {"CRC32": "AAAAAA=="}),
    ]
    bad_order = body.replace(b"<PartNumber>3<", b"<PartNumber>1<")
    with pytest.raises(S3Error) as ei:
        xmlio.parse_complete_multipart(bad_order)
    assert ei.value.code == "InvalidPartOrder"
    for bad in (
        b"<CompleteMultipartUpload/>",
        b"<CompleteMultipartUpload><Part><PartNumber>x</PartNumber><ETag>e</ETag></Part>"
        b"</CompleteMultipartUpload>",
        b"<CompleteMultipartUpload><Part><ETag>e</ETag></Part></CompleteMultipartUpload>",
    ):
        with pytest.raises(S3Error) as ei:
            xmlio.parse_complete_multipart(bad)
        assert ei.value.code == "MalformedXML"
    with pytest.raises(S3Error) as ei:
        xmlio.parse_complete_multipart(
            b"<CompleteMultipartUpload><Part><PartNumber>10001</PartNumber><ETag>e</ETag></Part>"
            b"</CompleteMultipartUpload>"
        )
    assert ei.value.code == "InvalidArgument"


def test_parse_create_bucket_and_versioning() -> None:
    assert xmlio.parse_create_bucket(b"") is None
    assert (
        xmlio.parse_create_bucket(
            f'<CreateBucketConfiguration xmlns="{NS}"><LocationConstraint>eu-west-3'
            "</LocationConstraint></CreateBucketConfiguration>".encode()
        )
        == "eu-west-3"
    )
    assert xmlio.parse_create_bucket(b"<CreateBucketConfiguration/>") is None
    with pytest.raises(S3Error):
        xmlio.parse_create_bucket(b"<nope")
    assert (
        xmlio.parse_versioning(
            b"<VersioningConfiguration><Status>Enabled</Status></VersioningConfiguration>"
        )
        == "Enabled"
    )
    with pytest.raises(S3Error):
        xmlio.parse_versioning(b"<VersioningConfiguration/>")


# ------------------------------------------------------------------ rendering


def test_list_buckets() -> None:
    body = xmlio.render_list_buckets(
        [xmlio.BucketInfo("b1", T), xmlio.BucketInfo("b2", T)], xmlio.Owner("id1", "me")
    )
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult ')
    assert b"<CreationDate>2024-02-03T04:05:06.789Z</CreationDate>" in body
    out = parse("ListBuckets", body)
    assert [b["Name"] for b in out["Buckets"]] == ["b1", "b2"]
    assert out["Owner"] == {"ID": "id1", "DisplayName": "me"}
    assert out["Buckets"][0]["CreationDate"] == T


OBJS = [
    xmlio.ObjectInfo("a <&> b", T, "etag1", 10),
    xmlio.ObjectInfo("dir/ü+x y", T, '"etag2"', 0, owner=xmlio.Owner("o")),
]


def test_list_objects_v2() -> None:
    r = xmlio.ListObjectsResult(
        name="bkt",
        prefix="",
        delimiter="/",
        max_keys=2,
        is_truncated=True,
        contents=OBJS,
        common_prefixes=["p/"],
        continuation_token="tok",
        next_continuation_token="next",
        start_after="a",
    )
    out = parse("ListObjectsV2", xmlio.render_list_objects_v2(r))
    assert out["KeyCount"] == 3 and out["IsTruncated"] is True
    assert out["NextContinuationToken"] == "next" and out["ContinuationToken"] == "tok"
    assert [c["Key"] for c in out["Contents"]] == ["a <&> b", "dir/ü+x y"]
    assert [c["ETag"] for c in out["Contents"]] == ['"etag1"', '"etag2"']
    assert out["Contents"][0]["LastModified"] == T
    assert "Owner" not in out["Contents"][1]
    assert out["CommonPrefixes"] == [{"Prefix": "p/"}]
    assert out["StartAfter"] == "a" and out["Delimiter"] == "/"


def test_list_objects_url_encoding() -> None:
    r = xmlio.ListObjectsResult(
        name="bkt",
        prefix="dir/ü",
        contents=OBJS,
        encoding_type="url",
        common_prefixes=["x+y z/"],
        delimiter="/",
    )
    body = xmlio.render_list_objects_v2(r)
    out = parse("ListObjectsV2", body)
    assert out["EncodingType"] == "url"
    # botocore's decode handler uses unquote_plus
    assert [unquote_plus(c["Key"]) for c in out["Contents"]] == [o.key for o in OBJS]
    assert unquote_plus(out["CommonPrefixes"][0]["Prefix"]) == "x+y z/"
    assert unquote_plus(out["Prefix"]) == "dir/ü"


def test_list_objects_v1() -> None:
    r = xmlio.ListObjectsResult(
        name="bkt", marker="m", next_marker="dir/ü+x y", is_truncated=True, contents=OBJS
    )
    out = parse("ListObjects", xmlio.render_list_objects_v1(r))
    assert out["Marker"] == "m" and out["NextMarker"] == "dir/ü+x y"
    assert out["Contents"][1]["Owner"] == {"ID": "o"}


def test_control_chars_do_not_break_xml() -> None:
    r = xmlio.ListObjectsResult(name="b", contents=[xmlio.ObjectInfo("a\x01b", T, "e", 1)])
    out = parse("ListObjectsV2", xmlio.render_list_objects_v2(r))
    assert out["Contents"][0]["Key"] == "a\ufffdb"


def test_delete_result() -> None:
    deleted = [xmlio.DeletedObject("k1"), xmlio.DeletedObject("k2", "v", True, "dm")]
    errors = [xmlio.DeleteError("k3", "AccessDenied", "Access Denied")]
    out = parse("DeleteObjects", xmlio.render_delete_result(deleted, errors))
    assert [d["Key"] for d in out["Deleted"]] == ["k1", "k2"]
    assert out["Deleted"][1]["DeleteMarker"] is True
    assert out["Errors"] == [{"Key": "k3", "Code": "AccessDenied", "Message": "Access Denied"}]
    quiet = parse("DeleteObjects", xmlio.render_delete_result(deleted, [], quiet=True))
    assert "Deleted" not in quiet


def test_multipart_documents() -> None:
    out = parse("CreateMultipartUpload", xmlio.render_initiate_multipart("b", "k&", "u1"))
    assert (out["Bucket"], out["Key"], out["UploadId"]) == ("b", "k&", "u1")
    out = parse(
        "CompleteMultipartUpload",
        xmlio.render_complete_multipart(
            "http://h/b/k", "b", "k", "abc-2", {"CRC32": "AAAAAA=="}, "COMPOSITE"
        ),
    )
    assert out["ETag"] == '"abc-2"' and out["ChecksumCRC32"] == "AAAAAA=="
    assert out["ChecksumType"] == "COMPOSITE"
    r = xmlio.ListPartsResult(
        "b",
        "k",
        "u1",
        parts=[xmlio.PartInfo(1, T, "e1", 5), xmlio.PartInfo(2, T, "e2", 6)],
        max_parts=2,
        is_truncated=True,
        owner=xmlio.Owner("o"),
    )
    out = parse("ListParts", xmlio.render_list_parts(r))
    assert [p["PartNumber"] for p in out["Parts"]] == [1, 2]
    assert out["NextPartNumberMarker"] == 2 and out["IsTruncated"] is True
    assert out["Parts"][0]["LastModified"] == T and out["Parts"][1]["Size"] == 6
    u = xmlio.ListUploadsResult(
        "b",
        uploads=[xmlio.UploadInfo("k 1", "u1", T)],
        common_prefixes=["d/"],
        is_truncated=True,
        next_key_marker="k 1",
        next_upload_id_marker="u1",
    )
    out = parse("ListMultipartUploads", xmlio.render_list_multipart_uploads(u))
    assert out["Uploads"][0]["Key"] == "k 1" and out["Uploads"][0]["Initiated"] == T
    assert out["NextUploadIdMarker"] == "u1" and out["CommonPrefixes"] == [{"Prefix": "d/"}]


def test_copy_location_versioning() -> None:
    out = parse("CopyObject", xmlio.render_copy_object("e", T))
    assert out["CopyObjectResult"]["ETag"] == '"e"'
    assert out["CopyObjectResult"]["LastModified"] == T
    out = parse("UploadPartCopy", xmlio.render_copy_part("e", T))
    assert out["CopyPartResult"]["ETag"] == '"e"'
    # botocore parses GetBucketLocation with a custom handler: check the bytes
    assert xmlio.render_location_constraint(None).endswith(
        f'<LocationConstraint xmlns="{NS}"></LocationConstraint>'.encode()
    )
    assert b">eu-west-3</LocationConstraint>" in xmlio.render_location_constraint("eu-west-3")
    out = parse("GetBucketVersioning", xmlio.render_versioning("Enabled"))
    assert out["Status"] == "Enabled"
    assert "Status" not in parse("GetBucketVersioning", xmlio.render_versioning(None))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30), max_size=5
    )
)
def test_url_encoded_listing_roundtrips_any_key(keys: list[str]) -> None:
    objs = [xmlio.ObjectInfo(k, T, "e", 1) for k in keys]
    r = xmlio.ListObjectsResult(name="b", contents=objs, encoding_type="url")
    out = parse("ListObjectsV2", xmlio.render_list_objects_v2(r))
    assert [unquote_plus(c["Key"]) for c in out.get("Contents", [])] == keys
