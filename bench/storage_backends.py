"""Store backends side by side: put/get rates of 4 KiB and 1 MiB values, and listings.

    .venv/bin/python bench/storage_backends.py [--osds 1] [--memstore] [--concurrency 16]
        [--small 1500] [--large 60] [--list-keys 1000] [--json out.json]

Starts a real Ceph (cohort.ceph_server: 1 monitor, --osds bluestore OSDs on files unless
--memstore, radosgw) and measures, in one run:

* ``local``: LocalStore in a temporary directory (fsync on): the reference every ratio is
  against;
* ``rados-raw``: bare librados ``write_full``/``read`` of the same sizes, sequential
  (sync) and pipelined (aio): what RADOS itself gives, with no Store mapping;
* ``rados aio/omap`` (the default mapping), ``rados sync/omap`` (blocking calls in the
  thread pool), ``rados aio/scan`` (no index object; listing sorts an object scan);
* ``s3 radosgw``: S3Store against Ceph's own S3 gateway on the same OSDs.

Puts are ``put(if_absent=True)`` of fresh keys (what the operation log and blobs do),
gets read them back; ``c=1`` rows issue one operation at a time, the others keep
``--concurrency`` in flight from one asyncio task set.  The listing rows time
``list(<dir>/)`` of a directory of ``--list-keys`` keys while the namespace holds
``--list-keys * 4`` other keys elsewhere (the object scan walks all of them).

Figures on a shared 2-core machine vary by ±20% between runs: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cohort.ceph_server import CephCluster
from cohort.storage.local import LocalStore
from cohort.storage.rados import RadosStore
from cohort.storage.s3 import S3Store

KiB = 1024
MiB = 1024 * 1024


async def rate(n: int, concurrency: int, op: Callable[[int], Awaitable[Any]]) -> float:
    """Operations per second of ``n`` calls of ``op(i)``, ``concurrency`` in flight."""
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            await op(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def bench_store(
    name: str, store: Any, args: argparse.Namespace, rows: list[dict[str, Any]]
) -> None:
    tag = uuid.uuid4().hex[:8]
    for size, n in ((4 * KiB, args.small), (1 * MiB, args.large)):
        data = os.urandom(size)
        label = "4KiB" if size == 4 * KiB else "1MiB"
        for c in (1, args.concurrency) if size == 4 * KiB else (args.concurrency // 4 or 1,):
            n_here = n if c > 1 else max(50, n // 4)
            prefix = f"b/{tag}/{label}-c{c}"

            async def put_one(i: int, p: str = prefix, d: bytes = data) -> None:
                await store.put(f"{p}/{i:08d}", d, if_absent=True)

            async def get_one(i: int, p: str = prefix) -> None:
                await store.get(f"{p}/{i:08d}")

            put = await rate(n_here, c, put_one)
            get = await rate(n_here, c, get_one)
            rows.append({"backend": name, "size": label, "concurrency": c,
                         "put_per_s": put, "get_per_s": get})  # fmt: skip
            print(f"  {name:18s} {label} c={c:<3d} put {put:8.0f}/s  get {get:8.0f}/s", flush=True)


async def bench_listing(
    name: str, store: Any, args: argparse.Namespace, rows: list[dict[str, Any]]
) -> None:
    n = args.list_keys
    v = b"x" * 64
    sem = asyncio.Semaphore(32)

    async def put(k: str) -> None:
        async with sem:
            await store.put(k, v, if_absent=True)

    await asyncio.gather(*(put(f"parts/0001/log/{i:016d}") for i in range(n)))
    await asyncio.gather(*(put(f"blobs/{i % 16:04d}/{i:08d}") for i in range(n * 4)))
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        got = [k async for k in store.list("parts/0001/log/")]
        assert len(got) == n
    ms = (time.perf_counter() - t0) / reps * 1000
    rows.append({"backend": name, "list_keys": n, "other_keys": n * 4, "list_ms": ms})
    print(f"  {name:18s} list {n} of {n * 5} keys: {ms:8.1f} ms", flush=True)


async def bench_raw(
    ceph: CephCluster, args: argparse.Namespace, rows: list[dict[str, Any]]
) -> None:
    """Bare librados: the ceiling for any mapping."""
    rs = await RadosStore.from_url(ceph.rados_url(namespace="raw-" + uuid.uuid4().hex[:6])).open()
    io = rs._ioctx
    ops = rs.ops
    for size, n in ((4 * KiB, args.small), (1 * MiB, args.large)):
        data = os.urandom(size)
        label = "4KiB" if size == 4 * KiB else "1MiB"
        n_sync = max(50, n // 4)

        def sync_puts(label: str = label, data: bytes = data, n_sync: int = n_sync) -> None:
            for i in range(n_sync):
                io.write_full(f"s{label}{i}", data)

        def sync_gets(label: str = label, size: int = size, n_sync: int = n_sync) -> None:
            for i in range(n_sync):
                io.read(f"s{label}{i}", size, 0)

        t0 = time.perf_counter()
        await asyncio.to_thread(sync_puts)
        put_sync = n_sync / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.to_thread(sync_gets)
        get_sync = n_sync / (time.perf_counter() - t0)
        window = 64 if size == 4 * KiB else 8

        async def aio_put(i: int, lb: str = label, d: bytes = data) -> None:
            await ops.write_full(f"a{lb}{i}", d)

        async def aio_get(i: int, lb: str = label, sz: int = size) -> None:
            await ops.read(f"a{lb}{i}", sz, 0)

        put_aio = await rate(n, window, aio_put)
        get_aio = await rate(n, window, aio_get)
        for mode, c, p, g in (("sync", 1, put_sync, get_sync), ("aio", window, put_aio, get_aio)):
            rows.append({"backend": f"rados-raw {mode}", "size": label, "concurrency": c,
                         "put_per_s": p, "get_per_s": g})  # fmt: skip
            print(f"  rados-raw {mode:8s} {label} c={c:<3d} put {p:8.0f}/s  get {g:8.0f}/s",
                  flush=True)  # fmt: skip
    await rs.aclose()


def table(rows: list[dict[str, Any]]) -> str:
    base = {
        (r["size"], r["concurrency"]): r for r in rows if r["backend"] == "local" and "size" in r
    }
    out = [
        f"{'backend':20s} {'size':5s} {'c':>3s} {'put/s':>9s} {'x local':>8s} "
        f"{'get/s':>9s} {'x local':>8s}"
    ]
    for r in rows:
        if "size" not in r:
            continue
        b = base.get((r["size"], r["concurrency"]))
        pr = f"{r['put_per_s'] / b['put_per_s']:8.2f}" if b else f"{'-':>8s}"
        gr = f"{r['get_per_s'] / b['get_per_s']:8.2f}" if b else f"{'-':>8s}"
        out.append(
            f"{r['backend']:20s} {r['size']:5s} {r['concurrency']:3d} {r['put_per_s']:9.0f} "
            f"{pr} {r['get_per_s']:9.0f} {gr}"
        )
    lbase = next((r for r in rows if r["backend"] == "local" and "list_ms" in r), None)
    out.append("")
    out.append(f"{'listing':20s} {'keys':>6s} {'of':>6s} {'ms':>9s} {'x local':>8s}")
    for r in rows:
        if "list_ms" in r:
            ratio = f"{r['list_ms'] / lbase['list_ms']:8.2f}" if lbase else "-"
            out.append(
                f"{r['backend']:20s} {r['list_keys']:6d} {r['list_keys'] + r['other_keys']:6d} "
                f"{r['list_ms']:9.1f} {ratio}"
            )
    return "\n".join(out)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="cohort-bench-stores-"))
    ceph = CephCluster(
        args.osds, objectstore="memstore" if args.memstore else "bluestore", rgw=True
    ).start(timeout=120)
    print(f"ceph: {args.osds} {'memstore' if args.memstore else 'bluestore'} OSD(s), "
          f"booted in {ceph.boot_seconds:.1f}s", flush=True)  # fmt: skip
    try:
        import boto3
        from botocore.config import Config

        cr = ceph.s3_credentials
        boto3.client(
            "s3", endpoint_url=ceph.s3_endpoint, aws_access_key_id=cr["access_key"],
            aws_secret_access_key=cr["secret_key"], region_name="us-east-1",
            config=Config(request_checksum_calculation="when_required"),
        ).create_bucket(Bucket="bench")  # fmt: skip

        async def local() -> Any:
            return LocalStore(tmp / uuid.uuid4().hex)

        def rados(io: str, listing: str) -> Callable[[], Awaitable[Any]]:
            async def make() -> Any:
                ns = f"bench-{uuid.uuid4().hex[:8]}"
                url = ceph.rados_url(namespace=ns, io=io, listing=listing)
                return await RadosStore.from_url(url).open()

            return make

        async def s3() -> Any:
            return await S3Store(
                "bench", uuid.uuid4().hex[:8], endpoint=ceph.s3_endpoint,
                access_key=cr["access_key"], secret_key=cr["secret_key"],
            ).open()  # fmt: skip

        backends: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("local", local),
            ("rados aio/omap", rados("aio", "omap")),
            ("rados sync/omap", rados("sync", "omap")),
            ("rados aio/scan", rados("aio", "scan")),
            ("s3 radosgw", s3),
        ]
        await bench_raw(ceph, args, rows)
        for name, make in backends:
            store = await make()
            try:
                await bench_store(name, store, args, rows)
                if name != "s3 radosgw" or args.list_s3:
                    store2 = await make()
                    try:
                        await bench_listing(name, store2, args, rows)
                    finally:
                        if hasattr(store2, "aclose"):
                            await store2.aclose()
            finally:
                if hasattr(store, "aclose"):
                    await store.aclose()
    finally:
        ceph.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "osds": args.osds,
        "objectstore": "memstore" if args.memstore else "bluestore",
        "concurrency": args.concurrency,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--osds", type=int, default=1)
    ap.add_argument("--memstore", action="store_true", help="OSDs in memory (not durable)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--small", type=int, default=1500, help="4 KiB operations per row")
    ap.add_argument("--large", type=int, default=60, help="1 MiB operations per row")
    ap.add_argument("--list-keys", type=int, default=1000)
    ap.add_argument("--list-s3", action="store_true", help="also time S3 listings")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    out = asyncio.run(run(args))
    print()
    print(table(out["rows"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
