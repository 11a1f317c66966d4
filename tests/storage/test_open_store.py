"""``open_store``: a storage spec (``--storage``) to an open store, with clear errors; the
``get_with_etag`` read on every backend."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from cohort.ceph_server import CephCluster, free_port
from cohort.storage import StorageUnavailable, open_store, redact
from cohort.storage.base import EtagStore, NotFound, PreconditionFailed
from cohort.storage.local import LocalStore
from tests.storage.conftest import BUCKET, Opener
from tests.storage.test_backends import start_forgetful_s3


async def test_a_path_or_file_url_is_a_local_store(tmp_path: Path) -> None:
    s = await open_store(str(tmp_path / "a"))
    assert isinstance(s, LocalStore) and s.root == tmp_path / "a"
    s = await open_store(f"file://{tmp_path / 'b'}")
    assert isinstance(s, LocalStore) and s.root == tmp_path / "b"
    assert isinstance(s, EtagStore)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no storage given"),
        ("ftp://host/dir", "unknown storage scheme 'ftp'"),
        ("file://otherhost/x", "file:///absolute/path"),
        ("rados://", "not a rados URL"),
        ("rados://pool?colour=blue", "unknown rados URL options"),
        ("s3://", "not an s3 URL"),
        ("s3://bucket?flavour=x", "unknown s3 URL options"),
        ("s3://bucket/p?credentials=/nonexistent/creds.json", "cannot open storage"),
    ],
)
async def test_bad_specs_say_what_to_use(spec: str, message: str) -> None:
    with pytest.raises(StorageUnavailable, match=message):
        await open_store(spec)


async def test_secrets_are_not_repeated_in_errors() -> None:
    spec = "s3://b/p?endpoint=http://127.0.0.1:1&access_key=AK&secret_key=TOPSECRET&flavour=x"
    with pytest.raises(StorageUnavailable) as e:
        await open_store(spec)
    assert "TOPSECRET" not in str(e.value) and "secret_key=***" in str(e.value)
    assert redact("rados://p?key=abc&id=x") == "rados://p?key=***&id=x"


async def test_an_unreachable_s3_service_is_named_with_a_hint() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(StorageUnavailable, match=rf"127.0.0.1:{port}.*hint: is the service"):
        await open_store(f"s3://b/p?endpoint=http://127.0.0.1:{port}&access_key=a&secret_key=b")


async def test_an_s3_service_without_conditional_writes_is_refused() -> None:
    runner, endpoint = await start_forgetful_s3()
    try:
        with pytest.raises(StorageUnavailable, match="does not honour 'If-None-Match: \\*'"):
            await open_store(f"s3://bucket/p?endpoint={endpoint}&access_key=k&secret_key=s")
    finally:
        await runner.cleanup()


async def test_rados_and_s3_urls_open_the_real_services(ceph: CephCluster, tmp_path: Path) -> None:
    r = await open_store(ceph.rados_url(namespace=f"o-{uuid.uuid4().hex[:8]}"))
    try:
        assert type(r).__name__ == "RadosStore"
        await r.put("a/b", b"rados")
        assert await r.get("a/b") == b"rados"
    finally:
        await r.aclose()  # type: ignore[attr-defined]
    with pytest.raises(StorageUnavailable, match=r"pool .nope. does not exist.*hint"):
        await open_store(ceph.rados_url(pool="nope"))
    creds = tmp_path / "rgw.json"
    creds.write_text(json.dumps(ceph.s3_credentials))
    s = await open_store(
        f"s3://{BUCKET}/o-{uuid.uuid4().hex[:8]}?endpoint={ceph.s3_endpoint}&credentials={creds}"
    )
    try:
        assert type(s).__name__ == "S3Store"
        await s.put("a/b", b"s3")
        assert await s.get("a/b") == b"s3"
    finally:
        await s.aclose()  # type: ignore[attr-defined]
    with pytest.raises(StorageUnavailable, match=r"no-such-bucket.*hint"):
        await open_store(f"s3://no-such-bucket/p?endpoint={ceph.s3_endpoint}&credentials={creds}")


async def test_get_with_etag(opener: Opener) -> None:
    """The etag read with a value is the one ``put`` returned, and a compare-and-swap
    with it succeeds exactly once (every backend)."""
    s: EtagStore = await opener.open()
    with pytest.raises(NotFound):
        await s.get_with_etag("system/doc")
    etag = await s.put("system/doc", b"one", if_absent=True)
    value, got = await s.get_with_etag("system/doc")
    assert (value, got) == (b"one", etag)
    new = await s.put("system/doc", b"two", if_match=got)
    with pytest.raises(PreconditionFailed):
        await s.put("system/doc", b"three", if_match=got)
    assert await s.get_with_etag("system/doc") == (b"two", new)
