"""Elasticity by routing alone: what adding, draining and losing a server costs.

    .venv/bin/python bench/elastic.py [--data-mb 300] [--partitions 64] [--duration 6] [--json out.json]

For a few GB (the issue's figure), give it the room and the time:

    .venv/bin/python bench/elastic.py --data-mb 4000 --object-mb 4 --json elastic.json

One run on this machine: a cluster starts with one server, is filled with ``--data-mb``
of objects, then grows to two and three servers (measuring throughput at each size),
drains server-1 and finally loses server-2 (SIGKILL).  For every event it prints, side
by side:

* the bytes the *servers* read from and wrote to shared storage while ownership moved,
  measured for real: every server counts the bytes of every storage call
  (``cohort_store_bytes{direction,kind}`` on its metrics endpoint; kinds: operation
  log, checkpoint, blob, other), and the figure is the difference across the event;
* what a uniserver would copy: the object data of the partitions that changed owner
  (the sizes of the blob files under ``blobs/<partition>/``, summed);
* how long it took (a new server carries its share: it *serves* its fair number of
  partitions; a drain: the drained server owns nothing and every partition is served);
* what a client running throughout saw: requests, errors, and the longest request.

The background client (4 tasks, GET 90 % / PUT 10 % of 4 KiB objects) is running
during each event, so the log bytes include its PUTs' log appends; GETs never touch
storage on the server (the server answers metadata from memory; the director reads
blobs), so every byte *read* is hand-over work (checkpoint + log replay).

Then: GET throughput of 4 KiB objects with 1, 2 and 3 servers under the same load
(bench/loadgen.py, 2 processes x 8 tasks), the scaling efficiency, and CPU microseconds
per request in each layer (as bench/cost.py) - on a 2-core machine the client, director
and servers share two cores, so throughput cannot scale with servers here; the CPU
figures show where the time goes.  Last, the lock-service message rate (``dlm.status``
``messages_sent`` summed over servers) in steady state before and after a rebalance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

import aiohttp
from loadgen import Target, run_load

from cohort.cluster import LocalCluster
from cohort.coord import connect
from cohort.rpc import ClientPool
from cohort.s3.sigv4 import sign_request

TICK = os.sysconf("SC_CLK_TCK")
STORE_RE = re.compile(
    r'^cohort_store_bytes(?:_total)?\{direction="(\w+)",kind="(\w+)"\}\s+([0-9.e+]+)', re.M
)


# ------------------------------------------------------------------------------ cluster probes
def view(cluster: LocalCluster) -> dict[str, Any]:
    return cluster.view()


def server_rpc(cluster: LocalCluster, method: str) -> dict[str, dict[str, Any]]:
    async def get() -> dict[str, dict[str, Any]]:
        pool = ClientPool(cluster.credential())
        out: dict[str, dict[str, Any]] = {}
        try:
            for sid, p in cluster.procs.items():
                if p.role == "server" and p.alive():
                    with contextlib.suppress(Exception):
                        out[sid] = await pool.get(p.address).call(method, None, timeout=3.0)
            return out
        finally:
            await pool.close()

    return asyncio.run(get())


def ready(v: dict[str, Any]) -> bool:
    return all(p[0] is not None and p[0] == p[2] for p in v["partitions"])


def store_bytes(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    """Per live server: ``{"read/ckpt": bytes, ...}`` from its metrics endpoint."""
    out: dict[str, dict[str, float]] = {}
    for m in view(cluster)["members"]:
        url = (m.get("meta") or {}).get("metrics")
        if m["role"] != "server" or m["state"] not in ("alive", "draining") or not url:
            continue
        try:
            text = urllib.request.urlopen(f"http://{url}/metrics", timeout=3).read().decode()
        except OSError:
            continue
        out[m["id"]] = {f"{d}/{k}": float(v) for d, k, v in STORE_RE.findall(text)}
    return out


def store_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, float]:
    tot: dict[str, float] = {}
    for sid, cur in after.items():
        old = before.get(sid, {})
        for k, v in cur.items():
            tot[k] = tot.get(k, 0.0) + v - old.get(k, 0.0)
    return tot


def blob_bytes_by_partition(storage: Path) -> dict[int, int]:
    out: dict[int, int] = {}
    root = storage / "blobs"
    if not root.exists():
        return out
    for d in root.iterdir():
        if d.is_dir() and d.name.isdigit():
            out[int(d.name)] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_until(cond: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.1)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------ clients
def _signed(t: Target, method: str, key: str, size: int = 0) -> tuple[str, dict[str, str]]:
    url = f"{t.endpoint}/{t.bucket}/{key}"
    headers = {"content-length": str(size)} if method == "PUT" else {}
    headers.update(
        sign_request(
            method, url, headers, "UNSIGNED-PAYLOAD", t.access_key, t.secret_key, "us-east-1"
        )
    )
    return url, headers


async def _populate(t: Target, prefix: str, count: int, size: int, concurrency: int = 6) -> None:
    body = os.urandom(size)
    todo = iter(range(count))
    async with aiohttp.ClientSession() as s:

        async def one() -> None:
            for i in todo:
                url, h = _signed(t, "PUT", f"{prefix}{i}", size)
                async with s.put(url, data=body, headers=h) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"PUT {prefix}{i}: {r.status}")

        await asyncio.gather(*(one() for _ in range(concurrency)))


class Background:
    """A client running throughout the events: GET 90 % / PUT 10 % of 4 KiB objects.

    Every request is recorded as ``(start, seconds, ok)``; nothing is retried by us (the
    director's own retries while ownership moves are what a client gets)."""

    def __init__(self, t: Target, keys: int, tasks: int = 4) -> None:
        self.t, self.keys, self.tasks = t, keys, tasks
        self.log: list[tuple[float, float, bool]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)

    async def _main(self) -> None:
        body = os.urandom(4096)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:

            async def one(n: int) -> None:
                rng = random.Random(n)
                while not self.stop.is_set():
                    put = rng.random() < 0.1
                    key = f"small/{rng.randrange(self.keys)}"
                    url, h = _signed(self.t, "PUT" if put else "GET", key, 4096 if put else 0)
                    t0 = time.monotonic()
                    ok = False
                    try:
                        async with s.request(
                            "PUT" if put else "GET", url, data=body if put else None, headers=h
                        ) as r:
                            await r.read()
                            ok = r.status == 200
                            if not ok:
                                self.errors.append(f"{r.method} {key}: {r.status}")
                    except Exception as e:
                        self.errors.append(f"{key}: {e!r}")
                    self.log.append((t0, time.monotonic() - t0, ok))

            await asyncio.gather(*(one(n) for n in range(self.tasks)))

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        rows = [r for r in list(self.log) if t0 <= r[0] <= t1]
        return {
            "requests": len(rows),
            "errors": sum(1 for r in rows if not r[2]),
            "longest_s": max((r[1] for r in rows), default=0.0),
        }


# ------------------------------------------------------------------------------------ phases
def event(
    cluster: LocalCluster,
    bg: Background,
    name: str,
    action: Any,
    done: Any,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run ``action``, wait for ``done(view)``, and measure the move."""
    v0 = view(cluster)
    sb0 = store_bytes(cluster)
    m0 = dlm_messages(cluster)
    blobs = blob_bytes_by_partition(cluster.storage)
    t0 = time.monotonic()
    action()  # adding a server: returns once the process is up and has joined
    started = time.monotonic() - t0
    wait_until(lambda: done(view(cluster)), timeout, name)
    t1 = time.monotonic()
    time.sleep(1.0)  # let hand-overs that were just finishing be counted
    v1 = view(cluster)
    sb1 = store_bytes(cluster)
    m1 = dlm_messages(cluster)
    moved = [
        i
        for i, (a, b) in enumerate(zip(v0["partitions"], v1["partitions"], strict=True))
        if a[0] != b[0]
    ]
    delta = store_delta(sb0, sb1)
    return {
        "event": name,
        "seconds": t1 - t0,  # from the action to "done", process start-up included
        "action_seconds": started,
        "moved_partitions": len(moved),
        "store_read": sum(v for k, v in delta.items() if k.startswith("read/")),
        "store_written": sum(v for k, v in delta.items() if k.startswith("write/")),
        "store_by_kind": delta,
        "uniserver_copy": sum(blobs.get(i, 0) for i in moved),
        "client": bg.window(t0, t1 + 1.0),
        "dlm_messages": sum(v - m0.get(k, 0) for k, v in m1.items()),
    }


def throughput(cluster: LocalCluster, t: Target, duration: float) -> dict[str, Any]:
    pids = {k: p.pid for k, p in cluster.procs.items() if p.alive()}
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    r = run_load(t, "GET", 4096, procs=2, concurrency=8, duration=duration, keys=20)
    after = {k: cpu_seconds(p) for k, p in pids.items() if Path(f"/proc/{p}").exists()}
    n = max(r.requests, 1)
    layer: dict[str, float] = {"director": 0.0, "server": 0.0, "coordinator": 0.0}
    for k in after:
        layer[cluster.procs[k].role] += (after[k] - before[k]) / n * 1e6
    return {
        "req_per_s": r.rate,
        "errors": r.errors,
        "p99_ms": r.p99_ms,
        "cpu_us_per_req": {
            "director": layer["director"],
            "servers": layer["server"],
            "coordinator": layer["coordinator"],
            "client": r.client_cpu_seconds / n * 1e6,
        },
    }


def dlm_messages(cluster: LocalCluster) -> dict[str, int]:
    """Lock-service messages sent so far, per live server (``dlm.status``)."""
    return {
        sid: int(s.get("messages_sent", 0)) for sid, s in server_rpc(cluster, "dlm.status").items()
    }


def dlm_rate(cluster: LocalCluster, seconds: float) -> float:
    a = dlm_messages(cluster)
    t0 = time.monotonic()
    time.sleep(seconds)
    b = dlm_messages(cluster)
    return sum(v - a.get(k, 0) for k, v in b.items()) / (time.monotonic() - t0)


def serving(cluster: LocalCluster, sid: str) -> int:
    return len(server_rpc(cluster, "status").get(sid, {}).get("serving", []))


# -------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    P = args.partitions
    cluster = LocalCluster(tmp / "c", port=0, servers=1, partitions=P).start()
    out: dict[str, Any] = {"args": vars(args), "events": [], "throughput": {}, "dlm": {}}
    try:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=cluster.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=cluster.creds["access_key"],
            aws_secret_access_key=cluster.creds["secret_key"],
        )
        wait_until(lambda: ready(view(cluster)), 60, "cluster ready")
        s3.create_bucket(Bucket="elastic")
        t = Target(
            cluster.s3_endpoint, cluster.creds["access_key"], cluster.creds["secret_key"], "elastic"
        )
        osize = int(args.object_mb * (1 << 20))
        count = max(1, int(args.data_mb * (1 << 20)) // osize)
        t0 = time.monotonic()
        asyncio.run(_populate(t, "data/", count, osize))
        asyncio.run(_populate(t, "small/", args.small_keys, 4096))
        run_load(t, "PUT", 4096, procs=2, concurrency=8, duration=2.0, keys=20)  # GET's keys
        out["data_bytes"] = sum(blob_bytes_by_partition(cluster.storage).values())
        out["populate_seconds"] = time.monotonic() - t0
        print(
            f"stored {out['data_bytes'] / 1e6:.0f} MB in {count} + {args.small_keys} objects "
            f"over {P} partitions in {out['populate_seconds']:.0f} s",
            flush=True,
        )

        out["throughput"]["1"] = throughput(cluster, t, args.duration)
        with Background(t, args.small_keys) as bg:
            wait_until(lambda: len(bg.log) > 50, 30, "background client running")
            out["events"].append(
                event(
                    cluster,
                    bg,
                    "add server (1->2)",
                    lambda: cluster.add_server("server-2"),
                    lambda v: ready(v) and serving(cluster, "server-2") >= P // 2,
                )
            )
        out["throughput"]["2"] = throughput(cluster, t, args.duration)
        out["dlm"]["steady, 2 servers"] = dlm_rate(cluster, args.dlm_window)
        with Background(t, args.small_keys) as bg:
            wait_until(lambda: len(bg.log) > 50, 30, "background client running")
            ev = event(
                cluster,
                bg,
                "add server (2->3)",
                lambda: cluster.add_server("server-3"),
                lambda v: ready(v) and serving(cluster, "server-3") >= P // 3,
            )
            out["events"].append(ev)
            out["dlm"]["while server-3 is added"] = ev["dlm_messages"] / max(ev["seconds"], 1e-3)
        out["dlm"]["steady, 3 servers"] = dlm_rate(cluster, args.dlm_window)
        out["throughput"]["3"] = throughput(cluster, t, args.duration)

        def set_state(sid: str, state: str) -> None:
            async def go() -> None:
                c = connect(cluster.coordinator_address, cluster.credential())
                try:
                    await c.set_state(sid, state)
                finally:
                    await c.close()

            asyncio.run(go())

        with Background(t, args.small_keys) as bg:
            wait_until(lambda: len(bg.log) > 50, 30, "background client running")
            out["events"].append(
                event(
                    cluster,
                    bg,
                    "drain server-1",
                    lambda: set_state("server-1", "draining"),
                    lambda v: ready(v) and not any(p[0] == "server-1" for p in v["partitions"]),
                )
            )
            out["events"].append(
                event(
                    cluster,
                    bg,
                    "fail server-2 (SIGKILL)",
                    lambda: cluster.kill("server-2"),
                    lambda v: ready(v) and not any(p[0] == "server-2" for p in v["partitions"]),
                )
            )
        out["dlm"]["steady, after failover"] = dlm_rate(cluster, args.dlm_window)
        out["bg_errors_sample"] = bg.errors[:5]
    finally:
        cluster.stop()
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def report(out: dict[str, Any]) -> None:
    print(
        f"\nMoving ownership ({out['data_bytes'] / 1e6:.0f} MB of objects, "
        f"{out['args']['partitions']} partitions); background client GET 90 % / PUT 10 %"
    )
    print(
        f"{'event':<24} {'parts':>5} {'time s':>7} {'(start)':>7} | {'cohort read':>12} {'written':>12} "
        f"{'(blob r/w)':>11} | {'uniserver copies':>16} | {'requests':>8} {'errors':>6} {'longest s':>9}"
    )
    for e in out["events"]:
        k = e["store_by_kind"]
        blob = k.get("read/blob", 0.0) + k.get("write/blob", 0.0)
        c = e["client"]
        print(
            f"{e['event']:<24} {e['moved_partitions']:>5} {e['seconds']:>7.2f} "
            f"{e['action_seconds']:>7.2f} | "
            f"{mb(e['store_read']):>12} {mb(e['store_written']):>12} {mb(blob):>11} | "
            f"{mb(e['uniserver_copy']):>16} | {c['requests']:>8} {c['errors']:>6} {c['longest_s']:>9.2f}"
        )
    print(
        "time: from the action until the new owners serve (process start-up, shown as "
        "(start), included); failover includes the lease expiry"
    )
    print(
        "cohort read/written: bytes the servers moved to or from shared storage during the event "
        "(cohort_store_bytes; written includes the background PUTs' log appends)"
    )
    print("\nGET 4 KiB throughput, same client load (2 processes x 8 tasks)")
    print(
        f"{'servers':>7} {'req/s':>8} {'efficiency':>10} {'p99 ms':>7} | CPU us/request: "
        f"{'director':>8} {'servers':>8} {'coord':>6} {'client':>7} | {'machine':>7} "
        f"{'server layer':>12}"
    )
    base = out["throughput"]["1"]["req_per_s"]
    cores = os.cpu_count() or 1
    for n, r in out["throughput"].items():
        eff = r["req_per_s"] / (base * int(n)) if base else 0.0
        c = r["cpu_us_per_req"]
        total = c["director"] + c["servers"] + c["coordinator"] + c["client"]
        r["bound_machine"] = cores * 1e6 / total if total else 0.0
        r["bound_servers"] = int(n) * 1e6 / c["servers"] if c["servers"] else 0.0
        print(
            f"{n:>7} {r['req_per_s']:>8.0f} {eff:>10.2f} {r['p99_ms']:>7.1f} | {'':>15}"
            f"{c['director']:>8.0f} {c['servers']:>8.0f} {c['coordinator']:>6.0f} "
            f"{c['client']:>7.0f} | {r['bound_machine']:>7.0f} {r['bound_servers']:>12.0f}"
        )
    print(
        f"efficiency = req/s / (n x req/s with one server).  machine = {cores} cores / all CPU "
        "per request (client included): the most this box can do.  server layer = n / server "
        "CPU per request: what n servers could do with a core each and enough directors and "
        "clients in front (a model from measured CPU, not a measured rate)."
    )
    print("\nLock-service messages per second (dlm.status messages_sent, all servers)")
    for k, v in out["dlm"].items():
        print(f"  {k:<32} {v:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data-mb", type=float, default=300.0, help="object data to store first")
    ap.add_argument("--object-mb", type=float, default=1.0, help="size of each data object")
    ap.add_argument("--small-keys", type=int, default=200, help="4 KiB objects for the client")
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per throughput cell")
    ap.add_argument("--dlm-window", type=float, default=5.0, help="seconds per lock-rate sample")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cohort-elastic-") as tmp:
        out = run(args, Path(tmp))
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
