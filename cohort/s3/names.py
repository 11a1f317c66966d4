"""Names, ranges, conditional requests and dates -- the small S3 rules.

* :func:`validate_bucket_name` -- S3's general-purpose bucket naming rules (3-63 chars of
  ``a-z0-9.-``, starting and ending with a letter or digit, no ``..``, not an IPv4
  address, no ``xn--``/``sthree-``/``amzn-s3-demo-`` prefix, no ``-s3alias``/``--ol-s3``/
  ``.mrap``/``--x-s3``/``--table-s3`` suffix); raises InvalidBucketName.
* :func:`validate_key` -- 1..1024 bytes of UTF-8; raises KeyTooLongError (too long) or
  InvalidArgument (empty / not encodable).  :func:`check_new_key` adds the rule for keys
  being created: no NUL, CR or LF (InvalidArgument); other control characters are
  allowed, as in S3.
* :func:`decode_path` -- a percent-encoded request path (or copy source) to text; bytes
  that are not UTF-8 raise InvalidURI instead of collapsing into U+FFFD (which made
  ``u%ff`` and ``u%fe`` one key).
* :func:`check_upload_size` -- EntityTooLarge for a PUT / UploadPart that declares more
  than 5 GiB (Content-Length, or ``x-amz-decoded-content-length`` for aws-chunked
  bodies), decided from the headers before any of the body is read.
* :func:`parse_range(header, size) <parse_range>` -- ``bytes=a-b``, ``bytes=a-``,
  ``bytes=-n``; returns inclusive ``(start, end)``, ``None`` for "send the whole object"
  (no header, syntactically invalid header, or a multi-range -- RFC 7233 says an
  invalid Range is ignored), or raises InvalidRange (416) when unsatisfiable.
  :func:`content_range` formats the response header.
* :func:`evaluate_conditions` -- If-Match / If-None-Match / If-Modified-Since /
  If-Unmodified-Since with RFC 7232 section 6 precedence (which is also what S3
  documents): returns ``None`` (proceed), ``304`` or ``412``.  :func:`check_conditions`
  raises the matching S3Error (NotModified / PreconditionFailed) instead.
* Request bits: :func:`parse_int_param`, :func:`parse_part_number`,
  :func:`parse_copy_source`, :func:`parse_copy_source_range`,
  :func:`extract_user_metadata` (2 KiB limit), :func:`bucket_from_host`.
* :func:`format_http_date` / :func:`parse_http_date` (IMF-fixdate out; IMF-fixdate,
  RFC 850 and asctime in) and :func:`format_iso8601` (``2024-01-02T03:04:05.678Z``).

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Final
from urllib.parse import parse_qs, unquote_to_bytes

from cohort.s3.errors import S3Error

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_SINGLE_PUT",
    "MAX_USER_METADATA",
    "bucket_from_host",
    "check_conditions",
    "check_new_key",
    "check_upload_size",
    "content_range",
    "decode_path",
    "etag_matches",
    "evaluate_conditions",
    "extract_user_metadata",
    "format_http_date",
    "format_iso8601",
    "parse_copy_source",
    "parse_copy_source_range",
    "parse_http_date",
    "parse_int_param",
    "parse_part_number",
    "parse_range",
    "quote_etag",
    "validate_bucket_name",
    "validate_key",
]

MAX_KEY_BYTES: Final = 1024
#: S3's limit for one PUT and for one part of a multipart upload: 5 GiB
MAX_SINGLE_PUT: Final = 5 * 1024**3
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_BAD_PREFIXES: Final = ("xn--", "sthree-", "amzn-s3-demo-")
_BAD_SUFFIXES: Final = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


# --------------------------------------------------------------------------- names


def validate_bucket_name(name: str) -> None:
    """Raise InvalidBucketName unless ``name`` follows S3's bucket naming rules."""

    def bad(why: str) -> S3Error:
        return S3Error(
            "InvalidBucketName",
            f"The specified bucket is not valid. ({why})",
            extra={"BucketName": name},
        )

    if not 3 <= len(name) <= 63:
        raise bad("length must be 3-63")
    if not _BUCKET_RE.fullmatch(name):
        raise bad(
            "only lowercase letters, digits, '.' and '-', starting and ending "
            "with a letter or digit"
        )
    if ".." in name or ".-" in name or "-." in name:
        raise bad("adjacent periods")
    if name.startswith(_BAD_PREFIXES):
        raise bad("reserved prefix")
    if name.endswith(_BAD_SUFFIXES):
        raise bad("reserved suffix")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        raise bad("formatted as an IP address")
    # dotted-quad look-alikes that IPv4Address rejects (leading zeros) are still IPs
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name):
        raise bad("formatted as an IP address")


