"""What only one backend has: RADOS's stripes, index repair, store marker and sweep; the
S3 backend's refusal of a service that ignores conditional writes, and its request counts."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from cohort.ceph_server import CephCluster
from cohort.storage.base import PreconditionFailed, StoreError
from cohort.storage.rados import RadosStore, rados_module
from cohort.storage.s3 import ConditionalWritesUnsupported, S3Store
from tests.storage.conftest import BUCKET


async def rados_store(ceph: CephCluster, **options: str) -> RadosStore:
    ns = options.pop("namespace", f"b-{uuid.uuid4().hex[:12]}")
    return await RadosStore.from_url(ceph.rados_url(namespace=ns, **options)).open()


def raw_objects(ceph: CephCluster, namespace: str) -> list[str]:
    with ceph.client().open_ioctx(ceph.pool) as io:
        io.set_namespace(namespace)
        return sorted(o.key for o in io.list_objects())


async def test_rados_stripes_are_removed_with_their_value(ceph: CephCluster) -> None:
    s = await rados_store(ceph, stripe="65536")
    try:
        data = os.urandom(1_000_000)  # 16 stripes of 64 KiB
        await s.put("blobs/x", data)
        objs = raw_objects(ceph, s.namespace)
        stripes = [o for o in objs if o.startswith("~s/blobs/x/")]
        assert len(stripes) == 15  # the head holds the first one
        assert all(len(o.rsplit("/", 2)[1]) == 32 for o in stripes)  # named by the etag
        await s.put("blobs/x", os.urandom(300_000))  # replaced: the old stripes go
        objs = raw_objects(ceph, s.namespace)
        assert len([o for o in objs if o.startswith("~s/")]) == 4
        await s.delete("blobs/x")
        assert [o for o in raw_objects(ceph, s.namespace) if not o.startswith("~i/")] == [
            "~cohort-store"
        ]
    finally:
        await s.aclose()


async def test_rados_sweep_removes_orphaned_stripes(ceph: CephCluster) -> None:
    """A writer that died between its stripes and its head leaves unreferenced stripe
    objects; ``sweep`` removes them (and only them)."""
    s = await rados_store(ceph, stripe="65536")
    try:
        await s.put("blobs/live", os.urandom(200_000))
        with ceph.client().open_ioctx(ceph.pool) as io:
            io.set_namespace(s.namespace)
            for n in (1, 2, 3):
                io.write_full(f"~s/blobs/dead/{'ab' * 16}/{n}", b"x" * 100)
        assert await s.sweep(older_than=3600) == 0  # too young: maybe a writer at work
        assert await s.sweep(older_than=0) == 3
        stripes = [o for o in raw_objects(ceph, s.namespace) if o.startswith("~s/")]
        assert len(stripes) == 3 and all(o.startswith("~s/blobs/live/") for o in stripes)
        assert len(await s.get("blobs/live")) == 200_000
    finally:
        await s.aclose()


async def test_rados_index_entry_is_repaired_by_the_fence(ceph: CephCluster) -> None:
    """A writer that died between its head and its index entry leaves a key that exists
    unlisted; the next create-if-absent of that key (the oplog's fence) lists it again."""
    s = await rados_store(ceph)
    try:
        await s.put("parts/0001/log/0000000000000001", b"one", if_absent=True)
        # the head of segment 2 without its index entry, as a crash would leave it
        head = s._header(os.urandom(16), 3) + b"two"
        with ceph.client().open_ioctx(ceph.pool) as io:
            io.set_namespace(s.namespace)
            io.write_full("parts/0001/log/0000000000000002", head)
        assert [k async for k in s.list("parts/0001/log/")] == ["parts/0001/log/0000000000000001"]
        with pytest.raises(PreconditionFailed):
            await s.put("parts/0001/log/0000000000000002", b"fence", if_absent=True)
        assert [k async for k in s.list("parts/0001/log/")] == [
            "parts/0001/log/0000000000000001",
            "parts/0001/log/0000000000000002",
        ]
        assert await s.get("parts/0001/log/0000000000000002") == b"two"
    finally:
        await s.aclose()


async def test_rados_store_keeps_its_listing_mode(ceph: CephCluster) -> None:
    ns = f"m-{uuid.uuid4().hex[:12]}"
    s = await rados_store(ceph, namespace=ns, listing="omap")
    await s.aclose()
    with pytest.raises(StoreError, match="listing=omap"):
        await rados_store(ceph, namespace=ns, listing="scan")


async def test_rados_url_errors(ceph: CephCluster) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await RadosStore.from_url(ceph.rados_url(pool="no-such-pool")).open()
    with pytest.raises(StoreError, match="unknown rados URL options"):
        RadosStore.from_url(ceph.rados_url(colour="blue"))
    with pytest.raises(StoreError, match="not a rados URL"):
        RadosStore.from_url("s3://bucket")
    assert rados_module().__name__ == "rados"


async def test_rados_many_concurrent_small_puts_over_aio(ceph: CephCluster) -> None:
    s = await rados_store(ceph)
    try:
        await asyncio.gather(*(s.put(f"k/{i:05d}", b"v" * 4096) for i in range(300)))
        assert len([k async for k in s.list("k/")]) == 300
        got = await asyncio.gather(*(s.get(f"k/{i:05d}") for i in range(300)))
        assert all(g == b"v" * 4096 for g in got)
    finally:
        await s.aclose()


# -- S3 ----------------------------------------------------------------------------------
async def start_forgetful_s3() -> tuple[web.AppRunner, str]:
    """A minimal S3 service that ignores If-None-Match and If-Match (no auth either),
    standing in for a service without conditional writes."""
    objects: dict[str, bytes] = {}

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.method == "HEAD" and path.count("/") == 1:
            return web.Response(status=200)
        if request.method == "PUT":
            objects[path] = await request.read()
            return web.Response(status=200, headers={"ETag": f'"{len(objects)}"'})
        if request.method == "DELETE":
            objects.pop(path, None)
            return web.Response(status=204)
        if request.method == "GET" and path in objects:
            return web.Response(body=objects[path])
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_s3_refuses_a_service_without_conditional_writes() -> None:
    runner, endpoint = await start_forgetful_s3()
    try:
        s = S3Store("bucket", "p", endpoint=endpoint, access_key="k", secret_key="s")
        with pytest.raises(ConditionalWritesUnsupported, match="If-None-Match"):
            await s.open()
        assert s._client is None  # not usable
    finally:
        await runner.cleanup()


async def test_s3_radosgw_and_cohort_honour_conditional_writes(
    ceph: CephCluster, cohort_s3: Any
) -> None:
    for endpoint, creds in [
        (ceph.s3_endpoint, ceph.s3_credentials),
        (cohort_s3.s3_endpoint, cohort_s3.creds),
    ]:
        s = S3Store(BUCKET, uuid.uuid4().hex, endpoint=endpoint, access_key=creds["access_key"],
                    secret_key=creds["secret_key"])  # fmt: skip
        await s.open()  # runs the probe
        await s.aclose()


async def test_s3_requests_per_operation(ceph: CephCluster) -> None:
    cr = ceph.s3_credentials
    s = S3Store(BUCKET, uuid.uuid4().hex, endpoint=ceph.s3_endpoint,
                access_key=cr["access_key"], secret_key=cr["secret_key"])  # fmt: skip
    await s.open()
    try:
        s.requests.clear()
        for i in range(10):
            await s.put(f"log/{i:016d}", b"x" * 4096, if_absent=True)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(20):
                yield b"y" * (1 << 20)

        await s.put_stream("blobs/big", body())
        assert s.requests["PutObject"] == 10
        # 20 MiB in 8 MiB parts: create + 3 parts + complete
        assert s.requests["CreateMultipartUpload"] == 1
        assert s.requests["UploadPart"] == 3
        assert s.requests["CompleteMultipartUpload"] == 1
    finally:
        await s.aclose()


# -- Ceph's promises under a writing client ----------------------------------------------
async def _write_while(store: RadosStore, stop: asyncio.Event, acked: list[str],
                       errors: list[BaseException]) -> None:  # fmt: skip
    i = 0
    while not stop.is_set():
        key = f"parts/0002/log/{i:016d}"
        try:
            await store.put(key, key.encode() * 64, if_absent=True)
            acked.append(key)
        except Exception as e:
            errors.append(e)
        i += 1


@pytest.mark.slow
async def test_rados_osd_added_and_killed_while_a_client_writes(tmp_path: Any) -> None:
    """Add an OSD online, then kill -9 one OSD of a size-2 pool, while a client writes:
    0 errors, and every acknowledged write reads back afterwards."""
    from cohort.ceph_server import ceph_available

    if not ceph_available():
        pytest.skip("Ceph is not installed")
    c = CephCluster(2, objectstore="memstore", pool_size=2)
    await asyncio.to_thread(c.start, 90)
    try:
        s = await RadosStore.from_url(c.rados_url(op_timeout="60")).open()
        stop = asyncio.Event()
        acked: list[str] = []
        errors: list[BaseException] = []
        writer = asyncio.create_task(_write_while(s, stop, acked, errors))
        await asyncio.sleep(1.0)
        before = len(acked)
        new_osd = await asyncio.to_thread(c.add_osd)
        await asyncio.sleep(2.0)
        assert len(acked) > before  # writes went on while the OSD joined
        victim = next(i for i in c.osds if i != new_osd)
        c.kill_osd(victim)
        n_at_kill = len(acked)
        # writes stall until the monitor marks it down (heartbeat grace 6 s), then go on
        deadline = asyncio.get_running_loop().time() + 45
        while len(acked) < n_at_kill + 50:
            assert asyncio.get_running_loop().time() < deadline, "writes did not resume"
            await asyncio.sleep(0.2)
        stop.set()
        await writer
        assert errors == []
        got = await asyncio.gather(*(s.get(k) for k in acked))
        assert all(g == k.encode() * 64 for g, k in zip(got, acked, strict=True))
        assert [k async for k in s.list("parts/0002/log/")] == acked
        await s.aclose()
    finally:
        await asyncio.to_thread(c.stop)
