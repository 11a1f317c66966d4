"""Lock agents over real TCP: in one process (TcpTransport on RpcServer), and as
separate processes killed with SIGKILL while holding EX."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from cohort.dlm.agent import LockAgent
from cohort.dlm.client import DlmClient
from cohort.dlm.errors import NotQueued
from cohort.dlm.modes import Mode
from cohort.dlm.sync import SyncLockAgent
from cohort.dlm.transport import TcpTransport
from cohort.rpc import ClientPool, RpcClient, RpcServer
from tests.keys import KEY_FILE, MEMBER, verifier

EX, PR = Mode.EX, Mode.PR


@contextlib.asynccontextmanager
async def tcp_cluster(n: int) -> AsyncIterator[list[LockAgent]]:
    servers = [RpcServer(verifier()) for _ in range(n)]
    pools = [ClientPool(MEMBER) for _ in range(n)]
    transports = [TcpTransport(s, p) for s, p in zip(servers, pools, strict=True)]
    agents = [LockAgent(f"t{i}", t, deadlock_wait=0.2) for i, t in enumerate(transports)]
    ports = [await s.start("127.0.0.1", 0) for s in servers]
    members = {f"t{i}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    for a in agents:
        a.set_membership(1, members)
    try:
        yield agents
    finally:
        for t in transports:
            t.close()
        for p in pools:
            await p.close()
        for s in servers:
            await s.close()


async def test_in_process_tcp_agents() -> None:
    async with tcp_cluster(3) as (a, b, c):
        h = await a.lock("tcp/x", EX)
        h.set_value(b"v")
        t = asyncio.create_task(b.lock("tcp/x", PR))
        with pytest.raises(NotQueued):
            await c.lock("tcp/x", PR, noqueue=True)
        await h.release()
        hb = await asyncio.wait_for(t, 5)
        assert hb.value == b"v"
        for _ in range(50):
            async with c.lock("tcp/x", PR):
                pass
        await hb.release()


async def test_sync_wrapper_from_a_thread() -> None:
    async with tcp_cluster(2) as (_a, b):
        loop = asyncio.get_running_loop()
        sync = SyncLockAgent(b, loop)
        out: list[int] = []

        def worker() -> None:
            with sync.lock("sync/x", "EX", timeout=5) as h:
                out.append(h.token)

        th = threading.Thread(target=worker)
        th.start()
        deadline = time.monotonic() + 10
        while th.is_alive():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert out and out[0] > 0


# ---------------------------------------------------------------- processes
class Node:
    def __init__(self, node_id: str) -> None:
        self.id = node_id
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cohort.dlm.node",
                "--id",
                node_id,
                "--deadlock-wait",
                "0.2",
                "--cluster-key",
                KEY_FILE,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # READY <port>; the child exits on error
        assert line.startswith("READY "), line
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    ns = [Node(f"p{i}") for i in range(3)]
    try:
        yield ns
    finally:
        for n in ns:
            n.stop()


async def set_members(nodes: list[Node], epoch: int) -> None:
    members = {n.id: n.address for n in nodes}
    for n in nodes:
        c = RpcClient("127.0.0.1", n.port, MEMBER)
        await c.call("dlm.admin.membership", [epoch, members], timeout=5)
        await c.close()


async def test_processes_lock_and_kill9_holder(nodes: list[Node]) -> None:
    p0, p1, p2 = nodes
    await set_members(nodes, 1)
    c0, c1, c2 = (DlmClient(n.address, MEMBER, poll_interval=0.2) for n in nodes)
    try:
        # p0 masters partition/3 (first locker), writes a value, then holds EX
        h = await c0.lock("partition/3", EX, timeout=5)
        h.set_value(b"seq=10")
        await h.release()
        told: list[Mode] = []
        # p2 keeps an NL lock (the VMS idiom for "keep me informed")
        pr = await c2.lock("partition/3", "NL", timeout=5, on_blocking=told.append)
        h = await c0.lock("partition/3", EX, timeout=5)
        # p0 will die holding EX; p1 waits
        h_blocked = await c1.lock("other", EX, timeout=5)
        waiter = asyncio.create_task(c1.lock("partition/3", EX, timeout=30))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        t0 = time.monotonic()
        p0.kill9()
        await set_members([p1, p2], 2)  # the coordinator's new epoch
        hw = await asyncio.wait_for(waiter, 10)
        elapsed = time.monotonic() - t0
        assert hw.previous_holder_died == "p0"
        assert not hw.value_valid
        assert hw.token > h.token
        assert elapsed < 5
        hw.set_value(b"seq=11")
        await hw.release()
        h2 = await c2.lock("partition/3", PR, timeout=5)
        assert h2.value == b"seq=11" and h2.value_valid and h2.previous_holder_died is None
        await h2.release()
        await pr.release()
        await h_blocked.release()
    finally:
        for c in (c0, c1, c2):
            await c.close()


async def test_client_session_expiry_releases_locks(nodes: list[Node]) -> None:
    await set_members(nodes, 1)
    c0 = DlmClient(nodes[0].address, MEMBER)
    c1 = DlmClient(nodes[1].address, MEMBER)
    try:
        await c0.lock("sess/x", EX, timeout=5)
        # simulate a crashed client: stop its keep-alive poll without closing
        assert c0._poller is not None
        c0._poller.cancel()
        await c0.rpc.close()
        h = await c1.lock("sess/x", EX, timeout=15)  # granted after the session expires
        assert h.token > 0
        await h.release()
    finally:
        await c1.close()
        with contextlib.suppress(Exception):
            await c0.close()


async def test_connection_resets_lose_no_message() -> None:
    """Every link between three agents goes through a FaultProxy that keeps resetting
    connections while workers lock and unlock in EX.  Before the transport numbered,
    acknowledged and retransmitted its messages, a GRANT or REL lost in a reset
    stranded the lock (found by the chaos run with proxies between components)."""
    from cohort.chaos.proxy import FaultProxy

    servers = [RpcServer(verifier()) for _ in range(3)]
    pools = [ClientPool(MEMBER) for _ in range(3)]
    transports = [TcpTransport(s, p) for s, p in zip(servers, pools, strict=True)]
    agents = [LockAgent(f"r{i}", t, deadlock_wait=0.2) for i, t in enumerate(transports)]
    ports = [await s.start("127.0.0.1", 0) for s in servers]
    proxies = [FaultProxy(target_host="127.0.0.1", target_port=p) for p in ports]
    members = {f"r{i}": f"127.0.0.1:{await px.start()}" for i, px in enumerate(proxies)}
    for a in agents:
        a.set_membership(1, members)
    holders: dict[str, set[int]] = {}
    done = [0]
    stop = asyncio.Event()

    async def worker(w: int) -> None:
        agent = agents[w % 3]
        n = 0
        while not stop.is_set():
            name = f"reset/{n % 3}"
            n += 1
            h = await asyncio.wait_for(agent.lock(name, EX), 20)
            held = holders.setdefault(name, set())
            assert not held, f"{name}: EX granted to worker {w} while {held} hold it"
            held.add(w)
            await asyncio.sleep(0.002)
            held.discard(w)
            await h.release()
            done[0] += 1

    async def nemesis() -> None:
        rng = __import__("random").Random(3)
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.05, 0.2))
            px = rng.choice(proxies)
            px.drop()
            await asyncio.sleep(rng.uniform(0.01, 0.05))
            px.pass_through()

    try:
        tasks = [asyncio.create_task(worker(w)) for w in range(6)]
        chaos = asyncio.create_task(nemesis())
        await asyncio.sleep(4)
        stop.set()
        await chaos
        for px in proxies:
            px.pass_through()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        resets = sum(px.stats.reset for px in proxies)
        assert resets > 5, resets
        assert done[0] > 50, done[0]
        # nothing stranded: every resource can be taken in EX from every agent
        for a in agents:
            for r in range(3):
                h = await asyncio.wait_for(a.lock(f"reset/{r}", EX), 10)
                await h.release()
        print(f"{done[0]} lock cycles, {resets} resets, "
              f"{sum(t.retransmitted for t in transports)} messages retransmitted")  # fmt: skip
    finally:
        stop.set()
        for t in transports:
            t.close()
        for px in proxies:
            await px.close()
        for p in pools:
            await p.close()
        for s in servers:
            await s.close()


async def test_client_locks_end_with_the_agents_lease() -> None:
    """Every answer tells a DlmClient how long the agent's membership lease still runs;
    a lock is good until then (``valid_until``), renewed by each poll.  When renewals
    stop, the client marks its locks lost by the deadline and gives them back, instead
    of holding on while another master may grant them (found by the 30-minute chaos
    run: clients of a paused server learned of the loss only 10 s later)."""
    from cohort.dlm.client import ClientService
    from cohort.dlm.transport import MemoryNetwork

    server = RpcServer(verifier())
    agent = LockAgent("solo", MemoryNetwork().transport("solo"))
    deadline = [time.monotonic() + 1.0]
    ClientService(agent, server, lease_remaining=lambda: deadline[0] - time.monotonic())
    port = await server.start("127.0.0.1", 0)
    c = DlmClient(f"127.0.0.1:{port}", MEMBER, poll_interval=0.2)
    try:
        h = await c.lock("x", EX, timeout=5)
        first = h.valid_until
        assert first <= deadline[0] + 0.01
        deadline[0] = time.monotonic() + 1.5  # renewed by the host
        await asyncio.sleep(0.6)
        assert h.valid_until > first and not h.lost.is_set()
        end = deadline[0]  # no more renewals from here on
        await asyncio.wait_for(h.lost.wait(), 5)
        assert time.monotonic() >= end - 0.3  # not long before the deadline...
        assert time.monotonic() <= end + 0.5  # ...and not long after it either
        h2 = await asyncio.wait_for(agent.lock("x", EX), 5)  # given back to the agent
        await h2.release()
    finally:
        await c.close()
        await server.close()
