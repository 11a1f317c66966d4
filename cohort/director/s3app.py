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
import heapq
import itertools
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from cohort.director.ops import classify, split_path
from cohort.director.router import Router, Unavailable
from cohort.partitioning import blob_key, partition_of
from cohort.rpc import RpcError
from cohort.s3 import names, xmlio
from cohort.s3.checksums import parse_checksum_headers, verify_small_body
from cohort.s3.chunked import AwsChunkedDecoder
from cohort.s3.errors import ERROR_TABLE, S3Error
from cohort.s3.sigv2 import has_v2_auth, verify_v2
from cohort.s3.sigv4 import UNSIGNED_PAYLOAD, AuthResult, has_auth, verify
from cohort.server.state import ObjectMeta, meta_from_wire, meta_to_wire
from cohort.storage.base import NotFound, Store
from cohort.tenants import ADMIN_TENANT, KeyCache, TenantRegistry

log = logging.getLogger("cohort.director.s3")

READ_CHUNK = 1 << 20
SMALL_OBJECT = 1 << 20
MAX_OBJECT = 5 * 1024**4  # 5 TiB, S3's limit for one object
MAX_SINGLE_PUT = names.MAX_SINGLE_PUT  # 5 GiB, S3's limit for one PUT (and one part)
# bodies read whole (DeleteObjects, CompleteMultipartUpload, ACLs, CreateBucket): 1000
# keys or 10000 parts fit in a few MB; more is answered MaxMessageLengthExceeded
MAX_XML_BODY = 8 * 1024**2
# the request header checks done before the body is read (EntityTooLarge, metadata)
_BODY_OPS = frozenset({"PutObject", "UploadPart"})
_CREATING_OPS = frozenset({"PutObject", "CopyObject", "CreateMultipartUpload"})
# request headers of server-side encryption (refused until it is built)
_SSE_HEADERS = ("x-amz-server-side-encryption", "x-amz-copy-source-server-side-encryption")
# operations an anonymous (unsigned) request may attempt; ACLs then decide
ANONYMOUS_OPS = {"GetObject", "HeadObject", "ListObjects", "ListObjectsV2", "HeadBucket"}
# what a public-read bucket ACL lets anyone do (READ on the bucket, as in S3)
_LIST_OPS = {"ListObjects", "ListObjectsV2", "HeadBucket"}
CANNED_ACLS = {"private", "public-read"}
_STANDARD_HEADERS = (
    "Cache-Control",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Expires",
)


_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count()


