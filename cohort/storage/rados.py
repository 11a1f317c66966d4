"""Ceph RADOS backend of the :class:`~cohort.storage.base.Store` protocol (``python3-rados``).

Ceph gives the bottom layer what seed 000 asks of Petal: replication across OSDs, online
growth, rebalancing and re-replication by itself.  This module maps the protocol onto
RADOS primitives, each a single atomic RADOS operation where the protocol needs atomicity.

**Objects.**  A key ``k`` (safe characters only, as for every backend) is the RADOS object
``k`` in the store's pool and namespace: the *head*.  The head holds a 32-byte header and
the value's first ``stripe`` bytes (4 MiB by default)::

    "Co" | format 1 | flags (1 = striped) | etag (16 random bytes) | size (u64) | stripe (u32)

A larger value continues in *stripe objects* ``~s/<k>/<etag hex>/<n>`` (n = 1, 2, ...), each
``stripe`` bytes, written before the head.  Names starting with ``~`` are never keys.

**Atomicity.**  The head is written with one RADOS write operation (``write_full`` of header
and first stripe, plus a guard), so a reader sees the old value or the new one:

* ``if_absent`` -> the write op starts with ``create(LIBRADOS_CREATE_EXCLUSIVE)``; a second
  creator gets ``EEXIST`` -> :class:`PreconditionFailed`.  This is the operation log's fence.
* ``if_match=etag`` -> ``cmpext(<current header>, 0)`` in the same write op: the OSD
  compares the stored header (which contains the etag) and applies the write only if it
  is unchanged (a compare-and-swap; python3-rados 16 has no ``cmpxattr`` in write ops,
  and the header makes the same check on the object's first bytes).
* A plain ``put`` is "create exclusive, else replace an unstriped value (``cmpext`` on the
  flags), else compare-and-swap on the header read", so the stripes of a replaced value
  are known exactly and deleted after the replacement.
* A reader of a striped value reads the head (header and first stripe in one read), then
  the stripe objects named by its etag; if one vanished (the value was replaced meanwhile)
  it starts over from the head.  A value is therefore never mixed from two versions.

Every write has been applied on all replicas of the pool when RADOS acknowledges it, which
is when ``put`` returns (durable, as the protocol requires).

**Listings.**  RADOS's object listing is unordered and walks every object of the pool, so
by default (``listing=omap``) each directory ``d`` (a key's part before its last ``/``) has
an index object ``~i/<d>`` whose omap keys are the names in it (subdirectories as
``name/``); omap keys are kept sorted by the OSD, so ``list(prefix)`` reads one omap range
per directory and expands subdirectories in place, which is lexicographic order.  The index
entry is added *after* the head is written and removed *before* the head is deleted, so a
listing never names a key that does not exist; a crash between the two leaves a key that
exists unlisted, and the next ``put(if_absent)`` that finds it (the oplog's fence, which
then reads it) adds the entry again.  ``listing=scan`` instead lists and sorts every
object of the namespace (no second write per put; fine for small stores only).
bench/storage_backends.py measures both.

**I/O.**  ``io=aio`` (default) issues librados ``aio_*`` operations and bridges their
completions to asyncio futures, so many operations are in flight from one thread;
``io=sync`` runs the blocking calls in the default thread pool.  Listings always run in the
thread pool.

URL: ``rados://<pool>[/<namespace>]?conf=/etc/ceph/ceph.conf&id=admin&keyring=...
&stripe=4194304&listing=omap&io=aio&op_timeout=30`` (or ``mon_host=`` and ``key=`` instead of
a conf file).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cohort.storage.base import NotFound, PreconditionFailed, StoreError

_SAFE = re.compile(r"^[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*$")
HEADER = struct.Struct("<2sBB16sQI")
HEADER_SIZE = HEADER.size  # 32
MAGIC = b"Co"
FORMAT = 1
FLAG_STRIPED = 1
UNSTRIPED_PREFIX = MAGIC + bytes([FORMAT, 0])  # cmpext guard: "an unstriped value"
DEFAULT_STRIPE = 4 << 20
STORE_MARKER = "~cohort-store"

ENOENT = 2
EEXIST = 17
MAX_ERRNO = 4095  # cmpext mismatch: -(MAX_ERRNO + offset)

_OMAP_PAGE = 1000


def rados_module() -> Any:
    """Debian's ``rados`` module, or a StoreError saying how to get it."""
    try:
        return importlib.import_module("rados")
    except ImportError as e:
        raise StoreError(
            "the rados backend needs Ceph's Python binding: apt-get install python3-rados, "
            "then scripts/bootstrap.sh links it into .venv (it is not on PyPI)"
        ) from e


