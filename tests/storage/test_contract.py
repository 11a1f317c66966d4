"""One contract suite for every Store backend (tests/storage/conftest.py): the local
directory, RADOS (a real Ceph: aio and sync I/O, omap and scan listings), and S3 (Ceph's
radosgw, and a real Cohort cluster's S3 endpoint)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from cohort.oplog.log import Fenced, PartitionLog, segment_epochs
from cohort.storage.base import NotFound, PreconditionFailed, Store
from tests.storage.conftest import Opener


async def keys(store: Store, prefix: str) -> list[str]:
    return [k async for k in store.list(prefix)]


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


async def test_put_get_size_delete(store: Store) -> None:
    etag = await store.put("a/b/obj", b"hello")
    assert isinstance(etag, str) and etag
    assert await store.get("a/b/obj") == b"hello"
    assert await store.size("a/b/obj") == 5
    etag2 = await store.put("a/b/obj", b"replaced value")
    assert etag2 != etag
    assert await store.get("a/b/obj") == b"replaced value"
    await store.put("empty", b"")
    assert await store.get("empty") == b""
    assert await store.size("empty") == 0
    await store.delete("a/b/obj")
    with pytest.raises(NotFound):
        await store.get("a/b/obj")
    await store.delete("a/b/obj")  # deleting a missing key is not an error


async def test_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.get("no/such/key")
    with pytest.raises(NotFound):
        await store.read_range("no/such/key", 0, 10)
    with pytest.raises(NotFound):
        await store.size("no/such/key")
    await store.delete("no/such/key")
    assert await keys(store, "no/") == []


async def test_read_range(store: Store) -> None:
    data = bytes(range(256)) * 40
    await store.put("r/obj", data)
    assert await store.read_range("r/obj", 0, 10) == data[:10]
    assert await store.read_range("r/obj", 100, 1000) == data[100:1100]
    assert await store.read_range("r/obj", len(data) - 5, 100) == data[-5:]  # short at the end
    assert await store.read_range("r/obj", len(data), 10) == b""
    assert await store.read_range("r/obj", len(data) + 100, 10) == b""


async def test_list_is_sorted_and_prefixed(store: Store) -> None:
    names = [
        "parts/0001/log/0000000000000002",
        "parts/0001/log/0000000000000010",
        "parts/0001/log/0000000000000001",
        "parts/0001/ckpt/0000000000000001",
        "parts/0002/log/0000000000000001",
        "parts/0001-x",
        "parts/0001.y",
        "parts/00010/log/0000000000000001",
        "blobs/0001/zz",
        "blobs/0001/a=b",
        "top",
    ]
    await asyncio.gather(*(store.put(n, n.encode()) for n in names))
    assert await keys(store, "") == sorted(names)
    assert await keys(store, "parts/0001/log/") == sorted(n for n in names if "0001/log/" in n)
    assert await keys(store, "parts/0001") == sorted(n for n in names if n.startswith("parts/0001"))
    assert await keys(store, "parts/0001/") == sorted(
        n for n in names if n.startswith("parts/0001/")
    )
    assert await keys(store, "parts/0001/log/000000000000000") == [
        "parts/0001/log/0000000000000001",
        "parts/0001/log/0000000000000002",
    ]
    assert await keys(store, "blobs/") == ["blobs/0001/a=b", "blobs/0001/zz"]
    assert await keys(store, "nothing/") == []
    await store.delete("parts/0001/log/0000000000000002")
    assert "parts/0001/log/0000000000000002" not in await keys(store, "parts/")


async def test_if_absent(store: Store) -> None:
    await store.put("fence/1", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        await store.put("fence/1", b"second", if_absent=True)
    assert await store.get("fence/1") == b"first"


async def test_if_absent_is_atomic_under_concurrency(opener: Opener) -> None:
    """24 concurrent creators over 4 separate clients (connections): exactly one wins,
    and the value is the winner's."""
    clients = [await opener.open() for _ in range(4)]
    for round_ in range(3):
        key = f"parts/0007/log/{round_:016d}"
        attempts = [
            clients[i % 4].put(key, f"writer-{i}".encode(), if_absent=True) for i in range(24)
        ]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        winners = [i for i, r in enumerate(results) if isinstance(r, str)]
        losers = [r for r in results if isinstance(r, PreconditionFailed)]
        assert len(winners) == 1, results
        assert len(losers) == 23, results
        assert await clients[0].get(key) == f"writer-{winners[0]}".encode()
    assert len(await keys(clients[1], "parts/0007/log/")) == 3


