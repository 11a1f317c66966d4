"""Shared storage: the :class:`~cohort.storage.base.Store` protocol and its backends.

:func:`open_store` turns a storage spec (``--storage``, ``[storage]`` in a node config)
into an open store:

* ``rados://pool[/namespace]?conf=...&keyring=...&id=...`` -> :class:`~cohort.storage.rados.RadosStore`
* ``s3://bucket/prefix?endpoint=...&credentials=FILE`` -> :class:`~cohort.storage.s3.S3Store`
* ``file:///path`` or a plain directory path -> :class:`~cohort.storage.local.LocalStore`

Backends are imported only when asked for, so a local cluster needs neither ``rados`` nor
``aiobotocore``.  See docs/storage.md.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from cohort.storage.base import EtagStore, StoreError

__all__ = ["SPEC_HELP", "StorageUnavailable", "aclose_store", "open_store", "redact"]

SPEC_HELP = (
    "a directory (the local backend), rados://POOL[/NAMESPACE]?conf=CEPH.CONF&keyring=FILE"
    "&id=NAME (Ceph RADOS), or s3://BUCKET/PREFIX?endpoint=URL&credentials=FILE (any S3 "
    "service that honours conditional writes); see docs/storage.md"
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SECRET_OPTS = re.compile(r"((?:^|[?&])(?:secret_key|key)=)[^&]*")


class StorageUnavailable(StoreError):
    """The storage spec is malformed, or its service cannot be reached or used."""


def redact(spec: str) -> str:
    """``spec`` with secrets in its query (``secret_key=``, ``key=``) replaced by ``***``."""
    base, sep, query = spec.partition("?")
    return base + sep + _SECRET_OPTS.sub(r"\1***", query) if sep else spec


def _hint(scheme: str, spec: str) -> str:
    if scheme == "rados":
        return (
            "is the Ceph monitor running and named by conf= (or mon_host=), is keyring= "
            "readable, does the pool exist? `python -m cohort.ceph_server --osds 3` starts a "
            "small Ceph and prints its URL"
        )
    if scheme == "s3":
        return (
            "is the service answering at endpoint=, does the bucket exist, are the "
            "credentials (credentials=FILE with access_key and secret_key) right?"
        )
    return ""


async def open_store(spec: str, *, fsync: bool = True) -> EtagStore:
    """Open the store named by ``spec`` (see the module doc); raises
    :class:`StorageUnavailable` with what to fix when the spec is malformed or the service
    cannot be reached, or refuses (an S3 service without conditional writes)."""
    if not spec or not spec.strip():
        raise StorageUnavailable(f"no storage given: use {SPEC_HELP}")
    m = _SCHEME.match(spec)
    scheme = m.group(1).lower() if m else ""
    if scheme in ("", "file"):
        from cohort.storage.local import LocalStore

        path = spec
        if scheme == "file":
            u = urlsplit(spec)
            if u.netloc not in ("", "localhost") or u.query:
                raise StorageUnavailable(
                    f"bad storage spec {spec!r}: a file URL is file:///absolute/path"
                )
            path = unquote(u.path)
        try:
            return LocalStore(path, fsync=fsync)
        except OSError as e:
            raise StorageUnavailable(
                f"cannot use the storage directory {path!r}: {e.strerror or e}"
            ) from e
    if scheme not in ("rados", "s3"):
        raise StorageUnavailable(
            f"unknown storage scheme {scheme!r} in {redact(spec)!r}: use {SPEC_HELP}"
        )
    store: Any
    try:
        if scheme == "rados":
            from cohort.storage.rados import RadosStore

            store = RadosStore.from_url(spec)
            opened: EtagStore = await store.open()
        else:
            from cohort.storage.s3 import S3Store

            store = S3Store.from_url(spec)
            opened = await store.open()
    except (ValueError, OSError, StoreError) as e:
        from cohort.storage.s3 import ConditionalWritesUnsupported

        if isinstance(e, ConditionalWritesUnsupported):
            raise StorageUnavailable(str(e)) from e
        what = "bad storage spec" if isinstance(e, ValueError) else "cannot open storage"
        hint = _hint(scheme, spec)
        raise StorageUnavailable(
            f"{what} {redact(spec)!r}: {e}" + (f" (hint: {hint})" if hint else "")
        ) from e
    return opened


async def aclose_store(store: object) -> None:
    """Close a store's connections (RADOS, S3 clients); a no-op for a directory."""
    close = getattr(store, "aclose", None)
    if close is not None:
        await close()
