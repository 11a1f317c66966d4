"""Object checksums as S3 uses them, and request-checksum negotiation.

Algorithms (names as in ``x-amz-checksum-<alg>`` / ``x-amz-sdk-checksum-algorithm``,
upper-case here): ``CRC32``, ``CRC32C``, ``CRC64NVME``, ``SHA1``, ``SHA256``, plus
``MD5`` (Content-MD5 and ETags).  Every digest is big-endian bytes; S3 transmits the
base64 of it (:meth:`Hasher.b64digest`).

* :func:`new_hasher(alg) <new_hasher>` -> an incremental :class:`Hasher`
  (``update``/``digest``/``b64digest``/``copy``).
* :class:`ChecksumSet` feeds one byte stream to several hashers at once.
* :func:`parse_checksum_headers(headers) <parse_checksum_headers>` reads
  ``x-amz-checksum-<alg>``, ``x-amz-sdk-checksum-algorithm``, ``x-amz-trailer`` and
  ``Content-MD5`` into a :class:`ChecksumRequest` (raising InvalidDigest /
  InvalidRequest for malformed values).  ``ChecksumRequest.new_set()`` builds the
  hashers to run over the body; ``ChecksumRequest.verify(set, trailers)`` checks the
  results (BadDigest on mismatch) and returns the verified ``{alg: base64}`` to store.
* :func:`verify_small_body(headers, body) <verify_small_body>` checks a request body
  that was read whole (DeleteObjects) against its Content-MD5 / ``x-amz-checksum-*``
  header, and can insist that one is present (S3 requires it for DeleteObjects).
* :func:`multipart_etag` and :func:`composite_checksum` for CompleteMultipartUpload.

CRC64NVME uses ``awscrt`` when importable (C, fast) and otherwise a table-driven pure
Python implementation (reflected polynomial 0x9a6c9329ac4bc9b5, i.e. 0xad93d23594c93659
reversed; init and xorout all ones) -- correct but only tens of MB/s.

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import crc32c as _crc32c

from cohort.s3.errors import S3Error

_crt_checksums: Any
try:  # optional accelerator; the pure-Python path below is the reference
    _crt_checksums = importlib.import_module("awscrt.checksums")
except ImportError:  # pragma: no cover - depends on the environment
    _crt_checksums = None

__all__ = [
    "ALGORITHMS",
    "CHECKSUM_ALGORITHMS",
    "ChecksumRequest",
    "ChecksumSet",
    "Hasher",
    "composite_checksum",
    "crc64nvme",
    "multipart_etag",
    "new_hasher",
    "parse_checksum_headers",
    "verify_small_body",
]

#: algorithms valid in ``x-amz-checksum-*`` headers
CHECKSUM_ALGORITHMS: Final = ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256")
#: everything :func:`new_hasher` accepts
ALGORITHMS: Final = (*CHECKSUM_ALGORITHMS, "MD5")
_DIGEST_SIZE: Final = {"CRC32": 4, "CRC32C": 4, "CRC64NVME": 8, "SHA1": 20, "SHA256": 32, "MD5": 16}


class Hasher(Protocol):
    name: str

    def update(self, data: bytes | bytearray | memoryview) -> None: ...
    def digest(self) -> bytes: ...
    def b64digest(self) -> str: ...
    def copy(self) -> Hasher: ...


# --------------------------------------------------------------------------- CRC64NVME

_CRC64_POLY_REFLECTED: Final = 0x9A6C9329AC4BC9B5
_MASK64: Final = 0xFFFFFFFFFFFFFFFF


def _make_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC64_POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC64_TABLE: Final = _make_table()


def _crc64nvme_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    table = _CRC64_TABLE
    c = crc ^ _MASK64
    for b in bytes(data) if isinstance(data, memoryview) else data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ _MASK64


def crc64nvme(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC64/NVME of ``data`` continuing from ``crc`` (the previous result)."""
    if _crt_checksums is not None:
        result: int = _crt_checksums.crc64nvme(bytes(data), crc)
        return result
    return _crc64nvme_py(data, crc)


# --------------------------------------------------------------------------- hashers


class _IntCrc:
    """Incremental CRC over a function ``f(data, previous) -> int``."""

    def __init__(self, name: str, size: int, func: Any, value: int = 0) -> None:
        self.name = name
        self._size = size
        self._func = func
        self._value = value

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._value = self._func(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._size, "big")

    def b64digest(self) -> str:
        return base64.b64encode(self.digest()).decode("ascii")

    def copy(self) -> _IntCrc:
        return _IntCrc(self.name, self._size, self._func, self._value)


