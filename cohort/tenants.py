"""Tenants and their access keys (seed 002's secure logical partitions).

A tenant owns buckets; each tenant has one or more access keys.  The registry is one small
JSON document on shared storage, ``system/tenants.json``, updated by compare-and-swap
(``put(..., if_match=etag)``), so every director sees the same accounts without another
service.  Secret keys must be usable (SigV4 needs the secret itself, so it cannot be
hashed): they are stored encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from the
well-kept ``cryptography`` package) under the cluster's master key, a file readable only
by the cluster's processes (``<data-dir>/master.key``, mode 0600).  Secrets are never
logged.

Directors look keys up through :class:`KeyCache`, which re-reads the document whenever
its etag changes (a ``stat`` per lookup on local storage), so a revoked key stops working
on the very next request.

The bootstrap credentials of ``cohort up`` (``credentials.json``) belong to the admin
tenant ``default``, which may manage tenants.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from cohort.storage.base import PreconditionFailed
from cohort.storage.local import LocalStore

REGISTRY_KEY = "system/tenants.json"
ADMIN_TENANT = "default"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


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


class TenantRegistry:
    """Read-modify-write access to the registry document (admin operations)."""

    def __init__(self, store: LocalStore, master_key: bytes) -> None:
        self.store = store
        self.fernet = Fernet(master_key)

    def _load(self) -> tuple[dict[str, Any], str | None]:
        path = self.store.path(REGISTRY_KEY)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {"tenants": {}, "keys": {}}, None
        from cohort.storage.local import _etag

        doc: dict[str, Any] = json.loads(data)
        return doc, _etag(os.stat(path))

    async def _update(self, change: Any) -> Any:
        for _ in range(50):
            doc, etag = self._load()
            result = change(doc)
            data = json.dumps(doc, indent=1, sort_keys=True).encode()
            try:
                if etag is None:
                    await self.store.put(REGISTRY_KEY, data, if_absent=True)
                else:
                    await self.store.put(REGISTRY_KEY, data, if_match=etag)
                return result
            except PreconditionFailed:
                continue  # someone else updated it meanwhile: redo on the new version
        raise TenantError("the tenant registry keeps changing; try again")

    def list(self) -> dict[str, Any]:
        doc, _ = self._load()
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
    """Access key -> (secret, tenant) for a director; always current (see module doc)."""

    def __init__(
        self, store: LocalStore, master_key: bytes | None, bootstrap: dict[str, str] | None = None
    ) -> None:
        self.path = store.path(REGISTRY_KEY)
        self.fernet = Fernet(master_key) if master_key else None
        self.bootstrap = dict(bootstrap or {})  # admin keys from credentials.json
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, tuple[str, str]] = {}
        self._bucket_acl: dict[str, str] = {}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._keys = {}
            self._stamp = None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return  # keep the previous view; the next request retries
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
        self._stamp = stamp

    def lookup(self, access_key: str) -> tuple[str, str] | None:
        """(secret, tenant) of an active key, or None."""
        if access_key in self.bootstrap:
            return self.bootstrap[access_key], ADMIN_TENANT
        self._refresh()
        return self._keys.get(access_key)

    def bucket_acl(self, bucket: str) -> str | None:
        self._refresh()
        return self._bucket_acl.get(bucket)

    def secret_for(self, access_key: str) -> str | None:
        found = self.lookup(access_key)
        return None if found is None else found[0]

    def tenant_of(self, access_key: str) -> str | None:
        found = self.lookup(access_key)
        return None if found is None else found[1]
