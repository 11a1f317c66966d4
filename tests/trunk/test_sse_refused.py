"""Server-side encryption is not built: a request asking for it is refused, never stored
in plaintext while the client believes it encrypted (found by the S3 conformance run:
an SSE-C PUT was stored in the clear and a GET without the key returned it)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import botocore.exceptions
import pytest

from cohort.cluster import LocalCluster
from tests.conftest import s3_client


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response["Error"]["Code"])


@pytest.mark.parametrize(
    "sse",
    [
        {"ServerSideEncryption": "AES256"},
        {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "alias/x"},
        {
            "SSECustomerAlgorithm": "AES256",
            "SSECustomerKey": base64.b64encode(b"k" * 32).decode(),
            "SSECustomerKeyMD5": base64.b64encode(hashlib.md5(b"k" * 32).digest()).decode(),
        },
    ],
    ids=["sse-s3", "sse-kms", "sse-c"],
)
def test_sse_requests_are_refused(
    cluster: LocalCluster, sse: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    s3 = s3_client(cluster)
    bucket = "sse-" + request.node.callspec.id
    s3.create_bucket(Bucket=bucket)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.put_object(Bucket=bucket, Key="secret", Body=b"plaintext?", **sse)
    assert _code(e.value) == "NotImplemented"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.head_object(Bucket=bucket, Key="secret")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.create_multipart_upload(Bucket=bucket, Key="mpu", **sse)
    assert _code(e.value) == "NotImplemented"
