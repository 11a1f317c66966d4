"""A lean S3 load generator: asyncio + aiohttp, requests signed with Cohort's own SigV4.

boto3 spends ~1.3 ms of CPU per request, so a boto3-driven benchmark measures boto3.
This client signs each request itself (an HMAC chain, tens of microseconds) and sends
``UNSIGNED-PAYLOAD`` so bodies are not hashed on the client.  It runs in several
processes (``run_load``) and reports the CPU it used itself, so a reader can see whether
the load generator was the bottleneck.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from cohort.s3.sigv4 import sign_request


@dataclass
class Target:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str


@dataclass
class LoadResult:
    op: str
    size: int
    requests: int
    errors: int
    seconds: float
    client_cpu_seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.rate * self.size / 1e6


async def _worker(
    t: Target, op: str, size: int, proc: int, concurrency: int, duration: float, keys: int
) -> tuple[int, int, list[float]]:
    body = os.urandom(size)
    done = 0
    errors = 0
    lat: list[float] = []
    stop_at = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def one(task: int) -> None:
            nonlocal done, errors
            i = 0
            while time.monotonic() < stop_at:
                key = f"p{proc}-t{task}-{i % keys}"
                url = f"{t.endpoint}/{t.bucket}/{key}"
                method = "PUT" if op == "PUT" else "GET"
                headers = {"content-length": str(size)} if method == "PUT" else {}
                headers.update(
                    sign_request(
                        method,
                        url,
                        headers,
                        "UNSIGNED-PAYLOAD",
                        t.access_key,
                        t.secret_key,
                        "us-east-1",
                    )
                )
                t0 = time.perf_counter()
                try:
                    async with session.request(
                        method, url, data=body if method == "PUT" else None, headers=headers
                    ) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                            if errors <= 3:
                                print(
                                    f"loadgen: {method} {key} -> {resp.status}: "
                                    f"{(await resp.read())[:200]!r}",
                                    flush=True,
                                )
                        else:
                            done += 1
                            lat.append(time.perf_counter() - t0)
                except aiohttp.ClientError:
                    errors += 1
                i += 1

        await asyncio.gather(*(one(k) for k in range(concurrency)))
    return done, errors, lat


def _proc_main(args: tuple[Target, str, int, int, int, float, int], q: Any) -> None:
    import uvloop

    done, errors, lat = uvloop.run(_worker(*args))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    q.put((done, errors, lat, ru.ru_utime + ru.ru_stime))


def run_load(
    t: Target,
    op: str,
    size: int,
    *,
    procs: int = 2,
    concurrency: int = 8,
    duration: float = 5.0,
    keys: int = 20,
) -> LoadResult:
    """Run ``op`` (PUT or GET) of ``size``-byte objects from ``procs`` processes with
    ``concurrency`` tasks each, for ``duration`` seconds.  GET reads the keys a PUT run
    with the same parameters wrote."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    ps = [
        ctx.Process(target=_proc_main, args=((t, op, size, i, concurrency, duration, keys), q))
        for i in range(procs)
    ]
    t0 = time.monotonic()
    for p in ps:
        p.start()
    outs = [q.get() for _ in ps]
    for p in ps:
        p.join()
    elapsed = time.monotonic() - t0
    done = sum(o[0] for o in outs)
    errors = sum(o[1] for o in outs)
    lat = sorted(x for o in outs for x in o[2])
    cpu = sum(o[3] for o in outs)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
    # elapsed includes process start-up; use the configured duration for the rate
    return LoadResult(op, size, done, errors, min(elapsed, duration), cpu, p50, p99)


def cluster_target(cluster: Any, bucket: str, timeout: float = 30.0) -> Target:
    """Create ``bucket`` on a just-started :class:`~cohort.cluster.LocalCluster` (retrying
    while its partitions are still being assigned) and return the load target."""
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1",
        aws_access_key_id=cluster.creds["access_key"],
        aws_secret_access_key=cluster.creds["secret_key"],
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3.create_bucket(Bucket=bucket)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return Target(
        cluster.s3_endpoint, cluster.creds["access_key"], cluster.creds["secret_key"], bucket
    )
