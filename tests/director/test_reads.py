"""Director reads: reader leases (BlobLease) and what a GET does when storage fails after
the response headers went out (it breaks the connection: the client sees a short body,
never a second HTTP response inside the first).  In-process: a real aiohttp server, a
stand-in router and store, raw sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from cohort.director.reads import BlobLease, ReadExpired, blobs_in_range
from cohort.director.s3app import READ_CHUNK, S3App
from cohort.server.state import ObjectMeta, meta_to_wire
from cohort.storage.base import NotFound


async def test_a_lease_renews_and_moves_the_deadline() -> None:
    calls: list[tuple[list[str], float]] = []

    async def renew(blobs: list[str], seconds: float) -> Any:
        calls.append((blobs, seconds))
        return {"s": seconds, "grace": 1.0}

    t0 = time.monotonic()
    async with BlobLease(["a"], renew, started=t0, grace=1.0, max_read=60) as lease:
        await asyncio.sleep(1.2)  # past the half-grace window a read without a lease has
        lease.check()
        assert lease.renewals >= 3
        assert lease.deadline > time.monotonic()
    assert calls[0] == (["a"], 1.0)


async def test_a_lease_that_cannot_be_renewed_expires_and_aborts() -> None:
    aborted: list[float] = []

    async def renew(blobs: list[str], seconds: float) -> Any:
        raise ConnectionError("owner unreachable")

    t0 = time.monotonic()
    lease = BlobLease(["a"], renew, started=t0, grace=0.4, on_expired=lambda: aborted.append(1))
    lease.start()
    await asyncio.sleep(0.3)
    await lease.close()
    assert aborted == [1]
    try:
        lease.check()
        raise AssertionError("check() passed after the deadline")
    except ReadExpired:
        pass


async def test_a_read_never_outlasts_the_maximum() -> None:
    aborted: list[float] = []

    async def renew(blobs: list[str], seconds: float) -> Any:
        return {"s": seconds}

    t0 = time.monotonic()
    async with BlobLease(
        ["a"], renew, started=t0, grace=1.0, max_read=0.6, on_expired=lambda: aborted.append(1)
    ):
        await asyncio.sleep(0.8)
    assert aborted == [1]


def test_blobs_in_range() -> None:
    m = ObjectMeta(
        size=30, etag="x", mtime=0, blob=None, segments=[("a", 10), ("b", 10), ("c", 10)]
    )
    assert blobs_in_range(m, 0, 30) == ["a", "b", "c"]
    assert blobs_in_range(m, 10, 10) == ["b"]
    assert blobs_in_range(m, 15, 10) == ["b", "c"]


class _Router:
    partition_count = 1

    def __init__(self, meta: ObjectMeta) -> None:
        self.buckets = {"bkt": {"name": "bkt", "id": "bid"}}
        self.meta = meta
        self.leases = 0

    async def refresh(self) -> None:
        return None

    async def read(self, p: int, method: str, params: Any, **kw: Any) -> Any:
        return {"m": meta_to_wire(self.meta)}

    async def call(self, p: int, method: str, params: Any) -> Any:
        assert method == "obj.lease"
        self.leases += 1
        return {"s": params["s"]}


class _FailingStore:
    """Serves ``good`` chunks of zeros, then raises NotFound (the blob vanished)."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.reads = 0

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        self.reads += 1
        await asyncio.sleep(0.01)
        if self.reads > self.good:
            raise NotFound(key)
        return b"\0" * length

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        raise NotImplementedError


async def _serve(app: S3App) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def _raw_get(port: int) -> tuple[bytes, str]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /bkt/k HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    ending = "eof"
    try:
        while True:
            d = s.recv(1 << 16)
            if not d:
                break
            data += d
    except ConnectionResetError:
        ending = "reset"
    except TimeoutError:
        ending = "timeout"
    finally:
        s.close()
    return data, ending


async def test_a_storage_failure_mid_body_breaks_the_connection() -> None:
    size = 8 * READ_CHUNK
    meta = ObjectMeta(
        size=size,
        etag="e" * 32,
        mtime=0,
        blob="blobs/0000/aa/x",
        headers={"x-amz-acl": "public-read"},
    )
    router = _Router(meta)
    app = S3App(router, _FailingStore(good=2), lambda _k: None)  # type: ignore[arg-type]
    runner, port = await _serve(app)
    try:
        data, ending = await asyncio.to_thread(_raw_get, port)
    finally:
        await runner.cleanup()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1" not in body  # no second response inside the first
    assert body == b"\0" * len(body) and len(body) < size
    assert ending in ("eof", "reset")
    assert router.leases >= 1  # the streamed read leased its blob
