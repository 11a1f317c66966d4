"""S3 figures side by side, measured in one run on this machine.

    .venv/bin/python bench/s3.py [--keys 1000000] [--large-objects 4] [--duration 5] [--json out.json]

1. PUT and GET per second for 4 KiB objects (lean signing client, several processes).
2. MB/s for 64 MiB objects uploaded by multipart (8 MiB parts, 4 in flight) next to the
   raw disk rate of the same storage directory measured with ``dd ... conv=fsync``.
3. Time to list N keys in one prefix through ListObjectsV2 (1000 keys per page, followed
   by continuation token), with the keys spread over every partition and server.  The N
   keys are loaded through the servers' bulk-import RPC (log records like any PUT, without
   bodies), because N real PUTs would take most of an hour here; the listing itself is
   the ordinary S3 path.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from loadgen import Target, cluster_target, run_load

from cohort.cluster import LocalCluster
from cohort.coord import connect
from cohort.partitioning import partition_of
from cohort.rpc import ClientPool
from cohort.s3.sigv4 import sign_request
from cohort.server.state import ObjectMeta, meta_to_wire

MiB = 1 << 20


def dd_rate(directory: Path, mib: int = 64) -> float:
    """MB/s of writing ``mib`` MiB with fsync at the end (what a durable large PUT costs)."""
    target = directory / "dd-probe"
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    dt = time.perf_counter() - t0
    target.unlink()
    return mib * MiB / dt / 1e6


async def _signed(
    session: aiohttp.ClientSession,
    t: Target,
    method: str,
    path: str,
    body: bytes = b"",
    query: str = "",
) -> tuple[int, bytes, dict[str, str]]:
    url = f"{t.endpoint}{path}" + (f"?{query}" if query else "")
    headers = {"content-length": str(len(body))} if method in ("PUT", "POST") else {}
    headers.update(
        sign_request(
            method, url, headers, "UNSIGNED-PAYLOAD", t.access_key, t.secret_key, "us-east-1"
        )
    )
    async with session.request(method, url, data=body or None, headers=headers) as r:
        return r.status, await r.read(), {k.lower(): v for k, v in r.headers.items()}


async def multipart_upload(t: Target, key: str, size: int, part: int, inflight: int) -> None:
    data = os.urandom(part)
    async with aiohttp.ClientSession() as s:
        st, body, _ = await _signed(s, t, "POST", f"/{t.bucket}/{key}", query="uploads=")
        assert st == 200, body
        uid = re.search(rb"<UploadId>(.*?)</UploadId>", body).group(1).decode()  # type: ignore[union-attr]
        n = size // part
        sem = asyncio.Semaphore(inflight)
        etags: dict[int, str] = {}

        async def one(i: int) -> None:
            async with sem:
                st, b, h = await _signed(
                    s, t, "PUT", f"/{t.bucket}/{key}", data, f"partNumber={i}&uploadId={uid}"
                )
                assert st == 200, b
                etags[i] = h["etag"]

        await asyncio.gather(*(one(i) for i in range(1, n + 1)))
        xml = (
            "<CompleteMultipartUpload>"
            + "".join(
                f"<Part><PartNumber>{i}</PartNumber><ETag>{etags[i]}</ETag></Part>"
                for i in range(1, n + 1)
            )
            + "</CompleteMultipartUpload>"
        )
        st, b, _ = await _signed(
            s, t, "POST", f"/{t.bucket}/{key}", xml.encode(), f"uploadId={uid}"
        )
        assert st == 200, b


async def large_objects(t: Target, count: int) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        await multipart_upload(t, f"large-{i}", 64 * MiB, 8 * MiB, 4)
    return count * 64 * MiB / (time.perf_counter() - t0) / 1e6


async def load_keys(cluster: LocalCluster, bucket: str, n: int) -> float:
    coord = connect(cluster.coordinator_address, cluster.credential())
    view = await coord.view()
    await coord.close()
    bid = next(b["id"] for b in view["buckets"] if b["name"] == bucket)
    owners = {m["id"]: m["address"] for m in view["members"] if m["role"] == "server"}
    P = len(view["partitions"])
    meta = meta_to_wire(
        ObjectMeta(size=0, etag=hashlib.md5(b"").hexdigest(), mtime=time.time(), blob=None)
    )
    pool = ClientPool(cluster.credential())
    t0 = time.perf_counter()
    batch: dict[str, list[Any]] = {}

    async def flush(addr: str, items: list[Any]) -> None:
        r = await pool.get(addr).call("obj.import", {"b": bid, "items": items}, timeout=300)
        assert not r["not_owned"], "partition map changed during the load"

    pending = []
    for i in range(n):
        key = f"many/{i:08d}"
        addr = owners[view["partitions"][partition_of(bid, key, P)][0]]
        batch.setdefault(addr, []).append([key, meta])
        if len(batch[addr]) >= 20_000:
            pending.append(flush(addr, batch.pop(addr)))
            if len(pending) >= 3:
                await asyncio.gather(*pending)
                pending = []
    pending.extend(flush(a, items) for a, items in batch.items())
    await asyncio.gather(*pending)
    await pool.close()
    return time.perf_counter() - t0


async def list_all(t: Target, prefix: str) -> tuple[int, float, int]:
    count = pages = 0
    token: str | None = None
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        while True:
            q = f"list-type=2&max-keys=1000&prefix={prefix}"
            if token:
                from urllib.parse import quote

                q += f"&continuation-token={quote(token, safe='')}"
            st, body, _ = await _signed(s, t, "GET", f"/{t.bucket}", query=q)
            assert st == 200, body[:500]
            count += body.count(b"<Key>")
            pages += 1
            m = re.search(rb"<NextContinuationToken>(.*?)</NextContinuationToken>", body)
            if m is None:
                break
            token = m.group(1).decode()
    return count, time.perf_counter() - t0, pages


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--large-objects", type=int, default=4)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(
        prefix="cohort-bench-s3-", dir=os.environ.get("COHORT_BENCH_DIR")
    ) as tmp:
        cluster = LocalCluster(Path(tmp) / "c", port=0).start()
        try:
            t = cluster_target(cluster, "bench")
            put = run_load(
                t,
                "PUT",
                4096,
                procs=args.procs,
                concurrency=args.concurrency,
                duration=args.duration,
            )
            get = run_load(
                t,
                "GET",
                4096,
                procs=args.procs,
                concurrency=args.concurrency,
                duration=args.duration,
            )
            disk = dd_rate(cluster.storage)
            large = asyncio.run(large_objects(t, args.large_objects))
            disk2 = dd_rate(cluster.storage)
            load_s = asyncio.run(load_keys(cluster, "bench", args.keys))
            n, list_s, pages = asyncio.run(list_all(t, "many/"))
        finally:
            cluster.stop()
    raw = (disk + disk2) / 2
    print(
        f"\nS3 benchmark ({args.procs} client processes x {args.concurrency} tasks; 2 shared cores)"
    )
    print(
        f"  PUT 4 KiB            {put.rate:9.0f} req/s   p50 {put.p50_ms:6.1f} ms  p99 {put.p99_ms:6.1f} ms"
        f"  errors {put.errors}  client cpu {put.client_cpu_seconds:.1f}s / {args.duration * 2:.0f}s"
    )
    print(
        f"  GET 4 KiB            {get.rate:9.0f} req/s   p50 {get.p50_ms:6.1f} ms  p99 {get.p99_ms:6.1f} ms"
        f"  errors {get.errors}  client cpu {get.client_cpu_seconds:.1f}s / {args.duration * 2:.0f}s"
    )
    print(
        f"  64 MiB multipart     {large:9.1f} MB/s    raw disk (dd, fsync) {raw:7.1f} MB/s"
        f"   ratio {large / raw:5.2f}"
    )
    print(
        f"  list {n:,} keys      {list_s:9.1f} s       ({pages} pages; loading them took {load_s:.1f} s)"
    )
    out.update(
        {
            "put_4k": put.__dict__,
            "get_4k": get.__dict__,
            "large_mb_s": large,
            "disk_mb_s": raw,
            "large_ratio": large / raw,
            "list_keys": n,
            "list_seconds": list_s,
            "load_seconds": load_s,
        }
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
