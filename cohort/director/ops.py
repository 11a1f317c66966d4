"""Which S3 operation an HTTP request is: a pure function of method, path and query.

``classify`` returns the operation name as AWS spells it (``PutObject``,
``ListObjectsV2``, ...) or raises ``S3Error`` (``NotImplemented`` for sub-resources Cohort
does not support yet, ``MethodNotAllowed`` for impossible combinations).  Keeping this
separate from the HTTP shell makes it testable on its own and keeps the dispatch table in
one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cohort.s3.errors import S3Error

# Bucket sub-resources we know about but have not built: answer NotImplemented, not 404.
_UNSUPPORTED_BUCKET = {
    "policy",
    "cors",
    "lifecycle",
    "tagging",
    "website",
    "logging",
    "notification",
    "replication",
    "encryption",
    "object-lock",
    "publicAccessBlock",
    "ownershipControls",
    "accelerate",
    "requestPayment",
    "analytics",
    "metrics",
    "inventory",
    "intelligent-tiering",
    "policyStatus",
    "versions",
}
_UNSUPPORTED_OBJECT = {
    "tagging",
    "retention",
    "legal-hold",
    "torrent",
    "restore",
    "select",
    "attributes",
}


@dataclass(frozen=True)
class S3Request:
    op: str
    bucket: str
    key: str


def split_path(path: str) -> tuple[str, str]:
    """``/bucket/some/key`` -> ("bucket", "some/key") (path already percent-decoded)."""
    p = path[1:] if path.startswith("/") else path
    bucket, _, key = p.partition("/")
    return bucket, key


def classify(
    method: str, bucket: str, key: str, query: Mapping[str, str], headers: Mapping[str, str]
) -> S3Request:
    m = method.upper()
    q = query
    if not bucket:
        if m == "GET":
            return S3Request("ListBuckets", "", "")
        raise S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )
    if not key:
        for sub in _UNSUPPORTED_BUCKET:
            if sub in q:
                raise S3Error(
                    "NotImplemented", f"Bucket sub-resource '{sub}' is not implemented by Cohort."
                )
        if "acl" in q:
            if m == "GET":
                return S3Request("GetBucketAcl", bucket, "")
            if m == "PUT":
                return S3Request("PutBucketAcl", bucket, "")
            raise S3Error(
                "MethodNotAllowed", "The specified method is not allowed against this resource."
            )
        if m == "PUT":
            if "versioning" in q:
                raise S3Error("NotImplemented", "Bucket versioning is not implemented by Cohort.")
            return S3Request("CreateBucket", bucket, "")
        if m == "HEAD":
            return S3Request("HeadBucket", bucket, "")
        if m == "DELETE":
            return S3Request("DeleteBucket", bucket, "")
        if m == "POST":
            if "delete" in q:
                return S3Request("DeleteObjects", bucket, "")
            raise S3Error(
                "MethodNotAllowed", "The specified method is not allowed against this resource."
            )
        if m == "GET":
            if "location" in q:
                return S3Request("GetBucketLocation", bucket, "")
            if "versioning" in q:
                return S3Request("GetBucketVersioning", bucket, "")
            if "uploads" in q:
                return S3Request("ListMultipartUploads", bucket, "")
            if q.get("list-type") == "2":
                return S3Request("ListObjectsV2", bucket, "")
            return S3Request("ListObjects", bucket, "")
        raise S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )
    for sub in _UNSUPPORTED_OBJECT:
        if sub in q:
            raise S3Error(
                "NotImplemented", f"Object sub-resource '{sub}' is not implemented by Cohort."
            )
    if "acl" in q:
        if m == "GET":
            return S3Request("GetObjectAcl", bucket, key)
        if m == "PUT":
            return S3Request("PutObjectAcl", bucket, key)
        raise S3Error(
            "MethodNotAllowed", "The specified method is not allowed against this resource."
        )
    if m == "PUT":
        if "uploadId" in q or "partNumber" in q:
            if "x-amz-copy-source" in headers:
                return S3Request("UploadPartCopy", bucket, key)
            return S3Request("UploadPart", bucket, key)
        if "x-amz-copy-source" in headers:
            return S3Request("CopyObject", bucket, key)
        return S3Request("PutObject", bucket, key)
    if m == "GET":
        if "uploadId" in q:
            return S3Request("ListParts", bucket, key)
        return S3Request("GetObject", bucket, key)
    if m == "HEAD":
        return S3Request("HeadObject", bucket, key)
    if m == "DELETE":
        if "uploadId" in q:
            return S3Request("AbortMultipartUpload", bucket, key)
        return S3Request("DeleteObject", bucket, key)
    if m == "POST":
        if "uploads" in q:
            return S3Request("CreateMultipartUpload", bucket, key)
        if "uploadId" in q:
            return S3Request("CompleteMultipartUpload", bucket, key)
    raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.")
