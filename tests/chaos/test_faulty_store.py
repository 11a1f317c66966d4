"""FaultyStore over a real LocalStore in a temporary directory."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cohort.chaos.faulty_store import FaultSchedule, FaultyStore, SimulatedCrash
from cohort.storage.base import NotFound, Store
from cohort.storage.local import LocalStore


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".cohort-tmp")]


@pytest.fixture
def local(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


async def test_is_a_store_and_passes_through(local: LocalStore) -> None:
    fs: Store = FaultyStore(local)
    assert isinstance(fs, Store)
    await fs.put("a/b", b"hello")
    assert await fs.get("a/b") == b"hello"
    assert await fs.read_range("a/b", 1, 3) == b"ell"
    assert await fs.size("a/b") == 5
    assert await fs.put_stream("a/c", _chunks(b"x", b"y")) == 2
    assert [k async for k in fs.list("a/")] == ["a/b", "a/c"]
    await fs.delete("a/b")
    with pytest.raises(NotFound):
        await fs.get("a/b")


async def test_eio_before_changes_nothing(local: LocalStore) -> None:
    fs = FaultyStore(local)
    await fs.put("k", b"old")
    fs.fail_next("eio")
    with pytest.raises(OSError) as e:
        await fs.put("k", b"new")
    assert e.value.errno == errno.EIO
    assert await local.get("k") == b"old"
    await fs.put("k", b"new")  # one-shot
    assert await local.get("k") == b"new"
    assert [f.kind for f in fs.injected] == ["eio"]


async def test_eio_after_is_applied_but_reported_failed(local: LocalStore) -> None:
    fs = FaultyStore(local)
    fs.fail_next("eio_after", ops=("delete",))
    await fs.put("k", b"v")
    with pytest.raises(OSError):
        await fs.delete("k")
    with pytest.raises(NotFound):
        await local.get("k")


async def test_enospc_and_disk_full(local: LocalStore) -> None:
    fs = FaultyStore(local)
    fs.fail_next("enospc", count=2)
    for _ in range(2):
        with pytest.raises(OSError) as e:
            await fs.put("k", b"v")
        assert e.value.errno == errno.ENOSPC
    await fs.put("k", b"v")
    fs.disk_full()
    with pytest.raises(OSError):
        await fs.put_stream("s", _chunks(b"abc"))
    await fs.delete("k")  # deleting frees space and still works
    fs.disk_full(False)
    await fs.put("k", b"w")


async def test_key_prefix_and_read_faults(local: LocalStore) -> None:
    fs = FaultyStore(local)
    await local.put("log/1", b"x")
    await local.put("data/1", b"y")
    fs.fail_next("eio", ops=("get",), key_prefix="log/")
    assert await fs.get("data/1") == b"y"
    with pytest.raises(OSError):
        await fs.get("log/1")
    with pytest.raises(ValueError):
        fs.fail_next("torn", ops=("get",))


async def test_slow_writes(local: LocalStore) -> None:
    import time

    fs = FaultyStore(local)
    fs.slow(0.15)
    t0 = time.monotonic()
    await fs.put("k", b"v")
    assert time.monotonic() - t0 >= 0.15
    assert await local.get("k") == b"v"  # applied before the delay
    fs.slow(0)
    t0 = time.monotonic()
    await fs.put("k", b"v2")
    assert time.monotonic() - t0 < 0.15


async def test_torn_write_leaves_partial_tmp_and_keeps_old_value(local: LocalStore) -> None:
    fs = FaultyStore(local, schedule=FaultSchedule(seed=3))
    await fs.put("d/k", b"old value")
    fs.crash_next_write()
    with pytest.raises(SimulatedCrash):
        await fs.put("d/k", b"a much longer new value")
    assert fs.crashed
    tmps = _tmp_files(local.root)
    assert len(tmps) == 1
    assert b"a much longer new value".startswith(tmps[0].read_bytes())
    assert len(tmps[0].read_bytes()) < len(b"a much longer new value")
    # the crashed process does nothing more
    with pytest.raises(SimulatedCrash):
        await fs.get("d/k")
    fs.restart()
    # the backend's atomicity holds: the old value, and listings ignore the leftover
    assert await fs.get("d/k") == b"old value"
    assert [k async for k in fs.list("d/")] == ["d/k"]


async def test_torn_put_stream(local: LocalStore) -> None:
    fs = FaultyStore(local, halt_on_crash=False)
    fs.crash_next_write()
    with pytest.raises(SimulatedCrash):
        await fs.put_stream("blob", _chunks(b"0123", b"4567"))
    assert not fs.crashed
    with pytest.raises(NotFound):
        await fs.get("blob")
    assert len(_tmp_files(local.root)) == 1


class _DictStore:
    """A minimal non-local Store for the torn_value path."""

    def __init__(self) -> None:
        self.d: dict[str, bytes] = {}

    async def get(self, key: str) -> bytes:
        if key not in self.d:
            raise NotFound(key)
        return self.d[key]

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        return (await self.get(key))[start : start + length]

    async def size(self, key: str) -> int:
        return len(await self.get(key))

    async def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        self.d[key] = bytes(data)
        return str(len(data))

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        self.d[key] = b"".join([c async for c in chunks])
        return len(self.d[key])

    async def delete(self, key: str) -> None:
        self.d.pop(key, None)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        for k in sorted(self.d):
            if k.startswith(prefix):
                yield k


async def test_torn_value_on_non_atomic_backend() -> None:
    inner = _DictStore()
    fs = FaultyStore(inner, torn_value=True, schedule=FaultSchedule(seed=1))
    fs.crash_next_write()
    with pytest.raises(SimulatedCrash):
        await fs.put("k", b"0123456789")
    assert len(inner.d["k"]) < 10 and b"0123456789".startswith(inner.d["k"])


async def test_seeded_schedule_is_reproducible(tmp_path: Path) -> None:
    async def run(seed: int) -> list[str]:
        root = tmp_path / f"s{seed}-{len(os.listdir(tmp_path))}"
        sched = FaultSchedule(seed=seed, eio=0.2, eio_after=0.1, enospc=0.1, slow=0.1,
                              slow_seconds=0.001, read_eio=0.2)  # fmt: skip
        fs = FaultyStore(LocalStore(root, fsync=False), schedule=sched)
        out: list[str] = []
        for i in range(60):
            try:
                if i % 3 == 2:
                    await fs.get(f"k{i % 5}")
                else:
                    await fs.put(f"k{i % 5}", b"v")
                out.append("ok")
            except OSError as e:
                out.append(errno.errorcode[e.errno or 0])
            except NotFound:
                out.append("missing")
        return out

    a, b = await run(7), await run(7)
    assert a == b
    assert {"EIO", "ENOSPC", "ok"} <= set(a)
    assert a != await run(8)
    with pytest.raises(ValueError):
        FaultSchedule(eio=0.6, enospc=0.6)
