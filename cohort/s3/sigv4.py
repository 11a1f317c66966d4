"""AWS Signature Version 4 for S3: server-side verification and client-side signing.

Server side -- :func:`verify`::

    verify(method, raw_path, query, headers, secret_for, *, region=None, now=None)
        -> AuthResult

* ``raw_path`` is the path exactly as it appeared on the request line (still
  percent-encoded; a ``?query`` suffix is ignored).  S3 does not double-encode the
  canonical URI, so the raw path is used as sent.  Because clients differ in which
  characters they escape, if the signature does not match with the raw path we retry
  once with the decoded path re-encoded the AWS way (RFC 3986 unreserved kept, ``/``
  kept); either match is accepted.
* ``query`` is the list of *decoded* ``(name, value)`` pairs in request order
  (``?acl`` -> ``("acl", "")``).  They are re-encoded AWS-style for the canonical query.
* ``headers`` is any mapping with case-insensitive keys; if it has ``getall`` (aiohttp's
  ``CIMultiDictProxy``) repeated headers are joined with ``,`` as SigV4 specifies.
* ``secret_for(access_key)`` returns the secret key or ``None`` (-> InvalidAccessKeyId).
* Both the ``Authorization: AWS4-HMAC-SHA256 ...`` header form and the presigned query
  form (``X-Amz-Algorithm``/``X-Amz-Credential``/``X-Amz-Date``/``X-Amz-Expires``/
  ``X-Amz-SignedHeaders``/``X-Amz-Signature``) are supported.  Header form enforces a
  15-minute clock skew (RequestTimeTooSkewed); presigned form enforces the expiry
  (AccessDenied "Request has expired") with X-Amz-Expires in 1..604800.
* If ``region`` is given, the credential scope must name it (AuthorizationHeaderMalformed
  otherwise, with ``<Region>`` in extra).  The service must be ``s3``.
* Failures raise :class:`S3Error`; SignatureDoesNotMatch carries ``StringToSign``,
  ``CanonicalRequest``, ``SignatureProvided`` and ``AWSAccessKeyId`` in ``extra``
  like S3 does.  A request with neither form raises AccessDenied (anonymous requests
  are the caller's policy decision: check :func:`has_auth` first).

The returned :class:`AuthResult` carries what the body stage needs: ``payload_mode`` is
one of :data:`UNSIGNED_PAYLOAD`, :data:`STREAMING_UNSIGNED_TRAILER`,
:data:`STREAMING_SIGNED`, :data:`STREAMING_SIGNED_TRAILER` or a lowercase hex SHA-256
that the caller must compare with the body's digest (XAmzContentSHA256Mismatch).  For
the streaming modes the caller feeds the body through
:class:`cohort.s3.chunked.AwsChunkedDecoder`.

Client side -- :func:`sign_request` returns the headers to add to a request and
:func:`presign_url` returns a presigned URL; both produce what botocore produces.

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from cohort.s3.errors import S3Error

__all__ = [
    "ALGORITHM",
    "EMPTY_SHA256",
    "MAX_PRESIGN_EXPIRES",
    "MAX_SKEW",
    "STREAMING_SIGNED",
    "STREAMING_SIGNED_TRAILER",
    "STREAMING_UNSIGNED_TRAILER",
    "UNSIGNED_PAYLOAD",
    "AuthResult",
    "canonical_query",
    "canonical_request",
    "check_payload_sha256",
    "derive_signing_key",
    "has_auth",
    "presign_url",
    "sign_request",
    "string_to_sign",
    "uri_encode",
    "verify",
]

ALGORITHM: Final = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD: Final = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_TRAILER: Final = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_SIGNED: Final = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER: Final = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
_ECDSA_MODES: Final = frozenset(
    {"STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER"}
)
_PAYLOAD_MODES: Final = frozenset(
    {UNSIGNED_PAYLOAD, STREAMING_UNSIGNED_TRAILER, STREAMING_SIGNED, STREAMING_SIGNED_TRAILER}
)
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
MAX_SKEW: Final = timedelta(minutes=15)
MAX_PRESIGN_EXPIRES: Final = 604800
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_AMZ_DATE_FMT: Final = "%Y%m%dT%H%M%SZ"
_AUTH_PARAM = re.compile(r"\s*([A-Za-z]+)\s*=\s*([^,]*?)\s*(?:,|$)")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of a successful :func:`verify`."""

    access_key: str
    #: HMAC key derived for (date, region, "s3"); used to verify chunk signatures.
    signing_key: bytes
    #: ``yyyymmdd/region/s3/aws4_request``
    scope: str
    #: the request's amz-date (``yyyymmddTHHMMSSZ``), part of chunk string-to-sign.
    timestamp: str
    #: the request signature; the first chunk signature chains from it.
    seed_signature: str
    #: one of the payload-mode constants or a lowercase hex SHA-256 of the body.
    payload_mode: str
    region: str
    signed_headers: tuple[str, ...]
    presigned: bool

    @property
    def is_streaming(self) -> bool:
        """True when the body is ``aws-chunked`` encoded."""
        return self.payload_mode.startswith("STREAMING-")

    @property
    def is_signed_streaming(self) -> bool:
        return self.payload_mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)

    @property
    def has_trailer(self) -> bool:
        return self.payload_mode.endswith("-TRAILER")

    @property
    def payload_sha256(self) -> str | None:
        """The hex digest the body must have, or None when not a plain signed payload."""
        return None if self.payload_mode in _PAYLOAD_MODES else self.payload_mode