def validate_key(key: str) -> None:
    """Raise unless ``key`` is a valid object key (1..1024 UTF-8 bytes)."""
    if not key:
        raise S3Error("InvalidArgument", "Object key must not be empty.")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        # lone surrogates: the client sent bytes that are not UTF-8
        raise S3Error("InvalidArgument", "Object key is not valid UTF-8.") from None
    if size > MAX_KEY_BYTES:
        raise S3Error(
            "KeyTooLongError",
            extra={"MaxSizeAllowed": str(MAX_KEY_BYTES), "Size": str(size)},
        )


_FORBIDDEN_IN_NEW_KEYS = re.compile("[\x00\r\n]")


def check_new_key(key: str) -> None:
    """Raise InvalidArgument if a key being *created* holds NUL, CR or LF.

    S3 itself stores any UTF-8, control characters included.  Cohort refuses these
    three for new objects: CR/LF split log lines and HTTP headers that echo a key
    (``Location``, copy sources), and NUL truncates keys in C tools.  Existing objects
    with such keys stay readable and deletable, so this is not part of
    :func:`validate_key`."""
    m = _FORBIDDEN_IN_NEW_KEYS.search(key)
    if m is not None:
        raise S3Error(
            "InvalidArgument",
            f"Object key must not contain the control character U+{ord(m.group()):04X} "
            "(NUL, CR and LF are refused).",
            extra={"ArgumentName": "key", "ArgumentValue": key.encode("unicode_escape").decode()},
        )


def decode_path(raw: str) -> str:
    """Percent-decode a request path (or copy source) strictly as UTF-8.

    ``raw`` is the path as received; aiohttp hands raw non-ASCII bytes over as
    surrogate escapes, which are turned back into the bytes they stand for.  Bytes that
    do not form UTF-8 raise InvalidURI (``urllib.parse.unquote`` would turn every such
    byte into U+FFFD, so distinct keys would collide)."""
    if "%" not in raw and raw.isascii():
        return raw
    try:
        data = unquote_to_bytes(raw.encode("utf-8", "surrogateescape"))
        return data.decode("utf-8")
    except UnicodeError:
        raise S3Error(
            "InvalidURI",
            "Couldn't parse the specified URI: it is not valid UTF-8 after percent-decoding.",
            extra={"URI": raw.encode("utf-8", "surrogateescape").decode("ascii", "replace")},
        ) from None


def check_upload_size(headers: Mapping[str, str], *, streaming: bool) -> None:
    """EntityTooLarge unless the declared body of a PUT / UploadPart is <= 5 GiB.

    ``streaming``: the body is aws-chunked, so its payload size is
    ``x-amz-decoded-content-length`` (``Content-Length`` then also counts the chunk
    signatures).  Only headers are looked at: the answer comes before the body."""
    declared = [headers.get("x-amz-decoded-content-length")]
    if not streaming:
        declared.append(headers.get("Content-Length"))
    for value in declared:
        v = (value or "").strip()
        if v.isascii() and v.isdigit() and int(v) > MAX_SINGLE_PUT:
            raise S3Error(
                "EntityTooLarge",
                extra={"ProposedSize": v, "MaxSizeAllowed": str(MAX_SINGLE_PUT)},
            )


# --------------------------------------------------------------------------- ranges


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Inclusive ``(start, end)`` for a Range header, None for the whole object."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header)
    if m is None:  # also rejects multi-range "bytes=0-1,5-6"; S3 ignores those too
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # syntactically invalid per RFC 7233 -> ignored
    if start >= size:
        raise _unsatisfiable(header, size)
    return start, min(end, size - 1)


def _unsatisfiable(header: str, size: int) -> S3Error:
    err = S3Error("InvalidRange", extra={"RangeRequested": header, "ActualObjectSize": str(size)})
    err.headers["Content-Range"] = f"bytes */{size}"
    return err


def content_range(start: int, end: int, size: int) -> str:
    return f"bytes {start}-{end}/{size}"


# --------------------------------------------------------------------------- dates


