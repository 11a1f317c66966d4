"""Storage-backend fixtures: one real Ceph (1 monitor, 1 memstore OSD, radosgw) and one
real Cohort cluster per session, and a ``store`` fixture parametrized over every backend.

Ceph is started by :class:`cohort.ceph_server.CephCluster` from Debian's packages; when
they (or the ``rados`` module) are missing, the Ceph-backed cases are skipped with the
reason.  Memstore is used because these tests check semantics, not durability.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cohort.ceph_server import CephCluster, ceph_available, missing
from cohort.cluster import LocalCluster
from cohort.storage.base import Store
from cohort.storage.local import LocalStore
from tests.conftest import s3_client, start_cluster

BUCKET = "cohort-store-tests"

BACKENDS = [
    "local",
    "rados-aio-omap",
    "rados-sync-omap",
    "rados-aio-scan",
    "s3-radosgw",
    "s3-cohort",
]


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    if not ceph_available(rgw=True):
        pytest.skip(
            f"Ceph is not installed ({', '.join(missing()) or 'radosgw'}): "
            "apt-get install ceph-mon ceph-osd radosgw ceph-common python3-rados, then "
            "scripts/bootstrap.sh"
        )
    c = CephCluster(1, objectstore="memstore", rgw=True).start(timeout=90)
    s3 = boto3_client(c.s3_endpoint, c.s3_credentials)
    s3.create_bucket(Bucket=BUCKET)
    yield c
    c.stop()


def boto3_client(endpoint: str, creds: dict[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=creds["access_key"],
        aws_secret_access_key=creds["secret_key"],
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@pytest.fixture(scope="session")
def cohort_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Cohort cluster whose S3 endpoint serves as another Cohort's storage."""
    c = start_cluster(tmp_path_factory.mktemp("cohort-as-storage"), servers=1, partitions=8)
    s3_client(c).create_bucket(Bucket=BUCKET)
    yield c
    c.stop()


class Opener:
    """Opens clients of one fresh, empty store of a backend (its own directory, RADOS
    namespace or S3 prefix); every client opened is closed at the end of the test."""

    def __init__(self, request: pytest.FixtureRequest, backend: str, tmp: Path) -> None:
        self.request = request
        self.backend = backend
        self.tag = uuid.uuid4().hex[:12]
        self.tmp = tmp
        self.opened: list[Any] = []

    async def open(self, **options: str) -> Any:
        s = await self._open(options)
        self.opened.append(s)
        return s

    async def _open(self, options: dict[str, str]) -> Any:
        backend = self.backend
        if backend == "local":
            return LocalStore(self.tmp / f"store-{self.tag}")
        if backend.startswith("rados-"):
            from cohort.storage.rados import RadosStore

            _, io, listing = backend.split("-")
            c: CephCluster = self.request.getfixturevalue("ceph")
            url = c.rados_url(namespace=f"t-{self.tag}", io=io, listing=listing, **options)
            return await RadosStore.from_url(url).open()
        from cohort.storage.s3 import S3Store

        if backend == "s3-radosgw":
            c = self.request.getfixturevalue("ceph")
            endpoint, creds = c.s3_endpoint, c.s3_credentials
        else:
            cl: LocalCluster = self.request.getfixturevalue("cohort_s3")
            endpoint, creds = cl.s3_endpoint, cl.creds
        s = S3Store(
            BUCKET,
            f"t-{self.tag}",
            endpoint=endpoint,
            access_key=creds["access_key"],
            secret_key=creds["secret_key"],
        )
        return await s.open()

    async def close(self) -> None:
        for s in self.opened:
            close = getattr(s, "aclose", None)
            if close is not None:
                await close()


@pytest.fixture(params=BACKENDS)
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    o = Opener(request, request.param, tmp_path)
    yield o
    await o.close()


@pytest.fixture
async def store(opener: Opener) -> Store:
    s: Store = await opener.open()
    return s