@dataclass(frozen=True)
class Header:
    striped: bool
    etag: bytes
    size: int
    stripe: int
    raw: bytes

    @property
    def n_stripes(self) -> int:
        """Stripe objects after the head."""
        if not self.striped:
            return 0
        return max(0, -(-self.size // self.stripe) - 1)


def _parse_header(key: str, data: bytes) -> Header:
    if len(data) < HEADER_SIZE:
        raise StoreError(f"{key}: not a Cohort value (short header)")
    magic, fmt, flags, etag, size, stripe = HEADER.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT or stripe <= 0:
        raise StoreError(f"{key}: not a Cohort value (header {data[:HEADER_SIZE]!r})")
    return Header(bool(flags & FLAG_STRIPED), etag, size, stripe, bytes(data[:HEADER_SIZE]))


def _mismatch(rc: int) -> bool:
    return rc <= -MAX_ERRNO


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise StoreError(f"rados {what}: {os.strerror(-rc) if rc > -MAX_ERRNO else rc} ({rc})")


def _dir_of(key: str) -> tuple[str, str]:
    d, _, name = key.rpartition("/")
    return d, name


def _index_oid(d: str) -> str:
    return f"~i/{d}"


# -- the two I/O styles: librados completions, or blocking calls in threads -----------------
class _Aio:
    """librados ``aio_*`` operations whose completions resolve asyncio futures."""

    def __init__(self, rados: Any, ioctx: Any) -> None:
        self.rados = rados
        self.io = ioctx

    @staticmethod
    def _resolver(
        loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]
    ) -> Callable[[Any], None]:
        def done(value: Any) -> None:
            if not fut.done():
                fut.set_result(value)

        def resolve(value: Any) -> None:
            loop.call_soon_threadsafe(done, value)

        return resolve

    async def read(self, oid: str, length: int, offset: int) -> tuple[int, bytes]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        resolve = self._resolver(loop, fut)

        def cb(comp: Any, data: bytes | None) -> None:
            rc = comp.get_return_value()
            # python3-rados 16 hands over its whole, uninitialised buffer when a read
            # returns 0 bytes (it resizes only for 0 < rc < length): keep rc bytes
            resolve((rc, (data or b"")[: max(rc, 0)]))

        self.io.aio_read(oid, length, offset, cb)
        return await fut

    async def operate(self, oid: str, build: Callable[[Any], None]) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        resolve = self._resolver(loop, fut)
        op = self.io.create_write_op()
        try:
            build(op)
            self.io.operate_aio_write_op(op, oid, lambda comp: resolve(comp.get_return_value()))
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self.io.release_write_op(op)
            else:  # cancelled while in flight: release once librados is done with it
                fut.add_done_callback(lambda _f: self.io.release_write_op(op))

    async def write_full(self, oid: str, data: bytes) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        resolve = self._resolver(loop, fut)
        self.io.aio_write_full(oid, data, lambda comp: resolve(comp.get_return_value()))
        return await fut

    async def remove(self, oid: str) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        resolve = self._resolver(loop, fut)
        self.io.aio_remove(oid, lambda comp: resolve(comp.get_return_value()))
        return await fut


class _Sync:
    """The same operations as blocking librados calls in the default thread pool."""

    def __init__(self, rados: Any, ioctx: Any) -> None:
        self.rados = rados
        self.io = ioctx
        self.mod = rados_module()

    def _rc(self, fn: Callable[[], Any]) -> tuple[int, Any]:
        try:
            return 0, fn()
        except self.mod.Error as e:
            errno = int(getattr(e, "errno", 0) or 0)
            return (-errno if errno else -5), None

    async def read(self, oid: str, length: int, offset: int) -> tuple[int, bytes]:
        rc, data = await asyncio.to_thread(self._rc, lambda: self.io.read(oid, length, offset))
        return rc, data or b""

    def _operate(self, oid: str, build: Callable[[Any], None]) -> int:
        op = self.io.create_write_op()
        try:
            build(op)
            rc, _ = self._rc(lambda: self.io.operate_write_op(op, oid))
            return rc
        finally:
            self.io.release_write_op(op)

    async def operate(self, oid: str, build: Callable[[Any], None]) -> int:
        return await asyncio.to_thread(self._operate, oid, build)

    async def write_full(self, oid: str, data: bytes) -> int:
        rc, _ = await asyncio.to_thread(self._rc, lambda: self.io.write_full(oid, data))
        return rc

    async def remove(self, oid: str) -> int:
        rc, _ = await asyncio.to_thread(self._rc, lambda: self.io.remove_object(oid))
        return rc


def _opt(q: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    v = q.get(name)
    return v[-1] if v else default


class RadosStore:
    """Shared storage in a Ceph pool (and namespace), through librados."""

    def __init__(
        self,
        pool: str,
        namespace: str = "",
        *,
        conf: str | None = None,
        client_id: str = "admin",
        keyring: str | None = None,
        mon_host: str | None = None,
        key: str | None = None,
        stripe: int = DEFAULT_STRIPE,
        listing: str = "omap",
        io: str = "aio",
        op_timeout: float = 30.0,
        window: int = 8,
    ) -> None:
        if listing not in ("omap", "scan"):
            raise StoreError("listing must be 'omap' or 'scan'")
        if io not in ("aio", "sync"):
            raise StoreError("io must be 'aio' or 'sync'")
        if not 4096 <= stripe <= 64 << 20:
            raise StoreError("stripe must be between 4 KiB and 64 MiB")
        self.pool = pool
        self.namespace = namespace
        self.stripe = stripe
        self.listing = listing
        self.io_mode = io
        self.window = max(1, window)  # stripes in flight per put_stream
        mod = rados_module()
        settings: dict[str, str] = {
            "admin_socket": "",  # many clients per machine: no socket collisions
            "log_file": "",
            "err_to_stderr": "false",
            "rados_osd_op_timeout": str(max(1, round(op_timeout))),
            "rados_mon_op_timeout": str(max(1, round(op_timeout))),
        }
        if keyring:
            settings["keyring"] = keyring
        if mon_host:
            settings["mon_host"] = mon_host
        if key:
            settings["key"] = key
        self._rados = mod.Rados(conffile=conf or "", rados_id=client_id, conf=settings)
        self._connected = False
        self._ioctx: Any = None
        self._ops: _Aio | _Sync | None = None
        self._indexed_dirs: set[str] = set()

    @classmethod
    def from_url(cls, url: str) -> RadosStore:
        """``rados://pool[/namespace]?conf=...&id=...&keyring=...&stripe=...&listing=...``"""
        u = urlsplit(url)
        if u.scheme != "rados" or not u.netloc:
            raise StoreError(f"not a rados URL: {url!r} (rados://pool[/namespace]?conf=...)")
        q = parse_qs(u.query)
        unknown = set(q) - {"conf", "id", "keyring", "mon_host", "key", "stripe", "listing",
                            "io", "op_timeout", "window"}  # fmt: skip
        if unknown:
            raise StoreError(f"unknown rados URL options: {sorted(unknown)}")
        return cls(
            unquote(u.netloc),
            unquote(u.path.lstrip("/")),
            conf=_opt(q, "conf"),
            client_id=_opt(q, "id", "admin") or "admin",
            keyring=_opt(q, "keyring"),
            mon_host=_opt(q, "mon_host"),
            key=_opt(q, "key"),
            stripe=int(_opt(q, "stripe", str(DEFAULT_STRIPE)) or DEFAULT_STRIPE),
            listing=_opt(q, "listing", "omap") or "omap",
            io=_opt(q, "io", "aio") or "aio",
            op_timeout=float(_opt(q, "op_timeout", "30") or 30),
            window=int(_opt(q, "window", "8") or 8),
        )

    # -- connection -----------------------------------------------------------------------
    def connect(self, timeout: float = 30.0) -> RadosStore:
        """Connect, open the pool and check the store's marker (blocking)."""
        if self._connected:
            return self
        mod = rados_module()
        try:
            self._rados.connect(timeout=int(timeout))
            self._connected = True
            self._ioctx = self._rados.open_ioctx(self.pool)
        except mod.ObjectNotFound as e:
            self.close()
            raise StoreError(f"rados pool {self.pool!r} does not exist") from e
        except mod.Error as e:
            self.close()
            raise StoreError(f"cannot connect to Ceph: {e}") from e
        self._ioctx.set_namespace(self.namespace)
        self._ops = (
            _Aio(self._rados, self._ioctx)
            if self.io_mode == "aio"
            else _Sync(self._rados, self._ioctx)
        )
        self._check_marker()
        return self

    async def open(self, timeout: float = 30.0) -> RadosStore:
        return await asyncio.to_thread(self.connect, timeout)

    def _check_marker(self) -> None:
        """A store's layout (listing mode) is fixed when it is first used: record it, and
        refuse a store opened with another (its listings would miss keys)."""
        mod = rados_module()
        want = {"format": FORMAT, "listing": self.listing}
        doc = json.dumps(want, sort_keys=True).encode()
        op = self._ioctx.create_write_op()
        try:
            op.new(mod.LIBRADOS_CREATE_EXCLUSIVE)
            op.write_full(doc)
            try:
                self._ioctx.operate_write_op(op, STORE_MARKER)
                return
            except mod.ObjectExists:
                pass
        finally:
            self._ioctx.release_write_op(op)
        found = json.loads(self._ioctx.read(STORE_MARKER, 4096, 0) or b"{}")
        if found.get("listing") != self.listing or found.get("format") != FORMAT:
            self.close()
            raise StoreError(
                f"rados pool {self.pool!r} namespace {self.namespace!r} holds a store made "
                f"with {found}, not {want}: open it with listing={found.get('listing')}"
            )

    def close(self) -> None:
        if self._ioctx is not None:
            with contextlib.suppress(Exception):
                self._ioctx.close()
            self._ioctx = None
        if self._connected:
            with contextlib.suppress(Exception):
                self._rados.shutdown()
            self._connected = False
        self._ops = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    @property
    def ops(self) -> _Aio | _Sync:
        if self._ops is None:
            self.connect()
        assert self._ops is not None
        return self._ops

    @staticmethod
    def check_key(key: str) -> None:
        if not _SAFE.match(key) or ".." in key.split("/"):
            raise StoreError(f"invalid storage key {key!r}")

    def _stripe_oid(self, key: str, etag: bytes, n: int) -> str:
        return f"~s/{key}/{etag.hex()}/{n}"

    # -- reads ---------------------------------------------------------------------------
    async def _read_header(self, key: str) -> Header | None:
        rc, data = await self.ops.read(key, HEADER_SIZE, 0)
        if rc == -ENOENT:
            return None
        _check(rc, f"read {key}")
        return _parse_header(key, data)

    async def _read_stripes(
        self, key: str, h: Header, first: int, last: int, start: int, end: int
    ) -> list[bytes] | None:
        """Bytes [start, end) of the value from stripe objects ``first..last``; None if
        one is gone (the value was replaced: start over)."""

        async def one(n: int) -> tuple[int, bytes]:
            lo = max(start, n * h.stripe) - n * h.stripe
            hi = min(end, (n + 1) * h.stripe) - n * h.stripe
            return await self.ops.read(self._stripe_oid(key, h.etag, n), hi - lo, lo)

        out: list[bytes] = []
        for base in range(first, last + 1, self.window):
            got = await asyncio.gather(
                *(one(n) for n in range(base, min(last, base + self.window - 1) + 1))
            )
            for rc, data in got:
                if rc == -ENOENT:
                    return None
                _check(rc, f"read stripe of {key}")
                out.append(data)
        return out

    async def get(self, key: str) -> bytes:
        value, _etag = await self.get_with_etag(key)
        return value

    async def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """Value and etag of one version, read atomically (stripes are named by the
        version's etag, and a head that changed under the read starts it over)."""
        self.check_key(key)
        for _attempt in range(20):
            rc, data = await self.ops.read(key, HEADER_SIZE + self.stripe, 0)
            if rc == -ENOENT:
                raise NotFound(key)
            _check(rc, f"read {key}")
            h = _parse_header(key, data)
            head = data[HEADER_SIZE:]
            if not h.striped:
                return head[: h.size], h.etag.hex()
            if h.stripe > self.stripe and len(head) < min(h.size, h.stripe):
                rc, data = await self.ops.read(key, HEADER_SIZE + h.stripe, 0)
                _check(rc, f"read {key}")
                if _parse_header(key, data).etag != h.etag:
                    continue
                head = data[HEADER_SIZE:]
            rest = await self._read_stripes(key, h, 1, h.n_stripes, h.stripe, h.size)
            if rest is None:
                continue
            return b"".join([head, *rest]), h.etag.hex()
        raise StoreError(f"{key}: value kept changing while it was read")

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        self.check_key(key)
        if start < 0 or length < 0:
            raise StoreError("negative range")
        if length == 0:
            await self.size(key)
            return b""
        end = start + length
        if end <= self.stripe:
            # wholly in the head (whatever the value's size): one read
            rc, data = await self.ops.read(key, length, HEADER_SIZE + start)
            if rc == -ENOENT:
                raise NotFound(key)
            _check(rc, f"read {key}")
            return data
        for _attempt in range(20):
            if start < self.stripe:
                rc, data = await self.ops.read(key, HEADER_SIZE + self.stripe, 0)
                if rc == -ENOENT:
                    raise NotFound(key)
                _check(rc, f"read {key}")
                h = _parse_header(key, data)
                head = data[HEADER_SIZE + start :]
            else:
                got = await self._read_header(key)
                if got is None:
                    raise NotFound(key)
                h, head = got, b""
            end = min(end, h.size)
            if not h.striped or end <= h.stripe:
                return head[: max(0, end - start)]
            first = max(1, start // h.stripe)
            rest = await self._read_stripes(key, h, first, (end - 1) // h.stripe, start, end)
            if rest is None:
                continue
            return b"".join([head, *rest])
        raise StoreError(f"{key}: value kept changing while it was read")

    async def size(self, key: str) -> int:
        self.check_key(key)
        h = await self._read_header(key)
        if h is None:
            raise NotFound(key)
        return h.size

    async def etag(self, key: str) -> str:
        """The current etag (not in the Store protocol: for read-modify-write callers)."""
        self.check_key(key)
        h = await self._read_header(key)
        if h is None:
            raise NotFound(key)
        return h.etag.hex()

    # -- writes --------------------------------------------------------------------------
    async def _write_stripe(self, key: str, etag: bytes, n: int, data: bytes) -> None:
        _check(await self.ops.write_full(self._stripe_oid(key, etag, n), data), "write stripe")

    async def _remove_stripes(self, key: str, etag: bytes, n_stripes: int) -> None:
        for base in range(1, n_stripes + 1, 32):
            await asyncio.gather(
                *(
                    self.ops.remove(self._stripe_oid(key, etag, n))
                    for n in range(base, min(n_stripes, base + 31) + 1)
                )
            )

    async def _add_index(self, key: str) -> None:
        if self.listing != "omap":
            return
        d, name = _dir_of(key)
        todo: list[tuple[str, str]] = [(d, name)]
        parent = d
        while parent and parent not in self._indexed_dirs:
            pd, pname = _dir_of(parent)
            todo.append((pd, pname + "/"))
            parent = pd

        async def add(dirname: str, entry: str) -> None:
            rc = await self.ops.operate(
                _index_oid(dirname), lambda op: self._ioctx.set_omap(op, (entry,), (b"",))
            )
            _check(rc, f"index {dirname}")

        await asyncio.gather(*(add(dd, e) for dd, e in todo))
        p = d
        while p and p not in self._indexed_dirs:
            self._indexed_dirs.add(p)
            p = _dir_of(p)[0]

    async def _remove_index(self, key: str) -> None:
        if self.listing != "omap":
            return
        d, name = _dir_of(key)
        rc = await self.ops.operate(
            _index_oid(d), lambda op: self._ioctx.remove_omap_keys(op, (name,))
        )
        if rc != -ENOENT:
            _check(rc, f"unindex {key}")

    async def _commit(
        self, key: str, head: bytes, etag: bytes, if_absent: bool, if_match: str | None
    ) -> Header | None:
        """Write the head atomically under the requested condition; returns the header of
        the value it replaced (None if there was none or it was unstriped)."""
        mod = rados_module()
        excl = mod.LIBRADOS_CREATE_EXCLUSIVE

        def create(op: Any) -> None:
            op.new(excl)
            op.write_full(head)

        def guarded(expect: bytes) -> Callable[[Any], None]:
            def build(op: Any) -> None:
                op.cmpext(expect, 0)
                op.write_full(head)

            return build

        if if_absent:
            rc = await self.ops.operate(key, create)
            if rc == -EEXIST:
                # the key exists: make sure it is listed (a writer may have died between
                # its head and its index entry), then refuse
                await self._add_index(key)
                raise PreconditionFailed(f"{key} exists")
            _check(rc, f"create {key}")
            return None
        if if_match is not None:
            try:
                want = bytes.fromhex(if_match)
            except ValueError:
                raise PreconditionFailed(f"{key}: etag {if_match!r} does not match") from None
            old = await self._read_header(key)
            if old is None:
                raise PreconditionFailed(f"{key} does not exist")
            if old.etag != want:
                raise PreconditionFailed(f"{key} changed")
            rc = await self.ops.operate(key, guarded(old.raw))
            if _mismatch(rc) or rc == -ENOENT:
                raise PreconditionFailed(f"{key} changed")
            _check(rc, f"replace {key}")
            return old if old.striped else None
        for _attempt in range(50):
            rc = await self.ops.operate(key, create)
            if rc == 0:
                return None
            if rc != -EEXIST:
                _check(rc, f"create {key}")
            rc = await self.ops.operate(key, guarded(UNSTRIPED_PREFIX))
            if rc == 0:
                return None
            if not _mismatch(rc):
                _check(rc, f"replace {key}")
            old = await self._read_header(key)
            if old is None:
                continue  # deleted meanwhile: create again
            rc = await self.ops.operate(key, guarded(old.raw))
            if rc == 0:
                return old if old.striped else None
            if not _mismatch(rc):
                _check(rc, f"replace {key}")
        raise StoreError(f"{key}: kept changing while it was replaced")

    def _header(self, etag: bytes, size: int) -> bytes:
        flags = FLAG_STRIPED if size > self.stripe else 0
        return HEADER.pack(MAGIC, FORMAT, flags, etag, size, self.stripe)

    async def _finish_put(
        self,
        key: str,
        etag: bytes,
        first: bytes,
        size: int,
        n_stripes: int,
        if_absent: bool,
        if_match: str | None,
    ) -> str:
        try:
            old = await self._commit(
                key, self._header(etag, size) + first, etag, if_absent, if_match
            )
        except BaseException:
            if n_stripes:
                with contextlib.suppress(Exception):
                    await self._remove_stripes(key, etag, n_stripes)
            raise
        await self._add_index(key)
        if old is not None and old.striped and old.etag != etag:
            await self._remove_stripes(key, old.etag, old.n_stripes)
        return etag.hex()

    async def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        self.check_key(key)
        if if_absent and if_match is not None:
            raise StoreError("if_absent and if_match together")
        data = bytes(data)
        etag = os.urandom(16)
        n_stripes = max(0, -(-len(data) // self.stripe) - 1)
        if n_stripes:
            try:
                for base in range(1, n_stripes + 1, self.window):
                    await asyncio.gather(
                        *(
                            self._write_stripe(
                                key, etag, n, data[n * self.stripe : (n + 1) * self.stripe]
                            )
                            for n in range(base, min(n_stripes, base + self.window - 1) + 1)
                        )
                    )
            except BaseException:
                with contextlib.suppress(Exception):
                    await self._remove_stripes(key, etag, n_stripes)
                raise
        return await self._finish_put(
            key, etag, data[: self.stripe], len(data), n_stripes, if_absent, if_match
        )

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Stripes are written as they fill (``window`` in flight); the head, holding the
        first stripe, is written last, so the value appears only once it is complete."""
        self.check_key(key)
        etag = os.urandom(16)
        buf = bytearray()
        first: bytes | None = None
        n = 0
        size = 0
        inflight: set[asyncio.Task[None]] = set()

        async def drain(limit: int) -> None:
            while len(inflight) > limit:
                done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    inflight.discard(t)
                    t.result()

        try:
            async for chunk in chunks:
                buf += chunk
                size += len(chunk)
                while len(buf) > self.stripe:
                    piece = bytes(buf[: self.stripe])
                    del buf[: self.stripe]
                    if first is None:
                        first = piece
                    else:
                        n += 1
                        inflight.add(asyncio.ensure_future(self._write_stripe(key, etag, n, piece)))
                        await drain(self.window - 1)
            if first is None:
                first = bytes(buf)
            elif buf:
                n += 1
                inflight.add(asyncio.ensure_future(self._write_stripe(key, etag, n, bytes(buf))))
            await drain(0)
        except BaseException:
            for t in inflight:
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._remove_stripes(key, etag, n)
            raise
        await self._finish_put(key, etag, first, size, n, False, None)
        return size

    async def delete(self, key: str) -> None:
        self.check_key(key)
        await self._remove_index(key)

        def remove_if(expect: bytes) -> Callable[[Any], None]:
            def build(op: Any) -> None:
                op.cmpext(expect, 0)
                op.remove()

            return build

        for _attempt in range(50):
            rc = await self.ops.operate(key, remove_if(UNSTRIPED_PREFIX))
            if rc in (0, -ENOENT):
                return
            if not _mismatch(rc):
                _check(rc, f"delete {key}")
            h = await self._read_header(key)
            if h is None:
                return
            rc = await self.ops.operate(key, remove_if(h.raw))
            if rc == 0:
                await self._remove_stripes(key, h.etag, h.n_stripes)
                return
            if not _mismatch(rc) and rc != -ENOENT:
                _check(rc, f"delete {key}")
        raise StoreError(f"{key}: kept changing while it was deleted")

    # -- listings ------------------------------------------------------------------------
    def _omap_names(self, d: str, name_prefix: str) -> list[str]:
        mod = rados_module()
        out: list[str] = []
        after = ""
        while True:
            with mod.ReadOpCtx() as op:
                it, _ret = self._ioctx.get_omap_vals(op, after, name_prefix, _OMAP_PAGE)
                try:
                    self._ioctx.operate_read_op(op, _index_oid(d))
                except mod.ObjectNotFound:
                    return out
                page = [k for k, _v in it]
            out.extend(page)
            if len(page) < _OMAP_PAGE:
                return out
            after = page[-1]

    def _list_omap(self, prefix: str) -> list[str]:
        d, name_prefix = _dir_of(prefix)
        out: list[str] = []

        def walk(dirname: str, name_prefix: str) -> None:
            for name in self._omap_names(dirname, name_prefix):
                full = f"{dirname}/{name}" if dirname else name
                if name.endswith("/"):
                    walk(full[:-1], "")
                else:
                    out.append(full)

        walk(d, name_prefix)
        return out

    def _list_scan(self, prefix: str) -> list[str]:
        keys = [
            o.key
            for o in self._ioctx.list_objects()
            if o.key.startswith(prefix) and not o.key.startswith("~")
        ]
        keys.sort()
        return keys

    async def list(self, prefix: str) -> AsyncIterator[str]:
        if self._ops is None:
            await self.open()
        fn = self._list_omap if self.listing == "omap" else self._list_scan
        for k in await asyncio.to_thread(fn, prefix):
            yield k

    # -- maintenance ----------------------------------------------------------------------
    def _sweep(self, older_than: float) -> int:
        """Remove stripe objects that no head refers to (left by a writer that crashed
        between its stripes and its head), if older than ``older_than`` seconds."""
        mod = rados_module()
        removed = 0
        now = time.time()
        for o in self._ioctx.list_objects():
            name: str = o.key
            if not name.startswith("~s/"):
                continue
            key, _, rest = name[3:].rpartition("/")
            key, _, etag_hex = key.rpartition("/")
            try:
                h = _parse_header(key, self._ioctx.read(key, HEADER_SIZE, 0))
                live = h.striped and h.etag.hex() == etag_hex and int(rest) <= h.n_stripes
            except (mod.ObjectNotFound, StoreError, ValueError):
                live = False
            if live:
                continue
            try:
                _size, mtime = self._ioctx.stat(name)
                if now - time.mktime(mtime) < older_than:
                    continue
                self._ioctx.remove_object(name)
                removed += 1
            except mod.ObjectNotFound:
                pass
        return removed

    async def sweep(self, older_than: float = 3600.0) -> int:
        if self._ops is None:
            await self.open()
        return await asyncio.to_thread(self._sweep, older_than)
