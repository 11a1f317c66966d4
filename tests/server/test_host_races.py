"""PartitionHost: checks made in ``commit``'s ``prepare`` see every queued record, and
the blob reclaimer (grace period, reader leases, hand-over).  No cluster: a real
LocalStore and log, one host."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cohort.rpc import RpcError
from cohort.server.host import BlobReclaimer, PartitionHost
from cohort.server.service import check_condition, complete_upload
from cohort.server.state import ObjectMeta, meta_to_wire
from cohort.storage.local import LocalStore


def _part(blob: str, etag: str = "e" * 32) -> list[Any]:
    return [100, etag, blob, 0.0, {}]


async def _host(tmp_path: Path, freed: list[str]) -> PartitionHost:
    h = PartitionHost(LocalStore(str(tmp_path)), 0, "s1", 1, freed.extend, grace=5.0)
    await h.recover()
    return h


async def _create(h: PartitionHost) -> None:
    tmpl = meta_to_wire(ObjectMeta(size=0, etag="", mtime=0.0, blob=None))
    await h.commit(
        {"op": "mpu_create", "b": "b", "k": "k", "u": "u", "m": tmpl, "t": 0.0, "rid": "u"}
    )
    await h.commit(
        {"op": "mpu_part", "b": "b", "k": "k", "u": "u", "n": 1, "p": _part("A"), "rid": "r1"}
    )


def _complete(h: PartitionHost, rec: dict[str, Any]) -> Any:
    def prepare() -> None:
        up = h.upload("b", "u")
        if up is None:
            raise RpcError("NoSuchUpload", "gone")
        rec["m"] = meta_to_wire(complete_upload(up, [(1, "e" * 32)]))

    return prepare


async def test_a_completion_uses_the_part_re_uploaded_while_it_was_queued(tmp_path: Path) -> None:
    freed: list[str] = []
    h = await _host(tmp_path, freed)
    await _create(h)
    # a re-upload of part 1 (blob B) is queued, not applied, when the completion comes
    reupload = asyncio.create_task(
        h.commit(
            {"op": "mpu_part", "b": "b", "k": "k", "u": "u", "n": 1, "p": _part("B"), "rid": "r2"}
        )
    )
    await asyncio.sleep(0)
    assert h.state.upload("b", "u").parts[1].blob == "A"  # type: ignore[union-attr]
    rec: dict[str, Any] = {"op": "mpu_complete", "b": "b", "k": "k", "u": "u", "rid": "c"}
    assert await h.commit(rec, _complete(h, rec))
    await reupload
    obj = h.state.get("b", "k")
    assert obj is not None and obj.segments == [("B", 100)]
    assert freed == ["A"]  # the replaced part; never the blob the object uses


async def test_a_part_queued_after_a_completion_is_refused(tmp_path: Path) -> None:
    freed: list[str] = []
    h = await _host(tmp_path, freed)
    await _create(h)
    rec: dict[str, Any] = {"op": "mpu_complete", "b": "b", "k": "k", "u": "u", "rid": "c"}
    done = asyncio.create_task(h.commit(rec, _complete(h, rec)))
    await asyncio.sleep(0)
    assert h.upload("b", "u") is None  # the queued completion ends it

    def exists() -> None:
        if h.upload("b", "u") is None:
            raise RpcError("NoSuchUpload", "gone")

    with pytest.raises(RpcError, match="gone"):
        await h.commit(
            {"op": "mpu_part", "b": "b", "k": "k", "u": "u", "n": 1, "p": _part("C"), "rid": "r3"},
            exists,
        )
    await done
    assert h.state.get("b", "k").segments == [("A", 100)]  # type: ignore[union-attr]


async def test_a_stale_part_record_never_frees_a_blob_the_object_uses(tmp_path: Path) -> None:
    """Defence in depth for logs written before the fix: a part record applied after
    the completion frees its blob only if the completed object does not use it."""
    freed: list[str] = []
    h = await _host(tmp_path, freed)
    await _create(h)
    rec: dict[str, Any] = {"op": "mpu_complete", "b": "b", "k": "k", "u": "u", "rid": "c"}
    await h.commit(rec, _complete(h, rec))
    h.state.apply(
        {"op": "mpu_part", "b": "b", "k": "k", "u": "u", "n": 1, "p": _part("A"), "rid": "x"}
    )
    assert "A" not in h.state.apply(
        {"op": "mpu_part", "b": "b", "k": "k", "u": "u", "n": 1, "p": _part("A"), "rid": "y"}
    )
    assert h.state.apply(
        {"op": "mpu_part", "b": "b", "k": "k", "u": "u", "n": 1, "p": _part("D"), "rid": "z"}
    ) == ["D"]


async def test_conditional_puts_checked_after_the_conversion_to_exclusive(tmp_path: Path) -> None:
    """A shared partition converts back to EX before a write (an await); two racing
    If-None-Match: * PUTs must see each other."""
    h = await _host(tmp_path, [])
    h.shared = True

    async def make_exclusive() -> None:
        await asyncio.sleep(0.05)  # the DLM revokes the read replicas
        h.shared = False

    h.make_exclusive = make_exclusive

    async def put(i: int) -> str:
        m = meta_to_wire(ObjectMeta(size=1, etag=f"{i:032x}", mtime=0.0, blob=f"blob{i}"))

        def prepare() -> None:
            check_condition(h.current("b", "once"), {"if_none_match": "*"})

        try:
            await h.commit({"op": "put", "b": "b", "k": "once", "m": m, "rid": f"p{i}"}, prepare)
            return "ok"
        except RpcError as e:
            return e.code

    outcomes = await asyncio.gather(*(put(i) for i in range(5)))
    assert sorted(outcomes) == ["PreconditionFailed"] * 4 + ["ok"]


async def test_current_follows_queued_drops_deletes_acls_and_retries(tmp_path: Path) -> None:
    h = await _host(tmp_path, [])
    m = meta_to_wire(ObjectMeta(size=1, etag="1" * 32, mtime=0.0, blob="x"))
    await h.commit({"op": "put", "b": "b", "k": "k", "m": m, "rid": "p1"})
    h._pending.append(({"op": "acl", "b": "b", "k": "k", "acl": "public-read", "rid": "a"}, None))  # type: ignore[arg-type]
    cur = h.current("b", "k")
    assert cur is not None and cur.headers["x-amz-acl"] == "public-read"
    # a retry of the applied PUT takes no effect; a delete does
    h._pending.append(({"op": "put", "b": "b", "k": "k", "m": m, "rid": "p1"}, None))  # type: ignore[arg-type]
    h._pending.append(({"op": "del", "b": "b", "k": "k", "rid": "d"}, None))  # type: ignore[arg-type]
    assert h.current("b", "k") is None
    h._pending.append(({"op": "drop", "b": "b", "t": 1.0}, None))  # type: ignore[arg-type]
    h._pending.append(({"op": "put", "b": "b", "k": "k", "m": m, "rid": "p2"}, None))  # type: ignore[arg-type]
    assert h.current("b", "k") is None  # a PUT into a dropped bucket is discarded
    h._pending.clear()


# -- the reclaimer ---------------------------------------------------------------------------


def test_a_freed_blob_waits_the_grace_period_and_every_lease() -> None:
    r = BlobReclaimer(10.0, now=0.0)
    r.not_before = 0.0
    r.free(["a", "b"], now=1.0)
    assert r.due(now=10.9) == []
    assert r.lease(["b"], 60.0, now=5.0) == 10.0  # at most the grace period
    assert r.due(now=11.0) == ["a"]
    assert r.busy("b", now=11.0) and not r.busy("a", now=11.0)
    assert r.lease(["b"], 10.0, now=14.0) == 10.0  # renewed
    assert r.due(now=20.0) == []
    assert r.due(now=24.0) == ["b"]
    assert r.pending() == 0 and r.due(now=100.0) == []


def test_a_new_owner_deletes_nothing_in_its_first_grace_period() -> None:
    r = BlobReclaimer(10.0, now=100.0)
    assert r.busy("orphan", now=105.0) and not r.busy("orphan", now=110.0)
    r.free(["x"], now=100.0)
    assert r.due(now=109.0) == [] and r.due(now=110.0) == ["x"]


def test_the_queue_moves_with_the_partition() -> None:
    old = BlobReclaimer(10.0, now=0.0)
    old.not_before = 0.0
    old.free(["a"], now=0.0)
    old.free(["b"], now=5.0)
    old.lease(["a"], 10.0, now=8.0)  # leased until 18
    items = old.export(now=9.0)
    assert items == [["a", 9.0], ["b", 6.0]]
    new = BlobReclaimer(10.0, now=50.0)
    new.load(items, now=50.0)
    assert new.busy("a", now=55.0)
    assert new.due(now=59.9) == []
    assert sorted(new.due(now=60.0)) == ["a", "b"]  # not before the new owner's grace


async def test_a_graceful_hand_over_passes_the_reclaim_queue_on(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    old = PartitionHost(store, 0, "s1", 1, lambda _f: None, grace=5.0)
    await old.recover()
    for blob in ("x", "y"):
        m = meta_to_wire(ObjectMeta(size=1, etag="1" * 32, mtime=0.0, blob=blob))
        await old.commit({"op": "put", "b": "b", "k": "k", "m": m, "rid": blob})
    assert old.reclaim.pending() == 1  # "x", replaced by "y"
    await old.close(graceful=True)
    new = PartitionHost(store, 0, "s2", 2, lambda _f: None, grace=5.0)
    await new.recover()
    assert new.reclaim.pending() == 1 and new.reclaim.busy("x")
    assert new.reclaim.due() == []  # not within the new owner's first grace period
    assert new.reclaim.due(now=new.reclaim.not_before + 0.1) == ["x"]
