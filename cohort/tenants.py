"""Tenants and their access keys (seed 002's secure logical partitions).

A tenant owns buckets; each tenant has one or more access keys.  The registry is one small
JSON document on shared storage, ``system/tenants.json``, updated by compare-and-swap
(``put(..., if_match=etag)``), so every director sees the same accounts without another
service.  Secret keys must be usable (SigV4 needs the secret itself, so it cannot be
hashed): they are stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from the
well-kept ``cryptography`` package) under the cluster's master key, a file readable only
by the cluster's processes (``<data-dir>/master.key``, mode 0600).  Secrets are never
logged.

Directors (and servers, for tenants' lock sessions) look keys up through
:class:`KeyCache`, whose ``lookup`` is synchronous and called on every request:

* on local storage it ``stat``s the document on every lookup and re-reads it when its etag
  changed, so a revoked key stops working on the very next request;
* on RADOS or S3 a ``stat`` would be a network round trip per request, so a background
  task re-reads the document every ``refresh_interval`` (1 s) instead: a revocation (or
  a bucket ACL change made through another director) takes effect within about that
  interval plus one storage read.  Changes made through this process's own
  :class:`TenantRegistry` are installed at once (``TenantRegistry.on_change``).

The bootstrap credentials of ``cohort up`` (``credentials.json``) belong to the admin
tenant ``default``, which may manage tenants.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from cohort.storage.base import EtagStore, NotFound, PreconditionFailed
from cohort.storage.local import LocalStore

log = logging.getLogger("cohort.tenants")

REGISTRY_KEY = "system/tenants.json"
ADMIN_TENANT = "default"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
REFRESH_INTERVAL = 1.0  # seconds between re-reads of the registry on remote stores


class TenantError(Exception):
    pass


def load_or_create_master_key(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes().strip()
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def new_access_key() -> str:
    return "CK" + secrets.token_hex(9).upper()


def new_secret() -> str:
    return secrets.token_urlsafe(30)


def _empty() -> dict[str, Any]:
    return {"tenants": {}, "keys": {}}


class TenantRegistry:
    """Read-modify-write access to the registry document (admin operations), on any store."""

    def __init__(self, store: EtagStore, master_key: bytes) -> None:
        self.store = store
        self.fernet = Fernet(master_key)
        # called with (document, etag) after every update this registry made (a KeyCache
        # of the same process installs it, so the change is visible to it at once)
        self.on_change: Callable[[dict[str, Any], str], None] | None = None

    async def _load(self) -> tuple[dict[str, Any], str | None]:
        try:
            data, etag = await self.store.get_with_etag(REGISTRY_KEY)
        except NotFound:
            return _empty(), None
        doc: dict[str, Any] = json.loads(data)
        return doc, etag

    async def _update(self, change: Any) -> Any:
        for _ in range(50):
            doc, etag = await self._load()
            result = change(doc)
            data = json.dumps(doc, indent=1, sort_keys=True).encode()
            try:
                if etag is None:
                    new_etag = await self.store.put(REGISTRY_KEY, data, if_absent=True)
                else:
                    new_etag = await self.store.put(REGISTRY_KEY, data, if_match=etag)
            except PreconditionFailed:
                continue  # someone else updated it meanwhile: redo on the new version
            if self.on_change is not None:
                self.on_change(doc, new_etag)
            return result
        raise TenantError("the tenant registry keeps changing; try again")

    async def list(self) -> dict[str, Any]:
        doc, _ = await self._load()
        keys = doc["keys"]
        return {
            name: {
                **t,
                "keys": sorted(
                    k for k, v in keys.items() if v["tenant"] == name and not v.get("revoked")
                ),
            }
            for name, t in doc["tenants"].items()
        }

    async def create_tenant(self, name: str) -> tuple[str, str]:
        """Create a tenant with a first key; returns (access_key, secret)."""
        if not _NAME.match(name) or name == ADMIN_TENANT:
            raise TenantError(
                f"invalid tenant name {name!r}: use 2-63 lowercase letters, digits and '-' "
                f"(and not {ADMIN_TENANT!r})"
            )
        access, secret = new_access_key(), new_secret()

        def change(doc: dict[str, Any]) -> None:
            if name in doc["tenants"]:
                raise TenantError(f"tenant {name!r} already exists")
            doc["tenants"][name] = {"created": time.time()}
            doc["keys"][access] = self._key_record(name, secret)

        await self._update(change)
        return access, secret

    def _key_record(self, tenant: str, secret: str) -> dict[str, Any]:
        return {
            "tenant": tenant,
            "secret": self.fernet.encrypt(secret.encode()).decode(),
            "created": time.time(),
            "revoked": False,
        }

    async def delete_tenant(self, name: str, owned_buckets: builtins.list[str]) -> None:
        if owned_buckets:
            raise TenantError(
                f"tenant {name!r} still owns buckets: {', '.join(sorted(owned_buckets))}; delete them first"
            )

        def change(doc: dict[str, Any]) -> None:
            if name not in doc["tenants"]:
                raise TenantError(f"no tenant named {name!r}")
            del doc["tenants"][name]
            for k in [k for k, v in doc["keys"].items() if v["tenant"] == name]:
                del doc["keys"][k]

        await self._update(change)

    async def create_key(self, tenant: str) -> tuple[str, str]:
        access, secret = new_access_key(), new_secret()

        def change(doc: dict[str, Any]) -> None:
            if tenant not in doc["tenants"]:
                raise TenantError(
                    f"no tenant named {tenant!r}; create it with `cohort tenant create`"
                )
            doc["keys"][access] = self._key_record(tenant, secret)

        await self._update(change)
        return access, secret

    async def set_bucket_acl(self, bucket: str, acl: str | None) -> None:
        """Canned bucket ACL: ``public-read`` lets anyone list and read; None = private."""

        def change(doc: dict[str, Any]) -> None:
            acls = doc.setdefault("bucket_acl", {})
            if acl in (None, "private"):
                acls.pop(bucket, None)
            else:
                acls[bucket] = acl

        await self._update(change)

    async def revoke_key(self, access_key: str) -> str:
        def change(doc: dict[str, Any]) -> str:
            k = doc["keys"].get(access_key)
            if k is None:
                raise TenantError(f"no access key {access_key!r}")
            k["revoked"] = True
            k["secret"] = ""  # forget the secret itself
            return str(k["tenant"])

        result: str = await self._update(change)
        return result


class KeyCache:
    """Access key -> (secret, tenant) for a director or server (see the module doc for how
    current it is on each kind of store).

    On a local store it needs nothing more.  On other stores call :meth:`start` (from the
    event loop) to load the document and start the background refresh, and :meth:`close`
    at the end; until :meth:`start`, only the bootstrap keys are known.
    """

    def __init__(
        self,
        store: EtagStore,
        master_key: bytes | None,
        bootstrap: dict[str, str] | None = None,
        *,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.store = store
        # a directory: a stat per lookup is cheap, and keeps revocation immediate
        self._local = store if isinstance(store, LocalStore) else None
        self.fernet = Fernet(master_key) if master_key else None
        self.bootstrap = dict(bootstrap or {})  # admin keys from credentials.json
        self.refresh_interval = refresh_interval
        self._etag: str | None = None
        self._keys: dict[str, tuple[str, str]] = {}
        self._bucket_acl: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self.refreshed_at = 0.0  # monotonic time of the last successful read (remote stores)
        self.refresh_errors = 0

    @property
    def background(self) -> bool:
        """True when lookups are served from a periodically refreshed copy."""
        return self._local is None

    # -- installing a version of the document ---------------------------------------------
    def install(self, doc: dict[str, Any], etag: str | None) -> None:
        """Use ``doc`` (at ``etag``) from now on; also ``TenantRegistry.on_change``."""
        keys: dict[str, tuple[str, str]] = {}
        for access, rec in doc.get("keys", {}).items():
            if rec.get("revoked") or self.fernet is None:
                continue
            try:
                keys[access] = (self.fernet.decrypt(rec["secret"].encode()).decode(), rec["tenant"])
            except (InvalidToken, KeyError):
                continue
        self._keys = keys
        self._bucket_acl = dict(doc.get("bucket_acl", {}))
        self._etag = etag

    def _forget(self) -> None:
        self._keys = {}
        self._bucket_acl = {}
        self._etag = None

    # -- local store: a stat per lookup ----------------------------------------------------
    def _refresh_local(self) -> None:
        assert self._local is not None
        etag = self._local.etag_now(REGISTRY_KEY)
        if etag is None:
            self._forget()
            return
        if etag == self._etag:
            return
        try:
            data, etag = self._local._get_with_etag(REGISTRY_KEY)
            doc = json.loads(data)
        except NotFound:
            self._forget()
            return
        except (OSError, ValueError):
            return  # keep the previous view; the next request retries
        self.install(doc, etag)

    # -- other stores: a background refresh ------------------------------------------------
    async def refresh(self) -> None:
        """Read the document now (if it changed, install it)."""
        if self._local is not None:
            self._refresh_local()
            return
        try:
            data, etag = await self.store.get_with_etag(REGISTRY_KEY)
        except NotFound:
            self._forget()
            self.refreshed_at = time.monotonic()
            return
        if etag != self._etag:
            self.install(json.loads(data), etag)
        self.refreshed_at = time.monotonic()

    async def start(self) -> KeyCache:
        """Load the document and, on a non-local store, refresh it in the background."""
        if self._local is not None or self._task is not None:
            return self
        try:
            await self.refresh()
        except Exception as e:  # the storage answered open(); keep trying in the background
            self.refresh_errors += 1
            log.warning("cannot read the tenant registry yet: %s", e)
        self._task = asyncio.create_task(self._loop(), name="tenant-key-refresh")
        return self

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep the previous view; tenants' keys stay as they were
                self.refresh_errors += 1
                if self.refresh_errors in (1, 10) or self.refresh_errors % 100 == 0:
                    log.warning("tenant registry refresh failed (%d times): %s",
                                self.refresh_errors, e)  # fmt: skip

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- lookups (synchronous, per request) ------------------------------------------------
    def lookup(self, access_key: str) -> tuple[str, str] | None:
        """(secret, tenant) of an active key, or None."""
        if access_key in self.bootstrap:
            return self.bootstrap[access_key], ADMIN_TENANT
        if self._local is not None:
            self._refresh_local()
        return self._keys.get(access_key)

    def bucket_acl(self, bucket: str) -> str | None:
        if self._local is not None:
            self._refresh_local()
        return self._bucket_acl.get(bucket)

    def secret_for(self, access_key: str) -> str | None:
        found = self.lookup(access_key)
        return None if found is None else found[0]

    def tenant_of(self, access_key: str) -> str | None:
        found = self.lookup(access_key)
        return None if found is None else found[1]
