"""A fault-injecting wrapper around any :class:`~cohort.storage.base.Store`.

Faults come from a seeded :class:`FaultSchedule` (each operation draws once from a
``random.Random(seed)``; the sequence is reproducible for a given order of operations)
and/or from explicit commands (:meth:`FaultyStore.fail_next`, :meth:`FaultyStore.slow`,
:meth:`FaultyStore.disk_full`).  Commands take precedence over the schedule.

Fault kinds:

``eio``
    ``OSError(EIO)`` before the operation touches the backend: nothing changed.
``eio_after``
    the operation is applied, then ``OSError(EIO)`` is raised (an error on the final
    fsync): the caller must treat the outcome as unknown.
``enospc``
    ``OSError(ENOSPC)`` before anything is written.
``slow``
    the operation is applied, then the wrapper sleeps before returning (slow fsync).
``torn``
    a crash in the middle of a write: the backend is left with a partial temporary file
    (for :class:`~cohort.storage.local.LocalStore`, exactly what its writer leaves behind
    when killed before the rename; for other backends, with ``torn_value=True``, a
    truncated value at the key itself, to test readers of non-atomic backends) and
    :class:`SimulatedCrash` is raised.  With ``halt_on_crash`` every later operation
    raises :class:`SimulatedCrash` too until :meth:`FaultyStore.restart`, as the crashed
    process would not do anything more.

Writes are ``put``, ``put_stream`` and ``delete``; reads (``get``, ``read_range``,
``size``, ``list``) only get ``eio`` (``read_eio`` in the schedule, or commands naming
read operations).  Every injected fault is appended to :attr:`FaultyStore.injected`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from cohort.storage.base import Store
from cohort.storage.local import LocalStore

FaultKind: TypeAlias = Literal["eio", "eio_after", "enospc", "slow", "torn"]
StoreOp: TypeAlias = Literal["get", "read_range", "size", "list", "put", "put_stream", "delete"]
WRITE_OPS: frozenset[StoreOp] = frozenset({"put", "put_stream", "delete"})
READ_OPS: frozenset[StoreOp] = frozenset({"get", "read_range", "size", "list"})

# LocalStore's temporary-file suffix: a torn write must leave what a real crash leaves
_TMP_SUFFIX = ".cohort-tmp"


class SimulatedCrash(Exception):
    """The process 'crashed' in the middle of a storage operation."""


@dataclass(slots=True)
class FaultSchedule:
    """Per-operation fault probabilities (checked in this order; their sum must be <= 1)."""

    seed: int = 0
    eio: float = 0.0
    eio_after: float = 0.0
    enospc: float = 0.0
    slow: float = 0.0
    torn: float = 0.0
    read_eio: float = 0.0
    slow_seconds: float = 0.2

    def __post_init__(self) -> None:
        total = self.eio + self.eio_after + self.enospc + self.slow + self.torn
        if total > 1 or self.read_eio > 1 or min(total, self.read_eio) < 0:
            raise ValueError("fault probabilities must be in [0, 1] and sum to <= 1")


@dataclass(frozen=True, slots=True)
class InjectedFault:
    at: float
    op: StoreOp
    key: str
    kind: FaultKind


@dataclass(slots=True)
class _Command:
    kind: FaultKind
    count: int
    ops: frozenset[StoreOp]
    key_prefix: str


@dataclass(slots=True)
class _State:
    commands: list[_Command] = field(default_factory=list)
    slow_seconds: float = 0.0
    disk_full: bool = False
    crashed: bool = False


def _oserror(code: int, key: str) -> OSError:
    return OSError(code, os.strerror(code), key)


class FaultyStore:
    """A :class:`Store` that injects faults into the ``inner`` store's operations."""

    def __init__(
        self,
        inner: Store,
        *,
        schedule: FaultSchedule | None = None,
        halt_on_crash: bool = True,
        torn_value: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.schedule = schedule
        self.halt_on_crash = halt_on_crash
        self.torn_value = torn_value
        self.clock = clock
        self.injected: list[InjectedFault] = []
        self._rng = random.Random(schedule.seed if schedule else 0)
        self._st = _State()

    # -- commands --------------------------------------------------------------------------
    def fail_next(
        self,
        kind: FaultKind,
        count: int = 1,
        *,
        ops: Collection[StoreOp] = WRITE_OPS,
        key_prefix: str = "",
    ) -> None:
        """Inject ``kind`` into the next ``count`` operations in ``ops`` on keys starting
        with ``key_prefix`` (reads only accept ``eio``)."""
        if kind != "eio" and set(ops) & READ_OPS:
            raise ValueError(f"{kind} applies to writes only")
        self._st.commands.append(_Command(kind, count, frozenset(ops), key_prefix))

    def crash_next_write(self, key_prefix: str = "") -> None:
        """The next ``put``/``put_stream`` tears and crashes."""
        self.fail_next("torn", ops=("put", "put_stream"), key_prefix=key_prefix)

    def slow(self, seconds: float) -> None:
        """Delay every write's return by ``seconds`` (0: stop)."""
        self._st.slow_seconds = seconds

    def disk_full(self, full: bool = True) -> None:
        """While full, ``put``/``put_stream`` fail with ENOSPC (``delete`` still works)."""
        self._st.disk_full = full

    def clear(self) -> None:
        """Drop pending commands, slowness and disk-full (not the crashed state)."""
        self._st = _State(crashed=self._st.crashed)

    @property
    def crashed(self) -> bool:
        return self._st.crashed

    def restart(self) -> None:
        """Come back after a simulated crash (the backend keeps whatever was left)."""
        self._st.crashed = False

    # -- fault selection -------------------------------------------------------------------
    def _pick(self, op: StoreOp, key: str) -> FaultKind | None:
        if self._st.crashed:
            raise SimulatedCrash(f"store crashed; {op} {key} not executed")
        for cmd in self._st.commands:
            if op in cmd.ops and key.startswith(cmd.key_prefix):
                cmd.count -= 1
                if cmd.count <= 0:
                    self._st.commands.remove(cmd)
                return cmd.kind
        if op in ("put", "put_stream") and self._st.disk_full:
            return "enospc"
        s = self.schedule
        if s is not None:
            x = self._rng.random()
            if op in READ_OPS:
                return "eio" if x < s.read_eio else None
            for kind, p in (
                ("eio", s.eio),
                ("eio_after", s.eio_after),
                ("enospc", s.enospc if op != "delete" else 0.0),
                ("slow", s.slow),
                ("torn", s.torn if op != "delete" else 0.0),
            ):
                if x < p:
                    return kind  # type: ignore[return-value]
                x -= p
        if op in WRITE_OPS and self._st.slow_seconds > 0:
            return "slow"
        return None

    def _note(self, op: StoreOp, key: str, kind: FaultKind) -> None:
        self.injected.append(InjectedFault(self.clock(), op, key, kind))

    def _slow_seconds(self) -> float:
        if self._st.slow_seconds > 0:
            return self._st.slow_seconds
        return self.schedule.slow_seconds if self.schedule else 0.0

    async def _before(self, op: StoreOp, key: str) -> FaultKind | None:
        """Raise pre-operation faults; return the fault to apply afterwards, if any."""
        kind = self._pick(op, key)
        if kind is None:
            return None
        self._note(op, key, kind)
        if kind == "eio":
            raise _oserror(errno.EIO, key)
        if kind == "enospc":
            raise _oserror(errno.ENOSPC, key)
        return kind

    async def _after(self, kind: FaultKind | None, key: str) -> None:
        if kind == "slow":
            await asyncio.sleep(self._slow_seconds())
        elif kind == "eio_after":
            raise _oserror(errno.EIO, key)

    # -- torn writes -----------------------------------------------------------------------
    async def _tear(self, key: str, data: bytes) -> None:
        cut = self._rng.randrange(len(data)) if data else 0
        partial = data[:cut]
        if isinstance(self.inner, LocalStore):
            final = self.inner.path(key)

            def leave_tmp() -> None:
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
                with open(tmp, "wb") as f:
                    f.write(partial)

            await asyncio.to_thread(leave_tmp)
        elif self.torn_value:
            await self.inner.put(key, partial)
        if self.halt_on_crash:
            self._st.crashed = True
        raise SimulatedCrash(f"crashed while writing {key} ({cut}/{len(data)} bytes written)")

    # -- Store protocol --------------------------------------------------------------------
    async def get(self, key: str) -> bytes:
        await self._before("get", key)
        return await self.inner.get(key)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        await self._before("read_range", key)
        return await self.inner.read_range(key, start, length)

    async def size(self, key: str) -> int:
        await self._before("size", key)
        return await self.inner.size(key)

    async def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        kind = await self._before("put", key)
        if kind == "torn":
            await self._tear(key, bytes(data))
        etag = await self.inner.put(key, data, if_absent=if_absent, if_match=if_match)
        await self._after(kind, key)
        return etag

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        kind = await self._before("put_stream", key)
        if kind == "torn":
            data = b"".join([c async for c in chunks])
            await self._tear(key, data)
        n = await self.inner.put_stream(key, chunks)
        await self._after(kind, key)
        return n

    async def delete(self, key: str) -> None:
        kind = await self._before("delete", key)
        await self.inner.delete(key)
        await self._after(kind, key)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        await self._before("list", prefix)
        async for k in self.inner.list(prefix):
            yield k