def new_id() -> str:
    """A unique id (request ids, blob names, upload ids): a random per-process prefix and
    a counter.  Cheaper than uuid4, which reads the kernel's random pool every time."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


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
        keys: KeyCache | None = None,
        registry: TenantRegistry | None = None,
        domains: list[str] | None = None,
    ) -> None:
        self.registry = registry
        # base domains for virtual-hosted-style requests (``bucket.<domain>``)
        self.domains = [d.strip().lower() for d in domains or [] if d.strip()]
        self.router = router
        self.store = store
        self.secret_for = keys.secret_for if keys is not None else credentials
        self.keys = keys
        self.region = region
        self.member_id = member_id
        self.requests = 0
        self.errors = 0
        # hooks for cohort.admin, set by the director service: per-request metrics, and the
        # operator endpoints under /_cohort/ (bucket names cannot start with "_")
        self.on_request: Callable[[str, int, float], None] | None = None
        self.admin: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
        self.app = web.Application(client_max_size=MAX_XML_BODY)
        self.app.router.add_route("*", "/_cohort/{tail:.*}", self._admin)
        # "Expect: 100-continue" is answered by handle itself, once the request passed
        # authentication and the header checks: a refused upload never sends its body
        # [\s\S]: a key may hold a (percent-encoded) newline, which "." would not match
        self.app.router.add_route("*", "/{tail:[\\s\\S]*}", self.handle, expect_handler=_no_expect)
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
            "CreateMultipartUpload": self.create_multipart,
            "UploadPart": self.upload_part,
            "UploadPartCopy": self.upload_part,
            "CompleteMultipartUpload": self.complete_multipart,
            "AbortMultipartUpload": self.abort_multipart,
            "ListParts": self.list_parts,
            "ListMultipartUploads": self.list_uploads,
            "GetBucketAcl": self.get_bucket_acl,
            "PutBucketAcl": self.put_bucket_acl,
            "GetObjectAcl": self.get_object_acl,
            "PutObjectAcl": self.put_object_acl,
        }

    # -- the shell -------------------------------------------------------------------------
    async def _admin(self, request: web.Request) -> web.StreamResponse:
        if self.admin is None:
            raise web.HTTPNotFound()
        return await self.admin(request)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        t0 = time.perf_counter()
        op = "Unknown"
        rid = new_id().upper()
        request["rid"] = rid
        resource = request.path
        try:
            raw_path = request.raw_path.split("?", 1)[0]
            vhost = (
                names.bucket_from_host(request.headers.get("Host"), self.domains)
                if self.domains
                else None
            )
            # strict UTF-8: bytes that are not UTF-8 are InvalidURI, never U+FFFD
            if vhost is not None:  # virtual-hosted style: the whole path is the key
                bucket, key = vhost, names.decode_path(raw_path)[1:]
            else:
                bucket, key = split_path(names.decode_path(raw_path))
            query = dict(urllib.parse.parse_qsl(request.query_string, keep_blank_values=True))
            req = classify(request.method, bucket, key, query, request.headers)
            op = req.op
            request["op"] = op
            raw_query = request.raw_path.partition("?")[2]
            v2 = has_v2_auth(raw_query, request.headers)
            if v2 or has_auth(
                urllib.parse.parse_qsl(request.query_string, keep_blank_values=True),
                request.headers,
            ):
                auth = (
                    self.authenticate_v2(request, raw_path, vhost)
                    if v2
                    else self.authenticate(request, raw_path)
                )
                request["auth"] = auth
                tenant = self.keys.tenant_of(auth.access_key) if self.keys else None
                request["tenant"] = tenant or ADMIN_TENANT
            elif op in ANONYMOUS_OPS:
                request["auth"] = None
                request["tenant"] = None  # anonymous: allowed only where an ACL says so
            else:
                raise S3Error("AccessDenied", "Anonymous users cannot perform this operation.")
            handler = self.handlers.get(req.op)
            if handler is None:
                raise S3Error("NotImplemented", f"{req.op} is not implemented by Cohort yet.")
            self.check_request_headers(request, op, key)
            if (
                request.version >= HttpVersion11
                and request.headers.get("Expect", "").lower() == "100-continue"
            ):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0  # the response proper has not started
            resp: web.StreamResponse = await handler(request, bucket, key)
        except S3Error as e:
            resp = self.error_response(request, e, resource)
        except web.HTTPRequestEntityTooLarge:  # request.read() past MAX_XML_BODY
            resp = self.error_response(
                request,
                S3Error("MaxMessageLengthExceeded", extra={"MaxMessageLength": str(MAX_XML_BODY)}),
                resource,
            )
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
        if self.on_request is not None:
            self.on_request(op, resp.status, time.perf_counter() - t0)
        return resp

    @staticmethod
    def check_request_headers(request: web.Request, op: str, key: str) -> None:
        """The limits that headers alone decide, checked before any of the body is read:
        a PUT or part over 5 GiB (EntityTooLarge), user metadata over 2 KB
        (MetadataTooLarge), NUL / CR / LF in a key being created (InvalidArgument), and
        server-side encryption, which is not built: refused (NotImplemented) rather than
        stored in plaintext while the client believes it encrypted."""
        for name in request.headers:
            lname = name.lower()
            if lname.startswith(_SSE_HEADERS):
                raise S3Error(
                    "NotImplemented",
                    "Server-side encryption (SSE-S3, SSE-KMS, SSE-C) is not implemented by "
                    f"Cohort yet, so nothing was done (header {name}). Send the request "
                    "without x-amz-server-side-encryption headers, or encrypt on the client.",
                )
        if op in _BODY_OPS:
            auth: AuthResult | None = request.get("auth")
            names.check_upload_size(
                request.headers, streaming=auth is not None and auth.is_streaming
            )
        if op in _CREATING_OPS:
            names.check_new_key(key)
            if op != "CopyObject" or (
                request.headers.get("x-amz-metadata-directive", "COPY").upper() == "REPLACE"
            ):
                names.extract_user_metadata(request.headers)

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

    def authenticate_v2(self, request: web.Request, raw_path: str, vhost: str | None) -> AuthResult:
        """Signature V2 (header or presigned query); the body is then unsigned, as in V2."""
        r = verify_v2(
            request.method,
            raw_path,
            request.raw_path.partition("?")[2],
            request.headers,
            self.secret_for,
            bucket=vhost,
        )
        return AuthResult(
            access_key=r.access_key,
            signing_key=b"",
            scope="",
            timestamp="",
            seed_signature="",
            payload_mode=UNSIGNED_PAYLOAD,
            region=self.region,
            signed_headers=(),
            presigned=r.presigned,
        )

    # -- helpers ---------------------------------------------------------------------------
    async def bucket_id(self, name: str, request: web.Request) -> str:
        """The bucket's id, after checking that the caller may use it at all: its tenant
        owns it, or (anonymous callers) a public-read ACL may let it read."""
        b = self.router.buckets.get(name)
        if b is None:
            await self.router.refresh()  # it may have been created through another director
            b = self.router.buckets.get(name)
        if b is None:
            raise S3Error("NoSuchBucket", resource=name, extra={"BucketName": name})
        if b.get("tenant", ADMIN_TENANT) != request.get("tenant"):
            # anonymous, or another tenant: as in S3, a public-read *bucket* lets anyone
            # list it; reading an object needs that object's own public-read ACL (decided
            # in get_object); nothing else is allowed to non-owners
            op = request["op"]
            if op in ("GetObject", "HeadObject"):
                pass
            elif op not in _LIST_OPS or not self._bucket_public(name):
                raise S3Error("AccessDenied", resource=name)
        return str(b["id"])

    def _bucket_public(self, name: str) -> bool:
        return self.keys is not None and self.keys.bucket_acl(name) == "public-read"

    def _owns_bucket(self, name: str, request: web.Request) -> bool:
        b = self.router.buckets.get(name) or {}
        return bool(b.get("tenant", ADMIN_TENANT) == request.get("tenant"))

    @staticmethod
    def _canned_acl(request: web.Request) -> str | None:
        acl = request.headers.get("x-amz-acl")
        if acl is None:
            return None
        if acl not in CANNED_ACLS:
            raise S3Error(
                "NotImplemented",
                f"Canned ACL {acl!r} is not supported by Cohort (use private or public-read).",
            )
        return acl

    def _owner(self, request: web.Request) -> xmlio.Owner:
        tenant = request.get("tenant") or "anonymous"
        return xmlio.Owner(tenant, tenant)

    def partition(self, bucket_id: str, key: str) -> int:
        return partition_of(bucket_id, key, self.router.partition_count)

    async def call(self, p: int, method: str, params: dict[str, Any]) -> Any:
        try:
            return await self.router.call(p, method, params)
        except RpcError as e:
            if e.code in ERROR_TABLE:  # the owner answered with an S3 error
                raise S3Error(e.code, e.message or None) from None
            raise

    async def _commit_blob(
        self, p: int, method: str, params: dict[str, Any], blob: str | None
    ) -> None:
        """Send the record that makes ``blob`` (already written) part of an object.

        Only an S3 error answered by the owner proves the record was not applied; then
        the blob is deleted at once.  After anything else (a timeout, no owner reachable
        in time, the client hanging up) the record may have been applied, or may still
        be, by an owner that received it: deleting the blob then could leave an object
        whose data is gone.  So it stays, and the owner's orphan sweeper deletes it once
        no record has referred to it for ``orphan_age``."""
        try:
            await self.call(p, method, params)
        except S3Error:
            if blob:
                await self.store.delete(blob)
            raise

    # -- buckets ---------------------------------------------------------------------------
    async def list_buckets(self, request: web.Request, bucket: str, key: str) -> web.Response:
        await self.router.refresh()
        tenant = request["tenant"]
        buckets = sorted(
            (b for b in self.router.buckets.values() if b.get("tenant", ADMIN_TENANT) == tenant),
            key=lambda b: b["name"],
        )
        body = xmlio.render_list_buckets(
            [xmlio.BucketInfo(b["name"], _dt(float(b["created"])), self.region) for b in buckets],
            self._owner(request),
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
            acl = self._canned_acl(request)
            await self.router.coord.create_bucket(bucket, request["tenant"])
            if self.registry is not None:
                await self.registry.set_bucket_acl(bucket, acl)
        except RpcError as e:
            if e.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise S3Error(e.code, resource=bucket, extra={"BucketName": bucket}) from None
            raise
        await self.router.refresh()
        return web.Response(headers={"Location": f"/{bucket}"})

    async def head_bucket(self, request: web.Request, bucket: str, key: str) -> web.Response:
        await self.bucket_id(bucket, request)
        return web.Response(headers={"x-amz-bucket-region": self.region})

    async def delete_bucket(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid = await self.bucket_id(bucket, request)
        results = await self.router.scatter("bucket.count", {"b": bid})
        if sum(int(r["count"]) for r in results) > 0:
            raise S3Error("BucketNotEmpty", resource=bucket, extra={"BucketName": bucket})
        try:
            await self.router.coord.delete_bucket(bucket, bid)
            if self.registry is not None and self.keys is not None and self.keys.bucket_acl(bucket):
                await self.registry.set_bucket_acl(bucket, None)
        except RpcError as e:
            if e.code == "NoSuchBucket":
                raise S3Error("NoSuchBucket", resource=bucket) from None
            raise
        await self.router.refresh()
        # A PUT that raced with the emptiness check may have landed under the dead id:
        # drop the bucket in every partition (reclaiming such objects and their blobs),
        # which also leaves a tombstone there that discards PUTs still in flight.
        try:
            results = await self.router.scatter("bucket.drop", {"b": bid})
            stray = sum(int(r.get("dropped", 0)) for r in results)
            if stray:
                log.warning(
                    "bucket %s: reclaimed %d objects written during its deletion", bucket, stray
                )
        except (Unavailable, RpcError) as e:
            # the bucket is gone either way; its stray objects wait for a later drop
            log.warning("bucket %s deleted, but dropping its id failed: %s", bucket, e)
        return web.Response(status=204)

    async def get_bucket_location(
        self, request: web.Request, bucket: str, key: str
    ) -> web.Response:
        await self.bucket_id(bucket, request)
        return web.Response(
            body=xmlio.render_location_constraint(
                None if self.region == "us-east-1" else self.region
            ),
            content_type="application/xml",
        )

    # -- canned ACLs (?acl) ------------------------------------------------------------------
    def _bucket_owner(self, bucket: str) -> xmlio.Owner:
        b = self.router.buckets.get(bucket) or {}
        tenant = str(b.get("tenant", ADMIN_TENANT))
        return xmlio.Owner(tenant, tenant)

    async def _requested_acl(self, request: web.Request, owner: xmlio.Owner) -> str:
        """The canned ACL a PUT ?acl asks for: the ``x-amz-acl`` header or an
        AccessControlPolicy body equivalent to private / public-read."""
        if any(h.lower().startswith("x-amz-grant-") for h in request.headers):
            raise S3Error("NotImplemented", "Cohort supports only canned ACLs (x-amz-acl).")
        body = await request.read()
        acl = self._canned_acl(request)
        if acl is not None:
            if body.strip():
                raise S3Error(
                    "UnexpectedContent", "This request does not support content", status=400
                )
            return acl
        if not body.strip():
            raise S3Error(
                "MissingSecurityHeader",
                "Your request was missing a required header",
                extra={"MissingHeaderName": "x-amz-acl"},
            )
        return xmlio.parse_access_control_policy(body, owner.id)

    async def get_bucket_acl(self, request: web.Request, bucket: str, key: str) -> web.Response:
        await self.bucket_id(bucket, request)
        acl = self.keys.bucket_acl(bucket) if self.keys is not None else None
        body = xmlio.render_access_control_policy(self._bucket_owner(bucket), acl)
        return web.Response(body=body, content_type="application/xml")

    async def put_bucket_acl(self, request: web.Request, bucket: str, key: str) -> web.Response:
        await self.bucket_id(bucket, request)
        acl = await self._requested_acl(request, self._bucket_owner(bucket))
        if self.registry is None:
            if acl == "private":
                return web.Response()
            raise S3Error("NotImplemented", "Bucket ACLs need the cluster's master key.")
        await self.registry.set_bucket_acl(bucket, acl)
        return web.Response()

    async def get_object_acl(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_key(key)
        _, _, meta = await self._lookup(bucket, key, request)
        body = xmlio.render_access_control_policy(
            self._bucket_owner(bucket), meta.headers.get("x-amz-acl")
        )
        return web.Response(body=body, content_type="application/xml")

    async def put_object_acl(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_key(key)
        bid = await self.bucket_id(bucket, request)
        acl = await self._requested_acl(request, self._bucket_owner(bucket))
        try:
            await self.call(
                self.partition(bid, key),
                "obj.set_acl",
                {"b": bid, "k": key, "acl": acl, "rid": new_id()},
            )
        except S3Error as e:
            if e.code == "NoSuchKey":
                raise S3Error(
                    "NoSuchKey", resource=f"/{bucket}/{key}", extra={"Key": key}
                ) from None
            raise
        return web.Response()

    async def get_bucket_versioning(
        self, request: web.Request, bucket: str, key: str
    ) -> web.Response:
        await self.bucket_id(bucket, request)
        return web.Response(body=xmlio.render_versioning(None), content_type="application/xml")

    # -- listing ---------------------------------------------------------------------------
    async def list_objects(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid = await self.bucket_id(bucket, request)
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
        entries: list[list[Any]] = []
        if max_keys > 0:
            entries = await self._gather_listing(bid, prefix, delimiter, start_after, max_keys + 1)
        truncated = len(entries) > max_keys
        entries = entries[:max_keys]
        contents: list[xmlio.ObjectInfo] = []
        prefixes: list[str] = []
        owner = self._owner(request)
        for e in entries:
            if len(e) == 1:
                prefixes.append(e[0])
            else:
                k, size, etag, mtime = e
                contents.append(
                    xmlio.ObjectInfo(key=k, last_modified=mtime, etag=etag, size=size, owner=owner)
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

    async def _gather_listing(
        self, bid: str, prefix: str, delimiter: str, start_after: str, need: int
    ) -> list[list[Any]]:
        """The first ``need`` entries after ``start_after``, merged from every owner.

        Each owner returns a sorted slice of its partitions.  Asking every owner for
        ``need`` entries would read (owners x need) to use ``need``; instead each is asked
        for a fair share plus slack, the merge is trusted only up to the smallest last key
        among slices that may have more, and only those slices are asked for more.
        """
        owners = max(1, len(set(self.router.addresses.values())))
        per = min(need, need * 5 // (4 * owners) + 16)
        params = {"b": bid, "prefix": prefix, "delimiter": delimiter}
        results = await self.router.scatter(
            "obj.list", {**params, "start_after": start_after, "limit": per}
        )
        # slice = [parts, entries, may_have_more, limit used]
        slices = [[r["_parts"], r["entries"], len(r["entries"]) >= per, per] for r in results]
        while True:
            bound = min((sl[1][-1][0] for sl in slices if sl[2] and sl[1]), default=None)
            merged: list[list[Any]] = []
            for e in heapq.merge(*(sl[1] for sl in slices), key=lambda e: e[0]):
                if bound is not None and e[0] > bound:
                    break
                if merged and merged[-1][0] == e[0]:
                    continue  # a common prefix reported by several owners
                merged.append(e)
                if len(merged) >= need:
                    return merged
            if bound is None:
                return merged
            for sl in slices:
                if sl[2] and sl[1] and sl[1][-1][0] == bound:
                    more = sl[3] * 2
                    rs = await self.router.scatter(
                        "obj.list", {**params, "start_after": bound, "limit": more}, parts=sl[0]
                    )
                    extra = sorted((e for r in rs for e in r["entries"]), key=lambda e: e[0])
                    sl[1] = sl[1] + extra
                    sl[2] = any(len(r["entries"]) >= more for r in rs)
                    sl[3] = more

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
        acl = self._canned_acl(request)
        if acl is not None:
            headers["x-amz-acl"] = acl
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
        bid = await self.bucket_id(bucket, request)
        p = self.partition(bid, key)
        auth: AuthResult = request["auth"]
        sink: list[Any] = []
        blob_id = new_id()
        bkey = blob_key(p, blob_id)
        size = await self.store.put_stream(bkey, self._body_chunks(request, auth, sink))
        try:
            checksums, md5 = sink[0]
            meta = self._meta_from_headers(request, size, md5, bkey if size else None, checksums)
        except BaseException:
            await self.store.delete(bkey)  # no record was sent: nothing can refer to it
            raise
        await self._commit_blob(
            p,
            "obj.put",
            {
                "b": bid,
                "k": key,
                "m": meta_to_wire(meta),
                "rid": blob_id,
                "cond": self._write_conditions(request),
            },
            bkey,
        )
        if not size:
            await self.store.delete(bkey)
        headers = {"ETag": f'"{meta.etag}"'}
        for alg, v in meta.checksums.items():
            headers[f"x-amz-checksum-{alg.lower()}"] = v
        return web.Response(headers=headers)

    @staticmethod
    def _write_conditions(request: web.Request) -> dict[str, str] | None:
        """``If-None-Match`` / ``If-Match`` on a write, checked atomically by the owner."""
        cond: dict[str, str] = {}
        inm = request.headers.get("If-None-Match")
        if inm is not None:
            cond["if_none_match"] = inm.strip().strip('"')
        im = request.headers.get("If-Match")
        if im is not None:
            cond["if_match"] = im.strip().strip('"')
        return cond or None

    async def _lookup(
        self, bucket: str, key: str, request: web.Request
    ) -> tuple[str, int, ObjectMeta]:
        bid = await self.bucket_id(bucket, request)
        p = self.partition(bid, key)
        r = await self.router.read(
            p,
            "obj.get",
            {"b": bid, "k": key},
            bucket=bucket,
            tenant=request.get("tenant") or "anonymous",
        )
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
        h.update((k, v) for k, v in meta.headers.items() if k != "x-amz-acl")
        for k, v in meta.user_meta.items():
            h[f"x-amz-meta-{k}"] = v
        return h

    async def get_object(self, request: web.Request, bucket: str, key: str) -> web.StreamResponse:
        from cohort.director.reads import BlobLease, ReadExpired, blobs_in_range, owner_lease

        names.validate_key(key)
        looked_up = time.monotonic()  # the body may be freed any time after this lookup
        owner = self._owns_bucket(bucket, request)
        try:
            bid, p, meta = await self._lookup(bucket, key, request)
        except S3Error as e:
            # a non-owner who may not list the bucket learns nothing of what is in it
            if e.code == "NoSuchKey" and not owner and not self._bucket_public(bucket):
                raise S3Error("AccessDenied", resource=f"/{bucket}/{key}") from None
            raise
        if not owner and meta.headers.get("x-amz-acl") != "public-read":
            # the object's own ACL decides, for anonymous callers and other tenants alike
            # (a public-read bucket does not make its private objects readable)
            raise S3Error("AccessDenied", resource=f"/{bucket}/{key}")
        headers = self._object_headers(meta)
        names.check_conditions(request.headers, meta.etag, meta.mtime, method=request.method)
        start, end = 0, meta.size - 1
        status = 200
        rng = request.headers.get("Range")
        part_number = request.query.get("partNumber")
        if part_number is not None:
            if meta.parts:
                # like S3: the parts count is returned only to a request by part number
                headers["x-amz-mp-parts-count"] = str(meta.parts)
            if rng is not None:
                raise S3Error(
                    "InvalidRequest",
                    "Cannot specify both Range header and partNumber query parameter",
                )
            span = self._part_span(meta, names.parse_part_number(part_number))
            if span is None:
                raise S3Error(
                    "InvalidPartNumber", "The requested partnumber is not satisfiable", status=416
                )
            start, end = span
            if meta.size:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{meta.size}"
        elif rng is not None:
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
        if length == 0 or not meta.blobs():
            return web.Response(status=status, headers=headers, body=b"")
        if length <= SMALL_OBJECT:
            # read whole before the response starts, within the window a read without a
            # lease has (half the blob grace period after the lookup)
            window = BlobLease(meta.blobs(), None, started=looked_up)
            try:
                data = b"".join([c async for c in self.read_body(meta, start, length, window)])
            except NotFound:
                raise S3Error("NoSuchKey", resource=f"/{bucket}/{key}") from None
            except ReadExpired:
                raise S3Error("SlowDown", "Reading the object took too long.") from None
            return web.Response(status=status, headers=headers, body=data)
        # Streamed: lease the blobs from the owner for as long as the client reads (up
        # to the maximum read duration).  Once the headers are out, any failure must
        # break the connection: a second response would land inside this one's body.
        transport = request.transport

        def abort() -> None:
            if transport is not None and not transport.is_closing():
                transport.abort()

        lease = BlobLease(
            blobs_in_range(meta, start, length),
            owner_lease(self.router, p, bid, key),
            started=looked_up,
            on_expired=abort,
        )
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = length
        lease.start()
        sent = 0
        try:
            await resp.prepare(request)
            body = self.read_body(meta, start, length, lease)
            try:
                async for data in body:
                    await resp.write(data)
                    sent += len(data)
            finally:
                close = getattr(body, "aclose", None)  # an async generator: release it now
                if close is not None:
                    await close()
            await resp.write_eof()
        except asyncio.CancelledError:
            abort()
            raise
        except Exception as e:
            abort()
            level = logging.INFO if isinstance(e, ConnectionError) else logging.WARNING
            log.log(
                level,
                "GET /%s/%s aborted after %d of %d body bytes: %s: %s",
                bucket,
                key,
                sent,
                length,
                type(e).__name__,
                e,
            )
        finally:
            await lease.close()
        return resp

    @staticmethod
    def _part_span(meta: ObjectMeta, n: int) -> tuple[int, int] | None:
        """Byte range (inclusive) of part ``n`` of an object, or None past its last part.

        An object that was not uploaded in parts has one part, itself.  Segments omit
        empty parts, and only the last part may be empty (every other is >= 5 MiB)."""
        if not meta.parts:
            return (0, meta.size - 1) if n == 1 else None
        if n > meta.parts:
            return None
        offset = 0
        for i, (_blob, size) in enumerate(meta.segments, 1):
            if i == n:
                return offset, offset + size - 1
            offset += size
        return offset, offset - 1  # an empty last part

    async def read_body(
        self, meta: ObjectMeta, start: int, length: int, lease: Any = None
    ) -> AsyncIterator[bytes]:
        """``length`` bytes of an object's body from offset ``start`` (across the segments
        of a multipart object), in chunks of at most READ_CHUNK.

        ``lease`` (a :class:`cohort.director.reads.BlobLease`) is checked before every
        storage read: past its deadline the blobs may be gone, and it raises
        ``ReadExpired`` rather than read on."""
        segments = [(meta.blob, meta.size)] if meta.blob else list(meta.segments)
        offset = 0
        remaining = length
        for blob, size in segments:
            if remaining <= 0:
                break
            if start >= offset + size:
                offset += size
                continue
            pos = max(0, start - offset)
            while pos < size and remaining > 0:
                n = min(READ_CHUNK, size - pos, remaining)
                if lease is not None:
                    lease.check()
                data = await self.store.read_range(blob, pos, n)
                if not data:
                    raise S3Error("InternalError", "object body shorter than its metadata says")
                yield data
                pos += len(data)
                remaining -= len(data)
            offset += size

    async def delete_object(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_key(key)
        bid = await self.bucket_id(bucket, request)
        p = self.partition(bid, key)
        await self.call(p, "obj.delete", {"b": bid, "k": key, "rid": new_id()})
        return web.Response(status=204)

    async def delete_objects(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid = await self.bucket_id(bucket, request)
        body = await request.read()
        # S3 requires Content-MD5 or an x-amz-checksum-* header on DeleteObjects (boto3
        # sends x-amz-checksum-crc32, older SDKs Content-MD5) and checks it
        verify_small_body(request.headers, body, required=True)
        req = xmlio.parse_delete(body)
        keys = [o.key for o in req.objects]

        async def one(k: str) -> tuple[str, S3Error | None]:
            try:
                names.validate_key(k)
                p = self.partition(bid, k)
                await self.call(p, "obj.delete", {"b": bid, "k": k, "rid": new_id()})
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
        src = names.decode_path(request.headers["x-amz-copy-source"].split("?", 1)[0])
        src_bucket, src_key = split_path(src if src.startswith("/") else "/" + src)
        if not src_bucket or not src_key:
            raise S3Error(
                "InvalidArgument",
                "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            )
        looked_up = time.monotonic()
        src_bid, src_p, smeta = await self._lookup(src_bucket, src_key, request)
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
        bid = await self.bucket_id(bucket, request)
        p = self.partition(bid, key)
        blob_id = new_id()
        new_blob: str | None = None
        if smeta.blobs() and smeta.size:
            from cohort.director.reads import BlobLease, ReadExpired, owner_lease

            new_blob = blob_key(p, blob_id)
            # the source may be replaced while it is copied: lease its blobs
            lease = BlobLease(
                smeta.blobs(),
                owner_lease(self.router, src_p, src_bid, src_key)
                if smeta.size > SMALL_OBJECT
                else None,
                started=looked_up,
            )
            try:
                async with lease:
                    await self.store.put_stream(
                        new_blob, self.read_body(smeta, 0, smeta.size, lease)
                    )
            except NotFound:
                raise S3Error("NoSuchKey", resource=src) from None
            except ReadExpired:
                raise S3Error("SlowDown", "Reading the copy source took too long.") from None
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
        await self._commit_blob(
            p, "obj.put", {"b": bid, "k": key, "m": meta_to_wire(meta), "rid": blob_id}, new_blob
        )
        body = xmlio.render_copy_object(meta.etag, _dt(meta.mtime), meta.checksums or None)
        return web.Response(body=body, content_type="application/xml")

    # -- multipart uploads -------------------------------------------------------------------
    async def _upload_target(
        self, request: web.Request, bucket: str, key: str
    ) -> tuple[str, int, str]:
        names.validate_key(key)
        bid = await self.bucket_id(bucket, request)
        upload_id = request.query.get("uploadId", "")
        if not upload_id:
            raise S3Error("NoSuchUpload", resource=key)
        return bid, self.partition(bid, key), upload_id

    async def create_multipart(self, request: web.Request, bucket: str, key: str) -> web.Response:
        names.validate_key(key)
        bid = await self.bucket_id(bucket, request)
        p = self.partition(bid, key)
        upload_id = new_id()
        template = self._meta_from_headers(request, 0, "", None, {})
        await self.call(
            p, "mpu.create", {"b": bid, "k": key, "u": upload_id, "m": meta_to_wire(template)}
        )
        body = xmlio.render_initiate_multipart(bucket, key, upload_id)
        return web.Response(body=body, content_type="application/xml")

    async def upload_part(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid, p, upload_id = await self._upload_target(request, bucket, key)
        n = names.parse_part_number(request.query.get("partNumber"))
        blob_id = new_id()
        bkey = blob_key(p, blob_id)
        copy = "x-amz-copy-source" in request.headers
        checksums: dict[str, str] = {}
        if copy:
            from cohort.director.reads import BlobLease, ReadExpired, blobs_in_range, owner_lease

            src_bucket, src_key, _ = names.parse_copy_source(request.headers["x-amz-copy-source"])
            looked_up = time.monotonic()
            src_bid, src_p, smeta = await self._lookup(src_bucket, src_key, request)
            rng = request.headers.get("x-amz-copy-source-range")
            start, end = (
                names.parse_copy_source_range(rng, smeta.size) if rng else (0, smeta.size - 1)
            )
            md5 = hashlib.md5()
            n_copy = end - start + 1
            # the source may be replaced while it is copied: lease its blobs
            lease = BlobLease(
                blobs_in_range(smeta, start, n_copy),
                owner_lease(self.router, src_p, src_bid, src_key)
                if n_copy > SMALL_OBJECT
                else None,
                started=looked_up,
            )

            async def copied() -> AsyncIterator[bytes]:
                async for chunk in self.read_body(smeta, start, n_copy, lease):
                    md5.update(chunk)
                    yield chunk

            try:
                async with lease:
                    size = await self.store.put_stream(bkey, copied())
            except NotFound:
                raise S3Error("NoSuchKey", resource=src_key) from None
            except ReadExpired:
                raise S3Error("SlowDown", "Reading the copy source took too long.") from None
            etag = md5.hexdigest()
        else:
            sink: list[Any] = []
            size = await self.store.put_stream(
                bkey, self._body_chunks(request, request["auth"], sink)
            )
            checksums, etag = sink[0]
        part = {
            "size": size,
            "etag": etag,
            "blob": bkey if size else None,
            "mtime": time.time(),
            "checksums": checksums,
        }
        await self._commit_blob(
            p,
            "mpu.part",
            {
                "b": bid,
                "k": key,
                "u": upload_id,
                "n": n,
                "p": [part["size"], part["etag"], part["blob"], part["mtime"], part["checksums"]],
                "rid": blob_id,
            },
            bkey,
        )
        if not size:
            await self.store.delete(bkey)
        if copy:
            body = xmlio.render_copy_part(etag, _dt(float(part["mtime"])))  # type: ignore[arg-type]
            return web.Response(body=body, content_type="application/xml")
        headers = {"ETag": f'"{etag}"'}
        for alg, v in checksums.items():
            headers[f"x-amz-checksum-{alg.lower()}"] = v
        return web.Response(headers=headers)

    async def complete_multipart(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid, p, upload_id = await self._upload_target(request, bucket, key)
        parts = xmlio.parse_complete_multipart(await request.read())
        r = await self.call(
            p,
            "mpu.complete",
            {
                "b": bid,
                "k": key,
                "u": upload_id,
                "rid": new_id(),
                "parts": [[cp.part_number, cp.etag] for cp in parts],
            },
        )
        if r.get("m") is None:
            raise S3Error("NoSuchUpload", resource=key)
        meta = meta_from_wire(r["m"])
        location = f"{request.scheme}://{request.host}/{bucket}/{urllib.parse.quote(key)}"
        body = xmlio.render_complete_multipart(location, bucket, key, meta.etag)
        return web.Response(body=body, content_type="application/xml")

    async def abort_multipart(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid, p, upload_id = await self._upload_target(request, bucket, key)
        await self.call(p, "mpu.abort", {"b": bid, "k": key, "u": upload_id})
        return web.Response(status=204)

    async def list_parts(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid, p, upload_id = await self._upload_target(request, bucket, key)
        up = await self.call(p, "mpu.get", {"b": bid, "k": key, "u": upload_id})
        marker = names.parse_int_param(
            request.query.get("part-number-marker"), "part-number-marker", default=0
        )
        max_parts = names.parse_int_param(
            request.query.get("max-parts"), "max-parts", default=1000, maximum=1000
        )
        numbers = sorted(int(n) for n in up["parts"] if int(n) > marker)
        page = numbers[:max_parts]
        truncated = len(numbers) > max_parts
        infos = []
        for n in page:
            size, etag, _blob, mtime, cks = up["parts"][n]
            infos.append(xmlio.PartInfo(n, _dt(mtime), etag, size, cks))
        owner = self._owner(request)
        body = xmlio.render_list_parts(
            xmlio.ListPartsResult(
                bucket=bucket,
                key=key,
                upload_id=upload_id,
                parts=infos,
                part_number_marker=marker,
                next_part_number_marker=page[-1] if truncated else None,
                max_parts=max_parts,
                is_truncated=truncated,
                initiator=owner,
                owner=owner,
            )
        )
        return web.Response(body=body, content_type="application/xml")

    async def list_uploads(self, request: web.Request, bucket: str, key: str) -> web.Response:
        bid = await self.bucket_id(bucket, request)
        q = request.query
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        key_marker = q.get("key-marker", "")
        id_marker = q.get("upload-id-marker", "")
        max_uploads = names.parse_int_param(
            q.get("max-uploads"), "max-uploads", default=1000, maximum=1000
        )
        results = await self.router.scatter("mpu.list", {"b": bid, "prefix": prefix})
        found = sorted(
            (k, u, t)
            for r in results
            for k, u, t in r["uploads"]
            if (k, u) > (key_marker, id_marker if key_marker else "")
        )
        uploads: list[xmlio.UploadInfo] = []
        prefixes: list[str] = []
        truncated = False
        last: tuple[str, str] | None = None
        for k, u, t in found:
            if delimiter:
                i = k.find(delimiter, len(prefix))
                if i >= 0:
                    cp = k[: i + len(delimiter)]
                    if cp not in prefixes:
                        if len(uploads) + len(prefixes) >= max_uploads:
                            truncated = True
                            break
                        prefixes.append(cp)
                    continue
            if len(uploads) + len(prefixes) >= max_uploads:
                truncated = True
                break
            uploads.append(xmlio.UploadInfo(k, u, _dt(t)))
            last = (k, u)
        body = xmlio.render_list_multipart_uploads(
            xmlio.ListUploadsResult(
                bucket=bucket,
                uploads=uploads,
                common_prefixes=prefixes,
                prefix=prefix,
                delimiter=delimiter or None,
                key_marker=key_marker,
                upload_id_marker=id_marker,
                next_key_marker=last[0] if truncated and last else None,
                next_upload_id_marker=last[1] if truncated and last else None,
                max_uploads=max_uploads,
                is_truncated=truncated,
                encoding_type=q.get("encoding-type"),
            )
        )
        return web.Response(body=body, content_type="application/xml")


# -- the HTTP server: S3 errors for what aiohttp refuses, and a header-read timeout ------------


async def _no_expect(request: web.Request) -> None:
    """Expect handler of the S3 route: nothing here; :meth:`S3App.handle` sends
    ``100 Continue`` once it knows it will read the body."""


def _protocol_error(status: int, exc: BaseException | None) -> S3Error:
    """The S3 error for a request aiohttp's HTTP parser (or protocol) refused."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower()
    ):
        return S3Error(
            "RequestHeaderSectionTooLarge",
            "Your request header section (request line, query or a header) exceeds "
            "the maximum allowed size.",
        )
    if isinstance(exc, BadHttpMessage):
        # the first line of the parser's message names the problem (bad method, invalid
        # character in the request line or a header: CR/LF/NUL in a key sent unencoded,
        # ...); the rest echoes the offending bytes, which are not sent back
        reason = (exc.message or "").strip().splitlines()[:1]
        detail = f" ({reason[0].rstrip(': ')})" if reason and reason[0].strip() else ""
        return S3Error("InvalidRequest", f"The HTTP request is malformed{detail}.")
    if status == 504:
        return S3Error("RequestTimeout")
    if 400 <= status < 500:
        return S3Error("InvalidRequest", "The HTTP request is malformed.", status=status)
    return S3Error("InternalError")