def format_http_date(when: datetime | float) -> str:
    """IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    dt = datetime.fromtimestamp(when, UTC) if isinstance(when, int | float) else when
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return format_datetime(dt.astimezone(UTC).replace(microsecond=0), usegmt=True)


def parse_http_date(value: str | None) -> datetime | None:
    """Parse an HTTP date (any of the three RFC 7231 formats); None if invalid."""
    if not value:
        return None
    try:
        dt = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


_SECOND_CACHE: dict[int, str] = {}


def format_iso8601(when: datetime | float) -> str:
    """``2024-01-02T03:04:05.678Z`` as S3 XML uses (milliseconds, UTC)."""
    if isinstance(when, int | float):
        # listings format thousands of these, mostly from a few distinct seconds: the
        # formatted second is cached, only the milliseconds are formatted every time
        secs = int(when)
        ms = min(999, int((when - secs) * 1000))
        head = _SECOND_CACHE.get(secs)
        if head is None:
            if len(_SECOND_CACHE) >= 4096:
                _SECOND_CACHE.clear()
            head = _SECOND_CACHE[secs] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(secs))
        return f"{head}{ms:03d}Z"
    dt = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# --------------------------------------------------------------------------- conditionals


def quote_etag(etag: str) -> str:
    """The ETag as sent in headers/XML: wrapped in double quotes exactly once."""
    etag = etag.strip()
    return etag if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2 else f'"{etag}"'


def _etag_list(header: str) -> list[str]:
    out = []
    for part in header.split(","):
        p = part.strip()
        if p.startswith("W/"):
            p = p[2:]
        p = p.strip('"').strip()
        if p:
            out.append(p)
    return out


def etag_matches(header: str, etag: str | None) -> bool:
    """True if the If-Match/If-None-Match list ``header`` matches ``etag``.

    ``*`` matches any existing object; quotes and ``W/`` are ignored (S3 stores only
    strong ETags and accepts unquoted ones from clients).
    """
    if etag is None:
        return False
    if header.strip() == "*":
        return True
    return etag.strip().strip('"') in _etag_list(header)


def evaluate_conditions(
    headers: Mapping[str, str],
    etag: str | None,
    last_modified: datetime | float | None,
    *,
    method: str = "GET",
) -> int | None:
    """None to proceed, 304 (Not Modified) or 412 (Precondition Failed); see _evaluate."""
    return _evaluate(headers, etag, last_modified, method)[0]


def _evaluate(
    headers: Mapping[str, str],
    etag: str | None,
    last_modified: datetime | float | None,
    method: str,
) -> tuple[int | None, str]:
    """None to proceed, 304 (Not Modified) or 412 (Precondition Failed).

    ``etag``/``last_modified`` describe the current object; pass ``None`` for both when
    it does not exist (then If-Match fails and If-None-Match: * passes -- conditional
    writes).  If-Modified-Since only applies to GET/HEAD; a failed If-None-Match gives
    304 for GET/HEAD and 412 otherwise.  Dates compare at one-second resolution and
    unparseable dates are ignored, per RFC 7232.
    """

    def h(name: str) -> str | None:
        v = headers.get(name)
        if v is not None:
            return v
        for k, val in headers.items():
            if k.lower() == name:
                return val
        return None

    if isinstance(last_modified, int | float):
        lm: datetime | None = datetime.fromtimestamp(int(last_modified), UTC)
    elif last_modified is not None:
        lm = last_modified if last_modified.tzinfo else last_modified.replace(tzinfo=UTC)
        lm = lm.astimezone(UTC).replace(microsecond=0)
    else:
        lm = None
    safe = method.upper() in ("GET", "HEAD")

    if_match = h("if-match")
    if if_match is not None:
        if not etag_matches(if_match, etag):
            return 412, "If-Match"
    else:
        ius = parse_http_date(h("if-unmodified-since"))
        if ius is not None and lm is not None and lm > ius:
            return 412, "If-Unmodified-Since"

    if_none_match = h("if-none-match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag):
            return (304 if safe else 412), "If-None-Match"
    elif safe:
        ims = parse_http_date(h("if-modified-since"))
        if ims is not None and lm is not None and lm <= ims:
            return 304, "If-Modified-Since"
    return None, ""


def check_conditions(
    headers: Mapping[str, str],
    etag: str | None,
    last_modified: datetime | float | None,
    *,
    method: str = "GET",
) -> None:
    """Like :func:`evaluate_conditions` but raises NotModified / PreconditionFailed.

    A NotModified error carries the ETag (and Last-Modified) in ``.headers`` since the
    304 response should include them.
    """
    result, condition = _evaluate(headers, etag, last_modified, method)
    if result is None:
        return
    if result == 304:
        err = S3Error("NotModified")
        if etag is not None:
            err.headers["ETag"] = quote_etag(etag)
        if last_modified is not None:
            err.headers["Last-Modified"] = format_http_date(last_modified)
        raise err
    raise S3Error("PreconditionFailed", extra={"Condition": condition})


# --------------------------------------------------------------------------- misc request bits

MAX_USER_METADATA: Final = 2048


def parse_int_param(
    value: str | None,
    name: str,
    *,
    default: int,
    minimum: int = 0,
    maximum: int | None = None,
    clamp: bool = True,
) -> int:
    """Integer query parameter (max-keys, part-number-marker...).

    Non-integers and values below ``minimum`` raise InvalidArgument; values above
    ``maximum`` are clamped (S3 caps max-keys at 1000 silently) unless ``clamp`` is false.
    """
    if value is None or value == "":
        return default
    try:
        n = int(value.strip())
    except ValueError:
        raise S3Error(
            "InvalidArgument",
            f"Provided {name} not an integer or within integer range",
            extra={"ArgumentName": name, "ArgumentValue": value},
        ) from None
    if n < minimum or (maximum is not None and n > maximum and not clamp):
        raise S3Error(
            "InvalidArgument",
            f"Argument {name} must be an integer between {minimum} and {maximum}"
            if maximum is not None
            else f"Argument {name} must be an integer >= {minimum}",
            extra={"ArgumentName": name, "ArgumentValue": value},
        )
    return min(n, maximum) if maximum is not None else n


def parse_part_number(value: str | None) -> int:
    """``partNumber`` for UploadPart: 1..10000, else InvalidArgument."""
    if value is None:
        raise S3Error(
            "InvalidArgument",
            "partNumber is required",
            extra={"ArgumentName": "partNumber", "ArgumentValue": ""},
        )
    return parse_int_param(value, "partNumber", default=0, minimum=1, maximum=10000, clamp=False)


def parse_copy_source(value: str) -> tuple[str, str, str | None]:
    """``x-amz-copy-source`` -> (bucket, key, version_id or None).

    Accepts ``bucket/key`` and ``/bucket/key``, URL-encoded, with an optional
    ``?versionId=``.  Raises InvalidArgument when malformed.
    """
    raw, _, query = value.partition("?")
    path = decode_path(raw).lstrip("/")
    bucket, sep, key = path.partition("/")
    if not bucket or not sep or not key:
        raise S3Error(
            "InvalidArgument",
            "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            extra={"ArgumentName": "x-amz-copy-source", "ArgumentValue": value},
        )
    version_id: str | None = None
    if query:
        versions = parse_qs(query, keep_blank_values=True).get("versionId")
        if versions:
            version_id = versions[0] or None
    return bucket, key, version_id


def parse_copy_source_range(value: str, size: int) -> tuple[int, int]:
    """``x-amz-copy-source-range: bytes=a-b`` (both bounds required) -> (start, end).

    Syntax errors raise InvalidArgument; ranges past the source end raise InvalidRange
    (copy ranges are never clamped).
    """
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", value.strip())
    if m is None or int(m.group(2)) < int(m.group(1)):
        raise S3Error(
            "InvalidArgument",
            "The x-amz-copy-source-range value must be of the form bytes=first-last where "
            "first and last are the zero-based offsets of the first and last bytes to copy",
            extra={"ArgumentName": "x-amz-copy-source-range", "ArgumentValue": value},
        )
    start, end = int(m.group(1)), int(m.group(2))
    if end >= size:
        raise S3Error(
            "InvalidRange",
            extra={"RangeRequested": value, "ActualObjectSize": str(size)},
        )
    return start, end


def extract_user_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """``x-amz-meta-*`` headers (names lower-cased, prefix kept); MetadataTooLarge over
    2 KiB of names+values (UTF-8), as S3 limits user metadata."""
    meta: dict[str, str] = {}
    total = 0
    for k, v in headers.items():
        lk = k.lower()
        if lk.startswith("x-amz-meta-"):
            meta[lk] = f"{meta[lk]},{v}" if lk in meta else v
    for k, v in meta.items():
        # header text may carry surrogate escapes (bytes that were not UTF-8): count
        # them as the bytes they were, never fail on them
        total += len(k.encode("utf-8", "surrogateescape")) - len("x-amz-meta-")
        total += len(v.encode("utf-8", "surrogateescape"))
    if total > MAX_USER_METADATA:
        raise S3Error(
            "MetadataTooLarge", extra={"Size": str(total), "MaxSizeAllowed": str(MAX_USER_METADATA)}
        )
    return meta


def bucket_from_host(host: str | None, base_domains: Iterable[str]) -> str | None:
    """Bucket name of a virtual-hosted-style request (``bkt.s3.example.com``), or None.

    ``base_domains`` are the service's own host names (``s3.example.com``); the port is
    ignored.  Returns None for path-style requests (host equal to a base domain or
    unrelated).
    """
    if not host:
        return None
    h = host.strip().lower()
    if h.startswith("["):  # IPv6 literal: never virtual-hosted
        return None
    h = h.rsplit(":", 1)[0] if ":" in h else h
    for base in base_domains:
        b = base.lower().rsplit(":", 1)[0]
        if h.endswith("." + b):
            bucket = h[: -len(b) - 1]
            return bucket or None
    return None