class _HashlibHasher:
    def __init__(self, name: str, h: Any) -> None:
        self.name = name
        self._h = h

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        d: bytes = self._h.digest()
        return d

    def b64digest(self) -> str:
        return base64.b64encode(self.digest()).decode("ascii")

    def copy(self) -> _HashlibHasher:
        return _HashlibHasher(self.name, self._h.copy())


def _crc32(data: bytes | bytearray | memoryview, value: int) -> int:
    return zlib.crc32(data, value)


def _crc32c_fn(data: bytes | bytearray | memoryview, value: int) -> int:
    result: int = _crc32c.crc32c(data, value)
    return result


def new_hasher(algorithm: str) -> Hasher:
    """A fresh incremental hasher for one of :data:`ALGORITHMS` (case-insensitive)."""
    alg = algorithm.upper()
    if alg == "CRC32":
        return _IntCrc(alg, 4, _crc32)
    if alg == "CRC32C":
        return _IntCrc(alg, 4, _crc32c_fn)
    if alg == "CRC64NVME":
        return _IntCrc(alg, 8, crc64nvme)
    if alg == "SHA1":
        return _HashlibHasher(alg, hashlib.sha1())
    if alg == "SHA256":
        return _HashlibHasher(alg, hashlib.sha256())
    if alg == "MD5":
        return _HashlibHasher(alg, hashlib.md5(usedforsecurity=False))
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


class ChecksumSet:
    """Several hashers fed from one stream.  ``algorithms`` may repeat (deduplicated)."""

    def __init__(self, algorithms: Iterable[str]) -> None:
        self.hashers: dict[str, Hasher] = {}
        for alg in algorithms:
            a = alg.upper()
            if a not in self.hashers:
                self.hashers[a] = new_hasher(a)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        for h in self.hashers.values():
            h.update(data)

    def __contains__(self, algorithm: str) -> bool:
        return algorithm.upper() in self.hashers

    def digest(self, algorithm: str) -> bytes:
        return self.hashers[algorithm.upper()].digest()

    def b64digest(self, algorithm: str) -> str:
        return self.hashers[algorithm.upper()].b64digest()

    def hexdigest(self, algorithm: str) -> str:
        return self.digest(algorithm).hex()

    def b64digests(self) -> dict[str, str]:
        return {alg: h.b64digest() for alg, h in self.hashers.items()}


# --------------------------------------------------------------------------- negotiation


