"""Signature V2: cohort.s3.sigv2 against botocore's own HmacV1 signers."""

from __future__ import annotations

import time
import urllib.parse
from email.utils import formatdate

import pytest
from botocore.auth import HmacV1Auth, HmacV1QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from cohort.s3.errors import S3Error
from cohort.s3.sigv2 import (
    canonical_amz_headers,
    canonical_resource,
    has_v2_auth,
    presign_url_v2,
    sign_request_v2,
    verify_v2,
)

AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CREDS = Credentials(AK, SK)


def secret_for(k: str) -> str | None:
    return SK if k == AK else None


def _split(url: str) -> tuple[str, str]:
    u = urllib.parse.urlsplit(url)
    return u.path, u.query


def test_header_form_matches_botocore() -> None:
    url = "http://127.0.0.1:9000/bkt/some%20dir/k%2Bey.txt?acl&uploadId=abc&prefix=x"
    req = AWSRequest(
        method="PUT",
        url=url,
        headers={
            "Content-Type": "text/plain",
            "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==",
            "x-amz-meta-Color": "  blue   sky ",
            "X-Amz-Acl": "public-read",
        },
        data=b"",
    )
    HmacV1Auth(CREDS).add_auth(req)
    path, query = _split(url)
    assert has_v2_auth(query, req.headers)
    r = verify_v2("PUT", path, query, req.headers, secret_for)
    assert r.access_key == AK and not r.presigned


def test_presigned_matches_botocore() -> None:
    req = AWSRequest(method="GET", url="http://h/bkt/a/b.txt?response-content-type=text%2Fplain")
    HmacV1QueryAuth(CREDS, expires=60).add_auth(req)
    path, query = _split(req.url)
    assert has_v2_auth(query, {})
    r = verify_v2("GET", path, query, {}, secret_for)
    assert r.presigned
    # expired
    with pytest.raises(S3Error) as e:
        verify_v2("GET", path, query, {}, secret_for, now=time.time() + 3600)
    assert e.value.code == "AccessDenied" and "expired" in e.value.message
    # tampered
    with pytest.raises(S3Error) as e:
        verify_v2("GET", path.replace("b.txt", "c.txt"), query, {}, secret_for)
    assert e.value.code == "SignatureDoesNotMatch"


def test_own_client_side_round_trips() -> None:
    hdrs = {"Content-Type": "x/y", "x-amz-meta-a": "1"}
    hdrs.update(sign_request_v2("GET", "/b/k", "versioning", hdrs, AK, SK))
    verify_v2("GET", "/b/k", "versioning", hdrs, secret_for)
    url = presign_url_v2("GET", "/b/k", AK, SK, expires=int(time.time()) + 30)
    path, query = _split(url)
    verify_v2("GET", path, query, {}, secret_for)


def test_virtual_hosted_resource_includes_bucket() -> None:
    hdrs: dict[str, str] = {}
    hdrs.update(sign_request_v2("GET", "/k", "", hdrs, AK, SK, bucket="bkt"))
    verify_v2("GET", "/k", "", hdrs, secret_for, bucket="bkt")
    with pytest.raises(S3Error):
        verify_v2("GET", "/k", "", hdrs, secret_for)


def test_errors() -> None:
    old = formatdate(time.time() - 3600, usegmt=True)
    hdrs = {"Date": old}
    hdrs.update(sign_request_v2("GET", "/b", "", hdrs, AK, SK))
    with pytest.raises(S3Error) as e:
        verify_v2("GET", "/b", "", hdrs, secret_for)
    assert e.value.code == "RequestTimeTooSkewed"
    hdrs = {}
    hdrs.update(sign_request_v2("GET", "/b", "", hdrs, "NOPE", SK))
    with pytest.raises(S3Error) as e:
        verify_v2("GET", "/b", "", hdrs, secret_for)
    assert e.value.code == "InvalidAccessKeyId"
    with pytest.raises(S3Error) as e:
        verify_v2("GET", "/b", "", {"Authorization": "AWS nocolon", "Date": old}, secret_for)
    assert e.value.code == "InvalidArgument"
    with pytest.raises(S3Error) as e:
        verify_v2("GET", "/b", "", {"Authorization": f"AWS {AK}:x"}, secret_for)
    assert e.value.code == "AccessDenied"


