"""Names, ranges, conditional requests and dates -- the small S3 rules.

* :func:`validate_bucket_name` -- S3's general-purpose bucket naming rules (3-63 chars of
  ``a-z0-9.-``, starting and ending with a letter or digit, no ``..``, not an IPv4
  address, no ``xn--``/``sthree-``/``amzn-s3-demo-`` prefix, no ``-s3alias``/``--ol-s3``/
  ``.mrap``/``--x-s3``/``--table-s3`` suffix); raises InvalidBucketName.
* :func:`validate_key` -- 1..1024 bytes of UTF-8; raises KeyTooLongError (too long) or
  InvalidArgument (empty / not encodable).
* :func:`parse_range(header, size) <parse_range>` -- ``bytes=a-b``, ``bytes=a-``,
  ``bytes=-n``; returns inclusive ``(start, end)``, ``None`` for "send the whole object"
  (no header, syntactically invalid header, or a multi-range -- RFC 7233 says an
  invalid Range is ignored), or raises InvalidRange (416) when unsatisfiable.
  :func:`content_range` formats the response header.
* :func:`evaluate_conditions` -- If-Match / If-None-Match / If-Modified-Since /
  If-Unmodified-Since with RFC 7232 section 6 precedence (which is also what S3
  documents): returns ``None`` (proceed), ``304`` or ``412``.  :func:`check_conditions`
  raises the matching S3Error (NotModified / PreconditionFailed) instead.
* :func:`format_http_date` / :func:`parse_http_date` (IMF-fixdate out; IMF-fixdate,
  RFC 850 and asctime in) and :func:`format_iso8601` (``2024-01-02T03:04:05.678Z``).

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Final

from cohort.s3.errors import S3Error

__all__ = [
    "MAX_KEY_BYTES",
    "check_conditions",
    "content_range",
    "etag_matches",
    "evaluate_conditions",
    "format_http_date",
    "format_iso8601",
    "parse_http_date",
    "parse_range",
    "quote_etag",
    "validate_bucket_name",
    "validate_key",
]

MAX_KEY_BYTES: Final = 1024
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
        raise bad("only lowercase letters, digits, '.' and '-', starting and ending "
                  "with a letter or digit")
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
    err = S3Error(
        "InvalidRange", extra={"RangeRequested": header, "ActualObjectSize": str(size)}
    )
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


def format_iso8601(when: datetime | float) -> str:
    """``2024-01-02T03:04:05.678Z`` as S3 XML uses (milliseconds, UTC)."""
    dt = datetime.fromtimestamp(when, UTC) if isinstance(when, int | float) else when
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
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
