"""Failover: kill -9 or pause a middle-layer server under continuous load.

Checks: every acknowledged PUT is readable afterwards with the same bytes; no read ever
returns a wrong body; the partitions of the failed server are unavailable for less than
5 s with default settings (the window is printed); a paused server that resumes never
writes to a log after it was fenced.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cohort.cluster import LocalCluster
from cohort.oplog.log import segment_epochs
from cohort.partitioning import partition_of
from cohort.storage.local import LocalStore
from tests.conftest import s3_client, start_cluster, wait_for


def view_of(cluster: LocalCluster) -> dict[str, Any]:
    return cluster.view()


class Load:
    """Writer and reader threads; records acknowledged writes and wrong reads."""

    def __init__(
        self, cluster: LocalCluster, bucket: str, bucket_id: str, victims: set[int]
    ) -> None:
        self.cluster = cluster
        self.bucket = bucket
        self.bucket_id = bucket_id
        self.victims = victims  # partitions owned by the server we will fail
        self.P = cluster.partitions
        self.acked: dict[str, str] = {}
        self.lock = threading.Lock()
        self.wrong: list[str] = []
        self.errors: list[str] = []
        self.victim_ops: list[tuple[float, float, bool]] = []  # (invoke, complete, ok)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def victim_key(self, rng: random.Random) -> str:
        while True:
            k = f"obj-{rng.getrandbits(48):012x}"
            if partition_of(self.bucket_id, k, self.P) in self.victims:
                return k

    def writer(self, n: int) -> None:
        s3 = s3_client(self.cluster, max_attempts=1, read_timeout=30)
        rng = random.Random(n)
        i = 0
        while not self.stop.is_set():
            # half the writes target the victim's partitions, so we see the window
            victim = i % 2 == 0
            key = self.victim_key(rng) if victim else f"w{n}-{i}"
            body = os.urandom(rng.randint(1, 5000))
            t0 = time.monotonic()
            try:
                s3.put_object(Bucket=self.bucket, Key=key, Body=body)
                ok = True
                with self.lock:
                    self.acked[key] = hashlib.sha256(body).hexdigest()
            except Exception as e:
                ok = False
                self.errors.append(f"PUT {key}: {e}")
            if victim:
                self.victim_ops.append((t0, time.monotonic(), ok))
            i += 1

    def reader(self, n: int) -> None:
        s3 = s3_client(self.cluster, max_attempts=1, read_timeout=30)
        rng = random.Random(1000 + n)
        while not self.stop.is_set():
            with self.lock:
                if not self.acked:
                    continue
                key = rng.choice(list(self.acked))
                want = self.acked[key]
            try:
                got = hashlib.sha256(
                    s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                ).hexdigest()
            except Exception as e:
                self.errors.append(f"GET {key}: {e}")
                continue
            # keys are written once, so any acknowledged key must read back exactly
            if got != want:
                self.wrong.append(key)

    def start(self, writers: int = 3, readers: int = 2) -> None:
        for i in range(writers):
            self.threads.append(threading.Thread(target=self.writer, args=(i,), daemon=True))
        for i in range(readers):
            self.threads.append(threading.Thread(target=self.reader, args=(i,), daemon=True))
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def window_after(self, t_fail: float) -> float:
        """How long the victim's partitions were unavailable: from the failure until the
        first victim-partition write *invoked after the failure* was acknowledged."""
        done = [c for (i, c, ok) in self.victim_ops if ok and i >= t_fail]
        assert done, "no write to the failed server's partitions succeeded afterwards"
        return min(done) - t_fail

    def verify_all(self) -> None:
        s3 = s3_client(self.cluster)
        for key, digest in self.acked.items():
            body = s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == digest, (
                f"acknowledged write {key} lost or changed"
            )


def setup_load(cluster: LocalCluster, victim: str) -> Load:
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="fobucket")
    view = view_of(cluster)
    bid = next(b["id"] for b in view["buckets"] if b["name"] == "fobucket")
    victims = {p for p, (owner, _e, _h) in enumerate(view["partitions"]) if owner == victim}
    assert victims
    return Load(cluster, "fobucket", bid, victims)


def partitions_moved(cluster: LocalCluster, victim: str, victims: set[int]) -> bool:
    v = view_of(cluster)
    return all(
        v["partitions"][p][0] not in (None, victim)
        and v["partitions"][p][0] == v["partitions"][p][2]
        for p in victims
    )


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Any:
    c = start_cluster(tmp_path / "c", partitions=64)
    yield c
    c.stop()


def test_kill_9_server_under_load(fresh_cluster: LocalCluster) -> None:
    cluster = fresh_cluster
    load = setup_load(cluster, "server-2")
    load.start()
    wait_for(lambda: len(load.acked) > 100, what="load warmed up")
    t_fail = time.monotonic()
    cluster.kill("server-2")
    wait_for(
        lambda: partitions_moved(cluster, "server-2", load.victims),
        timeout=30,
        what="partitions moved",
    )
    wait_for(
        lambda: any(ok and i >= t_fail for i, _c, ok in load.victim_ops),
        timeout=30,
        what="victim write",
    )
    time.sleep(1.0)  # keep the load going a little after recovery (this is load, not a wait)
    load.finish()
    window = load.window_after(t_fail)
    print(
        f"\nkill -9: partitions of server-2 unavailable for {window:.2f} s; "
        f"{len(load.acked)} acknowledged writes; {len(load.errors)} client errors"
    )
    assert not load.wrong, f"reads returned wrong bodies: {load.wrong[:5]}"
    load.verify_all()
    assert window < 5.0


def test_sigstop_server_is_fenced(fresh_cluster: LocalCluster) -> None:
    cluster = fresh_cluster
    load = setup_load(cluster, "server-3")
    load.start()
    wait_for(lambda: len(load.acked) > 100, what="load warmed up")
    t_fail = time.monotonic()
    cluster.signal("server-3", signal.SIGSTOP)
    try:
        wait_for(
            lambda: partitions_moved(cluster, "server-3", load.victims),
            timeout=30,
            what="partitions moved",
        )
        wait_for(
            lambda: any(ok and i >= t_fail for i, _c, ok in load.victim_ops),
            timeout=30,
            what="victim write",
        )
        window = load.window_after(t_fail)
    finally:
        cluster.signal("server-3", signal.SIGCONT)
    # the zombie wakes up with requests and commits queued; load continues meanwhile
    wait_for(
        lambda: (
            "declared us dead" in Path(cluster.procs["server-3"].log).read_text()
            or "lease lost" in Path(cluster.procs["server-3"].log).read_text()
        ),
        timeout=20,
        what="zombie notices it lost its lease",
    )
    time.sleep(1.0)
    load.finish()
    print(
        f"\nSIGSTOP: partitions of server-3 unavailable for {window:.2f} s; "
        f"{len(load.acked)} acknowledged writes; {len(load.errors)} client errors"
    )
    assert not load.wrong, f"reads returned wrong bodies: {load.wrong[:5]}"
    load.verify_all()
    assert window < 5.0
    # No segment of an old epoch after a newer one, in any partition the zombie owned.
    store = LocalStore(cluster.storage)

    async def audit() -> list[str]:
        bad = []
        for p in load.victims:
            epochs = [e for _s, e, _k in await segment_epochs(store, p)]
            if epochs != sorted(epochs):
                bad.append(f"partition {p}: epochs {epochs}")
        return bad

    assert asyncio.run(audit()) == []


def test_coordinator_crash_and_restart(fresh_cluster: LocalCluster) -> None:
    """kill -9 of the embedded coordinator for longer than a lease: servers self-fence,
    and when it comes back they re-join as new incarnations, the partitions are owned
    again and every acknowledged write is there; writes work again."""
    from tests.conftest import cluster_ready

    cluster = fresh_cluster
    s3 = s3_client(cluster)
    s3.create_bucket(Bucket="coordcrash")
    for i in range(30):
        s3.put_object(Bucket="coordcrash", Key=f"k{i}", Body=str(i).encode())
    cluster.kill("coordinator")
    down_since = time.monotonic()
    # the servers lose their leases while it is down (we watch their logs, no sleep)
    wait_for(
        lambda: all(
            "lease lost" in Path(p.log).read_text()
            for p in cluster.procs.values()
            if p.role == "server"
        ),
        timeout=30,
        what="servers self-fenced",
    )
    cluster.restart("coordinator")
    wait_for(lambda: cluster_ready(cluster), timeout=60, what="partitions owned again")
    print(f"\ncoordinator down for {time.monotonic() - down_since:.1f} s; cluster ready again")
    for i in range(30):
        assert s3.get_object(Bucket="coordcrash", Key=f"k{i}")["Body"].read() == str(i).encode()
    s3.put_object(Bucket="coordcrash", Key="after", Body=b"ok")
    assert s3.get_object(Bucket="coordcrash", Key="after")["Body"].read() == b"ok"
