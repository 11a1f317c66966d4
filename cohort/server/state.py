"""A partition's object metadata: a pure state machine fed by log records.

``PartitionState.apply(record)`` is the only way state changes, both when a server commits
new records and when a new owner replays the log; so replay reproduces exactly what was
acknowledged.  Keys of each bucket are kept in a ``SortedDict`` so listings walk a sorted
index instead of sorting, which keeps them fast with millions of keys.

Records (msgpack maps)::

    {"op": "put", "b": bucket_id, "k": key, "m": ObjectMeta-as-list, "rid": request_id}
    {"op": "del", "b": bucket_id, "k": key, "rid": request_id}
    {"op": "drop", "b": bucket_id, "t": time}  # bucket deleted: forget its keys
    {"op": "mpu_create", "b", "k", "u": upload_id, "m": ObjectMeta template, "t": time}
    {"op": "mpu_part", "b", "k", "u", "n": part_number, "p": Part}  # "k": since issue 12
    {"op": "mpu_complete", "b", "k", "u", "m": final ObjectMeta}   # uses the listed parts
    {"op": "mpu_abort", "b", "u"}
    {"op": "acl", "b", "k", "acl": canned ACL or None, "rid"}  # rewrite the object's ACL

``rid`` makes a retried request idempotent: a record whose ``rid`` was already applied is
skipped (see :meth:`PartitionState.seen`).

Blobs are immutable and never reused, so a blob that ``apply`` returns as freed is garbage
for good; the owner deletes it only once no reader can still need it (see
:class:`cohort.server.host.BlobReclaimer` and :func:`blob_grace`).
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import msgspec
from sortedcontainers import SortedDict

RID_MEMORY = 50_000
# how long a partition remembers a dropped bucket id, so a PUT that was in flight while
# its bucket was deleted is discarded (with its blob) when its record arrives
DROP_MEMORY = 86_400.0


DEFAULT_BLOB_GRACE = 30.0


def blob_grace() -> float:
    """Seconds a blob freed by a record stays readable at least (env ``COHORT_BLOB_GRACE``,
    default 30).  Servers delete no freed blob sooner, nor while a reader holds a lease on
    it; a director finishes every read that holds no lease within half this time of its
    metadata lookup, and leases anything longer.  Directors and servers must agree on it
    (a director that believes it longer risks failed reads, never wrong data: blob names
    are never reused)."""
    try:
        v = float(os.environ.get("COHORT_BLOB_GRACE", DEFAULT_BLOB_GRACE))
    except ValueError:
        return DEFAULT_BLOB_GRACE
    return v if v > 0 else DEFAULT_BLOB_GRACE


class ObjectMeta(msgspec.Struct, array_like=True, gc=False):
    size: int
    etag: str  # quoted-less hex md5 (or md5-of-md5s-N for multipart)
    mtime: float  # seconds since the epoch
    blob: str | None  # storage key of the body; None for an empty object
    content_type: str = "binary/octet-stream"
    user_meta: dict[str, str] = {}
    checksums: dict[str, str] = {}
    headers: dict[str, str] = {}  # Cache-Control, Content-Disposition, Content-Encoding, ...
    parts: int = 0
    # multipart objects: the body is the concatenation of these (blob, size) segments
    segments: list[tuple[str, int]] = []

    def blobs(self) -> list[str]:
        out = [self.blob] if self.blob else []
        out.extend(b for b, _ in self.segments)
        return out


class Part(msgspec.Struct, array_like=True, gc=False):
    size: int
    etag: str
    blob: str | None
    mtime: float
    checksums: dict[str, str] = {}


class Upload(msgspec.Struct, gc=False):
    key: str
    initiated: float
    meta: ObjectMeta  # template: content type, user metadata, headers, checksum algorithm
    parts: dict[int, Part] = {}


def with_acl(meta: ObjectMeta, acl: str | None) -> ObjectMeta:
    """``meta`` with its canned ACL replaced (private or None: no header)."""
    headers = {k: v for k, v in meta.headers.items() if k != "x-amz-acl"}
    if acl not in (None, "private"):
        headers["x-amz-acl"] = str(acl)
    return msgspec.structs.replace(meta, headers=headers)


_meta_dec = msgspec.msgpack.Decoder(ObjectMeta)
_meta_enc = msgspec.msgpack.Encoder()


def meta_from_wire(obj: Any) -> ObjectMeta:
    return msgspec.convert(obj, ObjectMeta)


def meta_to_wire(m: ObjectMeta) -> list[Any]:
    return msgspec.to_builtins(m)  # type: ignore[no-any-return]


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


class PartitionState:
    def __init__(self) -> None:
        self.buckets: dict[str, SortedDict] = {}
        self.uploads: dict[str, dict[str, Upload]] = {}  # bucket id -> upload id -> upload
        self.rids: OrderedDict[str, None] = OrderedDict()
        self.ops_applied = 0
        self.dropped: dict[str, float] = {}  # deleted bucket id -> when it was dropped

    # -- mutation --------------------------------------------------------------------------
    def seen(self, rid: str | None) -> bool:
        return rid is not None and rid in self.rids

    def apply(self, rec: dict[str, Any]) -> list[str]:
        """Apply one record; returns blob keys that are no longer referenced."""
        rid = rec.get("rid")
        if rid is not None:
            if rid in self.rids:
                return []
            self.rids[rid] = None
            if len(self.rids) > RID_MEMORY:
                self.rids.popitem(last=False)
        self.ops_applied += 1
        op = rec["op"]
        freed: list[str] = []
        if op == "put" or op == "mpu_complete":
            if op == "mpu_complete":
                up = self.uploads.get(rec["b"], {}).pop(rec["u"], None)
                if up is None:
                    return []  # completed or aborted already (a replayed duplicate)
                meta = meta_from_wire(rec["m"])
                used = {b for b, _ in meta.segments}
                freed.extend(p.blob for p in up.parts.values() if p.blob and p.blob not in used)
            else:
                meta = meta_from_wire(rec["m"])
                if rec["b"] in self.dropped:  # a straggler into a deleted bucket
                    freed.extend(meta.blobs())
                    return freed
            objs = self.buckets.get(rec["b"])
            if objs is None:
                objs = self.buckets[rec["b"]] = SortedDict()
            old = objs.get(rec["k"])
            objs[rec["k"]] = meta
            if old is not None:
                keep = set(meta.blobs())
                freed.extend(b for b in old.blobs() if b not in keep)
        elif op == "del":
            objs = self.buckets.get(rec["b"])
            if objs is not None:
                old = objs.pop(rec["k"], None)
                if old is not None:
                    freed.extend(old.blobs())
                if not objs:
                    del self.buckets[rec["b"]]
        elif op == "drop":
            t = float(rec.get("t", 0.0))
            self.dropped[rec["b"]] = t
            for b in [b for b, when in self.dropped.items() if when < t - DROP_MEMORY]:
                del self.dropped[b]
            objs = self.buckets.pop(rec["b"], None)
            if objs:
                for m in objs.values():
                    freed.extend(m.blobs())
            for up in self.uploads.pop(rec["b"], {}).values():
                freed.extend(p.blob for p in up.parts.values() if p.blob)
        elif op == "acl":
            objs = self.buckets.get(rec["b"])
            cur = None if objs is None else objs.get(rec["k"])
            if objs is not None and cur is not None:
                objs[rec["k"]] = with_acl(cur, rec.get("acl"))
        elif op == "mpu_create":
            if rec["b"] in self.dropped:
                return freed  # the bucket was deleted meanwhile: no such upload
            self.uploads.setdefault(rec["b"], {})[rec["u"]] = Upload(
                key=rec["k"], initiated=float(rec["t"]), meta=meta_from_wire(rec["m"]), parts={}
            )
        elif op == "mpu_part":
            up = self.uploads.get(rec["b"], {}).get(rec["u"])
            part = msgspec.convert(rec["p"], Part)
            if up is None:
                # The upload is gone (completed or aborted) before this part landed: the
                # part is garbage, unless (a record written before the owner checked
                # parts against queued records) the completed object uses its blob.
                if part.blob and part.blob not in self._object_blobs(rec["b"], rec.get("k")):
                    freed.append(part.blob)
                return freed
            old_part = up.parts.get(int(rec["n"]))
            up.parts[int(rec["n"])] = part
            if old_part is not None and old_part.blob and old_part.blob != part.blob:
                freed.append(old_part.blob)
        elif op == "mpu_abort":
            up = self.uploads.get(rec["b"], {}).pop(rec["u"], None)
            if up is not None:
                freed.extend(p.blob for p in up.parts.values() if p.blob)
        else:
            raise ValueError(f"unknown log record op {op!r}")
        return freed

    def _object_blobs(self, bucket_id: str, key: str | None) -> list[str]:
        if key is None:
            return []
        m = self.get(bucket_id, key)
        return [] if m is None else m.blobs()

    # -- queries ---------------------------------------------------------------------------
    def get(self, bucket_id: str, key: str) -> ObjectMeta | None:
        objs = self.buckets.get(bucket_id)
        return None if objs is None else objs.get(key)

    def upload(self, bucket_id: str, upload_id: str) -> Upload | None:
        return self.uploads.get(bucket_id, {}).get(upload_id)

    def count(self, bucket_id: str) -> int:
        objs = self.buckets.get(bucket_id)
        return 0 if objs is None else len(objs)

    def object_count(self) -> int:
        return sum(len(o) for o in self.buckets.values())

    def list(
        self,
        bucket_id: str,
        prefix: str = "",
        delimiter: str = "",
        start_after: str = "",
        limit: int = 1000,
    ) -> list[tuple[str, ObjectMeta | None]]:
        """Up to ``limit`` entries of :meth:`iter_list`."""
        if limit <= 0:
            return []
        return list(
            itertools.islice(self.iter_list(bucket_id, prefix, delimiter, start_after), limit)
        )

    def iter_list(
        self, bucket_id: str, prefix: str = "", delimiter: str = "", start_after: str = ""
    ) -> Iterator[tuple[str, ObjectMeta | None]]:
        """Entries after ``start_after`` in key order, lazily (a merge of many partitions
        pulls only what it uses).

        An entry is ``(key, meta)`` or, with a delimiter, ``(common_prefix, None)`` for the
        first key that rolls up into that prefix (later keys under it are skipped by a
        seek, not a scan).  If ``start_after`` is itself a common prefix (it ends with the
        delimiter), keys under it are skipped too, so a listing can resume after a prefix.
        """
        objs = self.buckets.get(bucket_id)
        if objs is None:
            return
        lo = prefix
        if start_after >= lo:
            lo = start_after
            if delimiter and start_after.endswith(delimiter) and start_after.startswith(prefix):
                end = _prefix_end(start_after)
                if end is None:
                    return
                lo = end
        hi = _prefix_end(prefix) if prefix else None
        plen = len(prefix)
        dlen = len(delimiter)
        while True:
            it = objs.irange(minimum=lo, maximum=hi, inclusive=(True, False))
            for key in it:
                if key == start_after:
                    continue
                if delimiter:
                    j = key.find(delimiter, plen)
                    if j >= 0:
                        cp = key[: j + dlen]
                        yield cp, None
                        end = _prefix_end(cp)
                        if end is None:
                            return
                        lo = end  # seek past everything under this prefix
                        break
                yield key, objs[key]
            else:
                return

    # -- checkpoints -----------------------------------------------------------------------
    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "buckets": {
                b: [[k, meta_to_wire(m)] for k, m in objs.items()]
                for b, objs in self.buckets.items()
            },
            "uploads": {
                b: {u: msgspec.to_builtins(up) for u, up in ups.items()}
                for b, ups in self.uploads.items()
            },
            "rids": list(self.rids.keys())[-RID_MEMORY:],
            "dropped": dict(self.dropped),
            "ops": self.ops_applied,
        }

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any] | None) -> PartitionState:
        s = cls()
        if not data:
            return s
        for b, items in data.get("buckets", {}).items():
            s.buckets[b] = SortedDict((k, meta_from_wire(m)) for k, m in items)
        for b, ups in data.get("uploads", {}).items():
            s.uploads[b] = {u: msgspec.convert(up, Upload) for u, up in ups.items()}
        s.rids = OrderedDict((r, None) for r in data.get("rids", []))
        s.ops_applied = int(data.get("ops", 0))
        s.dropped = {b: float(t) for b, t in data.get("dropped", {}).items()}
        return s
