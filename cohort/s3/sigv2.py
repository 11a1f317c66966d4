"""AWS Signature Version 2 for S3 (HMAC-SHA1): server-side verification and client signing.

Older tools, and boto3 with ``signature_version="s3"`` (including some
``generate_presigned_url`` configurations), sign requests this way.  Two forms:

* header: ``Authorization: AWS <access key>:<base64 HMAC-SHA1>``, with the request time
  in ``Date`` (or ``x-amz-date``); a skew of more than 15 minutes is refused
  (RequestTimeTooSkewed);
* presigned query: ``?AWSAccessKeyId=..&Expires=<epoch seconds>&Signature=..``; a request
  after ``Expires`` is refused (AccessDenied "Request has expired"), and so is a URL
  whose ``Expires`` lies more than 7 days (SigV4's cap, :data:`MAX_PRESIGN_EXPIRES`)
  plus the allowed clock skew in the future (AuthorizationQueryParametersError): a V2
  URL carries no signing time, so "at most a week from now" is what can be checked.

The string to sign::

    VERB \\n Content-MD5 \\n Content-Type \\n Date-or-Expires \\n
    CanonicalizedAmzHeaders CanonicalizedResource

``CanonicalizedAmzHeaders`` are the ``x-amz-*`` headers, lower-cased, sorted, repeated
values joined with ``,``, trimmed and unfolded (line breaks become one space), one ``name:value\\n`` each.
``CanonicalizedResource`` is ``/bucket`` (virtual-hosted style only) + the path as sent,
plus the S3 sub-resources and response overrides of the query (:data:`SUB_RESOURCES`),
sorted by name, with decoded values.  When ``x-amz-date`` is present, the date line is
empty (AWS's rule); a request signed with the ``Date`` value instead is accepted too.

V2 never signs the payload: the caller treats the body as ``UNSIGNED-PAYLOAD`` (its
Content-MD5 and checksum headers are still verified by the body stage).

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping
from email.utils import formatdate, parsedate_to_datetime
from typing import Final
from urllib.parse import quote, unquote

from cohort.s3.errors import S3Error

__all__ = [
    "MAX_PRESIGN_EXPIRES",
    "SUB_RESOURCES",
    "SigV2Result",
    "canonical_amz_headers",
    "canonical_resource",
    "has_v2_auth",
    "presign_url_v2",
    "sign",
    "sign_request_v2",
    "string_to_sign",
    "verify_v2",
]

#: query parameters that are part of the canonical resource (botocore's list).
SUB_RESOURCES: Final = frozenset(
    {
        "accelerate",
        "acl",
        "analytics",
        "cors",
        "defaultObjectAcl",
        "delete",
        "inventory",
        "lifecycle",
        "location",
        "logging",
        "metrics",
        "notification",
        "object-lock",
        "partNumber",
        "policy",
        "replication",
        "requestPayment",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "response-content-language",
        "response-content-type",
        "response-expires",
        "restore",
        "select",
        "select-type",
        "storageClass",
        "tagging",
        "torrent",
        "uploadId",
        "uploads",
        "versionId",
        "versioning",
        "versions",
        "website",
    }
)
MAX_SKEW: Final = 15 * 60
#: the longest a presigned URL may stay valid, as for SigV4 (X-Amz-Expires <= 604800)
MAX_PRESIGN_EXPIRES: Final = 7 * 24 * 3600
_FOLD = re.compile(r"\s*\r?\n\s*")


class SigV2Result:
    """Who signed a V2 request."""

    __slots__ = ("access_key", "presigned")

    def __init__(self, access_key: str, presigned: bool) -> None:
        self.access_key = access_key
        self.presigned = presigned


def _split_query(raw_query: str) -> list[tuple[str, str | None]]:
    """Raw ``a=1&b`` -> [("a", "1"), ("b", None)], names and values decoded."""
    out: list[tuple[str, str | None]] = []
    for item in raw_query.split("&") if raw_query else []:
        if not item:
            continue
        if "=" in item:
            k, v = item.split("=", 1)
            out.append((unquote(k), unquote(v.replace("+", " "))))
        else:
            out.append((unquote(item), None))
    return out


def has_v2_auth(raw_query: str, headers: Mapping[str, str]) -> bool:
    """True if the request carries V2 authentication (header or presigned query)."""
    auth = _get(headers, "authorization")
    if auth is not None:
        return auth.startswith("AWS ")
    names = {k for k, _ in _split_query(raw_query)}
    return "AWSAccessKeyId" in names and "Signature" in names


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return [str(v) for v in getall(name, [])]
    lname = name.lower()
    return [v for k, v in headers.items() if k.lower() == lname]


def _get(headers: Mapping[str, str], name: str) -> str | None:
    vals = _values(headers, name)
    return vals[0] if vals else None


def canonical_amz_headers(headers: Mapping[str, str]) -> str:
    found: dict[str, list[str]] = {}
    for k in {k.lower() for k in headers}:
        if k.startswith("x-amz-"):
            found[k] = [_FOLD.sub(" ", v.strip()) for v in _values(headers, k)]
    return "".join(f"{k}:{','.join(found[k])}\n" for k in sorted(found))


def canonical_resource(path: str, raw_query: str, bucket: str | None = None) -> str:
    """``path`` as sent (still percent-encoded); ``bucket`` for virtual-hosted style."""
    res = (f"/{bucket}" if bucket else "") + (path or "/")
    subs = [(k, v) for k, v in _split_query(raw_query) if k in SUB_RESOURCES]
    if subs:
        subs.sort(key=lambda kv: kv[0])
        res += "?" + "&".join(k if v is None else f"{k}={v}" for k, v in subs)
    return res


def string_to_sign(method: str, headers: Mapping[str, str], date: str, resource: str) -> str:
    return (
        "\n".join(
            [
                method.upper(),
                (_get(headers, "content-md5") or "").strip(),
                (_get(headers, "content-type") or "").strip(),
                date,
            ]
        )
        + "\n"
        + canonical_amz_headers(headers)
        + resource
    )


def sign(secret: str, sts: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), sts.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def _parse_time(value: str) -> float:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        pass
    try:  # x-amz-date may also be given in the ISO 8601 basic form
        return float(calendar.timegm(time.strptime(value, "%Y%m%dT%H%M%SZ")))
    except ValueError:
        pass
    raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")


def verify_v2(
    method: str,
    raw_path: str,
    raw_query: str,
    headers: Mapping[str, str],
    secret_for: Callable[[str], str | None],
    *,
    bucket: str | None = None,
    now: float | None = None,
) -> SigV2Result:
    """Verify a V2-signed request; raise :class:`S3Error` if it is not valid.

    ``raw_path`` is the path as sent (no query); ``raw_query`` the query string as sent;
    ``bucket`` is the bucket of a virtual-hosted-style request (it prefixes the resource).
    """
    now = time.time() if now is None else now
    query = _split_query(raw_query)
    qd = {k: v for k, v in query}
    auth = _get(headers, "authorization")
    presigned = auth is None
    if auth is not None:
        cred = auth[4:].strip() if auth.startswith("AWS ") else ""
        access_key, sep, signature = cred.rpartition(":")
        if not sep or not access_key or not signature:
            raise S3Error(
                "InvalidArgument",
                "AWS authorization header is invalid.  Expected AwsAccessKeyId:signature",
                extra={"ArgumentName": "Authorization", "ArgumentValue": auth},
            )
        amz_date = _get(headers, "x-amz-date")
        date = _get(headers, "date")
        stamp = amz_date if amz_date is not None else date
        if stamp is None:
            raise S3Error(
                "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header"
            )
        t = _parse_time(stamp)
        if abs(now - t) > MAX_SKEW:
            raise S3Error(
                "RequestTimeTooSkewed",
                extra={
                    "RequestTime": stamp,
                    "ServerTime": formatdate(now, usegmt=True),
                    "MaxAllowedSkewMilliseconds": str(MAX_SKEW * 1000),
                },
            )
        # x-amz-date present: AWS signs an empty date line; some clients sign Date anyway
        date_lines = [""] if amz_date is not None else [date or ""]
        if amz_date is not None and date is not None:
            date_lines.append(date)
    else:
        access_key = qd.get("AWSAccessKeyId") or ""
        signature = qd.get("Signature") or ""
        expires = qd.get("Expires")
        if not access_key or not signature or expires is None:
            raise S3Error(
                "AccessDenied",
                "Query-string authentication requires the Signature, Expires and "
                "AWSAccessKeyId parameters",
            )
        if not expires.isdigit():
            raise S3Error("AccessDenied", "Invalid date (should be seconds since epoch)")
        if now > int(expires):
            raise S3Error(
                "AccessDenied",
                "Request has expired",
                extra={
                    "Expires": formatdate(int(expires), usegmt=True),
                    "ServerTime": formatdate(now, usegmt=True),
                },
            )
        if int(expires) > now + MAX_PRESIGN_EXPIRES + MAX_SKEW:
            raise S3Error(
                "AuthorizationQueryParametersError",
                "Expires must be less than a week (604800 seconds) in the future",
                extra={
                    "Expires": expires,
                    "ServerTime": formatdate(now, usegmt=True),
                },
            )
        date_lines = [expires]
    secret = secret_for(access_key)
    if secret is None:
        raise S3Error(
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
            extra={"AWSAccessKeyId": access_key},
        )
    paths = [raw_path or "/"]
    reencoded = quote(unquote(raw_path or "/"), safe="/-_.~")
    if reencoded != paths[0]:
        paths.append(reencoded)
    if not bucket and paths[0].count("/") == 1 and paths[0] != "/":
        paths.append(paths[0] + "/")  # botocore signs a path-style bucket as "/bucket/"
    first_sts = ""
    for path in paths:
        resource = canonical_resource(path, raw_query, bucket)
        for date_line in date_lines:
            sts = string_to_sign(method, headers, date_line, resource)
            first_sts = first_sts or sts
            if hmac.compare_digest(sign(secret, sts), signature):
                return SigV2Result(access_key, presigned)
    raise S3Error(
        "SignatureDoesNotMatch",
        extra={
            "AWSAccessKeyId": access_key,
            "StringToSign": first_sts,
            "SignatureProvided": signature,
            "StringToSignBytes": " ".join(f"{b:02x}" for b in first_sts.encode("utf-8")),
        },
    )


# --------------------------------------------------------------------------- client side


def sign_request_v2(
    method: str,
    path: str,
    raw_query: str,
    headers: dict[str, str],
    access_key: str,
    secret: str,
    *,
    bucket: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """Headers to add (``Date``, ``Authorization``) for a V2 header-signed request."""
    date = headers.get("Date") or formatdate(time.time() if now is None else now, usegmt=True)
    all_headers = {**headers, "Date": date}
    sts = string_to_sign(method, all_headers, date, canonical_resource(path, raw_query, bucket))
    return {"Date": date, "Authorization": f"AWS {access_key}:{sign(secret, sts)}"}


def presign_url_v2(
    method: str,
    path: str,
    access_key: str,
    secret: str,
    *,
    expires: int,
    raw_query: str = "",
    headers: Iterable[tuple[str, str]] = (),
) -> str:
    """``path?[raw_query&]AWSAccessKeyId=..&Expires=..&Signature=..`` (a relative URL)."""
    sts = string_to_sign(method, dict(headers), str(expires), canonical_resource(path, raw_query))
    auth = (
        f"AWSAccessKeyId={quote(access_key, safe='')}&Expires={expires}"
        f"&Signature={quote(sign(secret, sts), safe='')}"
    )
    return f"{path}?{raw_query + '&' if raw_query else ''}{auth}"
