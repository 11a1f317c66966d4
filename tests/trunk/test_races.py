"""Data-path races of issue 12, reproduced with real S3 clients against a real cluster.

1. CompleteMultipartUpload racing a re-upload of the same part number: the completion
   must see every queued part record, and a part record can never free a blob that a
   completed object references; a part upload for an upload already completed answers
   NoSuchUpload and its blob is reclaimed at once.
2. A GET that streams for longer than the blob grace period while its object is
   overwritten reads the old version to the end (the director holds a reader lease on
   the blob); a storage failure after the response headers are sent closes the
   connection with a short body, never a second HTTP response inside the first; a
   reader past the maximum read duration is cut off the same way.
3. With read replicas, racing ``If-None-Match: *`` PUTs: exactly one wins (the condition
   is checked after the partition lock is back to EX, atomically with the enqueue).

The grace period is shortened for the tests (``COHORT_BLOB_GRACE``); run with
``COHORT_TEST_BLOB_GRACE=30`` to use the production value (slower).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import http.client
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cohort.cluster import LocalCluster
from cohort.partitioning import partition_of
from tests.conftest import s3_client, start_cluster, wait_for
from tests.trunk.test_hot_reads import dlm_views

GRACE = float(os.environ.get("COHORT_TEST_BLOB_GRACE", "3"))
MAX_READ = 4 * GRACE + 8  # the director's maximum read duration in this module's cluster
MiB = 1 << 20


def code_of(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("races"),
        partitions=16,
        extra_env={"COHORT_BLOB_GRACE": str(GRACE), "COHORT_MAX_READ_SECONDS": str(MAX_READ)},
    )
    yield c
    c.stop()


def blob_files(cluster: LocalCluster) -> set[str]:
    root = cluster.storage / "blobs"
    out: set[str] = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".cohort-tmp") and not f.startswith("."):
                out.add(os.path.relpath(os.path.join(dirpath, f), cluster.storage))
    return out


def bucket_id(cluster: LocalCluster, name: str) -> str:
    return str(next(b["id"] for b in cluster.view()["buckets"] if b["name"] == name))


# -- 1. CompleteMultipartUpload racing a re-upload of the same part -----------------------


def test_complete_racing_a_part_reupload_leaves_every_object_readable(
    cluster: LocalCluster,
) -> None:
    """40 uploads, each completed while three clients keep re-uploading its part 1 (the
    same bytes, so the same ETag).  Every completed object must stay readable after the
    grace period; re-uploads after the completion fail NoSuchUpload; no blob leaks."""
    s3 = s3_client(cluster, max_attempts=1, max_pool_connections=64)
    s3.create_bucket(Bucket="mpu-race")
    before = blob_files(cluster)
    n_uploads = 40
    bodies = {f"obj-{i}": os.urandom(2048) + str(i).encode() for i in range(n_uploads)}
    after_complete: dict[str, list[str]] = {k: [] for k in bodies}
    reupload_errors: list[str] = []
    accepted: list[str] = []
    refused: list[str] = []

    def one(key: str) -> str:
        body = bodies[key]
        up = s3.create_multipart_upload(Bucket="mpu-race", Key=key)["UploadId"]
        etag = s3.upload_part(Bucket="mpu-race", Key=key, UploadId=up, PartNumber=1, Body=body)[
            "ETag"
        ]
        done = threading.Event()
        completed = threading.Event()

        def reupload() -> None:
            while not done.is_set():
                late = completed.is_set()  # sent after the completion was acknowledged
                try:
                    s3.upload_part(Bucket="mpu-race", Key=key, UploadId=up, PartNumber=1, Body=body)
                    if late:
                        after_complete[key].append("ok")
                except ClientError as e:
                    if code_of(e) != "NoSuchUpload":
                        reupload_errors.append(f"{key}: {code_of(e)}")
                    refused.append(key)
                    return
                accepted.append(key)

        threads = [threading.Thread(target=reupload, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(random.uniform(0.0, 0.05))
        r = s3.complete_multipart_upload(
            Bucket="mpu-race",
            Key=key,
            UploadId=up,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
        )
        completed.set()
        time.sleep(0.05)  # let the re-uploaders try once more
        done.set()
        for t in threads:
            t.join(30)
        return str(r["ETag"])

    with cf.ThreadPoolExecutor(8) as ex:
        etags = dict(zip(bodies, ex.map(one, bodies), strict=True))
    assert reupload_errors == []
    # past the grace period (and a cleaner tick): nothing an object uses may be gone
    time.sleep(GRACE + 2.5)
    unreadable = []
    for key, body in bodies.items():
        head = s3.head_object(Bucket="mpu-race", Key=key)
        assert head["ETag"] == etags[key]
        try:
            got = s3.get_object(Bucket="mpu-race", Key=key)["Body"].read()
        except ClientError as e:
            unreadable.append(f"{key}: {code_of(e)}")
            continue
        if got != body:
            unreadable.append(f"{key}: wrong body")
    print(
        f"\n{len(accepted)} re-uploads accepted, {len(refused)} refused (NoSuchUpload); "
        f"{len(unreadable)} of {n_uploads} completed objects unreadable: {unreadable[:5]}"
    )
    assert unreadable == []
    # a re-upload that the owner accepted after the completion would have been told 200
    # for a part of an upload that no longer exists
    late_ok = sum(len(v) for v in after_complete.values())
    assert late_ok == 0, f"{late_ok} part uploads accepted after their upload completed"
    # every superseded or refused part blob is reclaimed: one blob per object remains
    wait_for(
        lambda: len(blob_files(cluster) - before) == n_uploads,
        timeout=GRACE + 10,
        what=f"exactly {n_uploads} blobs left",
    )


def test_a_part_upload_after_completion_is_refused_and_reclaimed(cluster: LocalCluster) -> None:
    s3 = s3_client(cluster, max_attempts=1)
    s3.create_bucket(Bucket="mpu-late")
    up = s3.create_multipart_upload(Bucket="mpu-late", Key="k")["UploadId"]
    etag = s3.upload_part(Bucket="mpu-late", Key="k", UploadId=up, PartNumber=1, Body=b"a" * 100)[
        "ETag"
    ]
    s3.complete_multipart_upload(
        Bucket="mpu-late",
        Key="k",
        UploadId=up,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
    )
    before = blob_files(cluster)
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket="mpu-late", Key="k", UploadId=up, PartNumber=1, Body=b"b" * 100)
    assert code_of(e.value) == "NoSuchUpload"
    assert blob_files(cluster) - before == set()  # the refused part's blob is gone already
    assert s3.get_object(Bucket="mpu-late", Key="k")["Body"].read() == b"a" * 100


# -- 2. blob reclamation knows about readers; mid-body failures abort ---------------------


def _presigned(cluster: LocalCluster, bucket: str, key: str) -> tuple[str, int, str]:
    s3 = s3_client(cluster)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key})
    u = urllib.parse.urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80, f"{u.path}?{u.query}"


def test_slow_reader_across_an_overwrite_past_the_grace_period(cluster: LocalCluster) -> None:
    """A boto3 GET of a 48 MiB object read slowly for about twice the grace period while
    the object is overwritten and then deleted: the reader gets the whole old version.
    Once it is done, the old blob is reclaimed (the reader's lease lapses)."""
    s3 = s3_client(cluster, read_timeout=60)
    s3.create_bucket(Bucket="slow")
    old = os.urandom(48 * MiB)
    before = blob_files(cluster)
    s3.put_object(Bucket="slow", Key="big", Body=old)
    blobs_old = blob_files(cluster) - before
    assert len(blobs_old) == 1
    resp = s3.get_object(Bucket="slow", Key="big")
    body = resp["Body"]
    got = [body.read(MiB)]
    s3.put_object(Bucket="slow", Key="big", Body=b"new version")
    s3.delete_object(Bucket="slow", Key="big")
    t0 = time.monotonic()
    duration = 2 * GRACE + 3
    chunk = 256 * 1024
    per_chunk = duration / (len(old) / chunk)
    while True:
        data = body.read(chunk)
        if not data:
            break
        got.append(data)
        time.sleep(per_chunk)
    elapsed = time.monotonic() - t0
    data = b"".join(got)
    print(f"\nread {len(data)} bytes in {elapsed:.1f}s after the overwrite (grace {GRACE}s)")
    assert elapsed > GRACE + 1
    assert b"HTTP/1.1" not in data
    assert len(data) == len(old)
    assert data == old
    # the reader is gone: its lease lapses and the old blob goes
    wait_for(
        lambda: not (blobs_old & blob_files(cluster)),
        timeout=3 * GRACE + 10,
        what="the old blob reclaimed",
    )


def _read_raw(
    host: str, port: int, path: str, pause_after: int, action: Any
) -> tuple[int, bytes, str]:
    """GET ``path``; after ``pause_after`` body bytes call ``action()``, then read on.
    Returns (status, body bytes received, how the body ended: ``complete``, ``short``
    (the connection closed before Content-Length bytes), ``reset`` or ``timeout``)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    length = int(r.headers["Content-Length"])
    got = [r.read(pause_after)]
    action()
    received = len(got[0])
    ending = "complete"
    try:
        while received < length:
            d = r.read1(256 * 1024)
            if not d:
                ending = "short"
                break
            got.append(d)
            received += len(d)
    except ConnectionResetError:
        ending = "reset"
    except TimeoutError:
        ending = "timeout"
    finally:
        conn.close()
    return r.status, b"".join(got), ending


def test_a_storage_failure_mid_body_closes_the_connection(cluster: LocalCluster) -> None:
    """The blob disappears (a storage failure) after the headers and 1 MiB of a 48 MiB
    body were sent: the client sees a short body and a closed connection, and what it got
    is a prefix of the object, never an error response inside the body."""
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="fail")
    data = os.urandom(48 * MiB)
    before = blob_files(cluster)
    s3.put_object(Bucket="fail", Key="big", Body=data)
    (blob,) = blob_files(cluster) - before
    host, port, path = _presigned(cluster, "fail", "big")
    t0 = time.monotonic()
    status, got, ending = _read_raw(
        host, port, path, MiB, lambda: os.unlink(cluster.storage / blob)
    )
    took = time.monotonic() - t0
    print(f"\nstatus {status}, {len(got)} of {len(data)} bytes, ended by {ending} in {took:.1f}s")
    assert status == 200
    assert b"HTTP/1.1" not in got
    assert len(got) < len(data)
    assert got == data[: len(got)]
    assert ending in ("short", "reset")
    assert took < 20
    # the director is fine afterwards
    s3.put_object(Bucket="fail", Key="small", Body=b"ok")
    assert s3.get_object(Bucket="fail", Key="small")["Body"].read() == b"ok"


def test_a_reader_past_the_maximum_read_duration_is_cut_off(cluster: LocalCluster) -> None:
    """A client that stops reading holds a blob no longer than the maximum read duration:
    the director aborts the connection (short body), and the blob is then reclaimed."""
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="stall")
    data = os.urandom(48 * MiB)
    before = blob_files(cluster)
    s3.put_object(Bucket="stall", Key="big", Body=data)
    blob = blob_files(cluster) - before
    host, port, path = _presigned(cluster, "stall", "big")
    t0 = time.monotonic()

    def stall() -> None:
        s3.delete_object(Bucket="stall", Key="big")
        time.sleep(MAX_READ + 2)

    status, got, ending = _read_raw(host, port, path, MiB, stall)
    print(
        f"\nstalled reader: {len(got)} bytes, ended by {ending} after {time.monotonic() - t0:.1f}s"
    )
    assert status == 200
    assert len(got) < len(data)
    assert got == data[: len(got)]
    assert ending in ("short", "reset")
    wait_for(lambda: not (blob & blob_files(cluster)), timeout=GRACE + 10, what="blob reclaimed")


# -- 3. conditional PUT on a partition with read replicas ----------------------------------


@pytest.fixture(scope="module")
def hot_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("hot"), partitions=16, extra_env={"COHORT_HOT_READS": "5"}
    )
    yield c
    c.stop()


def _read_hard(cluster: LocalCluster, bucket: str, key: str, stop: threading.Event) -> None:
    c = s3_client(cluster, max_attempts=1)
    while not stop.is_set():
        with contextlib.suppress(ClientError):
            c.get_object(Bucket=bucket, Key=key)["Body"].read()


def _shared(cluster: LocalCluster, p: int) -> bool:
    return any(p in st["shared"] for st in dlm_views(cluster).values())


def _race_once(cluster: LocalCluster, bid: str, key: str, n: int) -> list[str]:
    """Read ``key`` until its partition is shared with read replicas, then have ``n``
    clients PUT it at once with ``If-None-Match: *``; returns each one's outcome."""
    p = partition_of(bid, key, 16)
    stop = threading.Event()
    threads = [
        threading.Thread(target=_read_hard, args=(cluster, "cond", key, stop), daemon=True)
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: _shared(cluster, p), timeout=40, what=f"partition {p} shared with replicas"
        )
        barrier = threading.Barrier(n)
        clients = [s3_client(cluster, max_attempts=1) for _ in range(n)]

        def attempt(i: int) -> str:
            barrier.wait()
            try:
                clients[i].put_object(
                    Bucket="cond", Key=key, Body=f"v{i}".encode(), IfNoneMatch="*"
                )
                return f"v{i}"
            except ClientError as e:
                return code_of(e)

        with cf.ThreadPoolExecutor(n) as ex:
            return list(ex.map(attempt, range(n)))
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_racing_if_none_match_puts_with_read_replicas_one_wins(hot_cluster: LocalCluster) -> None:
    """The key's partition is read hard until its owner shares it read-only (PR) with
    replicas; then 8 clients PUT the key at once with ``If-None-Match: *``.  Exactly one
    may succeed.  (Before the fix, every PUT that arrived while the first one waited for
    the conversion back to EX passed the check too.)"""
    cluster = hot_cluster
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="cond")
    bid = bucket_id(cluster, "cond")
    # one key per partition: sharing again after a write is the next test's subject
    keys: dict[int, str] = {}
    for i in range(1000):
        keys.setdefault(partition_of(bid, f"once-{i}", 16), f"once-{i}")
    for r, key in enumerate(list(keys.values())[:5]):
        outcome = _race_once(cluster, bid, key, 8)
        winners = [o for o in outcome if o.startswith("v")]
        body = s3.get_object(Bucket="cond", Key=key)["Body"].read().decode()
        print(f"\nround {r}: {outcome}, stored {body}")
        assert len(winners) == 1, outcome
        assert set(outcome) - set(winners) <= {"PreconditionFailed"}, outcome
        assert body == winners[0]


def test_a_hot_partition_is_shared_again_after_every_write(hot_cluster: LocalCluster) -> None:
    """Read hard, write, read hard again, six times: the owner shares the partition with
    read replicas again each time.  A replica's request that reached the owner while it
    was converting back to EX for a write used to be dropped (the DLM notifies a holder
    once per grant), and the partition was never shared again."""
    cluster = hot_cluster
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="reshare")
    p = partition_of(bucket_id(cluster, "reshare"), "k", 16)
    stop = threading.Event()
    threads = [
        threading.Thread(target=_read_hard, args=(cluster, "reshare", "k", stop), daemon=True)
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    took = []
    try:
        for r in range(6):
            t0 = time.monotonic()
            wait_for(lambda: _shared(cluster, p), timeout=30, what=f"shared again, round {r}")
            took.append(round(time.monotonic() - t0, 1))
            s3.put_object(Bucket="reshare", Key="k", Body=str(r).encode())
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(f"\nshared again after each write in {took} s")