async def test_if_match(store: Store) -> None:
    e1 = await store.put("doc", b"v1", if_absent=True)
    e2 = await store.put("doc", b"v2", if_match=e1)
    assert await store.get("doc") == b"v2"
    with pytest.raises(PreconditionFailed):
        await store.put("doc", b"v3", if_match=e1)  # stale etag
    assert await store.get("doc") == b"v2"
    with pytest.raises(PreconditionFailed):
        await store.put("missing-doc", b"x", if_match=e2)
    with pytest.raises(NotFound):
        await store.get("missing-doc")
    e3 = await store.put("doc", b"v3", if_match=e2)
    assert e3 != e2


async def test_if_match_concurrent_compare_and_swap(opener: Opener) -> None:
    """Read-modify-write counters from 3 clients: no increment is lost."""
    clients = [await opener.open() for _ in range(3)]
    # the Store protocol has no "get etag": each writer records the etag its put returned
    # for its (unique) value; a writer whose etag is stale is refused and retries
    etags = {0: await clients[0].put("counter", b"0", if_absent=True)}

    async def bump(s: Store, me: int) -> int:
        tries = 0
        while True:
            tries += 1
            cur = int(await s.get("counter"))
            if cur not in etags:  # its writer has not heard back yet
                await asyncio.sleep(0.001)
                continue
            try:
                etags[cur + 1] = await s.put("counter", str(cur + 1).encode(), if_match=etags[cur])
                return tries
            except PreconditionFailed:
                await asyncio.sleep(0.001 * me)

    await asyncio.gather(*(bump(clients[i % 3], i) for i in range(12)))
    assert int(await clients[0].get("counter")) == 12


async def test_put_stream_large_value(store: Store) -> None:
    """20 MiB in 1 MiB chunks: striped over RADOS objects, multipart on S3."""
    data = os.urandom(20 << 20)
    assert await store.put_stream("blobs/0003/big", chunks_of(data, 1 << 20)) == len(data)
    assert await store.size("blobs/0003/big") == len(data)
    got = await store.get("blobs/0003/big")
    assert len(got) == len(data) and got == data
    for start, n in [(0, 1 << 20), ((4 << 20) - 10, 20), ((9 << 20) + 7, 5 << 20),
                     (len(data) - 3, 1 << 20), (1, len(data))]:  # fmt: skip
        assert await store.read_range("blobs/0003/big", start, n) == data[start : start + n]
    # replaced by a small value, then deleted: nothing of the large one is left visible
    await store.put("blobs/0003/big", b"small")
    assert await store.get("blobs/0003/big") == b"small"
    assert await store.read_range("blobs/0003/big", 0, 1 << 20) == b"small"
    await store.delete("blobs/0003/big")
    assert await keys(store, "blobs/") == []


async def test_put_large_value_with_conditions(store: Store) -> None:
    data = os.urandom(9 << 20)
    e = await store.put("ckpt/big", data, if_absent=True)
    with pytest.raises(PreconditionFailed):
        await store.put("ckpt/big", b"x", if_absent=True)
    assert await store.get("ckpt/big") == data
    data2 = os.urandom(6 << 20)
    await store.put("ckpt/big", data2, if_match=e)
    assert await store.get("ckpt/big") == data2
    with pytest.raises(PreconditionFailed):
        await store.put("ckpt/big", data, if_match=e)
    assert await store.get("ckpt/big") == data2


async def test_put_stream_small_and_empty(store: Store) -> None:
    assert await store.put_stream("s/one", chunks_of(b"abc" * 1000, 7)) == 3000
    assert await store.get("s/one") == b"abc" * 1000

    async def nothing() -> AsyncIterator[bytes]:
        return
        yield b""

    assert await store.put_stream("s/empty", nothing()) == 0
    assert await store.get("s/empty") == b""
    assert await keys(store, "s/") == ["s/empty", "s/one"]


async def test_operation_log_fences_a_zombie(opener: Opener) -> None:
    """The real consumer: PartitionLog over the backend; a second owner fences the log
    and the first one's next append fails, with every acknowledged record recovered."""
    a_store, b_store = await opener.open(), await opener.open()
    a = PartitionLog(a_store, 5, "server-a")
    await a.recover(1)
    for i in range(5):
        await a.append([{"op": "put", "k": f"k{i}"}])
    await a.checkpoint({"objects": 5})
    await a.append([{"op": "put", "k": "after-ckpt"}])
    b = PartitionLog(b_store, 5, "server-b")
    rec = await b.recover(2)
    assert rec.checkpoint == {"objects": 5}
    assert [r["k"] for r in rec.records] == ["after-ckpt"]
    with pytest.raises(Fenced):
        await a.append([{"op": "put", "k": "zombie"}])
    await b.append([{"op": "put", "k": "b1"}])
    epochs = await segment_epochs(b_store, 5)
    assert [e for _s, e, _k in epochs] == [1, 2, 2]
    rec = await PartitionLog(a_store, 5, "server-c").recover(3)
    assert [r["k"] for r in rec.records] == ["after-ckpt", "b1"]
