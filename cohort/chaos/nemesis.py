"""A seeded nemesis: process kills, pauses and network faults on a schedule.

The nemesis knows cluster members by id, role and PID (as listed in ``cluster.json``)
and, optionally, named :class:`~cohort.chaos.proxy.FaultProxy` instances sitting on links
between components.  From a seed it draws a *plan*: a sequence of faults, one at a time,
each with a start offset, a target and a duration:

``kill``
    ``SIGKILL`` the member, wait ``duration``, then call the ``restart`` callback (which
    must bring the member back and return its new PID).  Only planned when a ``restart``
    callback is given.
``pause``
    ``SIGSTOP`` the member, wait ``duration`` (choose it longer than the lease TTL to
    create zombies: a member that wakes up still believing it owns what it owned), then
    ``SIGCONT``.
``proxy-drop`` / ``proxy-delay`` / ``proxy-blackhole``
    put a proxy in that mode for ``duration`` (delay: a random latency), then
    ``pass_through()``.

The same seed, members and proxies give the same plan.  :meth:`Nemesis.run` executes it
in real time and records when each fault really started and ended (monotonic clock, the
one histories use); :meth:`Nemesis.heal` undoes whatever is still in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from cohort.chaos.proxy import FaultProxy

Action: TypeAlias = Literal["kill", "pause", "proxy-drop", "proxy-delay", "proxy-blackhole"]
ACTIONS: tuple[Action, ...] = ("kill", "pause", "proxy-drop", "proxy-delay", "proxy-blackhole")
PROCESS_ACTIONS: frozenset[Action] = frozenset({"kill", "pause"})

RestartFn: TypeAlias = Callable[["Member"], "Awaitable[int | None] | int | None"]


@dataclass(frozen=True, slots=True)
class Member:
    """A cluster process as ``cluster.json`` lists it."""

    role: str
    id: str
    address: str
    pid: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Member:
        return cls(str(d["role"]), str(d["id"]), str(d.get("address", "")), int(d["pid"]))


@dataclass(frozen=True, slots=True)
class PlannedFault:
    """``action`` on ``target`` (member id or proxy name) from ``at`` seconds after the
    start, for ``duration`` seconds; ``param`` is the latency of ``proxy-delay``."""

    at: float
    action: Action
    target: str
    duration: float
    param: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "action": self.action,
            "target": self.target,
            "duration": round(self.duration, 3),
            "param": round(self.param, 3),
        }


@dataclass(slots=True)
class FaultRecord:
    """What happened: monotonic ``start``/``end`` (``end`` ``None`` while in effect)."""

    action: Action
    target: str
    start: float
    end: float | None = None
    param: float = 0.0
    detail: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target,
            "start": self.start,
            "end": self.end,
            "param": self.param,
            "detail": self.detail,
            "error": self.error,
        }


@dataclass(slots=True)
class _InEffect:
    record: FaultRecord
    undo: Callable[[], Awaitable[None]]


def _signal(pid: int, sig: int) -> None:
    # refuse the obviously dangerous PIDs a malformed cluster.json could contain
    if pid <= 1 or pid == os.getpid():
        raise ValueError(f"refusing to signal pid {pid}")
    os.kill(pid, sig)


class Nemesis:
    """Seeded fault schedule over cluster members and proxies (see module docstring)."""

    def __init__(
        self,
        members: Sequence[Member],
        *,
        seed: int,
        restart: RestartFn | None = None,
        proxies: Mapping[str, FaultProxy] | None = None,
        actions: Collection[Action] = ACTIONS,
        roles: Collection[str] = ("coordinator", "server", "director"),
        interval: tuple[float, float] = (1.0, 3.0),
        duration: tuple[float, float] = (1.0, 4.0),
        pause: tuple[float, float] | None = None,
        delay: tuple[float, float] = (0.05, 0.5),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.members = {m.id: m for m in members}
        self.seed = seed
        self.restart_fn = restart
        self.proxies = dict(proxies or {})
        self.roles = set(roles)
        self.interval = interval
        self.duration = duration
        self.pause_range = pause or duration
        self.delay_range = delay
        self.clock = clock
        self.records: list[FaultRecord] = []
        self._in_effect: list[_InEffect] = []
        self.actions = [a for a in ACTIONS if a in set(actions) and self._targets(a)]

    def _targets(self, action: Action) -> list[str]:
        if action in PROCESS_ACTIONS:
            if action == "kill" and self.restart_fn is None:
                return []
            return sorted(m.id for m in self.members.values() if m.role in self.roles)
        return sorted(self.proxies)

    # -- planning --------------------------------------------------------------------------
    def plan(self, total: float) -> list[PlannedFault]:
        """The faults to inject within ``total`` seconds, one at a time, in order."""
        rng = random.Random(self.seed)
        out: list[PlannedFault] = []
        if not self.actions:
            return out
        t = rng.uniform(*self.interval)
        while True:
            action = rng.choice(self.actions)
            target = rng.choice(self._targets(action))
            span = self.pause_range if action == "pause" else self.duration
            d = rng.uniform(*span)
            param = rng.uniform(*self.delay_range) if action == "proxy-delay" else 0.0
            if t + d > total:
                return out
            out.append(PlannedFault(t, action, target, d, param))
            t += d + rng.uniform(*self.interval)

    # -- execution -------------------------------------------------------------------------
    async def run(self, total: float, stop: asyncio.Event | None = None) -> list[FaultRecord]:
        """Execute :meth:`plan` in real time; returns when done or ``stop`` is set, with
        everything healed either way."""
        stop = stop or asyncio.Event()
        t0 = self.clock()
        try:
            for f in self.plan(total):
                if await self._wait(stop, t0 + f.at):
                    break
                await self.inject(f)
                if await self._wait(stop, self.clock() + f.duration):
                    break
                await self.heal()
        finally:
            await self.heal()
        return self.records

    async def _wait(self, stop: asyncio.Event, until: float) -> bool:
        """Sleep until ``until``; True if ``stop`` was set first."""
        timeout = until - self.clock()
        if timeout <= 0:
            return stop.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout)
        return stop.is_set()

    async def inject(self, f: PlannedFault) -> FaultRecord:
        """Start fault ``f`` now (it stays in effect until :meth:`heal`)."""
        rec = FaultRecord(f.action, f.target, self.clock(), param=f.param)
        self.records.append(rec)
        try:
            undo = await self._apply(f, rec)
        except Exception as e:  # a member already gone is worth recording, not fatal
            rec.error = f"{type(e).__name__}: {e}"
            rec.end = self.clock()
            return rec
        self._in_effect.append(_InEffect(rec, undo))
        return rec

    async def _apply(self, f: PlannedFault, rec: FaultRecord) -> Callable[[], Awaitable[None]]:
        if f.action in PROCESS_ACTIONS:
            m = self.members[f.target]
            rec.detail = f"{m.role} pid {m.pid}"
            if f.action == "pause":
                _signal(m.pid, signal.SIGSTOP)

                async def cont() -> None:
                    with contextlib.suppress(ProcessLookupError):
                        _signal(self.members[m.id].pid, signal.SIGCONT)

                return cont
            _signal(m.pid, signal.SIGKILL)

            async def restart() -> None:
                assert self.restart_fn is not None
                fn: Callable[[Member], Any] = self.restart_fn
                res: Any
                if inspect.iscoroutinefunction(fn):
                    res = fn(self.members[m.id])
                else:
                    # a blocking restart (spawn, wait for READY) must not stall the loop,
                    # which may be running proxies and clients
                    res = await asyncio.to_thread(fn, self.members[m.id])
                pid = await res if inspect.isawaitable(res) else res
                if pid:
                    self.members[m.id] = replace(self.members[m.id], pid=pid)
                    rec.detail += f", restarted as pid {pid}"

            return restart
        proxy = self.proxies[f.target]
        if f.action == "proxy-drop":
            proxy.drop()
        elif f.action == "proxy-blackhole":
            proxy.blackhole()
        else:
            proxy.delay(f.param)
            rec.detail = f"{f.param * 1000:.0f} ms"

        async def heal_proxy() -> None:
            proxy.pass_through()

        return heal_proxy

    async def heal(self) -> None:
        """Undo every fault in effect (restart killed members, resume paused ones, heal
        proxies), most recent first.  Errors are recorded on the fault, not raised."""
        while self._in_effect:
            e = self._in_effect.pop()
            try:
                await e.undo()
            except Exception as exc:
                e.record.error = f"heal failed: {type(exc).__name__}: {exc}"
            e.record.end = self.clock()

    def pids(self) -> dict[str, int]:
        """Current PID of every member (after restarts)."""
        return {i: m.pid for i, m in self.members.items()}


@dataclass(slots=True)
class CmdlineRestarter:
    """Restart a killed member by re-running its original command line.

    The command line, working directory and environment are captured from ``/proc``
    when the restarter is created, i.e. while the members are alive.  A ``--port N``
    argument is replaced by the port of the member's address so that members reached at
    a fixed address (coordinator, directors) come back there even if they were started
    on an ephemeral port.  Restarted processes are children of this process, in their
    own session; their output goes to ``log_dir/<id>.restart.log`` when ``log_dir`` is
    given.  Readiness is not awaited here: the runner's settle phase waits for service.
    """

    members: Sequence[Member]
    log_dir: str | None = None
    captured: dict[str, tuple[list[str], str, dict[str, str]]] = field(default_factory=dict)
    children: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        for m in self.members:
            with contextlib.suppress(OSError):
                self.captured[m.id] = _proc_info(m.pid)

    def __call__(self, m: Member) -> int | None:
        import subprocess

        if not self.captured.get(m.id, ([], "", {}))[0]:
            return None  # never captured, or captured before the process had exec'ed
        argv, cwd, env = self.captured[m.id]
        argv = list(argv)
        port = m.address.rpartition(":")[2]
        if "--port" in argv and port.isdigit():
            argv[argv.index("--port") + 1] = port
        out: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            out = open(os.path.join(self.log_dir, f"{m.id}.restart.log"), "ab")  # noqa: SIM115
        p = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()  # the child has its own copy
        self.children.append(p)
        return p.pid


def _proc_info(pid: int) -> tuple[list[str], str, dict[str, str]]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    cwd = os.readlink(f"/proc/{pid}/cwd")
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return argv, cwd, env
