"""The director's S3 front: an aiohttp application over the router and shared storage.

Request path: authenticate (SigV4 header or presigned query) -> classify the operation ->
for object operations hash ``(bucket id, key)`` to a partition and call its owner through
the :class:`~cohort.director.router.Router`; bucket listings scatter to every owner and
merge.  Object bodies stream straight between the client and shared storage (a fresh,
immutable blob per PUT, written and synced *before* the metadata commit), so the
middle-layer server only logs and serves metadata.

Every failure reaches the client as an S3 XML error; nothing raises through to aiohttp.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from cohort.director.ops import classify, split_path
from cohort.director.router import Router, Unavailable
from cohort.partitioning import blob_key, partition_of
from cohort.rpc import RpcError
from cohort.s3 import names, xmlio
from cohort.s3.checksums import parse_checksum_headers
from cohort.s3.chunked import AwsChunkedDecoder
from cohort.s3.errors import S3Error
from cohort.s3.sigv4 import AuthResult, verify
from cohort.server.state import ObjectMeta, meta_from_wire, meta_to_wire
from cohort.storage.base import NotFound, Store

log = logging.getLogger("cohort.director.s3")

READ_CHUNK = 1 << 20
SMALL_OBJECT = 1 << 20
MAX_OBJECT = 5 * 1024**4  # 5 TiB, S3's limit for one object
MAX_SINGLE_PUT = 5 * 1024**3  # 5 GiB, S3's limit for one PUT
_STANDARD_HEADERS = (
    "Cache-Control",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Expires",
)


def http_date(ts: float) -> str:
    return email.utils.formatdate(ts, usegmt=True)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class S3App:
    def __init__(
        self,
        router: Router,
        store: Store,
        credentials: Callable[[str], str | None],
        *,
        region: str = "us-east-1",
        member_id: str = "director",
    ) -> None:
        self.router = router
        self.store = store
        self.secret_for = credentials
        self.region = region
        self.member_id = member_id
        self.requests = 0
        self.errors = 0
        self.app = web.Application(client_max_size=MAX_SINGLE_PUT)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.handlers: dict[str, Callable[[web.Request, str, str], Any]] = {
            "ListBuckets": self.list_buckets,
            "CreateBucket": self.create_bucket,
            "HeadBucket": self.head_bucket,
            "DeleteBucket": self.delete_bucket,
            "GetBucketLocation": self.get_bucket_location,
            "GetBucketVersioning": self.get_bucket_versioning,
            "ListObjectsV2": self.list_objects,
            "ListObjects": self.list_objects,
            "DeleteObjects": self.delete_objects,
            "PutObject": self.put_object,
            "CopyObject": self.copy_object,
            "GetObject": self.get_object,
            "HeadObject": self.get_object,
            "DeleteObject": self.delete_object,
        }

    # -- the shell -------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        rid = uuid.uuid4().hex[:16].upper()
        request["rid"] = rid
        resource = request.path
        try:
            raw_path = request.raw_path.split("?", 1)[0]
            bucket, key = split_path(urllib.parse.unquote(raw_path))
            query = dict(urllib.parse.parse_qsl(request.query_string, keep_blank_values=True))
            req = classify(request.method, bucket, key, query, request.headers)
            request["auth"] = self.authenticate(request, raw_path)
            handler = self.handlers.get(req.op)
            if handler is None:
                raise S3Error("NotImplemented", f"{req.op} is not implemented by Cohort yet.")
            resp: web.StreamResponse = await handler(request, bucket, key)
        except S3Error as e:
            resp = self.error_response(request, e, resource)
        except Unavailable as e:
            log.warning("unavailable: %s", e)
            resp = self.error_response(
                request, S3Error("ServiceUnavailable", "Please reduce your request rate."), resource
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error on %s %s", request.method, request.path)
            resp = self.error_response(request, S3Error("InternalError"), resource)
        if not resp.prepared:
            resp.headers["x-amz-request-id"] = rid
            resp.headers["x-amz-id-2"] = rid
            resp.headers["Server"] = "Cohort"
        return resp

    def error_response(self, request: web.Request, e: S3Error, resource: str) -> web.Response:
        self.errors += 1
        body = b"" if request.method == "HEAD" or e.status == 304 else e.to_xml(request["rid"])
        # the body has not been consumed: tell the client we close rather than reading it
        resp = web.Response(status=e.status, body=body, content_type="application/xml")
        for k, v in e.headers.items():
            resp.headers[k] = v
        if e.status >= 400 and request.can_read_body and not request.content.at_eof():
            resp.force_close()
        if not body:
            resp.headers["x-amz-error-code"] = e.code
        return resp

    def authenticate(self, request: web.Request, raw_path: str) -> AuthResult:
        query = urllib.parse.parse_qsl(request.query_string, keep_blank_values=True)
        return verify(
            request.method, raw_path, query, request.headers, self.secret_for, region=self.region
        )

    # -- helpers ---------------------------------------------------------------------------
    async def bucket_id(self, name: str) -> str:
        b = self.router.buckets.get(name)
        if b is None:
            await self.router.refresh()  # it may have been created through another director
            b = self.router.buckets.get(name)
        if b is None:
            raise S3Error("NoSuchBucket", resource=name, extra={"BucketName": name})
        return str(b["id"])

    def partition(self, bucket_id: str, key: str) -> int:
        return partition_of(bucket_id, key, self.router.partition_count)

    async def call(self, p: int, method: str, params: dict[str, Any]) -> Any:
        return await self.router.call(p, method, params)

    # -- buckets ---------------------------------------------------------------------------
    async def list_buckets(self, request: web.Request, bucket: str, key: str) -> web.Response:
        await self.router.refresh()
        buckets = sorted(self.router.buckets.values(), key=lambda b: b["name"])
        body = xmlio.render_list_buckets(
            [xmlio.BucketInfo(b["name"], _dt(float(b["created"])), self.region) for b in buckets],
            xmlio.Owner(request["auth"].access_key, request["auth"].access_key),
        )
        return web.Response(body=body, content_type="application/xml")

    async def create_bucket(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_bucket_name(bucket)
        body = await request.read()
        if body.strip():
            location = xmlio.parse_create_bucket(body)
            if location and location != self.region and not (location == "us-east-1"):
                raise S3Error(
                    "InvalidLocationConstraint",
                    "The specified location-constraint is not valid.",
                    status=400,
                )
        try:
            await self.router.coord.create_bucket(bucket)
        except RpcError as e:
            if e.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise S3Error(e.code, resource=bucket, extra={"BucketName": bucket}) from None
            raise
        await self.router.refresh()
        return web.Response(headers={"Location": f"/{bucket}"})

    async def head_bucket(self, request: web.Request, bucket: str, key: str) -> web.Response:
        await self.bucket_id(bucket)
        return web.Response(headers={"x-amz-bucket-region": self.region})

    async def delete_bucket(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid = await self.bucket_id(bucket)
        results = await self.router.scatter("bucket.count", {"b": bid})
        if sum(int(r["count"]) for r in results) > 0:
            raise S3Error("BucketNotEmpty", resource=bucket, extra={"BucketName": bucket})
        try:
            await self.router.coord.delete_bucket(bucket, bid)
        except RpcError as e:
            if e.code == "NoSuchBucket":
                raise S3Error("NoSuchBucket", resource=bucket) from None
            raise
        await self.router.refresh()
        return web.Response(status=204)

    async def get_bucket_location(
        self, request: web.Request, bucket: str, key: str
    ) -> web.Response:
        await self.bucket_id(bucket)
        return web.Response(
            body=xmlio.render_location_constraint(
                None if self.region == "us-east-1" else self.region
            ),
            content_type="application/xml",
        )

    async def get_bucket_versioning(
        self, request: web.Request, bucket: str, key: str
    ) -> web.Response:
        await self.bucket_id(bucket)
        return web.Response(body=xmlio.render_versioning(None), content_type="application/xml")

    # -- listing ---------------------------------------------------------------------------
    async def list_objects(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid = await self.bucket_id(bucket)
        q = request.query
        v2 = q.get("list-type") == "2"
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        encoding = q.get("encoding-type")
        if encoding is not None and encoding != "url":
            raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
        try:
            max_keys = int(q.get("max-keys", "1000"))
        except ValueError:
            raise S3Error(
                "InvalidArgument", "Provided max-keys not an integer or within integer range"
            ) from None
        if max_keys < 0:
            raise S3Error(
                "InvalidArgument", "Argument maxKeys must be an integer between 0 and 2147483647"
            )
        max_keys = min(max_keys, 1000)
        token = q.get("continuation-token")
        if v2:
            start_after = q.get("start-after", "")
            if token is not None:
                try:
                    start_after = base64.urlsafe_b64decode(token.encode()).decode()
                except Exception:
                    raise S3Error(
                        "InvalidArgument", "The continuation token provided is incorrect"
                    ) from None
        else:
            start_after = q.get("marker", "")
        entries: list[tuple[str, Any]] = []
        if max_keys > 0:
            results = await self.router.scatter(
                "obj.list",
                {
                    "b": bid,
                    "prefix": prefix,
                    "delimiter": delimiter,
                    "start_after": start_after,
                    "limit": max_keys + 1,
                },
            )
            merged: list[tuple[str, Any]] = []
            for r in results:
                merged.extend((e[0], e[1]) for e in r["entries"])
            merged.sort(key=lambda e: e[0])
            for e in merged:
                if entries and entries[-1][0] == e[0]:
                    continue
                entries.append(e)
        truncated = len(entries) > max_keys
        entries = entries[:max_keys]
        contents: list[xmlio.ObjectInfo] = []
        prefixes: list[str] = []
        auth_key = request["auth"].access_key
        owner = xmlio.Owner(auth_key, auth_key)
        for k, m in entries:
            if m is None:
                prefixes.append(k)
            else:
                meta = meta_from_wire(m)
                contents.append(
                    xmlio.ObjectInfo(
                        key=k,
                        last_modified=_dt(meta.mtime),
                        etag=meta.etag,
                        size=meta.size,
                        owner=owner,
                    )
                )
        last = entries[-1][0] if entries else ""
        result = xmlio.ListObjectsResult(
            name=bucket,
            prefix=prefix,
            delimiter=delimiter or None,
            max_keys=max_keys,
            is_truncated=truncated,
            contents=contents,
            common_prefixes=prefixes,
            encoding_type=encoding,
        )
        if v2:
            result.continuation_token = token
            result.next_continuation_token = (
                base64.urlsafe_b64encode(last.encode()).decode() if truncated else None
            )
            result.start_after = q.get("start-after")
            result.fetch_owner = q.get("fetch-owner") == "true"
            body = xmlio.render_list_objects_v2(result)
        else:
            result.marker = start_after
            result.next_marker = last if truncated and delimiter else None
            body = xmlio.render_list_objects_v1(result)
        return web.Response(body=body, content_type="application/xml")

    # -- objects ---------------------------------------------------------------------------
    async def _body_chunks(
        self, request: web.Request, auth: AuthResult, sink: list[Any]
    ) -> AsyncIterator[bytes]:
        """Yield the decoded request body, verifying length, payload hash and checksums.

        ``sink`` receives ``(ChecksumSet, trailers)`` once the body is complete.
        """
        cks_req = parse_checksum_headers(request.headers)
        cks = cks_req.new_set()
        sha = hashlib.sha256() if auth.payload_sha256 else None
        decoder: AwsChunkedDecoder | None = None
        declared = request.headers.get("Content-Length")
        if auth.is_streaming:
            dlen = request.headers.get("x-amz-decoded-content-length")
            decoder = AwsChunkedDecoder(
                auth,
                auth.payload_mode,
                decoded_length=int(dlen) if dlen and dlen.isdigit() else None,
            )
        elif declared is None and request.headers.get("Transfer-Encoding", "").lower() != "chunked":
            raise S3Error("MissingContentLength")
        received = 0
        try:
            async for data in request.content.iter_any():
                received += len(data)
                pieces = decoder.feed(data) if decoder is not None else [data]
                for piece in pieces:
                    cks.update(piece)
                    if sha is not None:
                        sha.update(piece)
                    yield piece
        except (ConnectionResetError, asyncio.IncompleteReadError):
            raise S3Error("IncompleteBody") from None
        if declared is not None and declared.isdigit() and received < int(declared):
            raise S3Error(
                "IncompleteBody",
                "You did not provide the number of bytes specified by the Content-Length HTTP header.",
            )
        trailers: dict[str, str] = {}
        if decoder is not None:
            trailers = decoder.finish()
        if sha is not None and sha.hexdigest() != auth.payload_sha256:
            raise S3Error(
                "XAmzContentSHA256Mismatch",
                "The provided 'x-amz-content-sha256' header does not match what was computed.",
            )
        sink.append((cks_req.verify(cks, trailers), cks.hexdigest("MD5")))

    def _meta_from_headers(
        self,
        request: web.Request,
        size: int,
        etag: str,
        blob: str | None,
        checksums: dict[str, str],
    ) -> ObjectMeta:
        user_meta = {
            k[11:].lower(): v
            for k, v in request.headers.items()
            if k.lower().startswith("x-amz-meta-")
        }
        headers = {h: request.headers[h] for h in _STANDARD_HEADERS if h in request.headers}
        if headers.get("Content-Encoding") == "aws-chunked":
            del headers["Content-Encoding"]
        elif "Content-Encoding" in headers:
            # aws-chunked may be listed alongside a real encoding: keep only the real one
            enc = [
                e.strip()
                for e in headers["Content-Encoding"].split(",")
                if e.strip() != "aws-chunked"
            ]
            headers["Content-Encoding"] = ", ".join(enc)
            if not enc:
                del headers["Content-Encoding"]
        return ObjectMeta(
            size=size,
            etag=etag,
            mtime=time.time(),
            blob=blob,
            content_type=request.headers.get("Content-Type", "binary/octet-stream"),
            user_meta=user_meta,
            checksums=checksums,
            headers=headers,
        )

    async def put_object(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_key(key)
        bid = await self.bucket_id(bucket)
        p = self.partition(bid, key)
        auth: AuthResult = request["auth"]
        sink: list[Any] = []
        blob_id = uuid.uuid4().hex
        bkey = blob_key(p, blob_id)
        size = await self.store.put_stream(bkey, self._body_chunks(request, auth, sink))
        try:
            checksums, md5 = sink[0]
            meta = self._meta_from_headers(request, size, md5, bkey if size else None, checksums)
            await self._conditional_put(request, bid, key, p)
            await self.call(
                p, "obj.put", {"b": bid, "k": key, "m": meta_to_wire(meta), "rid": blob_id}
            )
        except BaseException:
            await self.store.delete(bkey)
            raise
        if not size:
            await self.store.delete(bkey)
        headers = {"ETag": f'"{meta.etag}"'}
        for alg, v in meta.checksums.items():
            headers[f"x-amz-checksum-{alg.lower()}"] = v
        return web.Response(headers=headers)

    async def _conditional_put(self, request: web.Request, bid: str, key: str, p: int) -> None:
        if "If-None-Match" not in request.headers and "If-Match" not in request.headers:
            return
        # Checked at the owner just before the commit.  (Not atomic with the commit yet:
        # a concurrent writer can slip in between; moving the check into the server's
        # commit is part of issue 5.)
        r = await self.call(p, "obj.get", {"b": bid, "k": key})
        meta = None if r is None else meta_from_wire(r["m"])
        names.check_conditions(
            request.headers, meta.etag if meta else None, meta.mtime if meta else None, method="PUT"
        )

    async def _lookup(self, bucket: str, key: str) -> tuple[str, int, ObjectMeta]:
        bid = await self.bucket_id(bucket)
        p = self.partition(bid, key)
        r = await self.call(p, "obj.get", {"b": bid, "k": key})
        if r is None:
            raise S3Error("NoSuchKey", resource=f"/{bucket}/{key}", extra={"Key": key})
        return bid, p, meta_from_wire(r["m"])

    def _object_headers(self, meta: ObjectMeta) -> dict[str, str]:
        h = {
            "ETag": f'"{meta.etag}"',
            "Last-Modified": http_date(meta.mtime),
            "Content-Type": meta.content_type,
            "Accept-Ranges": "bytes",
        }
        h.update(meta.headers)
        for k, v in meta.user_meta.items():
            h[f"x-amz-meta-{k}"] = v
        return h

    async def get_object(self, request: web.Request, bucket: str, key: str) -> web.StreamResponse:
        names.validate_key(key)
        _, _, meta = await self._lookup(bucket, key)
        headers = self._object_headers(meta)
        names.check_conditions(request.headers, meta.etag, meta.mtime, method=request.method)
        start, end = 0, meta.size - 1
        status = 200
        rng = request.headers.get("Range")
        if rng is not None:
            parsed = names.parse_range(rng, meta.size)
            if parsed is not None:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{meta.size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        # a whole-object checksum describes only a whole-object response
        if status == 200 and request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
            for alg, v in meta.checksums.items():
                headers[f"x-amz-checksum-{alg.lower()}"] = v
        if request.method == "HEAD":
            # aiohttp keeps an explicit Content-Length on a body-less HEAD response
            return web.Response(status=status, headers=headers)
        if length == 0 or meta.blob is None:
            return web.Response(status=status, headers=headers, body=b"")
        if length <= SMALL_OBJECT:
            try:
                data = await self.store.read_range(meta.blob, start, length)
            except NotFound:
                raise S3Error("NoSuchKey", resource=f"/{bucket}/{key}") from None
            return web.Response(status=status, headers=headers, body=data)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        await resp.prepare(request)
        pos = start
        while pos <= end:
            n = min(READ_CHUNK, end - pos + 1)
            data = await self.store.read_range(meta.blob, pos, n)
            if not data:
                break
            await resp.write(data)
            pos += len(data)
        await resp.write_eof()
        return resp

    async def delete_object(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_key(key)
        bid = await self.bucket_id(bucket)
        p = self.partition(bid, key)
        await self.call(p, "obj.delete", {"b": bid, "k": key, "rid": uuid.uuid4().hex})
        return web.Response(status=204)

    async def delete_objects(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid = await self.bucket_id(bucket)
        body = await request.read()
        if "Content-MD5" not in request.headers and not any(
            h.lower().startswith("x-amz-checksum-") for h in request.headers
        ):
            # S3 requires an integrity header on DeleteObjects; boto3 always sends one.
            pass
        req = xmlio.parse_delete(body)
        keys = [o.key for o in req.objects]

        async def one(k: str) -> tuple[str, S3Error | None]:
            try:
                names.validate_key(k)
                p = self.partition(bid, k)
                await self.call(p, "obj.delete", {"b": bid, "k": k, "rid": uuid.uuid4().hex})
                return k, None
            except S3Error as e:
                return k, e
            except (Unavailable, RpcError) as e:
                return k, S3Error("InternalError", str(e))

        results = await asyncio.gather(*(one(k) for k in keys))
        deleted = [k for k, e in results if e is None]
        errors = [(k, e.code, e.message) for k, e in results if e is not None]
        body = xmlio.render_delete_result(
            [xmlio.DeletedObject(k) for k in deleted],
            [xmlio.DeleteError(k, code, msg) for k, code, msg in errors],
            quiet=req.quiet,
        )
        return web.Response(body=body, content_type="application/xml")

    async def copy_object(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_key(key)
        src = urllib.parse.unquote(request.headers["x-amz-copy-source"].split("?", 1)[0])
        src_bucket, src_key = split_path(src if src.startswith("/") else "/" + src)
        if not src_bucket or not src_key:
            raise S3Error(
                "InvalidArgument",
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            )
        _, _, smeta = await self._lookup(src_bucket, src_key)
        copy_conditions = {
            h[len("x-amz-copy-source-") :]: v
            for h, v in request.headers.items()
            if h.lower().startswith("x-amz-copy-source-if-")
        }
        if names.evaluate_conditions(copy_conditions, smeta.etag, smeta.mtime) is not None:
            raise S3Error("PreconditionFailed")
        directive = request.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.")
        if directive == "COPY" and src_bucket == bucket and src_key == key:
            raise S3Error(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes.",
            )
        bid = await self.bucket_id(bucket)
        p = self.partition(bid, key)
        blob_id = uuid.uuid4().hex
        new_blob: str | None = None
        if smeta.blob is not None and smeta.size:
            new_blob = blob_key(p, blob_id)
            src_blob = smeta.blob

            async def chunks() -> AsyncIterator[bytes]:
                pos = 0
                while pos < smeta.size:
                    data = await self.store.read_range(src_blob, pos, READ_CHUNK)
                    if not data:
                        raise S3Error("InternalError", "source object changed during copy")
                    pos += len(data)
                    yield data

            try:
                await self.store.put_stream(new_blob, chunks())
            except NotFound:
                raise S3Error("NoSuchKey", resource=src) from None
        if directive == "REPLACE":
            meta = self._meta_from_headers(
                request, smeta.size, smeta.etag, new_blob, smeta.checksums
            )
        else:
            meta = ObjectMeta(
                size=smeta.size,
                etag=smeta.etag,
                mtime=time.time(),
                blob=new_blob,
                content_type=smeta.content_type,
                user_meta=dict(smeta.user_meta),
                checksums=dict(smeta.checksums),
                headers=dict(smeta.headers),
                parts=smeta.parts,
            )
        try:
            await self.call(
                p, "obj.put", {"b": bid, "k": key, "m": meta_to_wire(meta), "rid": blob_id}
            )
        except BaseException:
            if new_blob:
                await self.store.delete(new_blob)
            raise
        body = xmlio.render_copy_object(meta.etag, _dt(meta.mtime), meta.checksums or None)
        return web.Response(body=body, content_type="application/xml")
