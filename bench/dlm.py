"""Benchmark of the Cohort DLM against etcd, Redis, ZooKeeper and asyncio.Lock.

    .venv/bin/python bench/dlm.py [--seconds 1.0] [--json out.json] [--skip etcd,zk]

Everything is started by the benchmark on 127.0.0.1 (free ports) and stopped after.
A missing peer (etcd-server, redis-server, zookeeperd; or the redis/kazoo Python
packages) is reported and skipped.  Loops are uncontended lock+release on per-task
lock names; "remote master" means the resource is mastered by another agent process
and every lock costs REQ/GRANT + REL over TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cohort.auth import ClusterKey, Verifier  # noqa: E402
from cohort.dlm.agent import LockAgent  # noqa: E402
from cohort.dlm.client import DlmClient  # noqa: E402
from cohort.dlm.modes import Mode  # noqa: E402
from cohort.dlm.transport import MemoryNetwork, TcpTransport  # noqa: E402
from cohort.rpc import ClientPool, RpcClient, RpcServer  # noqa: E402

# the lock agents this benchmark starts prove membership with a throwaway cluster key
_KEY_DIR = tempfile.mkdtemp(prefix="cohort-bench-key-")
atexit.register(shutil.rmtree, _KEY_DIR, True)
KEY_FILE = os.path.join(_KEY_DIR, "cluster.key")
ClusterKey.create_file(KEY_FILE)
KEY = ClusterKey.load(KEY_FILE)
MEMBER = KEY.member("bench")

EX = Mode.EX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def rate(
    op_factory: Callable[[int], Callable[[], Awaitable[None]]], tasks: int, seconds: float
) -> float:
    """Run ``tasks`` concurrent loops of ``op`` for ``seconds``; ops per second."""
    count = 0
    end = 0.0

    async def loop(i: int) -> None:
        nonlocal count
        op = op_factory(i)
        await op()  # warm-up (first lock, connections)
        while time.perf_counter() < end:
            for _ in range(20):
                await op()
            count += 20

    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(loop(i) for i in range(tasks)))
    return count / (time.perf_counter() - t0)


def thread_rate(
    op_factory: Callable[[int], Callable[[], None]], threads: int, seconds: float
) -> float:
    count = [0] * threads
    end = time.perf_counter() + seconds

    def loop(i: int) -> None:
        op = op_factory(i)
        op()
        while time.perf_counter() < end:
            op()
            count[i] += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(count) / (time.perf_counter() - t0)


async def wait_for(pred: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await pred():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout}s")
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def process(args: list[str], **kw: Any) -> Iterator[subprocess.Popen[Any]]:
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class AgentProc:
    """A lock-agent process (``python -m cohort.dlm.node``)."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cohort.dlm.node",
                "--id",
                node_id,
                "--uvloop",
                "--cluster-key",
                KEY_FILE,
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"agent {node_id} failed to start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def admin(address: str, method: str, params: Any) -> Any:
    host, _, port = address.rpartition(":")
    c = RpcClient(host, int(port), MEMBER)
    try:
        return await c.call(method, params, timeout=5)
    finally:
        await c.close()


# ------------------------------------------------------------------ Cohort
async def bench_cohort_local(seconds: float, tasks: int) -> float:
    agent = LockAgent("bench", MemoryNetwork().transport("bench"), deadlock_wait=None)

    def factory(i: int) -> Callable[[], Awaitable[None]]:
        name = f"local/{i}"

        async def op() -> None:
            async with agent.lock(name, EX):
                pass

        return op

    return await rate(factory, tasks, seconds)


async def bench_cohort_remote(seconds: float, tasks_list: list[int]) -> dict[int, float]:
    peer = AgentProc("peer")
    server = RpcServer(Verifier(KEY))
    pool = ClientPool(MEMBER)
    transport = TcpTransport(server, pool)
    agent = LockAgent("bench", transport, deadlock_wait=None)
    port = await server.start("127.0.0.1", 0)
    members = {"bench": f"127.0.0.1:{port}", "peer": peer.address}
    out: dict[int, float] = {}
    client = DlmClient(peer.address, MEMBER)
    try:
        await admin(peer.address, "dlm.admin.membership", [1, members])
        agent.set_membership(1, members)
        # the peer locks first, so it masters every benchmark resource
        for i in range(max(tasks_list)):
            h = await client.lock(f"remote/{i}", EX, timeout=5)
            await h.release()

        def factory(i: int) -> Callable[[], Awaitable[None]]:
            name = f"remote/{i}"

            async def op() -> None:
                async with agent.lock(name, EX):
                    pass

            return op

        for t in tasks_list:
            out[t] = await rate(factory, t, seconds)
        assert all(agent.master_of[f"remote/{i}"] == "peer" for i in range(max(tasks_list)))
    finally:
        await client.close()
        transport.close()
        await pool.close()
        await server.close()
        peer.stop()
    return out