class S3RequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 connection protocol with two changes for an S3 front.

    * A request aiohttp refuses itself (bad request line, CR/LF/NUL in the target,
      oversized request line or header, too many headers) gets an S3 XML error, not
      aiohttp's plain-text page.
    * Header-read timeout (against slowloris): the request line and headers must be
      complete within ``header_timeout`` seconds, counted from the connection's start
      and, on a kept-alive connection, from the first byte of each further request.
      Otherwise the connection is answered 400 RequestTimeout and closed (or just
      closed, if it never sent a byte).  Idle keep-alive connections are aiohttp's
      ``keepalive_timeout``.
    """

    __slots__ = ("_got_bytes", "_header_deadline", "_header_timeout")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._got_bytes = False

    # the timer -----------------------------------------------------------------------------
    def _arm(self, got_bytes: bool) -> None:
        self._got_bytes = got_bytes
        if self._header_deadline is None and self._header_timeout > 0:
            self._header_deadline = self._loop.call_later(
                self._header_timeout, self._headers_too_slow
            )

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._request_in_progress or self._messages or self.transport is None:
            return  # a request is being served (its body is the handler's business)
        if self._got_bytes:
            body = S3Error(
                "RequestTimeout",
                "Your socket connection to the server did not send a complete request "
                f"header within {self._header_timeout:g} seconds.",
            ).to_xml(new_id().upper())
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nServer: Cohort\r\n"
                b"Content-Type: application/xml\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        log.info("closing a connection that sent no complete request in time")
        self.force_close()

    # protocol events -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm(False)

    def data_received(self, data: bytes) -> None:
        if data and not self._request_in_progress and not self._messages:
            self._arm(True)  # bytes of the next request line / headers
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()  # a complete request head was parsed

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    async def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        # body bytes that arrived between the head being parsed and the handler starting
        # may have armed the timer: a request being served is never timed out here (and
        # a stale timer must not fire into the idle keep-alive connection afterwards)
        self._disarm()
        return await super()._handle_request(request, start_time, request_handler)

    # errors ------------------------------------------------------------------------------------
    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:  # anyone can send garbage: not worth a traceback in the log
            log.info("bad HTTP request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send an error")
        rid = new_id().upper()
        err = _protocol_error(status, exc)
        resp = web.Response(status=err.status, body=err.to_xml(rid), content_type="application/xml")
        resp.headers["x-amz-request-id"] = rid
        resp.headers["x-amz-id-2"] = rid
        resp.headers["Server"] = "Cohort"
        resp.force_close()
        return resp


class _S3Server(web.Server):
    """aiohttp's low-level server, making :class:`S3RequestHandler` connections."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return S3RequestHandler(
            self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs
        )


class S3Runner(web.AppRunner):
    """``web.AppRunner`` whose connections are :class:`S3RequestHandler`.

    ``header_timeout`` bounds the time to a complete request head; every other keyword
    goes to aiohttp as for AppRunner (``keepalive_timeout``, ``max_line_size``,
    ``max_field_size``, ``max_headers``...)."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _S3Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            header_timeout=self.header_timeout,
            **plain._kwargs,
        )
