"""The etcd primary keeps the rules' state in etcd: a new primary continues it.

* The state document (``s/state``) carries what the map alone cannot: the ``home`` of
  partitions that failed over to a standby, operator states, the lock managers' epoch.
  A change of primary in the middle of a fail-over loses none of it.
* A map written before the rules ran on etcd (no state document) is adopted: epochs go
  on growing, owners whose incarnation it names keep their partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from cohort.coord.etcd import EtcdCoordinator, _put
from cohort.etcd_server import EtcdCluster, etcd_available
from cohort.rpc import RpcError

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
]

P = 8


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster(1) as e:
        yield e


async def until(fn: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = await fn()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def heartbeating(c: EtcdCoordinator, incs: dict[str, str]) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            for mid, inc in list(incs.items()):
                with contextlib.suppress(RpcError):
                    await c.heartbeat(mid, inc)
            await asyncio.sleep(0.25)

    t = asyncio.create_task(loop())
    try:
        yield
    finally:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t


def owned(v: dict[str, Any], mid: str) -> set[int]:
    return {p for p, (o, _e, _h) in enumerate(v["partitions"]) if o == mid}


def state_of(v: dict[str, Any], mid: str) -> str:
    return str(next(m for m in v["members"] if m["id"] == mid)["state"])


async def test_a_new_primary_continues_the_rules(etcd: EtcdCluster) -> None:
    addr = etcd.address("n" + uuid.uuid4().hex[:8], partitions=P, lease_ttl=2)
    members = EtcdCoordinator(addr, campaign=False)  # members only: never the primary
    a, b = EtcdCoordinator(addr, name="cand-a"), EtcdCoordinator(addr, name="cand-b")
    try:
        a.start_primary()
        await until(lambda: _true(a.is_primary), 10, "a to be the primary")
        b.start_primary()
        incs: dict[str, str] = {}
        for mid, sb in (("s1", False), ("s2", False), ("s3", False), ("sb", True)):
            r = await members.join({"id": mid, "role": "server", "address": "x:1", "standby": sb})
            incs[mid] = r["incarnation"]
        async with heartbeating(members, incs):

            async def spread() -> dict[str, Any] | None:
                v = await members.view()
                ok = None not in [p[0] for p in v["partitions"]] and not owned(v, "sb")
                return v if ok and all(owned(v, s) for s in ("s1", "s2", "s3")) else None

            await until(spread, 10, "s1, s2, s3 to share the partitions")
            await members.set_state("s3", "draining")

            async def drained() -> dict[str, Any] | None:
                v = await members.view()
                return (
                    v
                    if not owned(v, "s3") and None not in [p[0] for p in v["partitions"]]
                    else None
                )

            failed = owned(await until(drained, 10, "s3 drained"), "s1")
            del incs["s1"]  # s1 dies: the standby takes its partitions (they remember home)

            async def taken() -> dict[str, Any] | None:
                v = await members.view()
                return v if owned(v, "sb") == failed and not owned(v, "s3") else None

            v = await until(taken, 10, "sb to take over s1's partitions")
            epoch = v["membership_epoch"]
            # the primary goes away; the other candidate continues from s/state
            await a.close()
            await until(lambda: _true(b.is_primary), 10, "b to be the primary")
            await asyncio.sleep(0.5)
            v = await members.view()
            assert owned(v, "sb") == failed and state_of(v, "s3") == "draining"
            assert v["membership_epoch"] == epoch  # nobody joined or left: the same epoch
            r = await members.join({"id": "s1", "role": "server", "address": "x:1"})
            incs["s1"] = r["incarnation"]

            async def home() -> dict[str, Any] | None:
                v = await members.view()
                return v if owned(v, "s1") == failed and not owned(v, "sb") else None

            v = await until(home, 10, "s1's partitions to fail back under the new primary")
            assert state_of(v, "s3") == "draining" and v["membership_epoch"] > epoch
    finally:
        for c in (a, b, members):
            await c.close()


async def _true(x: bool) -> bool:
    return x


async def test_a_map_without_a_state_document_is_adopted(etcd: EtcdCluster) -> None:
    addr = etcd.address("m" + uuid.uuid4().hex[:8], partitions=P, lease_ttl=2)
    members = EtcdCoordinator(addr, campaign=False)
    primary = EtcdCoordinator(addr, name="upgraded")
    try:
        i1 = (await members.join({"id": "s1", "role": "server", "address": "x:1"}))["incarnation"]
        i2 = (await members.join({"id": "s2", "role": "server", "address": "x:2"}))["incarnation"]
        incs = {"s1": i1, "s2": i2}
        async with heartbeating(members, incs):
            # what a primary of the previous version wrote: no s/state; partition 0 names
            # an incarnation of s1 that is gone
            owners = ["s1" if p % 2 == 0 else "s2" for p in range(P)]
            old = {
                "owners": owners,
                "epochs": [5] * P,
                "incs": ["gone"] + [incs[o] for o in owners[1:]],
                "dlm": {"epoch": 7, "members": {f"s1~{i1}": "x:1", f"s2~{i2}": "x:2"}},
            }
            await members.client.txn([], [_put(members.k("map"), old)])
            primary.start_primary()

            async def adopted() -> dict[str, Any] | None:
                _, kv = await members.client.get(primary.state_key)
                return (await members.view()) if kv is not None else None

            v = await until(adopted, 10, "the primary to write its state document")
            for p, (o, e, _h) in enumerate(v["partitions"]):
                if p == 0:
                    assert e > 5  # its owner's incarnation was gone: a new epoch
                else:
                    assert (o, e) == (owners[p], 5)  # kept, with the epoch it had
            assert v["membership_epoch"] == 7  # the same live servers: the same epoch
    finally:
        for c in (primary, members):
            await c.close()
