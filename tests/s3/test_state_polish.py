"""PartitionState records added for issue 5's polish: ``acl`` and drop tombstones."""

from __future__ import annotations

from cohort.server.state import DROP_MEMORY, ObjectMeta, PartitionState, meta_to_wire


def _put(b: str, k: str, blob: str, rid: str) -> dict[str, object]:
    m = ObjectMeta(size=1, etag="e", mtime=1.0, blob=blob, headers={"Cache-Control": "x"})
    return {"op": "put", "b": b, "k": k, "m": meta_to_wire(m), "rid": rid}


def test_acl_record_rewrites_metadata_only() -> None:
    s = PartitionState()
    s.apply(_put("b", "k", "blob1", "r1"))
    assert s.apply({"op": "acl", "b": "b", "k": "k", "acl": "public-read", "rid": "r2"}) == []
    m = s.get("b", "k")
    assert (
        m is not None
        and m.blob == "blob1"
        and m.headers
        == {
            "Cache-Control": "x",
            "x-amz-acl": "public-read",
        }
    )
    s.apply({"op": "acl", "b": "b", "k": "k", "acl": "private", "rid": "r3"})
    m = s.get("b", "k")
    assert m is not None and "x-amz-acl" not in m.headers
    # missing object: nothing happens; the record survives a checkpoint round trip
    s.apply({"op": "acl", "b": "b", "k": "nope", "acl": "public-read", "rid": "r4"})
    assert s.get("b", "nope") is None
    again = PartitionState.from_checkpoint(s.to_checkpoint())
    assert again.get("b", "k") == s.get("b", "k")


def test_drop_tombstone_discards_stragglers() -> None:
    s = PartitionState()
    s.apply(_put("b", "k", "blob1", "r1"))
    s.apply(
        {
            "op": "mpu_create",
            "b": "b",
            "k": "u",
            "u": "U",
            "m": meta_to_wire(ObjectMeta(size=0, etag="", mtime=0.0, blob=None)),
            "t": 1.0,
        }
    )
    s.apply({"op": "mpu_part", "b": "b", "u": "U", "n": 1, "p": [1, "e", "part1", 1.0, {}]})
    freed = s.apply({"op": "drop", "b": "b", "t": 1000.0})
    assert sorted(freed) == ["blob1", "part1"]
    assert s.apply(_put("b", "late", "blob2", "r2")) == ["blob2"]
    assert s.get("b", "late") is None
    s.apply(
        {
            "op": "mpu_create",
            "b": "b",
            "k": "u",
            "u": "V",
            "m": meta_to_wire(ObjectMeta(size=0, etag="", mtime=0.0, blob=None)),
            "t": 2.0,
        }
    )
    assert s.upload("b", "V") is None
    # tombstones are checkpointed, and forgotten after DROP_MEMORY
    again = PartitionState.from_checkpoint(s.to_checkpoint())
    assert again.apply(_put("b", "later", "blob3", "r3")) == ["blob3"]
    again.apply({"op": "drop", "b": "other", "t": 1000.0 + DROP_MEMORY + 1})
    assert "b" not in again.dropped and "other" in again.dropped
