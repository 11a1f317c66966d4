"""One contract, two backends: the embedded coordinator and etcd behave the same.

Every test runs against both backends (``backend`` is parametrized).  The embedded one
runs in-process (:class:`EmbeddedCoordinator` + :class:`RpcCoordinator`); the etcd one
talks to a real ``etcd`` (one member for the whole module, a fresh key namespace per
test).  Leases are 2 s on both (etcd's shortest with its default election timeout).

The rules' settings (failback, capacity schedule, load policy, an injected wall clock)
come from the ``rules`` fixture, which a test may parametrize (tests/coord/test_rules_both.py):
the embedded coordinator takes them as arguments, etcd from the address (and the clock
is injected into every client, so whichever becomes the primary steps the rules with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cohort.coord import connect
from cohort.coord.base import Coordinator
from cohort.coord.embedded import EmbeddedCoordinator
from cohort.coord.etcd import EtcdCoordinator
from cohort.coord.state import CapacityRule, Clock, LoadPolicy, system_clock
from cohort.etcd_server import EtcdCluster, etcd_available
from cohort.rpc import RpcError
from tests.keys import KEY, MEMBER

P = 8
TTL = 2.0


@dataclass
class Rules:
    """Settings of the rule engine, the same on both backends."""

    failback: str = "immediate"
    capacity_schedule: list[str] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)  # LoadPolicy fields
    clock: Clock | None = None  # wall clock injected into the rules (None: the real one)

    def options(self) -> dict[str, Any]:
        """As etcd address options."""
        opts: dict[str, Any] = {}
        if self.failback != "immediate":
            opts["failback"] = self.failback
        if self.capacity_schedule:
            opts["capacity_schedule"] = ",".join(self.capacity_schedule)
        for k, v in self.load.items():
            opts["load_balance" if k == "enabled" else f"load_{k}"] = (
                int(v) if k == "enabled" else v
            )
        return opts


class Backend:
    """A running coordinator backend: clients, restart, the assignment run by its primary."""

    def __init__(
        self, kind: str, tmp: Path, etcd: EtcdCluster | None, rules: Rules | None = None
    ) -> None:
        self.kind = kind
        self.tmp = tmp
        self.etcd = etcd
        self.rules = rules or Rules()
        self.embedded: EmbeddedCoordinator | None = None
        self.port = 0
        self.ns = "t" + uuid.uuid4().hex[:10]
        self.clients: list[Coordinator] = []

    async def start(self) -> None:
        if self.kind == "embedded":
            r = self.rules
            self.embedded = EmbeddedCoordinator(
                self.tmp / "coord",
                partitions=P,
                lease_ttl=TTL,
                cluster_key=KEY,
                failback=r.failback,
                load_policy=LoadPolicy(**r.load) if r.load else None,
                capacity_schedule=[CapacityRule.parse(x) for x in r.capacity_schedule],
                clock=r.clock or system_clock,
            )
            self.port = await self.embedded.start("127.0.0.1", self.port)

    @property
    def address(self) -> str:
        if self.kind == "embedded":
            return f"127.0.0.1:{self.port}"
        assert self.etcd is not None
        return self.etcd.address(self.ns, partitions=P, lease_ttl=int(TTL), **self.rules.options())

    def client(self) -> Coordinator:
        c: Coordinator
        if self.kind == "etcd" and self.rules.clock is not None:
            c = EtcdCoordinator(self.address, clock=self.rules.clock)
        else:
            c = connect(self.address, MEMBER)
        self.clients.append(c)
        return c

    async def restart(self) -> None:
        """Stop the backend entirely and start it again on the same data."""
        if self.kind == "embedded":
            assert self.embedded is not None
            await self.embedded.close()
            await self.start()
        else:
            assert self.etcd is not None
            await asyncio.to_thread(self.etcd.restart)

    async def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), 15.0)
        if self.embedded is not None:
            await self.embedded.close()


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdCluster | None]:
    if not etcd_available():
        yield None
        return
    with EtcdCluster(1) as e:
        yield e


@pytest.fixture
def rules() -> Rules:
    """The rules' settings; a test overrides them with ``@pytest.mark.parametrize("rules", ...)``."""
    return Rules()


