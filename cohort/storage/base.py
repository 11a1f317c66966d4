"""The ``Store`` protocol: what the middle layer needs from shared storage.

Keys are ``/``-separated relative paths of safe characters (``[A-Za-z0-9._=-]`` segments).
Every backend guarantees:

* ``put`` is atomic: a reader sees the old value or the new one, never a mix, and once
  ``put`` returns the value survives a crash of the caller or the machine.
* ``put(..., if_absent=True)`` creates the key only if it does not exist, atomically across
  every process that shares the store; otherwise it raises :class:`PreconditionFailed`.
  The operation log's fencing depends on this.
* ``put(..., if_match=etag)`` replaces the value only if its current etag is ``etag``.
* ``get``/``read_range`` raise :class:`NotFound` for a missing key.

:class:`EtagStore` adds ``get_with_etag``, a value read together with its etag, for
read-modify-write callers (the tenant registry).  Every backend has it (local, RADOS,
S3); it is a separate protocol so that wrappers which only pass the data path through
(the chaos harness's ``FaultyStore``, the metrics' ``InstrumentedStore``) stay ``Store``s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable


class StoreError(Exception):
    """Base class for storage errors."""


class NotFound(StoreError):
    """The key does not exist."""


class PreconditionFailed(StoreError):
    """``if_absent`` found the key present, or ``if_match`` found another etag."""


@runtime_checkable
class Store(Protocol):
    async def get(self, key: str) -> bytes: ...

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (fewer at the end of the value)."""
        ...

    async def size(self, key: str) -> int: ...

    async def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """Store ``data`` durably; returns the new etag."""
        ...

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Write a new value from ``chunks`` durably and atomically; returns its size.

        Meant for large immutable blobs under fresh, unique keys: the value appears only
        once it is complete and synced.  An existing key is replaced.
        """
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""
        ...

    def list(self, prefix: str) -> AsyncIterator[str]:
        """Keys starting with ``prefix``, in lexicographic order."""
        ...


@runtime_checkable
class EtagStore(Store, Protocol):
    async def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """The value and its current etag, read together (the etag ``put`` returned,
        suitable for ``put(..., if_match=etag)``); :class:`NotFound` for a missing key."""
        ...
