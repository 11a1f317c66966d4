"""Incremental decoder (and encoder) for ``Content-Encoding: aws-chunked`` bodies.

Wire format (``hex`` is the chunk size in hex)::

    signed:    hex;chunk-signature=<64 hex>\\r\\n <data> \\r\\n ... 0;chunk-signature=<sig>\\r\\n
    unsigned:  hex\\r\\n <data> \\r\\n ... 0\\r\\n
    then, with a -TRAILER mode:   name:value\\r\\n ... [x-amz-trailer-signature:<sig>\\r\\n]
    and finally:                  \\r\\n

Contract of :class:`AwsChunkedDecoder`:

* ``AwsChunkedDecoder(auth, mode, *, decoded_length=None)``; ``mode`` is the request's
  payload mode (``AuthResult.payload_mode``), one of the ``STREAMING-*`` constants of
  :mod:`cohort.s3.sigv4`.  Signed modes need ``auth`` (for signing key, scope,
  timestamp and seed signature); unsigned ones accept ``None``.
* ``feed(data)`` returns the payload pieces decoded so far (possibly empty).  Pieces are
  released as soon as they arrive, *before* the signature of the chunk they belong to
  has been checked: the caller must treat everything as provisional until
  :meth:`finish` returns (abort the upload on any exception).  Memory stays bounded:
  only a header/trailer line (<= 4 KiB, trailers <= 16 KiB in total) is ever buffered.
* ``finish()`` is called at end of input; it checks the body was complete, the trailer
  signature (``AWS4-HMAC-SHA256-TRAILER``) and ``decoded_length``, and returns the
  trailing headers (lower-case names, ``x-amz-trailer-signature`` excluded).
* Errors raise :class:`S3Error`: SignatureDoesNotMatch (bad chunk / trailer signature),
  IncompleteBody (truncated input, fewer bytes than x-amz-decoded-content-length),
  InvalidArgument (malformed framing), InvalidRequest (more bytes than declared).

Chunk string-to-sign (chained from the request's seed signature)::

    AWS4-HMAC-SHA256-PAYLOAD \\n timestamp \\n scope \\n previous-sig \\n sha256("") \\n sha256(data)

Trailer string-to-sign (previous-sig is the final zero-length chunk's signature; the
hash covers ``name:value\\n`` for each trailer in the order sent)::

    AWS4-HMAC-SHA256-TRAILER \\n timestamp \\n scope \\n previous-sig \\n sha256(trailers)

:func:`encode_aws_chunked` produces such bodies (for tests and our own client).

Pure: no I/O, no aiohttp.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from cohort.s3.errors import S3Error
from cohort.s3.sigv4 import (
    EMPTY_SHA256,
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    derive_signing_key,
)

__all__ = [
    "AwsChunkedDecoder",
    "ChunkContext",
    "ChunkSigningContext",
    "chunk_context_from_signed_headers",
    "chunk_string_to_sign",
    "encode_aws_chunked",
    "split_content_encoding",
    "trailer_string_to_sign",
]

MAX_LINE: Final = 4096
MAX_TRAILERS: Final = 16384
_MODES: Final = frozenset({STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER})
_SIG_PREFIX: Final = b"chunk-signature="
_TRAILER_SIG: Final = "x-amz-trailer-signature"

_HEADER, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkSigningContext(Protocol):
    """What chunk signing needs; :class:`cohort.s3.sigv4.AuthResult` satisfies it."""

    @property
    def signing_key(self) -> bytes: ...
    @property
    def scope(self) -> str: ...
    @property
    def timestamp(self) -> str: ...
    @property
    def seed_signature(self) -> str: ...


def chunk_string_to_sign(timestamp: str, scope: str, previous: str, data_sha256: str) -> str:
    return (
        f"AWS4-HMAC-SHA256-PAYLOAD\n{timestamp}\n{scope}\n{previous}\n{EMPTY_SHA256}\n{data_sha256}"
    )


def trailer_string_to_sign(timestamp: str, scope: str, previous: str, canonical: bytes) -> str:
    digest = hashlib.sha256(canonical).hexdigest()
    return f"AWS4-HMAC-SHA256-TRAILER\n{timestamp}\n{scope}\n{previous}\n{digest}"


def _hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


def _malformed(detail: str) -> S3Error:
    return S3Error("InvalidArgument", f"Malformed aws-chunked body: {detail}")


class AwsChunkedDecoder:
    """Incremental aws-chunked decoder; see the module docstring for the contract."""

    def __init__(
        self,
        auth: ChunkSigningContext | None,
        mode: str,
        *,
        decoded_length: int | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"not an aws-chunked payload mode: {mode!r}")
        self._signed = mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
        self._trailer_mode = mode.endswith("-TRAILER")
        if self._signed and auth is None:
            raise ValueError("signed streaming modes need the request's AuthResult")
        self._auth = auth
        self._prev_sig = auth.seed_signature if auth is not None else ""
        self._decoded_length = decoded_length
        self._state = _HEADER
        self._line = bytearray()
        self._remaining = 0
        self._chunk_sig = ""
        self._hash = hashlib.sha256()
        self._crlf_seen = 0
        self._total = 0
        self._trailer_bytes = 0
        self._trailers: dict[str, str] = {}
        self._trailer_lines: list[tuple[str, str]] = []
        self._trailer_sig: str | None = None
        self._failed = False

    @property
    def decoded_bytes(self) -> int:
        """Payload bytes released so far."""
        return self._total

    @property
    def done(self) -> bool:
        """True once the terminating empty line has been read."""
        return self._state == _DONE

    # ------------------------------------------------------------------ feeding

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._failed:
            raise S3Error("InvalidArgument", "aws-chunked decoder already failed")
        try:
            return self._feed(bytes(data) if not isinstance(data, bytes) else data)
        except S3Error:
            self._failed = True
            raise

    def _feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, n - pos)
                piece = data[pos : pos + take] if (pos or take != n) else data
                if self._signed:
                    self._hash.update(piece)
                out.append(piece)
                self._total += take
                if self._decoded_length is not None and self._total > self._decoded_length:
                    raise S3Error(
                        "InvalidRequest",
                        "The decoded body is longer than x-amz-decoded-content-length.",
                    )
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._end_of_chunk_data()
            elif state == _DATA_END:
                expected = b"\r\n"[self._crlf_seen]
                if data[pos] != expected:
                    raise _malformed("chunk data is not followed by CRLF")
                pos += 1
                self._crlf_seen += 1
                if self._crlf_seen == 2:
                    self._state = _HEADER
            elif state in (_HEADER, _TRAILER):
                idx = data.find(b"\n", pos, pos + MAX_LINE + 1)
                end = min(n, pos + MAX_LINE + 1) if idx < 0 else idx + 1
                if len(self._line) + (end - pos) > MAX_LINE:
                    raise _malformed("header line too long")
                self._line += data[pos:end]
                pos = end
                if idx < 0:
                    break
                line = bytes(self._line)
                self._line.clear()
                if not line.endswith(b"\r\n"):
                    raise _malformed("line not terminated by CRLF")
                if state == _HEADER:
                    self._chunk_header(line[:-2])
                else:
                    self._trailer_line(line[:-2])
            else:  # _DONE
                raise _malformed("data after the end of the aws-chunked body")
        return out

    def _chunk_header(self, line: bytes) -> None:
        size_part, sep, ext = line.partition(b";")
        size_s = size_part.strip()
        if (
            not size_s
            or len(size_s) > 16
            or any(c not in b"0123456789abcdefABCDEF" for c in size_s)
        ):
            raise _malformed("bad chunk size")
        size = int(size_s, 16)
        if self._signed:
            ext = ext.strip()
            if not sep or not ext.startswith(_SIG_PREFIX):
                raise _malformed("missing chunk-signature")
            sig = ext[len(_SIG_PREFIX) :].decode("ascii", "replace").strip()
            if len(sig) != 64:
                raise _malformed("bad chunk-signature")
            self._chunk_sig = sig.lower()
            self._hash = hashlib.sha256()
        self._remaining = size
        if size == 0:
            self._end_of_chunk_data()
            self._state = _TRAILER
        else:
            self._state = _DATA

    def _end_of_chunk_data(self) -> None:
        if self._signed:
            assert self._auth is not None
            sts = chunk_string_to_sign(
                self._auth.timestamp, self._auth.scope, self._prev_sig, self._hash.hexdigest()
            )
            expected = _hmac_hex(self._auth.signing_key, sts)
            if not hmac.compare_digest(expected, self._chunk_sig):
                raise S3Error(
                    "SignatureDoesNotMatch",
                    extra={"StringToSign": sts, "SignatureProvided": self._chunk_sig},
                )
            self._prev_sig = expected
        self._state = _DATA_END
        self._crlf_seen = 0

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._complete_trailers()
            self._state = _DONE
            return
        if not self._trailer_mode:
            raise _malformed("trailing headers sent without a -TRAILER payload mode")
        self._trailer_bytes += len(line)
        if self._trailer_bytes > MAX_TRAILERS:
            raise _malformed("trailing headers too large")
        name_b, sep, value_b = line.partition(b":")
        if not sep or not name_b.strip():
            raise _malformed("bad trailing header line")
        try:
            name = name_b.decode("ascii").strip().lower()
            value = value_b.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise _malformed("trailing header is not text") from None
        if name == _TRAILER_SIG:
            if self._trailer_sig is not None:
                raise _malformed("duplicate x-amz-trailer-signature")
            self._trailer_sig = value.lower()
            return
        if self._trailer_sig is not None:
            raise _malformed("trailing header after x-amz-trailer-signature")
        self._trailer_lines.append((name, value))
        self._trailers[name] = value

    def _complete_trailers(self) -> None:
        if not self._signed or not self._trailer_mode:
            if self._trailer_sig is not None and not self._signed:
                # An unsigned stream cannot carry a meaningful trailer signature.
                raise _malformed("x-amz-trailer-signature in an unsigned stream")
            return
        assert self._auth is not None
        if self._trailer_sig is None:
            raise S3Error("SignatureDoesNotMatch", "Missing x-amz-trailer-signature.")
        provided = self._trailer_sig
        candidates = [self._trailer_lines, sorted(self._trailer_lines)]
        sts = ""
        for lines in candidates:
            canonical = "".join(f"{k}:{v}\n" for k, v in lines).encode("utf-8")
            text = trailer_string_to_sign(
                self._auth.timestamp, self._auth.scope, self._prev_sig, canonical
            )
            sts = sts or text
            if hmac.compare_digest(_hmac_hex(self._auth.signing_key, text), provided):
                return
        raise S3Error(
            "SignatureDoesNotMatch", extra={"StringToSign": sts, "SignatureProvided": provided}
        )

    # ------------------------------------------------------------------ finish

    def finish(self) -> dict[str, str]:
        """Check completeness and return the trailing headers; see module docstring."""
        if self._failed:
            raise S3Error("InvalidArgument", "aws-chunked decoder already failed")
        if self._state != _DONE:
            # Some clients omit the final CRLF (after the trailers, or after the final
            # zero-length chunk): accept a body that ended cleanly on a line boundary
            # once the final chunk was seen; everything before it was verified.
            if self._state == _TRAILER and not self._line:
                self._complete_trailers()
                self._state = _DONE
            else:
                self._failed = True
                raise S3Error("IncompleteBody", "The aws-chunked body ended prematurely.")
        if self._decoded_length is not None and self._total != self._decoded_length:
            raise S3Error(
                "IncompleteBody",
                "You did not provide the number of bytes specified by the "
                "x-amz-decoded-content-length HTTP header.",
            )
        return dict(self._trailers)


@dataclass(frozen=True, slots=True)
class ChunkContext:
    """A concrete :class:`ChunkSigningContext` (client side)."""

    signing_key: bytes
    scope: str
    timestamp: str
    seed_signature: str


def chunk_context_from_signed_headers(headers: Mapping[str, str], secret_key: str) -> ChunkContext:
    """Chunk-signing context for a request signed by :func:`cohort.s3.sigv4.sign_request`.

    ``headers`` must hold its ``Authorization`` and ``x-amz-date``; the request's
    x-amz-content-sha256 must be a STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER] mode.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    auth = lower["authorization"]
    fields = dict(
        part.strip().split("=", 1) for part in auth.split(" ", 1)[1].split(",") if "=" in part
    )
    _, date, region, service, terminal = fields["Credential"].rsplit("/", 4)
    return ChunkContext(
        signing_key=derive_signing_key(secret_key, date, region, service),
        scope=f"{date}/{region}/{service}/{terminal}",
        timestamp=lower["x-amz-date"],
        seed_signature=fields["Signature"],
    )