async def bench_messages(sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        net = MemoryNetwork()
        ids = [f"n{i:02d}" for i in range(n)]
        agents = [LockAgent(i, net.transport(i), deadlock_wait=None) for i in ids]
        for a in agents:
            a.set_membership(1, {i: "" for i in ids})
        await asyncio.sleep(0.01)

        async def measure(
            coros: list[Callable[[], Awaitable[None]]], net: MemoryNetwork = net
        ) -> float:
            net.reset_counters()
            for c in coros:
                await c()
            for _ in range(10):
                await asyncio.sleep(0)
            return net.messages / len(coros)

        def lockrel(a: LockAgent, name: str) -> Callable[[], Awaitable[None]]:
            async def go() -> None:
                h = await a.lock(name, EX)
                await h.release()

            return go

        # node i masters own/i (first locker); count costs by case
        first_local = await measure([lockrel(agents[i], f"own/{i}") for i in range(n)])
        local = await measure([lockrel(agents[i], f"own/{i}") for i in range(n)])
        first_remote = await measure([lockrel(agents[(i + 1) % n], f"own/{i}") for i in range(n)])
        remote = await measure([lockrel(agents[(i + 1) % n], f"own/{i}") for i in range(n)])
        sizes_seen = net.max_message
        # steady state: every node has met every resource once (caches warm), then
        # random nodes lock random resources: ~3 (remote) or 0 (local) per op
        for a in agents:
            for j in range(n):
                await lockrel(a, f"own/{j}")()
        net.reset_counters()
        rng = random.Random(1)
        ops = 400
        for _ in range(ops):
            a = rng.choice(agents)
            await lockrel(a, f"own/{rng.randrange(n)}")()
        await asyncio.sleep(0)
        rows.append(
            {
                "nodes": n,
                "first_lock_new_resource": first_local,
                "local_master": local,
                "first_lock_remote_master": first_remote,
                "remote_master": remote,
                "mixed": net.messages / ops,
                "avg_bytes": net.bytes / max(net.messages, 1),
                "max_bytes": max(net.max_message, sizes_seen),
            }
        )
    return rows


# ------------------------------------------------------------------ peers
async def bench_redis(seconds: float, tasks_list: list[int]) -> dict[int, float] | str:
    exe = shutil.which("redis-server")
    if exe is None:
        return "redis-server not installed (apt-get install redis-server)"
    try:
        import redis.asyncio as aioredis
    except ImportError:
        return "redis Python package missing (pip install -r requirements.lock)"
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="bench-redis-")
    out: dict[int, float] = {}
    with process(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
        ]
    ):
        r = aioredis.Redis(host="127.0.0.1", port=port, max_connections=64)
        try:
            await wait_for(lambda: r.ping(), 10, "redis")

            def factory(i: int) -> Callable[[], Awaitable[None]]:
                lock = r.lock(f"lock/{i}", timeout=10)

                async def op() -> None:
                    async with lock:
                        pass

                return op

            for t in tasks_list:
                out[t] = await rate(factory, t, seconds)
        finally:
            await r.aclose()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


