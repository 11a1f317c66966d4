"""Nemesis planning and execution against throwaway sleeper processes."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cohort.chaos.nemesis import CmdlineRestarter, Member, Nemesis
from cohort.chaos.proxy import FaultProxy

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _state(pid: int) -> str:
    """The process state letter from /proc (``T`` stopped, ``Z`` zombie); ``X`` if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "X"


def _until(cond: object, timeout: float = 5.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Procs:
    def __init__(self) -> None:
        self.all: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str] | None = None) -> int:
        p = subprocess.Popen(argv or SLEEPER)
        self.all.append(p)
        return p.pid

    def reap(self) -> None:
        for p in self.all:
            p.poll()


@pytest.fixture
def procs() -> Iterator[Procs]:
    ps = Procs()
    yield ps
    for p in ps.all:
        if p.poll() is None:
            p.kill()
        p.wait()


def _members(procs: Procs, n: int = 3) -> list[Member]:
    roles = ["coordinator", "server", "director"]
    return [Member(roles[i % 3], f"m{i}", f"127.0.0.1:{1000 + i}", procs.spawn()) for i in range(n)]


def test_plan_is_seeded_and_bounded(procs: Procs) -> None:
    ms = _members(procs)
    restart = lambda m: None  # noqa: E731
    a = Nemesis(ms, seed=1, restart=restart).plan(60)
    assert a == Nemesis(ms, seed=1, restart=restart).plan(60)
    assert a != Nemesis(ms, seed=2, restart=restart).plan(60)
    assert a and all(f.at + f.duration <= 60 for f in a)
    assert all(b.at >= f.at + f.duration for f, b in itertools.pairwise(a))
    assert {f.action for f in a} <= {"kill", "pause"}  # no proxies given
    # without a restart callback nothing is killed; roles filter targets
    b = Nemesis(ms, seed=1, roles=["server"]).plan(60)
    assert b and {f.action for f in b} == {"pause"} and {f.target for f in b} == {"m1"}
    assert Nemesis([], seed=1).plan(60) == []


async def test_pause_and_heal(procs: Procs) -> None:
    ms = _members(procs, 1)
    n = Nemesis(ms, seed=0, actions=["pause"])
    from cohort.chaos.nemesis import PlannedFault

    rec = await n.inject(PlannedFault(0, "pause", "m0", 1))
    assert rec.error is None
    _until(lambda: _state(ms[0].pid) == "T")
    await n.heal()
    _until(lambda: _state(ms[0].pid) in ("S", "R"))
    assert rec.end is not None and rec.end >= rec.start


async def test_kill_and_restart(procs: Procs) -> None:
    ms = _members(procs, 1)
    restarted: list[str] = []

    async def restart(m: Member) -> int:
        restarted.append(m.id)
        return procs.spawn()

    n = Nemesis(ms, seed=0, restart=restart, actions=["kill"])
    from cohort.chaos.nemesis import PlannedFault

    old = ms[0].pid
    await n.inject(PlannedFault(0, "kill", "m0", 1))
    _until(lambda: _state(old) in ("X", "Z"))  # dead (a zombie until reaped)
    await n.heal()
    assert restarted == ["m0"]
    new = n.pids()["m0"]
    assert new != old and _state(new) in ("S", "R")
    assert "restarted as pid" in n.records[0].detail


async def test_proxy_faults_and_heal() -> None:
    p = FaultProxy("127.0.0.1", 0, target_host="127.0.0.1", target_port=9)
    await p.start()
    try:
        n = Nemesis([], seed=5, proxies={"s1->coord": p}, interval=(0.01, 0.02))
        plan = n.plan(100)
        assert plan and {f.action for f in plan} <= {"proxy-drop", "proxy-delay", "proxy-blackhole"}
        for f in plan[:6]:
            await n.inject(f)
            expected = {
                "proxy-drop": "drop",
                "proxy-delay": "delay",
                "proxy-blackhole": "blackhole",
            }
            assert p.mode == expected[f.action]
            await n.heal()
            assert p.mode == "pass"
    finally:
        await p.close()


async def test_run_executes_plan_and_heals(procs: Procs) -> None:
    ms = _members(procs, 2)
    p = FaultProxy("127.0.0.1", 0, target_host="127.0.0.1", target_port=9)
    await p.start()

    def restart(m: Member) -> int:  # synchronous callbacks run in a thread
        return procs.spawn()

    try:
        n = Nemesis(
            ms, seed=3, restart=restart, proxies={"x": p},
            interval=(0.02, 0.05), duration=(0.05, 0.1),
        )  # fmt: skip
        planned = n.plan(1.0)
        t0 = time.monotonic()
        recs = await n.run(1.0)
        assert time.monotonic() - t0 < 3
        assert [(r.action, r.target) for r in recs] == [(f.action, f.target) for f in planned]
        assert all(r.end is not None and r.error is None for r in recs)
        assert p.mode == "pass"
        procs.reap()
        for pid in n.pids().values():
            assert _state(pid) in ("S", "R")
    finally:
        await p.close()


async def test_run_stops_early_and_heals(procs: Procs) -> None:
    ms = _members(procs, 1)
    n = Nemesis(ms, seed=1, actions=["pause"], interval=(0.01, 0.02), duration=(30, 40))
    stop = asyncio.Event()
    task = asyncio.create_task(n.run(1000, stop))
    await asyncio.sleep(0.2)
    assert _state(ms[0].pid) == "T"
    stop.set()
    await asyncio.wait_for(task, 5)
    _until(lambda: _state(ms[0].pid) in ("S", "R"))


def test_cmdline_restarter(procs: Procs, tmp_path: object) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "--port", "0"]
    pid = procs.spawn(argv)
    m = Member("director", "d1", "127.0.0.1:4567", pid)

    def execed() -> bool:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"--port" in f.read()

    _until(execed)  # /proc shows the parent's command line until exec
    r = CmdlineRestarter([m])
    procs.all[-1].kill()
    procs.reap()
    new = r(m)
    assert new is not None
    try:
        _until(lambda: _state(new) in ("S", "R"))
        with open(f"/proc/{new}/cmdline", "rb") as f:
            got = [a.decode() for a in f.read().split(b"\0") if a]
        assert got == [*argv[:-1], "4567"]
    finally:
        for c in r.children:
            c.kill()
            c.wait()
    assert r(Member("server", "unknown", "", 0)) is None