# --------------------------------------------------------------------------- encoding

_UNRESERVED = "-_.~"  # plus ASCII letters/digits, which quote() never escapes


def uri_encode(value: str, *, encode_slash: bool = True) -> str:
    """AWS ``UriEncode``: escape everything but RFC 3986 unreserved chars (UTF-8)."""
    return quote(value, safe=_UNRESERVED if encode_slash else _UNRESERVED + "/")


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    """Canonical query string from decoded pairs (sorted by encoded name, then value)."""
    encoded = sorted((uri_encode(k), uri_encode(v)) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    getall: Any = getattr(headers, "getall", None)
    if getall is not None:
        values: list[str] = list(getall(name, []))
        return values
    value = headers.get(name)
    if value is not None:
        return [value]
    # plain dicts are case-sensitive; fall back to a scan
    lname = name.lower()
    return [v for k, v in headers.items() if k.lower() == lname]


def _get(headers: Mapping[str, str], name: str) -> str | None:
    values = _header_values(headers, name)
    return values[0] if values else None


def _canonical_header_value(values: list[str]) -> str:
    return ",".join(_SPACES.sub(" ", v.strip()) for v in values)


def canonical_request(
    method: str,
    canonical_uri: str,
    canonical_query_string: str,
    headers: Mapping[str, str],
    signed_headers: Iterable[str],
    payload_hash: str,
) -> str:
    """The SigV4 canonical request (``canonical_uri`` must already be encoded)."""
    names = list(signed_headers)
    lines = [f"{n}:{_canonical_header_value(_header_values(headers, n))}\n" for n in names]
    return "\n".join(
        [
            method.upper(),
            canonical_uri or "/",
            canonical_query_string,
            "".join(lines),
            ";".join(names),
            payload_hash,
        ]
    )


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


@lru_cache(maxsize=256)
def derive_signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    """``kSigning``; cached because it only changes daily per key and region."""
    k = hmac.new(("AWS4" + secret).encode("utf-8"), date.encode("ascii"), hashlib.sha256)
    k = hmac.new(k.digest(), region.encode("utf-8"), hashlib.sha256)
    k = hmac.new(k.digest(), service.encode("utf-8"), hashlib.sha256)
    return hmac.new(k.digest(), b"aws4_request", hashlib.sha256).digest()


def _sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- verify


def has_auth(query: Iterable[tuple[str, str]], headers: Mapping[str, str]) -> bool:
    """True if the request carries SigV4 (or any) authentication material."""
    if _get(headers, "authorization") is not None:
        return True
    return any(k == "X-Amz-Algorithm" or k == "X-Amz-Signature" for k, _ in query)


def _parse_amz_date(value: str, code: str) -> datetime:
    # ``yyyymmddTHHMMSSZ``, parsed by hand: strptime costs ~100 us on every request
    try:
        if len(value) != 16 or value[8] != "T" or value[15] != "Z":
            raise ValueError(value)
        return datetime(
            int(value[0:4]), int(value[4:6]), int(value[6:8]),
            int(value[9:11]), int(value[11:13]), int(value[13:15]), tzinfo=UTC,
        )  # fmt: skip
    except ValueError:
        raise S3Error(code, f"Invalid date format: {value!r}") from None


def _parse_credential(credential: str, code: str) -> tuple[str, str, str, str]:
    # access keys never contain '/', but split from the right to be lenient
    parts = credential.rsplit("/", 4)
    if len(parts) != 5 or not parts[0]:
        raise S3Error(
            code,
            "The authorization header is malformed; the Credential is mal-formed; "
            f'expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request". ({credential})'
            if code == "AuthorizationHeaderMalformed"
            else "Error parsing the X-Amz-Credential parameter; the Credential is mal-formed; "
            'expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".',
        )
    access_key, date, region, service, terminal = parts
    if terminal != "aws4_request":
        raise S3Error(
            code,
            f'The authorization header is malformed; incorrect terminal "{terminal}". '
            'This endpoint uses "aws4_request".',
        )
    if service != "s3":
        raise S3Error(
            code,
            f'The authorization header is malformed; incorrect service "{service}". '
            'This endpoint belongs to "s3".',
        )
    if len(date) != 8 or not date.isdigit():
        raise S3Error(code, f"The authorization header is malformed; invalid date {date!r}.")
    return access_key, date, region, service


def _parse_auth_header(value: str) -> tuple[str, list[str], str]:
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        if algorithm == "AWS":
            raise S3Error(
                "InvalidRequest",
                "The authorization mechanism you have provided is not supported. "
                "Please use AWS4-HMAC-SHA256.",
            )
        raise S3Error(
            "AuthorizationHeaderMalformed",
            f"The authorization header is malformed; unsupported algorithm {algorithm!r}.",
        )
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _AUTH_PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            raise S3Error(
                "AuthorizationHeaderMalformed",
                "The authorization header is malformed; cannot parse the parameters.",
            )
        params[m.group(1)] = m.group(2)
        pos = m.end()
    try:
        credential = params["Credential"]
        signed = params["SignedHeaders"]
        signature = params["Signature"]
    except KeyError as e:
        raise S3Error(
            "AuthorizationHeaderMalformed",
            f"The authorization header is malformed; missing {e.args[0]}.",
        ) from None
    return credential, _split_signed_headers(signed, "AuthorizationHeaderMalformed"), signature


def _split_signed_headers(signed: str, code: str) -> list[str]:
    names = [n.strip().lower() for n in signed.split(";") if n.strip()]
    if not names:
        raise S3Error(code, "SignedHeaders is empty.")
    if "host" not in names:
        raise S3Error(code, "The authorization header is malformed; host must be signed.")
    return names


def _payload_mode(value: str | None, *, presigned: bool) -> str:
    if value is None:
        if presigned:
            return UNSIGNED_PAYLOAD
        raise S3Error(
            "InvalidRequest", "Missing required header for this request: x-amz-content-sha256"
        )
    if value in _PAYLOAD_MODES:
        return value
    if _HEX64.fullmatch(value):
        return value.lower()
    if value in _ECDSA_MODES:
        raise S3Error("NotImplemented", "SigV4a (ECDSA) streaming signatures are not supported.")
    raise S3Error(
        "InvalidArgument",
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-UNSIGNED-PAYLOAD-TRAILER, "
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD, STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER "
        "or a valid sha256 value.",
        extra={"ArgumentName": "x-amz-content-sha256", "ArgumentValue": value},
    )


def _reencoded_path(raw_path: str) -> str:
    return uri_encode(unquote(raw_path), encode_slash=False)


def verify(
    method: str,
    raw_path: str,
    query: list[tuple[str, str]],
    headers: Mapping[str, str],
    secret_for: Callable[[str], str | None],
    *,
    region: str | None = None,
    now: datetime | None = None,
) -> AuthResult:
    """Verify a SigV4-signed S3 request; see the module docstring."""
    now = now if now is not None else datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    path = raw_path.split("?", 1)[0] or "/"
    auth_header = _get(headers, "authorization")
    qdict = {k: v for k, v in query}
    presigned = auth_header is None and ("X-Amz-Algorithm" in qdict or "X-Amz-Signature" in qdict)

    if auth_header is not None and ("X-Amz-Algorithm" in qdict or "X-Amz-Signature" in qdict):
        raise S3Error(
            "InvalidArgument",
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
            "Signature query string parameter or the Authorization header should be specified",
            extra={"ArgumentName": "Authorization", "ArgumentValue": auth_header},
        )
    if auth_header is not None:
        code = "AuthorizationHeaderMalformed"
        credential, signed_headers, signature = _parse_auth_header(auth_header)
        date_value = _get(headers, "x-amz-date")
        if date_value is None:
            date_value = _date_header_as_amz(_get(headers, "date"))
        amz_date = _parse_amz_date(date_value, "AccessDenied")
        canon_query_pairs = query
        payload_header = _get(headers, "x-amz-content-sha256")
        payload_mode = _payload_mode(payload_header, presigned=False)
    elif presigned:
        code = "AuthorizationQueryParametersError"
        try:
            algorithm = qdict["X-Amz-Algorithm"]
            credential = qdict["X-Amz-Credential"]
            date_value = qdict["X-Amz-Date"]
            expires_s = qdict["X-Amz-Expires"]
            signed_headers_s = qdict["X-Amz-SignedHeaders"]
            signature = qdict["X-Amz-Signature"]
        except KeyError:
            raise S3Error(
                code,
                "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
                "and X-Amz-Expires parameters.",
            ) from None
        if algorithm != ALGORITHM:
            raise S3Error(code, 'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256".')
        signed_headers = _split_signed_headers(signed_headers_s, code)
        amz_date = _parse_amz_date(date_value, code)
        try:
            expires = int(expires_s)
        except ValueError:
            raise S3Error(code, "X-Amz-Expires should be a number") from None
        if expires < 0:
            raise S3Error(code, "X-Amz-Expires must be non-negative")
        if expires > MAX_PRESIGN_EXPIRES:
            raise S3Error(
                code,
                "X-Amz-Expires must be less than a week (in seconds) that is 604800",
            )
        canon_query_pairs = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        # The canonical payload of a presigned request is UNSIGNED-PAYLOAD unless the
        # signer bound a hash (query parameter, or a signed x-amz-content-sha256 header).
        payload_header = qdict.get("X-Amz-Content-Sha256")
        if payload_header is None and "x-amz-content-sha256" in signed_headers:
            payload_header = _get(headers, "x-amz-content-sha256")
        payload_mode = _payload_mode(payload_header, presigned=True)
    else:
        raise S3Error("AccessDenied", "Anonymous access is not allowed.")

    access_key, scope_date, scope_region, service = _parse_credential(credential, code)
    timestamp = amz_date.strftime(_AMZ_DATE_FMT)
    if scope_date != timestamp[:8]:
        raise S3Error(
            code,
            f'Invalid credential date "{scope_date}". This date is not the same as '
            'X-Amz-Date: "' + timestamp[:8] + '".',
        )
    if region is not None and scope_region != region:
        raise S3Error(
            code,
            f"The authorization header is malformed; the region '{scope_region}' is wrong; "
            f"expecting '{region}'",
            extra={"Region": region},
        )

    if presigned:
        if now < amz_date - MAX_SKEW:
            raise S3Error("AccessDenied", "Request is not valid yet")
        if now > amz_date + timedelta(seconds=expires):
            raise S3Error(
                "AccessDenied",
                "Request has expired",
                extra={
                    "X-Amz-Expires": str(expires),
                    "Expires": (amz_date + timedelta(seconds=expires)).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"
                    ),
                    "ServerTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
            )
    elif abs(now - amz_date) > MAX_SKEW:
        raise S3Error(
            "RequestTimeTooSkewed",
            extra={
                "RequestTime": timestamp,
                "ServerTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "MaxAllowedSkewMilliseconds": "900000",
            },
        )

    secret = secret_for(access_key)
    if secret is None:
        raise S3Error("InvalidAccessKeyId", extra={"AWSAccessKeyId": access_key})

    scope = f"{scope_date}/{scope_region}/{service}/aws4_request"
    key = derive_signing_key(secret, scope_date, scope_region, service)
    cquery = canonical_query(canon_query_pairs)
    # In the presigned form the canonical payload is the declared mode (default
    # UNSIGNED-PAYLOAD); in the header form it is the header's literal value.
    payload_in_request = payload_header if payload_header is not None else payload_mode
    creq = canonical_request(method, path, cquery, headers, signed_headers, payload_in_request)
    sts = string_to_sign(timestamp, scope, creq)
    expected = _sign(key, sts)
    provided = signature.strip().lower()
    if not hmac.compare_digest(expected, provided):
        alt_path = _reencoded_path(path)
        matched = False
        if alt_path != path:
            creq2 = canonical_request(
                method, alt_path, cquery, headers, signed_headers, payload_in_request
            )
            matched = hmac.compare_digest(
                _sign(key, string_to_sign(timestamp, scope, creq2)), provided
            )
        if not matched:
            raise S3Error(
                "SignatureDoesNotMatch",
                extra={
                    "AWSAccessKeyId": access_key,
                    "StringToSign": sts,
                    "SignatureProvided": signature,
                    "StringToSignBytes": " ".join(f"{b:02x}" for b in sts.encode("utf-8")),
                    "CanonicalRequest": creq,
                },
            )
    return AuthResult(
        access_key=access_key,
        signing_key=key,
        scope=scope,
        timestamp=timestamp,
        seed_signature=expected,
        payload_mode=payload_mode,
        region=scope_region,
        signed_headers=tuple(signed_headers),
        presigned=presigned,
    )


def check_payload_sha256(auth: AuthResult, computed_hex: str) -> None:
    """Raise XAmzContentSHA256Mismatch if the body's SHA-256 differs from the signed one.

    No-op for UNSIGNED-PAYLOAD and the streaming modes (chunk signatures cover those).
    """
    expected = auth.payload_sha256
    if expected is not None and not hmac.compare_digest(expected, computed_hex.lower()):
        raise S3Error(
            "XAmzContentSHA256Mismatch",
            extra={
                "ClientComputedContentSHA256": expected,
                "S3ComputedContentSHA256": computed_hex.lower(),
            },
        )


def _date_header_as_amz(value: str | None) -> str:
    """The ``Date`` header (HTTP-date or ISO basic) reformatted as an amz-date."""
    if value is None:
        raise S3Error(
            "AccessDenied",
            "AWS authentication requires a valid Date or x-amz-date header",
        )
    try:
        datetime.strptime(value, _AMZ_DATE_FMT)
        return value
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise S3Error(
            "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).strftime(_AMZ_DATE_FMT)


# --------------------------------------------------------------------------- client side


def _split_url(url: str) -> tuple[str, str, str, list[tuple[str, str]]]:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    path = parts.path or "/"
    query = parse_qsl(parts.query, keep_blank_values=True)
    return parts.scheme, host, path, query


def _host_header(scheme: str, host: str) -> str:
    # botocore strips default ports from the signed Host header; so do we.
    if (scheme == "http" and host.endswith(":80")) or (scheme == "https" and host.endswith(":443")):
        return host.rsplit(":", 1)[0]
    return host


_UNSIGNABLE = frozenset({"expect", "user-agent", "x-amzn-trace-id", "authorization", "connection"})


def sign_request(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body_sha256: str,
    access_key: str,
    secret_key: str,
    region: str,
    *,
    now: datetime | None = None,
) -> dict[str, str]:
    """Headers to add to sign a request (``Authorization``, ``x-amz-date``,
    ``x-amz-content-sha256`` and ``host`` if ``headers`` lacks it).

    ``url``'s path must already be percent-encoded the way it will be sent (use
    :func:`uri_encode` with ``encode_slash=False`` on keys).  ``body_sha256`` is a hex
    digest or one of the payload-mode constants.  Every header in ``headers`` except a
    few hop-by-hop ones is signed, as botocore does.
    """
    now = now if now is not None else datetime.now(UTC)
    timestamp = now.astimezone(UTC).strftime(_AMZ_DATE_FMT)
    scheme, host, path, query = _split_url(url)
    lower = {k.lower(): v for k, v in headers.items()}
    added: dict[str, str] = {}
    if "host" not in lower:
        added["host"] = _host_header(scheme, host)
    added["x-amz-date"] = timestamp
    added["x-amz-content-sha256"] = body_sha256
    all_headers = {**lower, **added}
    signed = sorted(n for n in all_headers if n not in _UNSIGNABLE)
    scope = f"{timestamp[:8]}/{region}/s3/aws4_request"
    creq = canonical_request(method, path, canonical_query(query), all_headers, signed, body_sha256)
    key = derive_signing_key(secret_key, timestamp[:8], region)
    signature = _sign(key, string_to_sign(timestamp, scope, creq))
    added["Authorization"] = (
        f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={';'.join(signed)}, "
        f"Signature={signature}"
    )
    return added


def presign_url(
    method: str,
    url: str,
    access_key: str,
    secret_key: str,
    region: str,
    expires: int = 3600,
    *,
    headers: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> str:
    """A presigned URL valid for ``expires`` seconds (payload UNSIGNED-PAYLOAD).

    Only ``host`` plus the given ``headers`` are signed; the client must send those
    headers with exactly these values.
    """
    if not 1 <= expires <= MAX_PRESIGN_EXPIRES:
        raise ValueError("expires must be within 1..604800 seconds")
    now = now if now is not None else datetime.now(UTC)
    timestamp = now.astimezone(UTC).strftime(_AMZ_DATE_FMT)
    scheme, host, path, query = _split_url(url)
    all_headers = {k.lower(): v for k, v in (headers or {}).items()}
    all_headers.setdefault("host", _host_header(scheme, host))
    signed = sorted(all_headers)
    scope = f"{timestamp[:8]}/{region}/s3/aws4_request"
    query = [
        *query,
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{access_key}/{scope}"),
        ("X-Amz-Date", timestamp),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", ";".join(signed)),
    ]
    cquery = canonical_query(query)
    creq = canonical_request(method, path, cquery, all_headers, signed, UNSIGNED_PAYLOAD)
    key = derive_signing_key(secret_key, timestamp[:8], region)
    signature = _sign(key, string_to_sign(timestamp, scope, creq))
    parts = urlsplit(url)
    return urlunsplit(
        (parts.scheme, parts.netloc, path, f"{cquery}&X-Amz-Signature={signature}", "")
    )