async def bench_etcd(seconds: float, tasks_list: list[int]) -> dict[int, float] | str:
    exe = shutil.which("etcd")
    if exe is None:
        return "etcd not installed (apt-get install etcd-server)"
    import aiohttp

    cport, pport = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="bench-etcd-")
    url = f"http://127.0.0.1:{cport}"
    peer = f"http://127.0.0.1:{pport}"
    out: dict[int, float] = {}
    args = [
        exe,
        "--name",
        "bench",
        "--data-dir",
        tmp,
        "--listen-client-urls",
        url,
        "--advertise-client-urls",
        url,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        f"bench={peer}",
        "--log-level",
        "error",
    ]
    with process(args, env={**os.environ, "ETCD_UNSUPPORTED_ARCH": "arm64"}):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

            async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
                async with http.post(url + path, json=body) as resp:
                    resp.raise_for_status()
                    return await resp.json()  # type: ignore[no-any-return]

            async def healthy() -> bool:
                await post("/v3/kv/range", {"key": b64("x")})
                return True

            await wait_for(healthy, 15, "etcd")
            lease = (await post("/v3/lease/grant", {"TTL": 60}))["ID"]

            def factory(i: int) -> Callable[[], Awaitable[None]]:
                # etcd's concurrency.Mutex: put-if-absent <prefix>/<lease> under the
                # session lease, then read the lowest create revision under the prefix
                prefix = f"/locks/{i}/"
                key = b64(f"{prefix}{lease}")
                pfx, end = b64(prefix), b64(prefix[:-1] + chr(ord(prefix[-1]) + 1))

                async def op() -> None:
                    r = await post(
                        "/v3/kv/txn",
                        {
                            "compare": [{"target": "CREATE", "key": key, "create_revision": "0"}],
                            "success": [
                                {"request_put": {"key": key, "value": "", "lease": lease}},
                                {
                                    "request_range": {
                                        "key": pfx,
                                        "range_end": end,
                                        "sort_order": "ASCEND",
                                        "sort_target": "CREATE",
                                        "limit": 1,
                                    }
                                },
                            ],
                            "failure": [{"request_range": {"key": key}}],
                        },
                    )
                    owner = r["responses"][1]["response_range"]["kvs"][0]["key"]
                    if owner != key:
                        raise RuntimeError("etcd lock contended (unexpected)")
                    await post("/v3/kv/deleterange", {"key": key})

                return op

            for t in tasks_list:
                out[t] = await rate(factory, t, seconds)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def bench_zookeeper(seconds: float, threads_list: list[int]) -> dict[int, float] | str:
    java = shutil.which("java")
    jar = Path("/usr/share/java/zookeeper.jar")
    if java is None or not jar.exists():
        return "ZooKeeper not installed (apt-get install zookeeperd)"
    try:
        import logging

        from kazoo.client import KazooClient

        logging.getLogger("kazoo").setLevel(logging.CRITICAL)  # connect retries are noise
    except ImportError:
        return "kazoo Python package missing (pip install -r requirements.lock)"
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-zk-"))
    (tmp / "data").mkdir()
    cfg = tmp / "zoo.cfg"
    cfg.write_text(
        f"tickTime=2000\ndataDir={tmp / 'data'}\nclientPort={port}\n"
        "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nmaxClientCnxns=100\n"
        "4lw.commands.whitelist=ruok\n"
    )
    cp = ":".join(
        ["/etc/zookeeper/conf", str(jar)]
        + [
            str(p)
            for p in Path("/usr/share/java").glob("*.jar")
            if any(
                k in p.name
                for k in (
                    "slf4j",
                    "log4j",
                    "netty",
                    "jute",
                    "metrics",
                    "commons",
                    "snappy",
                    "jackson",
                    "audience",
                    "jline",
                )
            )
        ]
    )
    out: dict[int, float] = {}
    with process(
        [
            java,
            "-Xmx256m",
            "-Dzookeeper.log.dir=" + str(tmp),
            "-Dzookeeper.root.logger=ERROR,CONSOLE",
            "-cp",
            cp,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(cfg),
        ]
    ):
        zk = KazooClient(hosts=f"127.0.0.1:{port}", timeout=10)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    zk.start(timeout=2)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        return "ZooKeeper did not start within 30s"
            for t in threads_list:

                def factory(i: int) -> Callable[[], None]:
                    lock = zk.Lock(f"/locks/{i}", f"bench-{i}")

                    def op() -> None:
                        with lock:
                            pass

                    return op

                out[t] = thread_rate(factory, t, seconds)
        finally:
            with contextlib.suppress(Exception):
                zk.stop()
                zk.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


async def bench_asyncio_lock(seconds: float) -> float:
    lock = asyncio.Lock()

    def factory(i: int) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            async with lock:
                pass

        return op

    return await rate(factory, 1, seconds)


# ------------------------------------------------------------------ failover
async def bench_failover(lease_ttl: float, ping: float) -> float:
    """kill -9 of an EX holder -> grant on another node, with a lease-keeping
    coordinator that removes a node after ``lease_ttl`` s without renewal."""
    procs = [AgentProc(f"f{i}") for i in range(3)]
    members = {p.id: p.address for p in procs}
    clients: list[DlmClient] = []
    epoch = 1
    stop = asyncio.Event()
    try:
        for p in procs:
            await admin(p.address, "dlm.admin.membership", [epoch, members])
        c0, c1 = DlmClient(procs[0].address, MEMBER), DlmClient(procs[1].address, MEMBER)
        clients += [c0, c1]
        await c0.lock("partition/0", EX, timeout=5)
        waiter = asyncio.create_task(c1.lock("partition/0", EX, timeout=60))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        last_ok = {p.id: time.monotonic() for p in procs}
        pools = {p.id: RpcClient("127.0.0.1", p.port, MEMBER) for p in procs}

        async def coordinator() -> None:
            nonlocal epoch, members
            while not stop.is_set():
                for pid in list(members):
                    with contextlib.suppress(Exception):
                        await pools[pid].call("dlm.admin.ping", None, timeout=ping)
                        last_ok[pid] = time.monotonic()
                expired = [pid for pid in members if time.monotonic() - last_ok[pid] > lease_ttl]
                if expired:
                    epoch += 1
                    members = {k: v for k, v in members.items() if k not in expired}
                    for pid in members:
                        await pools[pid].call("dlm.admin.membership", [epoch, members], timeout=5)
                await asyncio.sleep(ping)

        coord = asyncio.create_task(coordinator())
        t0 = time.monotonic()
        procs[0].proc.send_signal(signal.SIGKILL)
        h = await asyncio.wait_for(waiter, 30)
        elapsed = time.monotonic() - t0
        assert h.previous_holder_died == "f0", h.previous_holder_died
        stop.set()
        await coord
        for pc in pools.values():
            await pc.close()
        return elapsed
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
        for p in procs:
            p.stop()


