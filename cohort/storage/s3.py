"""S3 backend of the :class:`~cohort.storage.base.Store` protocol: any S3-compatible
service that honours conditional writes (AWS S3, Ceph's radosgw, MinIO, another Cohort).

The client is ``aiobotocore`` (asyncio over botocore, already pinned in requirements.lock).
A key ``k`` is the object ``<prefix>k`` in one bucket.

* ``put(if_absent=True)`` -> ``PutObject`` with ``If-None-Match: *``; ``412`` ->
  :class:`PreconditionFailed`.  This is the operation log's fence, so :meth:`S3Store.open`
  first checks that the service really honours it: it creates a probe object twice with
  ``If-None-Match: *`` (the second must fail with 412) and replaces it with a wrong
  ``If-Match`` (must fail with 412), and refuses the service with
  :class:`ConditionalWritesUnsupported` otherwise.  A service that ignores the header
  would let a paused former owner overwrite the new owner's log.
* ``put(if_match=etag)`` -> ``PutObject`` with ``If-Match: etag`` (unquoted: radosgw
  compares the header's bytes with its stored etag); 412 (or 404: no such
  object) -> :class:`PreconditionFailed`.  The etag is the service's ETag of the value
  (an MD5 for a single PUT on most services), so a compare-and-swap compares content.
* Conditional PUTs are never retried blindly.  botocore retries 5xx answers and dropped
  connections, and a retried conditional PUT whose first attempt was applied gets 412:
  the writer would take its own write for another's.  Reading the value back and
  comparing bytes does not settle it either: two writers of a compare-and-swap may write
  the same bytes (measured: a lost increment on radosgw).  So conditional PUTs go through
  a client without retries; an answer that is neither success nor 412 raises
  :class:`StoreError` ("outcome unknown"), and the caller decides (the operation log's
  next append of that sequence number then finds it, raises ``Fenced``, and the
  partition is recovered with the segment in it).  Only AWS's ``409
  ConditionalRequestConflict``, which means "not applied, retry", is retried.
* ``put_stream`` sends values up to ``multipart_threshold`` (8 MiB) as one PUT and larger
  ones as a multipart upload (the object appears whole at CompleteMultipartUpload, or not
  at all; an aborted upload is cleaned up).
* ``read_range`` -> ``GET`` with ``Range``; ``list`` -> ``ListObjectsV2`` pages, which S3
  returns in lexicographic (UTF-8 binary) order.
* Durability and atomicity are the service's: S3 PUTs are atomic and durable once
  answered.

:attr:`S3Store.requests` counts the requests issued per operation (``PutObject``,
``GetObject``, ...), for the cost per client request.

URL: ``s3://bucket/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1
&credentials=/path/cluster.json`` (a JSON file with ``access_key`` and ``secret_key``;
without it botocore's usual chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, ...);
``access_key=``/``secret_key=`` in the URL work too but put the secret in the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cohort.storage.base import NotFound, PreconditionFailed, StoreError

_SAFE = re.compile(r"^[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*$")
MULTIPART_THRESHOLD = 8 << 20
PART_SIZE = 8 << 20


class ConditionalWritesUnsupported(StoreError):
    """The S3 service does not honour If-None-Match / If-Match on PUT."""


def _code(e: Exception) -> tuple[str, int, int]:
    """(error code, HTTP status, botocore retry attempts) of a ClientError."""
    resp: dict[str, Any] = getattr(e, "response", None) or {}
    err = resp.get("Error") or {}
    meta = resp.get("ResponseMetadata") or {}
    return (
        str(err.get("Code", "")),
        int(meta.get("HTTPStatusCode", 0) or 0),
        int(meta.get("RetryAttempts", 0) or 0),
    )


def _not_found(e: Exception) -> bool:
    code, status, _ = _code(e)
    return status == 404 or code in ("NoSuchKey", "404", "NotFound")


def _precondition(e: Exception) -> bool:
    code, status, _ = _code(e)
    return status == 412 or code == "PreconditionFailed"


class S3Store:
    """Shared storage in an S3 bucket (under a key prefix)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        addressing: str = "path",
        max_connections: int = 64,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        check_conditional: bool = True,
    ) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self.addressing = addressing
        self.max_connections = max_connections
        self.multipart_threshold = max(multipart_threshold, 5 << 20)
        self.part_size = max(part_size, 5 << 20)  # S3's minimum part size
        self.check_conditional = check_conditional
        self.requests: Counter[str] = Counter()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._conditional: Any = None  # the same, without botocore's retries
        self._open_lock: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """``s3://bucket/prefix?endpoint=...&region=...&credentials=FILE``"""
        u = urlsplit(url)
        if u.scheme != "s3" or not u.netloc:
            raise StoreError(f"not an s3 URL: {url!r} (s3://bucket/prefix?endpoint=...)")
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(q) - {"endpoint", "region", "credentials", "access_key", "secret_key",
                            "addressing", "max_connections"}  # fmt: skip
        if unknown:
            raise StoreError(f"unknown s3 URL options: {sorted(unknown)}")
        access, secret = q.get("access_key"), q.get("secret_key")
        if "credentials" in q:
            doc = json.loads(Path(q["credentials"]).read_text())
            access = doc.get("access_key") or doc.get("aws_access_key_id")
            secret = doc.get("secret_key") or doc.get("aws_secret_access_key")
        return cls(
            unquote(u.netloc),
            unquote(u.path.lstrip("/")),
            endpoint=q.get("endpoint"),
            region=q.get("region", "us-east-1"),
            access_key=access,
            secret_key=secret,
            addressing=q.get("addressing", "path"),
            max_connections=int(q.get("max_connections", "64")),
        )

    # -- connection -----------------------------------------------------------------------
    async def open(self) -> S3Store:
        """Create the client, check the bucket, and check conditional writes are honoured."""
        if self._client is not None:
            return self
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._client is not None:
                return self
            try:
                from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
                from aiobotocore.session import get_session  # type: ignore[import-untyped]
            except ImportError as e:
                raise StoreError(
                    "the s3 backend needs aiobotocore (pip install aiobotocore)"
                ) from e

            def config(attempts: int) -> Any:
                return AioConfig(
                    s3={"addressing_style": self.addressing},
                    retries={"max_attempts": attempts, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=60,
                    max_pool_connections=self.max_connections,
                    # servers that predate the flexible checksums (radosgw 16) break on them
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )

            stack = contextlib.AsyncExitStack()
            session = get_session()
            clients = []
            # conditional PUTs are never retried by botocore (see the module doc)
            for attempts in (4, 1):
                clients.append(
                    await stack.enter_async_context(
                        session.create_client(
                            "s3",
                            endpoint_url=self.endpoint,
                            region_name=self.region,
                            aws_access_key_id=self._access_key,
                            aws_secret_access_key=self._secret_key,
                            config=config(attempts),
                        )
                    )
                )
            client, self._conditional = clients
            try:
                try:
                    await client.head_bucket(Bucket=self.bucket)
                except Exception as e:
                    raise StoreError(f"s3 bucket {self.bucket!r} at {self.endpoint}: {e}") from e
                self._client = client
                self._stack = stack
                if self.check_conditional:
                    await self.check()
            except BaseException:
                self._client = None
                self._conditional = None
                self._stack = None
                await stack.aclose()
                raise
        return self

    async def check(self) -> None:
        """Refuse a service that does not honour conditional PUTs (the log's fence)."""
        probe = f"{self.prefix}~cohort-probe/{uuid.uuid4().hex}"
        c = self._conditional
        try:
            r = await c.put_object(Bucket=self.bucket, Key=probe, Body=b"1", IfNoneMatch="*")
            etag = str(r.get("ETag", "")).strip('"')
            try:
                await c.put_object(Bucket=self.bucket, Key=probe, Body=b"2", IfNoneMatch="*")
            except Exception as e:
                if not _precondition(e):
                    raise StoreError(f"s3 probe: second If-None-Match PUT: {e}") from e
            else:
                raise ConditionalWritesUnsupported(
                    f"the S3 service at {self.endpoint or 'AWS'} (bucket {self.bucket}) does not "
                    "honour 'If-None-Match: *' on PUT: a second create-if-absent of one key "
                    "succeeded. Cohort's operation log fences a former owner with it, so this "
                    "service cannot hold a Cohort cluster's storage."
                )
            wrong = "0" * 32 if etag != "0" * 32 else "1" * 32
            try:
                await c.put_object(Bucket=self.bucket, Key=probe, Body=b"3", IfMatch=wrong)
            except Exception as e:
                if not _precondition(e):
                    raise StoreError(f"s3 probe: If-Match PUT: {e}") from e
            else:
                raise ConditionalWritesUnsupported(
                    f"the S3 service at {self.endpoint or 'AWS'} (bucket {self.bucket}) does not "
                    "honour 'If-Match' on PUT: a replacement with a wrong etag succeeded."
                )
        finally:
            with contextlib.suppress(Exception):
                await c.delete_object(Bucket=self.bucket, Key=probe)

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = None
        self._client = None
        self._conditional = None

    async def aclose(self) -> None:
        await self.close()

    async def _c(self, op: str) -> Any:
        if self._client is None:
            await self.open()
        self.requests[op] += 1
        return self._client

    def _key(self, key: str) -> str:
        if not _SAFE.match(key) or ".." in key.split("/"):
            raise StoreError(f"invalid storage key {key!r}")
        return self.prefix + key

    # -- reads ---------------------------------------------------------------------------
    async def get(self, key: str) -> bytes:
        return (await self.get_with_etag(key))[0]

    async def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """Value and etag of one GET (not in the Store protocol: read-modify-write)."""
        k = self._key(key)
        c = await self._c("GetObject")
        try:
            r = await c.get_object(Bucket=self.bucket, Key=k)
        except Exception as e:
            if _not_found(e):
                raise NotFound(key) from None
            raise StoreError(f"s3 GET {key}: {e}") from e
        async with r["Body"] as body:
            data: bytes = await body.read()
        return data, str(r.get("ETag", "")).strip('"')

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        k = self._key(key)
        if start < 0 or length < 0:
            raise StoreError("negative range")
        if length == 0:
            await self.size(key)
            return b""
        c = await self._c("GetObject")
        try:
            r = await c.get_object(
                Bucket=self.bucket, Key=k, Range=f"bytes={start}-{start + length - 1}"
            )
        except Exception as e:
            if _not_found(e):
                raise NotFound(key) from None
            code, status, _ = _code(e)
            if status == 416 or code == "InvalidRange":
                return b""  # start at or past the end: nothing, as for a file
            raise StoreError(f"s3 GET {key}: {e}") from e
        async with r["Body"] as body:
            data: bytes = await body.read()
        return data[:length]

    async def size(self, key: str) -> int:
        return (await self._head(key))[0]

    async def etag(self, key: str) -> str:
        return (await self._head(key))[1]

    async def _head(self, key: str) -> tuple[int, str]:
        k = self._key(key)
        c = await self._c("HeadObject")
        try:
            r = await c.head_object(Bucket=self.bucket, Key=k)
        except Exception as e:
            if _not_found(e):
                raise NotFound(key) from None
            raise StoreError(f"s3 HEAD {key}: {e}") from e
        return int(r["ContentLength"]), str(r.get("ETag", "")).strip('"')

    # -- writes --------------------------------------------------------------------------
    async def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        k = self._key(key)
        if if_absent and if_match is not None:
            raise StoreError("if_absent and if_match together")
        data = bytes(data)
        if len(data) > 5 << 30:
            raise StoreError(f"{key}: a single S3 PUT holds at most 5 GiB")
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k, "Body": data}
        if if_absent:
            kw["IfNoneMatch"] = "*"
        elif if_match is not None:
            # unquoted: radosgw compares the header's bytes with its stored (unquoted) etag
            kw["IfMatch"] = if_match
        conditional = if_absent or if_match is not None
        for attempt in range(20):
            c = await self._c("PutObject")
            if conditional:
                c = self._conditional
            try:
                r = await c.put_object(**kw)
                return str(r.get("ETag", "")).strip('"')
            except Exception as e:
                code, status, _retries = _code(e)
                if status == 409 and code == "ConditionalRequestConflict":
                    # AWS: a concurrent conditional write on the key; not applied, retry
                    await asyncio.sleep(min(0.5, 0.01 * 2**attempt))
                    continue
                if conditional and (_precondition(e) or (if_match and _not_found(e))):
                    raise PreconditionFailed(
                        f"{key} exists" if if_absent else f"{key} changed"
                    ) from None
                if conditional:
                    raise StoreError(f"s3 conditional PUT {key}: outcome unknown: {e}") from e
                raise StoreError(f"s3 PUT {key}: {e}") from e
        raise StoreError(f"s3 PUT {key}: conditional write kept conflicting")

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        k = self._key(key)
        buf = bytearray()
        it = chunks.__aiter__()
        exhausted = False
        while len(buf) <= self.multipart_threshold:
            try:
                buf += await it.__anext__()
            except StopAsyncIteration:
                exhausted = True
                break
        if exhausted:
            await self.put(key, bytes(buf))
            return len(buf)
        c = await self._c("CreateMultipartUpload")
        up = await c.create_multipart_upload(Bucket=self.bucket, Key=k)
        upload_id = up["UploadId"]
        parts: list[dict[str, Any]] = []
        size = 0
        inflight: set[asyncio.Task[dict[str, Any]]] = set()

        async def send(n: int, body: bytes) -> dict[str, Any]:
            cc = await self._c("UploadPart")
            r = await cc.upload_part(
                Bucket=self.bucket, Key=k, UploadId=upload_id, PartNumber=n, Body=body
            )
            return {"PartNumber": n, "ETag": r["ETag"]}

        async def drain(limit: int) -> None:
            while len(inflight) > limit:
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    inflight.discard(t)
                    parts.append(t.result())

        try:
            n = 0
            while True:
                while len(buf) >= self.part_size:
                    n += 1
                    piece = bytes(buf[: self.part_size])
                    del buf[: self.part_size]
                    size += len(piece)
                    inflight.add(asyncio.ensure_future(send(n, piece)))
                    await drain(3)
                if exhausted:
                    break
                try:
                    buf += await it.__anext__()
                except StopAsyncIteration:
                    exhausted = True
            if buf or n == 0:
                n += 1
                size += len(buf)
                inflight.add(asyncio.ensure_future(send(n, bytes(buf))))
            await drain(0)
            parts.sort(key=lambda p: int(p["PartNumber"]))
            c = await self._c("CompleteMultipartUpload")
            await c.complete_multipart_upload(
                Bucket=self.bucket, Key=k, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            for t in inflight:
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            with contextlib.suppress(Exception):
                c = await self._c("AbortMultipartUpload")
                await c.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=upload_id)
            raise
        return size

    async def delete(self, key: str) -> None:
        k = self._key(key)
        c = await self._c("DeleteObject")
        try:
            await c.delete_object(Bucket=self.bucket, Key=k)
        except Exception as e:
            if _not_found(e):
                return
            raise StoreError(f"s3 DELETE {key}: {e}") from e

    # -- listings ------------------------------------------------------------------------
    async def list(self, prefix: str) -> AsyncIterator[str]:
        token: str | None = None
        n = len(self.prefix)
        while True:
            c = await self._c("ListObjectsV2")
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kw["ContinuationToken"] = token
            try:
                r = await c.list_objects_v2(**kw)
            except Exception as e:
                raise StoreError(f"s3 LIST {prefix}: {e}") from e
            for o in r.get("Contents", []):
                key = str(o["Key"])[n:]
                if _SAFE.match(key):  # not the probe object, nor foreign names
                    yield key
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")
            if not token:
                return
