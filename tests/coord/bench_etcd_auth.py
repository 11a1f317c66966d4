"""What authenticating the etcd connection costs: the handshake, and each request.

    .venv/bin/python -m tests.coord.bench_etcd_auth --mode plain|tls|token [--requests 2000] [--loop uvloop|asyncio]

``plain``: etcd over plain HTTP (``EtcdCluster(tls=False)``, what every cluster ran before);
``tls``: HTTPS with a client certificate (the default when Cohort starts etcd); ``token``:
TLS plus etcd user/password auth (a token in the ``Authorization`` header).

It starts one etcd member and measures, from this process:

* ``connect``: a fresh TCP connection (plus the TLS handshake with the client certificate
  when TLS is on), closed at once: wall time per connection (blocking sockets);
* ``new-conn request``: one ``/kv/range`` on a new connection each time (aiohttp with
  ``force_close``): what a client pays when its keep-alive connection is gone;
* ``request``: one ``/kv/range`` through :class:`EtcdClient` on a kept-alive connection,
  sequentially (latency) and 32 at a time (throughput), with this process's CPU and etcd's
  CPU per request (etcd's from /proc).  The event loop is uvloop by default, as in the
server and director processes (its TLS transport is much cheaper than asyncio's).

Not a test (pytest does not collect it).  Numbers on a shared 2-core machine vary by a
few percent from run to run; run each mode two or three times.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import socket
import ssl
import statistics
import time
from typing import Any

import aiohttp

from cohort.coord.etcd import EtcdClient, b64, parse_address
from cohort.etcd_server import EtcdCluster

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / TICK


def make_client(address: str) -> EtcdClient:
    endpoints, _, opts = parse_address(address)
    factory = getattr(EtcdClient, "from_options", None)
    if factory is not None:
        client: EtcdClient = factory(endpoints, opts)
        return client
    return EtcdClient(endpoints)


def raw_connect(host: str, port: int, ctx: ssl.SSLContext | None, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        s = socket.create_connection((host, port))
        if ctx is not None:
            s = ctx.wrap_socket(s, server_hostname=host)  # handshakes here
        out.append(time.perf_counter() - t)
        s.close()
    return out


async def new_conn_requests(client: EtcdClient, n: int) -> list[float]:
    ctx = getattr(client, "ssl_context", None)
    headers = await client.auth_headers() if hasattr(client, "auth_headers") else {}
    conn = aiohttp.TCPConnector(force_close=True, ssl=ctx if ctx is not None else False)
    url = client.endpoints[0] + "/v3/kv/range"
    out = []
    async with aiohttp.ClientSession(connector=conn) as s:
        for _ in range(n):
            t = time.perf_counter()
            async with s.post(url, json={"key": b64("bench")}, headers=headers) as r:
                doc = json.loads(await r.text())
                assert "header" in doc, doc
            out.append(time.perf_counter() - t)
    return out


async def requests(client: EtcdClient, n: int, pid: int, parallel: int) -> dict[str, float]:
    await client.call("/kv/range", {"key": b64("bench")})  # connect (and authenticate)
    lat: list[float] = []
    e0, c0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()

    async def worker(k: int) -> None:
        for _ in range(k):
            t = time.perf_counter()
            await client.call("/kv/range", {"key": b64("bench")})
            lat.append(time.perf_counter() - t)

    await asyncio.gather(*(worker(n // parallel) for _ in range(parallel)))
    wall = time.perf_counter() - t0
    done = len(lat)
    return {
        "req_per_s": done / wall,
        "p50_us": statistics.median(lat) * 1e6,
        "client_cpu_us": (time.process_time() - c0) / done * 1e6,
        "etcd_cpu_us": (cpu_seconds(pid) - e0) / done * 1e6,
    }


async def bench(e: EtcdCluster, mode: str, n: int) -> dict[str, Any]:
    address = e.address("bench")
    if mode == "token":
        address += "&user=root&password_file=" + str(e.base_dir / "root.password")
    client = make_client(address)
    assert e.members[0].popen is not None
    pid = e.members[0].popen.pid
    m = e.members[0]
    try:
        res: dict[str, Any] = {"mode": mode, "address": address}
        ctx = getattr(client, "ssl_context", None)
        conn = raw_connect(m.host, m.client_port, ctx, max(50, n // 10))
        res["connect_us_median"] = statistics.median(conn) * 1e6
        nc = await new_conn_requests(client, max(50, n // 10))
        res["new_conn_request_us_median"] = statistics.median(nc) * 1e6
        res["sequential"] = await requests(client, n, pid, 1)
        res["parallel32"] = await requests(client, n, pid, 32)
    finally:
        await client.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["plain", "tls", "token"], default="tls")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = ap.parse_args()
    kw: dict[str, Any] = {}
    if args.mode == "plain" and "tls" in inspect.signature(EtcdCluster).parameters:
        kw["tls"] = False  # (before TLS existed, plain was the only mode)
    with EtcdCluster(1, **kw) as e:
        if args.mode == "token":
            pw = e.base_dir / "root.password"
            pw.write_text("bench-root-password\n")
            pw.chmod(0o600)
            e.enable_auth("root", "bench-root-password")  # type: ignore[attr-defined]
        if args.loop == "uvloop":
            import uvloop

            res = uvloop.run(bench(e, args.mode, args.requests))
        else:
            res = asyncio.run(bench(e, args.mode, args.requests))
        res["loop"] = args.loop
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