def split_content_encoding(value: str | None) -> tuple[bool, str | None]:
    """(is aws-chunked, remaining Content-Encoding to store or None).

    ``aws-chunked`` may be combined with other codings (``aws-chunked,gzip``); S3 strips
    it and stores the rest.
    """
    if value is None:
        return False, None
    codings = [c.strip() for c in value.split(",") if c.strip()]
    rest = [c for c in codings if c.lower() != "aws-chunked"]
    return len(rest) != len(codings), ",".join(rest) or None


def encode_aws_chunked(
    chunks: Iterable[bytes],
    signer: ChunkSigningContext | None = None,
    trailers: Mapping[str, str] | None = None,
) -> Iterator[bytes]:
    """Encode ``chunks`` (each non-empty chunk becomes one aws-chunked chunk).

    With ``signer`` the chunks (and trailers) are signed, chaining from
    ``signer.seed_signature``; ``trailers`` (name -> value) are appended after the final
    chunk.  The matching payload modes are STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]
    and STREAMING-UNSIGNED-PAYLOAD-TRAILER.
    """
    prev = signer.seed_signature if signer is not None else ""

    def header(data: bytes) -> bytes:
        nonlocal prev
        if signer is None:
            return b"%x\r\n" % len(data)
        sts = chunk_string_to_sign(
            signer.timestamp, signer.scope, prev, hashlib.sha256(data).hexdigest()
        )
        prev = _hmac_hex(signer.signing_key, sts)
        return b"%x;chunk-signature=%s\r\n" % (len(data), prev.encode("ascii"))

    for chunk in chunks:
        if chunk:
            yield header(chunk) + chunk + b"\r\n"
    final = header(b"")
    if trailers is None:
        yield final + b"\r\n"
        return
    lines = [(k.lower(), v) for k, v in trailers.items()]
    body = b"".join(f"{k}:{v}\r\n".encode() for k, v in lines)
    if signer is not None:
        canonical = "".join(f"{k}:{v}\n" for k, v in lines).encode("utf-8")
        sig = _hmac_hex(
            signer.signing_key,
            trailer_string_to_sign(signer.timestamp, signer.scope, prev, canonical),
        )
        body += f"{_TRAILER_SIG}:{sig}\r\n".encode()
    yield final + body + b"\r\n"
