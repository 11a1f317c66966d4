"""Every internal surface refuses outsiders: real sockets against a real cluster.

Each test acts as an outsider twice (no credential at all, and a wrong one) and checks
both that the connection is refused and that nothing changed.  Tenants' lock sessions
are checked against another tenant's names and against the system's ``partition/*``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from cohort.auth import ClusterKey, tenant_credential
from cohort.cluster import LocalCluster
from cohort.coord import connect
from cohort.dlm.client import DlmClient
from cohort.dlm.errors import LockLost, NotQueued
from cohort.rpc import RpcAuthError, RpcClient, RpcError
from cohort.storage.local import LocalStore
from cohort.tenants import TenantRegistry
from tests.conftest import s3_client, start_cluster

STRANGER = ClusterKey.generate().member("server-9")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("auth"), servers=2)
    try:
        yield c
    finally:
        c.stop()


def _addr(cluster: LocalCluster, role: str) -> tuple[str, int]:
    p = next(p for p in cluster.procs.values() if p.role == role)
    host, _, port = p.address.rpartition(":")
    return host, int(port)


def _raw_request(address: tuple[str, int], method: str, params: Any) -> bytes:
    """Connect with no credential, send one request frame at once, return all we get."""
    body = msgspec.msgpack.encode([0, 1, method, params])
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(struct.pack(">I", len(body)) + body)
        s.settimeout(8)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return got


def _frames(data: bytes) -> list[Any]:
    out = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        out.append(msgspec.msgpack.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def _only_hello(data: bytes) -> None:
    """What an unauthenticated peer gets: the challenge, then the connection closes."""
    frames = _frames(data)
    assert len(frames) == 1 and frames[0][0] == "cohort-rpc/1", frames


async def _wrong_key(address: tuple[str, int], method: str, params: Any) -> None:
    c = RpcClient(address[0], address[1], STRANGER)
    try:
        with pytest.raises(RpcAuthError):
            await c.call(method, params, timeout=5)
    finally:
        await c.close()


def test_server_rpc_refuses_outsiders(cluster: LocalCluster) -> None:
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="secret", Body=b"tenant data")
    view = cluster.view()
    bucket_id = next(b["id"] for b in view["buckets"] if b["name"] == "private")
    server = _addr(cluster, "server")
    attack = {"bucket": bucket_id, "key": "secret", "p": 0}
    # no credential: the challenge, then the connection closes; nothing is answered
    for method in ("obj.get", "obj.delete", "status"):
        _only_hello(_raw_request(server, method, attack))
    asyncio.run(_wrong_key(server, "obj.delete", attack))
    # the object is still there and unchanged
    assert s3.get_object(Bucket="private", Key="secret")["Body"].read() == b"tenant data"

    # the member credential does work (the refusals are not just a broken port)
    async def status() -> Any:
        c = RpcClient(server[0], server[1], cluster.credential("test"))
        try:
            return await c.call("status", None, timeout=5)
        finally:
            await c.close()

    assert "serving" in asyncio.run(status())


def test_coordinator_refuses_outsiders(cluster: LocalCluster) -> None:
    coord = _addr(cluster, "coordinator")
    before = cluster.view()
    fake = {"id": "evil", "role": "server", "address": "127.0.0.1:1", "capacity": 100.0}
    _only_hello(_raw_request(coord, "join", fake))
    _only_hello(_raw_request(coord, "set_state", {"id": "server-1", "state": "draining"}))
    asyncio.run(_wrong_key(coord, "join", fake))

    async def wrong_via_connect() -> None:
        c = connect(f"{coord[0]}:{coord[1]}", STRANGER)
        try:
            with pytest.raises(RpcAuthError):
                await c.join(fake)
        finally:
            await c.close()

    asyncio.run(wrong_via_connect())
    after = cluster.view()
    assert [m["id"] for m in after["members"]] == [m["id"] for m in before["members"]]
    assert all(m["state"] == "alive" for m in after["members"] if m["role"] == "server")
    assert "evil" not in {p[0] for p in after["partitions"]}


def test_dlm_transport_refuses_outsiders(cluster: LocalCluster) -> None:
    """The agent-to-agent transport rides the server's port: an outsider's DLM frame
    gets the challenge and a closed connection (on the real server), and is never
    delivered to the lock agent (checked in-process, where delivery can be seen)."""
    from cohort.dlm.transport import RPC_METHOD, TcpTransport
    from cohort.rpc import ClientPool, RpcServer
    from tests.keys import MEMBER, verifier

    frame = ["x~1", "n1", 1, 1, 1, 0, 0, ["REQ", "partition/0", 5]]
    _only_hello(_raw_request(_addr(cluster, "server"), RPC_METHOD, frame))

    async def scenario() -> None:
        delivered: list[Any] = []
        server = RpcServer(verifier())
        transport = TcpTransport(server, ClientPool(MEMBER), own_pool=True)
        transport.attach("n1", lambda src, msg: delivered.append((src, msg)))
        port = await server.start("127.0.0.1", 0)
        try:
            raw = await asyncio.to_thread(_raw_request, ("127.0.0.1", port), RPC_METHOD, frame)
            _only_hello(raw)
            await _wrong_key(("127.0.0.1", port), RPC_METHOD, frame)
            assert delivered == []
            # the control: a member's identical frame is delivered
            c = RpcClient("127.0.0.1", port, MEMBER)
            await c.notify(RPC_METHOD, frame)
            deadline = time.monotonic() + 5
            while not delivered:
                assert time.monotonic() < deadline, "a member's frame was not delivered"
                await asyncio.sleep(0.01)
            await c.close()
        finally:
            transport.close()
            await server.close()

    asyncio.run(scenario())


def test_an_impostor_server_learns_nothing(tmp_path: Path) -> None:
    """A member never sends a request to a peer that cannot prove the cluster key."""
    from cohort.auth import Verifier
    from cohort.rpc import RpcServer

    async def scenario() -> None:
        seen: list[Any] = []

        async def handler(params: Any) -> str:
            seen.append(params)
            return "ok"

        impostor = RpcServer(Verifier(ClusterKey.generate()))
        impostor.register("obj.put", handler)
        port = await impostor.start("127.0.0.1", 0)
        c = RpcClient("127.0.0.1", port, ClusterKey.generate().member("director-1"))
        try:
            with pytest.raises(RpcAuthError):
                await c.call("obj.put", {"body": "secret"}, timeout=5)
        finally:
            await c.close()
            await impostor.close()
        assert seen == []

    asyncio.run(scenario())


# ---------------------------------------------------------------------- tenants' locks
def _tenant(cluster: LocalCluster, name: str) -> tuple[str, str]:
    reg = TenantRegistry(LocalStore(cluster.storage), cluster.master_key_path.read_bytes().strip())

    return asyncio.run(reg.create_tenant(name))


def _servers(cluster: LocalCluster) -> list[str]:
    return [p.address for p in cluster.procs.values() if p.role == "server"]


def test_tenant_lock_sessions_are_authenticated_and_scoped(cluster: LocalCluster) -> None:
    a_key, a_secret = _tenant(cluster, "alpha")
    b_key, b_secret = _tenant(cluster, "beta")
    s1, s2 = _servers(cluster)[:2]

    async def scenario() -> None:
        # a wrong secret, and an unknown access key: refused at the handshake
        for cred in (tenant_credential(a_key, "wrong"), tenant_credential("CKNOPE", "x")):
            bad = DlmClient(s1, cred)
            with pytest.raises(RpcAuthError):
                await bad.lock("jobs/1", "EX", timeout=2)
            await bad.close()
        a = DlmClient(s1, tenant_credential(a_key, a_secret))
        a2 = DlmClient(s2, tenant_credential(a_key, a_secret))
        b = DlmClient(s2, tenant_credential(b_key, b_secret))
        try:
            ha = await a.lock("jobs/1", "EX", timeout=5)
            # the same tenant through another server is excluded (cluster-wide)...
            with pytest.raises(NotQueued):
                await a2.lock("jobs/1", "EX", noqueue=True)
            # ...another tenant's "jobs/1" is a different resource: neither sees nor
            # blocks the other
            hb = await b.lock("jobs/1", "EX", timeout=5, noqueue=True)
            await hb.release()
            # a tenant can neither take nor block the system's partition locks: its
            # "partition/0" is its own name
            hp = await b.lock("partition/0", "PR", timeout=5, noqueue=True)
            s3 = s3_client(cluster)
            s3.create_bucket(Bucket="still-writable")
            for i in range(20):  # lands on many partitions while b holds its "partition/0"
                s3.put_object(Bucket="still-writable", Key=f"k{i}", Body=b"x")
            await hp.release()
            # b cannot use a's session, even knowing its id
            b.sid, saved = a.sid, b.sid
            with pytest.raises(LockLost):
                await b._call("dlm.c.release", [a.sid, 1, None])
            b.sid = saved
            # a tenant connection cannot call the server's internal methods
            with pytest.raises(RpcError) as e:
                await b.rpc.call("status", None, timeout=5)
            assert e.value.code == "AccessDenied"
            await ha.release()
        finally:
            for c in (a, a2, b):
                await c.close()

    asyncio.run(scenario())


def test_revoked_key_cannot_open_a_lock_session(cluster: LocalCluster) -> None:
    key, secret = _tenant(cluster, "gamma")
    reg = TenantRegistry(LocalStore(cluster.storage), cluster.master_key_path.read_bytes().strip())
    server = _servers(cluster)[0]

    async def scenario() -> None:
        c = DlmClient(server, tenant_credential(key, secret))
        h = await c.lock("x", "EX", timeout=5)
        await h.release()
        await c.close()
        await reg.revoke_key(key)
        c2 = DlmClient(server, tenant_credential(key, secret))
        with pytest.raises(RpcAuthError):
            await c2.lock("x", "EX", timeout=5)
        await c2.close()

    asyncio.run(scenario())


def test_a_session_holds_a_bounded_number_of_locks(cluster: LocalCluster) -> None:
    key, secret = _tenant(cluster, "delta")
    server = _servers(cluster)[0]

    async def scenario() -> None:
        c = DlmClient(server, tenant_credential(key, secret))
        held = []
        try:
            with pytest.raises(RpcError) as e:
                for i in range(1001):
                    held.append(await c.lock(f"many/{i}", "NL", timeout=5))
            assert e.value.code == "TooManyLocks" and len(held) == 1000
        finally:
            await c.close()

    asyncio.run(scenario())


def test_handshake_is_bounded_in_time(cluster: LocalCluster) -> None:
    """A peer that connects and says nothing is dropped (no slot held forever)."""
    server = _addr(cluster, "server")
    t0 = time.monotonic()
    with socket.create_connection(server, timeout=10) as s:
        s.settimeout(10)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    _only_hello(got)
    assert time.monotonic() - t0 < 8