# ------------------------------------------------------------------ main
async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="duration of each loop")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--skip", default="", help="comma list of: etcd,redis,zk,failover")
    ap.add_argument(
        "--lease-ttl",
        type=float,
        default=1.0,
        help="coordinator lease TTL for the failover measurement",
    )
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    s = a.seconds
    res: dict[str, Any] = {
        "seconds_per_loop": s,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    print("measuring Cohort local master ...", file=sys.stderr)
    res["cohort_local"] = {t: await bench_cohort_local(s, t) for t in (1, 8)}
    print("measuring Cohort remote master (TCP, peer process) ...", file=sys.stderr)
    res["cohort_remote"] = await bench_cohort_remote(s, [1, 8])
    print("measuring asyncio.Lock ...", file=sys.stderr)
    res["asyncio_lock"] = await bench_asyncio_lock(s)
    print("counting messages ...", file=sys.stderr)
    res["messages"] = await bench_messages([2, 4, 8, 16, 32])
    peers: dict[str, Any] = {}
    if "redis" not in skip:
        print("measuring Redis ...", file=sys.stderr)
        peers["redis"] = await bench_redis(s, [1, 8])
    if "etcd" not in skip:
        print("measuring etcd ...", file=sys.stderr)
        peers["etcd"] = await bench_etcd(s, [1, 8])
    if "zk" not in skip:
        print("measuring ZooKeeper ...", file=sys.stderr)
        peers["zookeeper"] = await asyncio.to_thread(bench_zookeeper, s, [1, 8])
    res["peers"] = peers
    if "failover" not in skip:
        print("measuring kill -9 failover ...", file=sys.stderr)
        res["failover_seconds"] = await bench_failover(a.lease_ttl, 0.1)
        res["lease_ttl"] = a.lease_ttl
    report(res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))


def report(res: dict[str, Any]) -> None:
    loc, rem = res["cohort_local"], res["cohort_remote"]
    print(
        f"\nDLM benchmark ({res['seconds_per_loop']} s per loop, Python {res['python']}, "
        f"{res['cpus']} CPUs): uncontended lock+release per second"
    )
    print(f"{'system':34} {'1 task':>12} {'8 tasks':>12}")
    print(f"{'Cohort, local master':34} {loc[1]:12,.0f} {loc[8]:12,.0f}")
    print(f"{'Cohort, remote master (TCP)':34} {rem[1]:12,.0f} {rem[8]:12,.0f}")
    for name, v in res["peers"].items():
        if isinstance(v, str):
            print(f"{name:34} skipped: {v}")
        else:
            print(f"{name:34} {v[1]:12,.0f} {v[8]:12,.0f}")
    print(f"{'asyncio.Lock (in-process ceiling)':34} {res['asyncio_lock']:12,.0f}")
    print("\nratios (Cohort / peer, same concurrency)")
    print(f"{'peer':12} {'local 1':>9} {'local 8':>9} {'remote 1':>9} {'remote 8':>9}")
    for name, v in res["peers"].items():
        if isinstance(v, str):
            continue
        print(
            f"{name:12} {loc[1] / v[1]:9.1f} {loc[8] / v[8]:9.1f} "
            f"{rem[1] / v[1]:9.2f} {rem[8] / v[8]:9.2f}"
        )
    print("\nmessages per operation (simulated agents, in-memory transport)")
    print(
        f"{'nodes':>5} {'new res':>8} {'local':>6} {'1st rem':>8} {'remote':>7} "
        f"{'mixed':>6} {'avg B':>6} {'max B':>6}"
    )
    for r in res["messages"]:
        print(
            f"{r['nodes']:5} {r['first_lock_new_resource']:8.2f} {r['local_master']:6.2f} "
            f"{r['first_lock_remote_master']:8.2f} {r['remote_master']:7.2f} {r['mixed']:6.2f} "
            f"{r['avg_bytes']:6.1f} {r['max_bytes']:6}"
        )
    if "failover_seconds" in res:
        print(
            f"\nkill -9 of an EX holder -> grant on another node: {res['failover_seconds']:.2f} s "
            f"(lease TTL {res['lease_ttl']} s, renewal every 0.1 s)"
        )


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