def test_x_amz_date_means_empty_date_line() -> None:
    stamp = formatdate(time.time(), usegmt=True)
    hdrs = {"x-amz-date": stamp}
    from cohort.s3.sigv2 import sign, string_to_sign

    sts = string_to_sign("GET", hdrs, "", canonical_resource("/b/k", ""))
    hdrs["Authorization"] = f"AWS {AK}:{sign(SK, sts)}"
    verify_v2("GET", "/b/k", "", hdrs, secret_for)


def test_canonical_pieces() -> None:
    assert canonical_amz_headers({"X-Amz-B": " 2 ", "x-amz-a": "a\n  b", "Other": "x"}) == (
        "x-amz-a:a b\nx-amz-b:2\n"
    )
    assert canonical_resource("/b/k", "uploadId=u%2F1&partNumber=2&foo=1&acl") == (
        "/b/k?acl&partNumber=2&uploadId=u/1"
    )
    assert canonical_resource("/", "", "bkt") == "/bkt/"


def test_botocore_bucket_operations_sign_trailing_slash() -> None:
    import boto3
    from botocore.config import Config

    c = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:1",
        aws_access_key_id=AK,
        aws_secret_access_key=SK,
        region_name="us-east-1",
        config=Config(signature_version="s3", s3={"addressing_style": "path"}),
    )
    checked: list[str] = []

    class Stop(Exception):
        pass

    def before_send(request: object, **kw: object) -> None:
        h = {
            k: (v.decode() if isinstance(v, bytes) else v)
            for k, v in request.headers.items()  # type: ignore[attr-defined]
        }
        u = urllib.parse.urlsplit(request.url)  # type: ignore[attr-defined]
        verify_v2(request.method, u.path, u.query, h, secret_for)  # type: ignore[attr-defined]
        checked.append(u.path)
        raise Stop()

    c.meta.events.register("before-send.s3", before_send)
    for call in (
        lambda: c.create_bucket(Bucket="bb"),
        lambda: c.list_objects_v2(Bucket="bb", Prefix="a b"),
        lambda: c.put_object(Bucket="bb", Key="k/ x+y", Body=b"x"),
        lambda: c.get_bucket_acl(Bucket="bb"),
    ):
        with pytest.raises(Stop):
            call()
    assert len(checked) == 4


def test_presigned_expiry_is_capped_at_a_week() -> None:
    """SigV4 refuses X-Amz-Expires over 604800 s; a V2 URL has no signing time, so its
    Expires may be at most a week (plus the clock skew allowance) from now."""
    now = time.time()
    week = 7 * 24 * 3600
    for seconds in (60, week, week + 10 * 60):  # 10 minutes of client clock skew
        path, query = _split(presign_url_v2("GET", "/b/k", AK, SK, expires=int(now) + seconds))
        assert verify_v2("GET", path, query, {}, secret_for, now=now).presigned
    for seconds in (week + 16 * 60, 30 * 24 * 3600, 10**10):
        path, query = _split(presign_url_v2("GET", "/b/k", AK, SK, expires=int(now) + seconds))
        with pytest.raises(S3Error) as e:
            verify_v2("GET", path, query, {}, secret_for, now=now)
        assert e.value.code == "AuthorizationQueryParametersError" and e.value.status == 400
    # boto3's V2 presigner with an 8-day ExpiresIn
    req = AWSRequest(method="GET", url="http://h/bkt/k")
    HmacV1QueryAuth(CREDS, expires=8 * 24 * 3600).add_auth(req)
    path, query = _split(req.url)
    with pytest.raises(S3Error) as e:
        verify_v2("GET", path, query, {}, secret_for)
    assert e.value.code == "AuthorizationQueryParametersError"