def _get(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for k, v in headers.items():
        if k.lower() == lname:
            return v
    return None


def _decode_b64(value: str, size: int) -> bytes | None:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def _invalid_header(alg: str) -> S3Error:
    return S3Error("InvalidRequest", f"Value for x-amz-checksum-{alg.lower()} header is invalid.")


@dataclass(slots=True)
class ChecksumRequest:
    """What the request asks us to verify / compute.

    ``algorithm`` is the flexible-checksum algorithm of the object (from a checksum
    header, the trailer declaration, or ``x-amz-sdk-checksum-algorithm``), or None.
    ``expected`` maps algorithm -> base64 value given in headers (``MD5`` for
    Content-MD5).  ``trailer`` is the algorithm whose value arrives as a trailer.
    """

    algorithm: str | None = None
    expected: dict[str, str] = field(default_factory=dict)
    trailer: str | None = None
    checksum_type: str | None = None

    @property
    def content_md5(self) -> str | None:
        return self.expected.get("MD5")

    def algorithms(self, *, include_md5: bool = True) -> list[str]:
        """Algorithms the body must be hashed with (MD5 first: it is the ETag)."""
        algs = ["MD5"] if include_md5 else []
        for a in (*self.expected, self.algorithm):
            if a is not None and a not in algs:
                algs.append(a)
        return algs

    def new_set(self, *, include_md5: bool = True) -> ChecksumSet:
        return ChecksumSet(self.algorithms(include_md5=include_md5))

    def verify(
        self, computed: ChecksumSet, trailers: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Compare digests; return the verified flexible checksum ``{alg: base64}``.

        Raises BadDigest on mismatch, InvalidRequest if a declared trailer is missing
        or malformed.
        """
        expected = dict(self.expected)
        if self.trailer is not None:
            name = f"x-amz-checksum-{self.trailer.lower()}"
            value = _get(trailers or {}, name)
            if value is None:
                raise S3Error(
                    "InvalidRequest",
                    f"The {name} trailer declared in x-amz-trailer was not sent.",
                )
            if _decode_b64(value, _DIGEST_SIZE[self.trailer]) is None:
                raise _invalid_header(self.trailer)
            expected[self.trailer] = value.strip()
        for alg, want in expected.items():
            got = computed.b64digest(alg)
            if got != want:
                if alg == "MD5":
                    raise S3Error("BadDigest")
                raise S3Error(
                    "BadDigest",
                    f"The {alg} you specified did not match the calculated checksum.",
                )
        out: dict[str, str] = {}
        if self.algorithm is not None:
            out[self.algorithm] = expected.get(self.algorithm) or computed.b64digest(self.algorithm)
        return out


def parse_checksum_headers(headers: Mapping[str, str]) -> ChecksumRequest:
    """Parse checksum-related request headers; see the module docstring."""
    req = ChecksumRequest()
    md5 = _get(headers, "content-md5")
    if md5 is not None:
        if _decode_b64(md5, 16) is None:
            raise S3Error("InvalidDigest")
        req.expected["MD5"] = md5.strip()

    found: list[str] = []
    for alg in CHECKSUM_ALGORITHMS:
        value = _get(headers, f"x-amz-checksum-{alg.lower()}")
        if value is None:
            continue
        if _decode_b64(value, _DIGEST_SIZE[alg]) is None:
            raise _invalid_header(alg)
        req.expected[alg] = value.strip()
        found.append(alg)
    if len(found) > 1:
        raise S3Error(
            "InvalidRequest",
            "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
        )

    trailer_decl = _get(headers, "x-amz-trailer")
    if trailer_decl is not None:
        names = [n.strip().lower() for n in trailer_decl.split(",") if n.strip()]
        for n in names:
            alg = n.removeprefix("x-amz-checksum-").upper()
            if not n.startswith("x-amz-checksum-") or alg not in CHECKSUM_ALGORITHMS:
                raise S3Error(
                    "InvalidRequest",
                    f"The value specified in the x-amz-trailer header is not supported: {n}",
                )
            if req.trailer is not None or found:
                raise S3Error(
                    "InvalidRequest",
                    "Expecting a single x-amz-checksum- header. Multiple checksum Types "
                    "are not allowed.",
                )
            req.trailer = alg

    sdk_alg = _get(headers, "x-amz-sdk-checksum-algorithm")
    declared = found[0] if found else req.trailer
    if sdk_alg is not None:
        alg = sdk_alg.strip().upper()
        if alg not in CHECKSUM_ALGORITHMS:
            raise S3Error(
                "InvalidRequest", "Value for x-amz-sdk-checksum-algorithm header is invalid."
            )
        if declared is None:
            raise S3Error(
                "InvalidRequest",
                "x-amz-sdk-checksum-algorithm specified, but no corresponding "
                "x-amz-checksum-* or x-amz-trailer headers were found.",
            )
        if declared != alg:
            raise S3Error(
                "InvalidRequest",
                "Value for x-amz-sdk-checksum-algorithm header is invalid.",
            )
    req.algorithm = declared

    ctype = _get(headers, "x-amz-checksum-type")
    if ctype is not None:
        ct = ctype.strip().upper()
        if ct not in ("COMPOSITE", "FULL_OBJECT"):
            raise S3Error("InvalidRequest", "Value for x-amz-checksum-type header is invalid.")
        req.checksum_type = ct
    return req


def verify_small_body(headers: Mapping[str, str], body: bytes, *, required: bool) -> None:
    """Verify a whole, already read request body against its integrity header.

    InvalidDigest / InvalidRequest for malformed headers, BadDigest on mismatch.  With
    ``required``, a request that carries neither Content-MD5 nor an
    ``x-amz-checksum-<alg>`` value is refused as S3 refuses it (InvalidRequest
    "Missing required header for this request: Content-MD5"); a checksum declared only
    as a trailer does not count, as the body here is not aws-chunked."""
    req = parse_checksum_headers(headers)
    if not req.expected:
        if required:
            raise S3Error(
                "InvalidRequest",
                "Missing required header for this request: Content-MD5 "
                "(or an x-amz-checksum-* header)",
            )
        return
    computed = req.new_set(include_md5=False)
    computed.update(body)
    req.trailer = None
    req.verify(computed)


# --------------------------------------------------------------------------- multipart


def multipart_etag(part_md5s: Iterable[bytes]) -> str:
    """S3's multipart ETag (unquoted): ``hex(md5(md5_1 || ... || md5_n))-n``.

    ``part_md5s`` are the raw 16-byte MD5 digests of the parts, in part order.
    """
    digests = list(part_md5s)
    h = hashlib.md5(b"".join(digests), usedforsecurity=False)
    return f"{h.hexdigest()}-{len(digests)}"


def composite_checksum(algorithm: str, part_checksums_b64: Iterable[str]) -> str:
    """COMPOSITE multipart checksum: ``b64(alg(raw_1 || ... || raw_n))-n``.

    ``part_checksums_b64`` are the parts' base64 checksums of ``algorithm``, in order.
    """
    raws = [base64.b64decode(v) for v in part_checksums_b64]
    h = new_hasher(algorithm)
    h.update(b"".join(raws))
    return f"{h.b64digest()}-{len(raws)}"
