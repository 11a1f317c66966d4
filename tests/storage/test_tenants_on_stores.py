"""The tenant registry and the key cache on every backend: compare-and-swap updates, and
how soon a revocation reaches a cache (at once on a directory; within the refresh
interval, in the background, on RADOS and S3; at once through the process's own
registry)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cryptography.fernet import Fernet

from cohort.storage.local import LocalStore
from cohort.tenants import KeyCache, TenantRegistry
from tests.storage.conftest import Opener

MASTER = Fernet.generate_key()


class CountingStore:
    """A store that is not a LocalStore (so the cache refreshes in the background) and
    counts the reads the cache makes."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner
        self.reads = 0
        self.put = inner.put
        self.put_stream = inner.put_stream
        self.get = inner.get
        self.read_range = inner.read_range
        self.size = inner.size
        self.delete = inner.delete
        self.list = inner.list

    async def get_with_etag(self, key: str) -> tuple[bytes, str]:
        self.reads += 1
        return await self.inner.get_with_etag(key)


async def wait_until(cond: Any, timeout: float) -> float:
    """Seconds until ``cond()`` held (0.0: at once)."""
    if cond():
        return 0.0
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_registry_and_key_cache(opener: Opener) -> None:
    admin_store = await opener.open()
    director_store = await opener.open()  # another client: another process's view
    reg = TenantRegistry(admin_store, MASTER)
    cache = await KeyCache(director_store, MASTER, refresh_interval=0.2).start()
    try:
        access, secret = await reg.create_tenant("acme")
        # concurrent updates through several registries: compare-and-swap, none lost
        others = [TenantRegistry(await opener.open(), MASTER) for _ in range(3)]
        made = await asyncio.gather(*(r.create_key("acme") for r in others for _ in range(3)))
        listed = await reg.list()
        assert set(listed["acme"]["keys"]) == {access, *(a for a, _ in made)}
        expected = [(access, secret), *made]

        def all_seen() -> bool:
            return all(cache.lookup(a) == (s, "acme") for a, s in expected)

        took = await wait_until(all_seen, 3.0)
        assert cache.background == (opener.backend != "local")
        if not cache.background:
            assert took == 0.0
        await reg.revoke_key(access)
        took = await wait_until(lambda: cache.lookup(access) is None, 3.0)
        if opener.backend == "local":
            assert took == 0.0  # a stat per lookup: the very next request
        assert cache.lookup(made[0][0]) is not None
    finally:
        await cache.close()


async def test_key_cache_refreshes_in_the_background(tmp_path: Any) -> None:
    store = CountingStore(LocalStore(tmp_path / "s"))
    reg = TenantRegistry(store.inner, MASTER)
    access, secret = await reg.create_tenant("bg")
    cache = await KeyCache(store, MASTER, refresh_interval=0.1).start()
    try:
        assert cache.background
        reads = store.reads
        for _ in range(1000):  # lookups are served from memory: no storage reads
            assert cache.lookup(access) == (secret, "bg")
        assert store.reads == reads
        await reg.revoke_key(access)
        took = await wait_until(lambda: cache.lookup(access) is None, 2.0)
        assert took < 0.5
        # a change made through a registry of the same process is seen at once
        mine = TenantRegistry(store, MASTER)
        mine.on_change = cache.install
        await mine.set_bucket_acl("pics", "public-read")
        assert cache.bucket_acl("pics") == "public-read"
        a2, s2 = await mine.create_key("bg")
        assert cache.lookup(a2) == (s2, "bg")
    finally:
        await cache.close()
    assert cache._task is None


async def test_key_cache_survives_a_failing_store(tmp_path: Any) -> None:
    store = CountingStore(LocalStore(tmp_path / "s"))
    access, secret = await TenantRegistry(store.inner, MASTER).create_tenant("flaky")
    cache = await KeyCache(store, MASTER, refresh_interval=0.05).start()
    try:
        assert cache.lookup(access) == (secret, "flaky")

        async def broken(key: str) -> tuple[bytes, str]:
            raise OSError("storage unreachable")

        store.get_with_etag = broken  # type: ignore[method-assign]
        await wait_until(lambda: cache.refresh_errors >= 3, 2.0)
        assert cache.lookup(access) == (secret, "flaky")  # the last good view stays
    finally:
        await cache.close()
