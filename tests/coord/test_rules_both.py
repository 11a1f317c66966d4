"""The rules, on both backends: one rule engine decides, the embedded coordinator and the
etcd primary only store its state and step it.

Every test runs on ``embedded`` and on ``etcd`` (the ``backend`` fixture of
tests/coord/test_contract.py; the rules' settings come from the ``rules`` parameter):
standby take-over and failback (immediate, never, a window), drain and undrain,
set_state standby/active, load-based moves from heartbeats' load reports, a capacity
schedule, and epochs that only grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cohort.coord.base import Coordinator
from cohort.rpc import RpcError
from tests.coord import test_contract as contract
from tests.coord.test_contract import (
    TTL,
    Backend,
    P,
    Rules,
    balanced,
    code_of,
    member_state,
    owners,
    until,
)

# the same fixtures: ``backend`` (embedded and etcd), its etcd server, and ``rules``
backend = contract.backend
etcd_server = contract.etcd_server
rules = contract.rules


class WallClock:
    """A wall clock the test moves: ``set(h)`` puts it at HH:30 local time today."""

    def __init__(self, hour: int) -> None:
        self.t = 0.0
        self.set(hour)

    def set(self, hour: int) -> None:
        lt = list(time.localtime())
        lt[3:6] = [hour, 30, 0]
        self.t = time.mktime(time.struct_time(lt))  # type: ignore[arg-type]

    def __call__(self) -> float:
        return self.t


class Cluster:
    """Servers that join and heartbeat through one client; optional load reports."""

    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self.incs: dict[str, str] = {}
        self.load: Callable[[str, dict[str, Any]], list[list[float]]] | None = None
        self.view: dict[str, Any] = {}

    async def join(self, mid: str, *, standby: bool = False) -> str:
        r = await self.c.join(
            {"id": mid, "role": "server", "address": f"127.0.0.1:{hash(mid) % 50000 + 1}",
             "standby": standby}
        )  # fmt: skip
        self.incs[mid] = str(r["incarnation"])
        return self.incs[mid]

    def stop(self, mid: str) -> None:
        """``mid`` stops renewing its lease (as if killed)."""
        del self.incs[mid]

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(RpcError):
                self.view = await self.c.view()
            for mid, inc in list(self.incs.items()):
                rows = self.load(mid, self.view) if self.load and self.view else None
                with contextlib.suppress(RpcError):
                    await self.c.heartbeat(mid, inc, rows)
            await asyncio.sleep(TTL / 8)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Cluster]:
        t = asyncio.create_task(self._loop())
        try:
            yield self
        finally:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t


def owned(v: dict[str, Any], mid: str) -> set[int]:
    return {p for p, o in enumerate(owners(v)) if o == mid}


async def owns(c: Coordinator, want: dict[str, set[int] | int], what: str, t: float = 12) -> Any:
    """Wait until each named server owns exactly that set (or that many) partitions and
    every partition has an owner."""

    async def check() -> dict[str, Any] | None:
        v = await c.view()
        if None in owners(v):
            return None
        for mid, w in want.items():
            got = owned(v, mid)
            if (len(got) != w) if isinstance(w, int) else (got != w):
                return None
        return v

    return await until(check, t, what)


def standby_of(v: dict[str, Any], mid: str) -> bool:
    return bool(next(m for m in v["members"] if m["id"] == mid)["standby"])


# -- standby take-over and failback ---------------------------------------------------------------
class _Running(Cluster):
    """A :class:`Cluster` whose heartbeat loop runs until ``close``."""

    task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


async def _take_over_running(backend: Backend) -> tuple[_Running, set[int], dict[int, int]]:
    cl = _Running(backend.client())
    cl.task = asyncio.create_task(cl._loop())
    try:
        await cl.join("s1")
        await cl.join("s2")
        await cl.join("sb", standby=True)
        v = await owns(cl.c, {"s1": P // 2, "s2": P // 2, "sb": 0}, "s1/s2 share, sb idle")
        failed, kept = owned(v, "s1"), owned(v, "s2")
        epochs = {p: e for p, (_o, e, _h) in enumerate(v["partitions"])}
        cl.stop("s1")
        v = await owns(cl.c, {"sb": failed, "s2": kept}, "sb to take over s1's partitions")
        assert member_state(v, "s1") == "dead"
        for p, (_o, e, _h) in enumerate(v["partitions"]):
            assert e > epochs[p] if p in failed else e == epochs[p], (p, e, epochs[p])
        return cl, failed, {p: e for p, (_o, e, _h) in enumerate(v["partitions"])}
    except BaseException:
        await cl.close()
        raise


async def test_standby_takes_over_and_fails_back_at_once(backend: Backend) -> None:
    cl, failed, epochs = await _take_over_running(backend)
    try:
        await cl.join("s1")  # the failed server comes back: immediate failback
        v = await owns(cl.c, {"s1": failed, "sb": 0}, "s1's partitions to go home")
        assert all(v["partitions"][p][1] > epochs[p] for p in failed)
        assert member_state(v, "s1") == "alive"
    finally:
        await cl.close()


@pytest.mark.parametrize("rules", [Rules(failback="never")], ids=["never"])
async def test_standby_keeps_them_with_failback_never(backend: Backend) -> None:
    cl, failed, _ = await _take_over_running(backend)
    try:
        await cl.join("s1")
        # the actives even out between themselves; the standby keeps what failed over
        await owns(cl.c, {"sb": failed, "s1": P // 4, "s2": P // 4}, "s1 back, sb keeps")
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            assert owned(await cl.c.view(), "sb") == failed
            await asyncio.sleep(0.1)
    finally:
        await cl.close()


WINDOW_CLOCK = WallClock(9)


@pytest.mark.parametrize(
    "rules", [Rules(failback="10-12", clock=WINDOW_CLOCK)], ids=["window-10-12"]
)
async def test_failback_waits_for_its_window(backend: Backend) -> None:
    WINDOW_CLOCK.set(9)
    cl, failed, _ = await _take_over_running(backend)
    try:
        await cl.join("s1")
        await owns(cl.c, {"sb": failed}, "sb keeps them outside the window")
        await asyncio.sleep(1.0)
        assert owned(await cl.c.view(), "sb") == failed
        WINDOW_CLOCK.set(10)  # the window opens
        await owns(cl.c, {"s1": failed, "sb": 0}, "failback once the window opened")
    finally:
        await cl.close()


# -- operator states ---------------------------------------------------------------------------------
async def test_drain_and_undrain(backend: Backend) -> None:
    cl = Cluster(backend.client())
    async with cl.running():
        for m in ("s1", "s2", "s3"):
            await cl.join(m)
        await balanced(cl.c, ["s1", "s2", "s3"])
        r = await cl.c.set_state("s3", "draining")
        assert r["id"] == "s3" and r["state"] == "draining"
        v = await owns(cl.c, {"s3": 0, "s1": P // 2, "s2": P // 2}, "s3 drained")
        assert member_state(v, "s3") == "draining"
        await cl.c.set_state("s3", "alive")
        v = await balanced(cl.c, ["s1", "s2", "s3"])
        assert member_state(v, "s3") == "alive"
        assert await code_of(cl.c.set_state("s3", "sleeping")) == "InvalidState"
        assert await code_of(cl.c.set_state("nobody", "draining")) == "UnknownMember"


async def test_set_state_standby_and_active(backend: Backend) -> None:
    cl = Cluster(backend.client())
    async with cl.running():
        for m in ("s1", "s2", "s3"):
            await cl.join(m)
        await balanced(cl.c, ["s1", "s2", "s3"])
        r = await cl.c.set_state("s3", "standby")
        assert r["standby"] is True
        v = await owns(cl.c, {"s3": 0, "s1": P // 2, "s2": P // 2}, "s3 made standby")
        assert standby_of(v, "s3") and member_state(v, "s3") == "alive"
        # a standby made so takes over when an active server fails
        failed = owned(v, "s1")
        cl.stop("s1")
        v = await owns(cl.c, {"s3": failed}, "the new standby to take over s1's partitions")
        r = await cl.c.set_state("s3", "active")
        assert r["standby"] is False
        v = await balanced(cl.c, ["s2", "s3"])
        assert not standby_of(v, "s3")
        assert await code_of(cl.c.set_state("s1", "standby")) == "MemberDown"


# -- load-based moves ----------------------------------------------------------------------------------
LOAD = {"period": 0.3, "ticks": 2, "min_rate": 1.0, "cooldown": 1.0}


@pytest.mark.parametrize("rules", [Rules(load=LOAD)], ids=["fast-load-policy"])
async def test_load_reports_move_a_hot_partition(backend: Backend) -> None:
    cl = Cluster(backend.client())
    async with cl.running():
        await cl.join("s1")
        await cl.join("s2")
        v = await balanced(cl.c, ["s1", "s2"])
        hot = sorted(owned(v, "s1"))[:2]  # two hot partitions, both on s1
        rate = {p: (100.0 if p in hot else 1.0) for p in range(P)}

        def load(mid: str, view: dict[str, Any]) -> list[list[float]]:
            return [[p, rate[p], 0.0] for p in owned(view, mid)]

        cl.load = load
        before = v["partitions"]

        async def split() -> dict[str, Any] | None:
            v = await cl.c.view()
            return v if {owners(v)[p] for p in hot} == {"s1", "s2"} else None

        v = await until(split, 15, "a hot partition to move to s2")
        c = Counter(owners(v))
        assert c["s1"] == c["s2"] == P // 2  # a swap: the counts stay even
        moved = [p for p in range(P) if owners(v)[p] != before[p][0]]
        assert len(moved) == 2 and all(v["partitions"][p][1] > before[p][1] for p in moved)
        # then the load is even: nothing moves any more
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            assert owners(await cl.c.view()) == owners(v)
            await asyncio.sleep(0.1)
        assert (await cl.c.view())["load"]["moves"] == 2


async def test_no_load_reports_no_load_moves(backend: Backend) -> None:
    cl = Cluster(backend.client())
    async with cl.running():
        await cl.join("s1")
        await cl.join("s2")
        v = await balanced(cl.c, ["s1", "s2"])
        await asyncio.sleep(2.0)
        assert owners(await cl.c.view()) == owners(v)


# -- capacity schedules -----------------------------------------------------------------------------
SCHEDULE_CLOCK = WallClock(9)


@pytest.mark.parametrize(
    "rules",
    [Rules(capacity_schedule=["s1@10-12=3"], clock=SCHEDULE_CLOCK)],
    ids=["s1-x3-from-10-to-12"],
)
async def test_capacity_schedule_follows_the_clock(backend: Backend) -> None:
    SCHEDULE_CLOCK.set(9)
    cl = Cluster(backend.client())
    async with cl.running():
        await cl.join("s1")
        await cl.join("s2")
        await owns(cl.c, {"s1": P // 2, "s2": P // 2}, "even before the window")
        SCHEDULE_CLOCK.set(10)
        await owns(cl.c, {"s1": P * 3 // 4, "s2": P // 4}, "s1 counts 3x in its window")
        SCHEDULE_CLOCK.set(12)
        await owns(cl.c, {"s1": P // 2, "s2": P // 2}, "even again once the window closed")
        kinds = [e["kind"] for e in await cl.c.events()]
        assert "capacity-schedule" in kinds


# -- epochs ---------------------------------------------------------------------------------------------
async def test_epochs_only_grow_and_a_dead_owners_partitions_get_new_ones(
    backend: Backend,
) -> None:
    """Every view seen during joins, a drain, a death and a re-join: a partition's epoch
    never goes down and goes up whenever its owner changes; the lock managers' epoch never
    goes down and goes up whenever the set of live servers changes."""
    cl = Cluster(backend.client())
    watcher = backend.client()
    seen: list[dict[str, Any]] = []
    problems: list[str] = []

    async def watch() -> None:
        since = -1
        while True:
            with contextlib.suppress(RpcError):
                v = await watcher.watch(since, timeout=1.0)
                since = v["version"]
                seen.append(v)
                if len(seen) > 1:
                    try:
                        problems.extend(_compare(seen[-2], v))
                    except Exception as e:  # a bug here must fail the test, not end the watch
                        problems.append(repr(e))

    w = asyncio.create_task(watch())
    try:
        async with cl.running():
            for m in ("s1", "s2", "s3"):
                await cl.join(m)
            v = await balanced(cl.c, ["s1", "s2", "s3"])
            await cl.c.set_state("s3", "draining")
            await owns(cl.c, {"s3": 0}, "s3 drained")
            await cl.c.set_state("s3", "alive")
            v = await balanced(cl.c, ["s1", "s2", "s3"])
            dead = {p: v["partitions"][p][1] for p in owned(v, "s2")}
            me = v.get("membership_epoch", 0)
            cl.stop("s2")
            v = await owns(cl.c, {"s2": 0}, "s2's partitions to move")
            assert all(v["partitions"][p][1] > e for p, e in dead.items())
            assert v.get("membership_epoch", 1) > me
            await cl.join("s2")
            await balanced(cl.c, ["s1", "s2", "s3"])
            await asyncio.sleep(0.3)
    finally:
        w.cancel()
        with contextlib.suppress(BaseException):
            await w
    assert len(seen) > 5 and not problems, problems


def _compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if len(a["partitions"]) != len(b["partitions"]):
        return out  # the first view, from before the cluster's config existed
    for p, ((oa, ea, _), (ob, eb, _)) in enumerate(
        zip(a["partitions"], b["partitions"], strict=True)
    ):
        if eb < ea or (ob != oa and oa is not None and eb <= ea):
            out.append(f"partition {p}: {oa}@{ea} -> {ob}@{eb}")
    ma, mb = a.get("membership_epoch"), b.get("membership_epoch")
    if ma is not None and mb is not None:
        servers = [
            {(m["id"], m["incarnation"]) for m in v["members"]
             if m["role"] == "server" and m["state"] in ("alive", "draining")}
            for v in (a, b)
        ]  # fmt: skip
        if mb < ma:
            out.append(f"membership epoch {ma} -> {mb}")
        if "dlm_members" in b and "dlm_members" in a and a["dlm_members"] != b["dlm_members"]:
            if mb <= ma:
                out.append(f"DLM members changed under epoch {ma} -> {mb}")
        elif "dlm_members" not in b and servers[0] != servers[1] and mb <= ma:
            out.append(f"servers changed under membership epoch {ma} -> {mb}")
    return out
