"""Local-directory backend of the :class:`~cohort.storage.base.Store` protocol.

Crash safety: every write goes to a temporary file in the same directory, is fsynced, then
moved into place (``rename`` to replace, ``link`` to create-if-absent: ``link`` fails if
the name exists, atomically, even across processes), and the directory is fsynced so
the new name survives a power loss.  ``if_match`` takes an ``flock`` on a per-directory
lock file so compare-and-swap is atomic across processes on one machine.

Etags are ``<mtime_ns>-<size>-<inode>``: cheap, and different after every replacement
because each write is a new inode.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from cohort.storage.base import NotFound, PreconditionFailed, StoreError

_SAFE = re.compile(r"^[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*$")
_TMP_SUFFIX = ".cohort-tmp"
_STREAM_BUFFER = 1 << 20  # bytes gathered before each write of a streamed value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


class LocalStore:
    """Shared storage in a local directory (the embedded default)."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._made_dirs: set[Path] = set()

    def path(self, key: str) -> Path:
        if not _SAFE.match(key) or ".." in key.split("/"):
            raise StoreError(f"invalid storage key {key!r}")
        return self.root / key

    # -- reads ---------------------------------------------------------------------------
    def _get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(key) from None

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._get, key)

    def _get_with_etag(self, key: str) -> tuple[bytes, str]:
        # every write is a new inode (rename or link of a fresh file), so the fstat of
        # the open file names exactly the version that was read
        try:
            with open(self.path(key), "rb") as f:
                return f.read(), _etag(os.fstat(f.fileno()))
        except FileNotFoundError:
            raise NotFound(key) from None

    async def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """The value and its etag, of one version (see :class:`~cohort.storage.base.EtagStore`)."""
        return await asyncio.to_thread(self._get_with_etag, key)

    def etag_now(self, key: str) -> str | None:
        """The current etag, or None for a missing key: one ``stat``, blocking (cheap
        enough to call per request, which :class:`cohort.tenants.KeyCache` does)."""
        try:
            return _etag(os.stat(self.path(key)))
        except FileNotFoundError:
            return None

    def _read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self.path(key), "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise NotFound(key) from None

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        return await asyncio.to_thread(self._read_range, key, start, length)

    async def size(self, key: str) -> int:
        try:
            return (await asyncio.to_thread(os.stat, self.path(key))).st_size
        except FileNotFoundError:
            raise NotFound(key) from None

    # -- writes --------------------------------------------------------------------------
    def _ensure_dir(self, d: Path) -> None:
        if d in self._made_dirs:
            return
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                # make the new directory chain durable
                p = d
                while p != self.root and p.parent != p:
                    _fsync_dir(p.parent)
                    p = p.parent
        self._made_dirs.add(d)

    def _write_tmp(self, final: Path, data: bytes | Iterator[bytes]) -> tuple[Path, int]:
        self._ensure_dir(final.parent)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            else:
                for chunk in data:
                    view = memoryview(chunk)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        size += n
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp, size

    def _put(self, key: str, data: bytes, if_absent: bool, if_match: str | None) -> str:
        final = self.path(key)
        tmp, _ = self._write_tmp(final, data)
        try:
            if if_absent:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    raise PreconditionFailed(f"{key} exists") from None
                finally:
                    os.unlink(tmp)
            elif if_match is not None:
                with self._dir_lock(final.parent):
                    try:
                        current = _etag(os.stat(final))
                    except FileNotFoundError:
                        raise PreconditionFailed(f"{key} does not exist") from None
                    if current != if_match:
                        raise PreconditionFailed(f"{key} changed")
                    os.replace(tmp, final)
            else:
                os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            _fsync_dir(final.parent)
        return _etag(os.stat(final))

    @contextlib.contextmanager
    def _dir_lock(self, d: Path) -> Iterator[None]:
        fd = os.open(d / ".cohort-lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    async def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        return await asyncio.to_thread(self._put, key, data, if_absent, if_match)

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        final = self.path(key)
        it = chunks.__aiter__()
        # Small values (the common case) are gathered first and written in one trip to
        # the thread pool: each hop costs tens of microseconds of CPU, a 4 KiB PUT would
        # otherwise pay four of them.
        first: list[bytes] = []
        first_len = 0
        exhausted = False
        while first_len < _STREAM_BUFFER:
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                exhausted = True
                break
            first.append(chunk)
            first_len += len(chunk)
        if exhausted:
            await asyncio.to_thread(self._put, key, b"".join(first), False, None)
            return first_len
        await asyncio.to_thread(self._ensure_dir, final.parent)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
        f = await asyncio.to_thread(open, tmp, "wb")
        size = 0
        try:
            pending: list[bytes] = first
            pending_len = first_len
            async for chunk in it:
                pending.append(chunk)
                pending_len += len(chunk)
                if pending_len >= _STREAM_BUFFER:
                    await asyncio.to_thread(f.writelines, pending)
                    size += pending_len
                    pending, pending_len = [], 0
            if pending:
                await asyncio.to_thread(f.writelines, pending)
                size += pending_len
            await asyncio.to_thread(self._finish, f, tmp, final)
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return size

    def _finish(self, f: object, tmp: Path, final: Path) -> None:
        import io

        assert isinstance(f, io.BufferedWriter)
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(final.parent)

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._delete, key)

    def _list(self, prefix: str) -> list[str]:
        # Walk only the directory that can contain the prefix.
        base_dir, _, _ = prefix.rpartition("/")
        start = self.root / base_dir if base_dir else self.root
        out: list[str] = []
        if not start.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            dirnames[:] = [
                d for d in dirnames if (rel + d + "/").startswith(prefix[: len(rel + d + "/")])
            ]
            for name in filenames:
                if name.endswith(_TMP_SUFFIX) or name == ".cohort-lock":
                    continue
                k = rel + name
                if k.startswith(prefix):
                    out.append(k)
        out.sort()
        return out

    async def list(self, prefix: str) -> AsyncIterator[str]:
        for k in await asyncio.to_thread(self._list, prefix):
            yield k