@pytest.fixture(
    params=["embedded", pytest.param("etcd", marks=pytest.mark.etcd)],
)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, etcd_server: EtcdCluster | None, rules: Rules
) -> AsyncIterator[Backend]:
    if request.param == "etcd" and etcd_server is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    b = Backend(request.param, tmp_path, etcd_server, rules)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


# -- helpers ------------------------------------------------------------------------------------
async def until(fn: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = await fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def heartbeating(c: Coordinator, members: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """Keep the given members (id → incarnation) alive; remove an id to let its lease lapse."""

    async def loop() -> None:
        while True:
            for mid, inc in list(members.items()):
                with contextlib.suppress(RpcError):
                    await c.heartbeat(mid, inc)
            await asyncio.sleep(TTL / 8)

    t = asyncio.create_task(loop())
    try:
        yield members
    finally:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t


async def join(c: Coordinator, mid: str, role: str = "server") -> str:
    r = await c.join({"id": mid, "role": role, "address": f"127.0.0.1:{hash(mid) % 50000 + 1}"})
    assert r["lease_ttl"] == TTL
    assert {"version", "members", "partitions", "buckets", "cluster_id"} <= set(r["view"])
    return str(r["incarnation"])


def owners(view: dict[str, Any]) -> list[str | None]:
    return [p[0] for p in view["partitions"]]


def member_state(view: dict[str, Any], mid: str) -> str | None:
    for m in view["members"]:
        if m["id"] == mid:
            return str(m["state"])
    return None


async def balanced(c: Coordinator, ids: list[str]) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        v = await c.view()
        o = owners(v)
        counts = [o.count(i) for i in ids]
        ok = None not in o and sum(counts) == P and max(counts) - min(counts) <= 1
        return v if ok else None

    v: dict[str, Any] = await until(check, 10, f"partitions spread over {ids}")
    return v


async def _is_ok(aw: Awaitable[Any]) -> bool:
    return await code_of(aw) == "ok"


async def code_of(aw: Awaitable[Any]) -> str:
    try:
        await aw
    except RpcError as e:
        return e.code
    return "ok"


# -- the contract ----------------------------------------------------------------------------------
async def test_join_heartbeat_and_assignment(backend: Backend) -> None:
    c = backend.client()
    i1 = await join(c, "s1")
    i2 = await join(c, "s2")
    assert i1 != i2
    async with heartbeating(c, {"s1": i1, "s2": i2}):
        v = await balanced(c, ["s1", "s2"])
        assert len(v["partitions"]) == P
        assert all(p[1] >= 1 and p[2] is None for p in v["partitions"])
        hb = await c.heartbeat("s1", i1)
        assert isinstance(hb["version"], int)
        assert member_state(v, "s1") == "alive"
        # a director is a member but never owns partitions
        d = await join(c, "d1", role="director")
        assert d
        v = await c.view()
        assert member_state(v, "d1") == "alive" and "d1" not in owners(v)
    assert await code_of(c.heartbeat("s1", "not-the-incarnation")) == "UnknownMember"


async def test_lease_expiry_moves_partitions_with_new_epochs(backend: Backend) -> None:
    c = backend.client()
    i1, i2 = await join(c, "s1"), await join(c, "s2")
    async with heartbeating(c, {"s1": i1, "s2": i2}) as alive:
        v = await balanced(c, ["s1", "s2"])
        before = v["partitions"]
        for p, (o, e, _) in enumerate(before):
            assert await c.acquire_partition(o, i1 if o == "s1" else i2, p) == e
        del alive["s1"]  # s1 stops renewing its lease
        t0 = time.monotonic()

        async def moved() -> dict[str, Any] | None:
            v = await c.view()
            return v if all(o == "s2" for o in owners(v)) else None

        v = await until(moved, 4 * TTL, "s1's partitions to move to s2")
        took = time.monotonic() - t0
        assert took >= TTL * 0.5, f"moved after {took:.2f}s: before the lease could expire"
        assert member_state(v, "s1") == "dead"
        for p, (o, e, _h) in enumerate(before):
            new_owner, new_epoch, holder = v["partitions"][p]
            if o == "s1":
                assert new_epoch > e and holder is None  # s1's lock died with it
                assert await c.acquire_partition("s2", i2, p) == new_epoch
            else:
                assert (new_owner, new_epoch, holder) == ("s2", e, "s2")
        assert await code_of(c.heartbeat("s1", i1)) == "UnknownMember"
        assert await code_of(c.acquire_partition("s1", i1, 0)) == "UnknownMember"
        # s1 comes back as a new incarnation and gets partitions again
        i1b = await join(c, "s1")
        alive["s1"] = i1b
        assert i1b != i1
        v = await balanced(c, ["s1", "s2"])
        assert member_state(v, "s1") == "alive"


async def test_acquire_release_busy_notowner(backend: Backend) -> None:
    c = backend.client()
    i1, i2 = await join(c, "s1"), await join(c, "s2")
    async with heartbeating(c, {"s1": i1, "s2": i2}):
        v = await balanced(c, ["s1", "s2"])
        p = owners(v).index("s1")
        epoch = v["partitions"][p][1]
        assert await code_of(c.acquire_partition("s2", i2, p)) == "NotOwner"
        assert await c.acquire_partition("s1", i1, p) == epoch
        assert await c.acquire_partition("s1", i1, p) == epoch  # re-entrant
        assert (await c.view())["partitions"][p][2] == "s1"
        # drain s1: the map moves p to s2, but s1 still holds the lock until it releases
        await c.set_state("s1", "draining")

        async def moved() -> bool:
            return (await c.view())["partitions"][p][0] == "s2"

        await until(moved, 5, "partition to move to s2")
        assert member_state(await c.view(), "s1") == "draining"
        assert await code_of(c.acquire_partition("s2", i2, p)) == "Busy"
        await c.release_partition("s2", i2, p)  # not the holder: no effect
        assert await code_of(c.acquire_partition("s2", i2, p)) == "Busy"
        await c.release_partition("s1", i1, p)
        token = await c.acquire_partition("s2", i2, p)
        assert token > epoch
        assert (await c.view())["partitions"][p] == ["s2", token, "s2"]
        # operator errors
        assert await code_of(c.set_state("nobody", "draining")) == "UnknownMember"
        assert await code_of(c.set_state("s1", "sleeping")) == "InvalidState"
        await c.set_state("s1", "alive")
        await balanced(c, ["s1", "s2"])


async def test_leave_hands_partitions_over(backend: Backend) -> None:
    c = backend.client()
    i1, i2 = await join(c, "s1"), await join(c, "s2")
    async with heartbeating(c, {"s1": i1, "s2": i2}) as alive:
        await balanced(c, ["s1", "s2"])
        del alive["s1"]
        await c.leave("s1", i1)

        async def moved() -> dict[str, Any] | None:
            v = await c.view()
            return v if all(o == "s2" for o in owners(v)) else None

        v = await until(moved, 5, "partitions to move after leave")
        assert member_state(v, "s1") == "left"


async def test_cas_conflicts(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    # two clients race to create the same bucket: exactly one wins
    results = await asyncio.gather(
        *(code_of(x.create_bucket("race")) for x in (a, b, a, b)), return_exceptions=False
    )
    assert sorted(results) == ["BucketAlreadyOwnedByYou"] * 3 + ["ok"]
    # two incarnations race for the same member id: only the last join is alive
    i_old = await join(a, "s1")
    i_new = await join(b, "s1")
    assert await code_of(a.heartbeat("s1", i_old)) == "UnknownMember"
    async with heartbeating(b, {"s1": i_new}):
        await balanced(b, ["s1"])
        assert await code_of(a.acquire_partition("s1", i_old, 0)) == "UnknownMember"
        # on etcd the primary folds the re-join into the rules a moment later (new epochs);
        # until then the map names the old incarnation and the new one gets NotOwner
        await until(lambda: _is_ok(b.acquire_partition("s1", i_new, 1)), 5, "the re-join folded in")
        v = await b.view()
        # concurrent acquires of one partition by its owner from two clients agree
        tokens = await asyncio.gather(
            a.acquire_partition("s1", i_new, 0), b.acquire_partition("s1", i_new, 0)
        )
        assert tokens[0] == tokens[1] == v["partitions"][0][1]


async def test_watch_delivery_and_reconnect(backend: Backend) -> None:
    a, b = backend.client(), backend.client()
    v0 = await a.view()
    # nothing changes: the watch returns the current view after its timeout
    t0 = time.monotonic()
    v = await a.watch(v0["version"], timeout=0.5)
    assert 0.3 < time.monotonic() - t0 < 3.0
    assert v["version"] >= v0["version"] and v["buckets"] == v0["buckets"]
    # a change made by another client is delivered within a fraction of a second
    w = asyncio.create_task(a.watch(v["version"], timeout=5.0))
    await asyncio.sleep(0.2)
    t1 = time.monotonic()
    await b.create_bucket("watched")
    v1 = await w
    took = time.monotonic() - t1
    assert [x["name"] for x in v1["buckets"]] == ["watched"]
    assert v1["version"] > v["version"]
    # well before the watch's own 5 s timeout; the bound covers create_bucket's fsync'd
    # commit on a loaded disk (0.84 s in one clean-clone CI run)
    assert took < 2.5, f"watch delivered after {took:.3f}s"
    # the watcher goes away; a change happens; a new client watching from the old
    # version sees it at once
    await a.close()
    await b.create_bucket("while-away")
    a2 = backend.client()
    t2 = time.monotonic()
    v2 = await a2.watch(v1["version"], timeout=5.0)
    assert time.monotonic() - t2 < 1.0
    assert {x["name"] for x in v2["buckets"]} == {"watched", "while-away"}


async def test_buckets(backend: Backend) -> None:
    c = backend.client()
    b = await c.create_bucket("photos")
    assert set(b) >= {"name", "id", "created", "tenant"} and b["tenant"] == "default"
    assert await code_of(c.create_bucket("photos")) == "BucketAlreadyOwnedByYou"
    assert await code_of(c.create_bucket("photos", tenant="other")) == "BucketAlreadyExists"
    v = await c.view()
    assert [(x["name"], x["id"]) for x in v["buckets"]] == [("photos", b["id"])]
    assert await code_of(c.delete_bucket("photos", "wrong-id")) == "NoSuchBucket"
    assert await code_of(c.delete_bucket("nothing", b["id"])) == "NoSuchBucket"
    await c.delete_bucket("photos", b["id"])
    assert (await c.view())["buckets"] == []
    b2 = await c.create_bucket("photos")
    assert b2["id"] != b["id"]  # a re-created bucket never sees the old keys
    kinds = [e["kind"] for e in await c.events()]
    assert "bucket-create" in kinds and "bucket-delete" in kinds


async def test_restart_loses_nothing(backend: Backend) -> None:
    c = backend.client()
    i1 = await join(c, "s1")
    async with heartbeating(c, {"s1": i1}):
        v = await balanced(c, ["s1"])
        for p in range(P):
            await c.acquire_partition("s1", i1, p)
        bucket = await c.create_bucket("keep")
        before = await c.view()
        assert all(p[2] == "s1" for p in before["partitions"])
        await backend.restart()

        async def back() -> dict[str, Any] | None:
            with contextlib.suppress(RpcError):
                return await c.view()
            return None

        after = await until(back, 20, "the backend to answer after restart")
        assert after["cluster_id"] == before["cluster_id"]
        assert after["partitions"] == before["partitions"]
        assert after["buckets"] == [bucket]
        assert member_state(after, "s1") == "alive"
        # the member's lease survived: it keeps renewing and keeps its partitions
        await until(lambda: code_of(c.heartbeat("s1", i1)), 10, "heartbeat after restart")
        assert await code_of(c.heartbeat("s1", i1)) == "ok"
        assert await c.acquire_partition("s1", i1, 0) == v["partitions"][0][1]
