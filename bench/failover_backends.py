"""Failover and standby take-over windows on the embedded coordinator and on etcd, side
by side in one run (the same cluster shape, the same fault, the same client).

    .venv/bin/python bench/failover_backends.py [--rounds 2] [--json PATH]

Each round starts a cluster of 3 servers and 1 standby (64 partitions, lease 2 s) on each
backend in turn (etcd: 3 real members with TLS), stores 60 objects, then kills server-1
with SIGKILL while a client reads the objects in a loop, and reports:

* ``all served``: seconds from the kill until every partition has an owner that holds its
  lock again (polled from the coordinator's view);
* ``standby serving``: seconds until the standby serves partitions (it takes the dead
  server's share);
* ``client gap``: the longest time the reading client went without a successful GET, and
  its errors (it retries like boto3's defaults).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from botocore.config import Config

from cohort.cluster import LocalCluster


def _ready(c: LocalCluster) -> bool:
    return all(p[0] is not None and p[0] == p[2] for p in c.view()["partitions"])


def _wait(cond: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)
    return time.monotonic() - t0


def one_round(coordinator: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"cohort-fo-{coordinator}-") as tmp:
        c = LocalCluster(
            Path(tmp), port=0, servers=3, standby=1, partitions=64, lease_ttl=2,
            coordinator=coordinator, etcd_members=3,
        ).start()  # fmt: skip
        try:
            _wait(lambda: _ready(c), 90)
            s3 = boto3.client(
                "s3", endpoint_url=c.s3_endpoint, aws_access_key_id=c.creds["access_key"],
                aws_secret_access_key=c.creds["secret_key"], region_name="us-east-1",
                config=Config(retries={"total_max_attempts": 4, "mode": "standard"},
                              read_timeout=10),
            )  # fmt: skip
            s3.create_bucket(Bucket="failover")
            for i in range(60):
                s3.put_object(Bucket="failover", Key=f"k{i}", Body=b"x" * 1024)
            stop = threading.Event()
            stats = {"gap": 0.0, "errors": 0, "ok": 0}

            def reader() -> None:
                last = time.monotonic()
                i = 0
                while not stop.is_set():
                    try:
                        s3.get_object(Bucket="failover", Key=f"k{i % 60}")["Body"].read()
                        now = time.monotonic()
                        stats["gap"] = max(stats["gap"], now - last)
                        last = now
                        stats["ok"] += 1
                    except Exception:
                        stats["errors"] += 1
                    i += 1

            th = threading.Thread(target=reader, daemon=True)
            th.start()
            time.sleep(1.0)  # a measured window of normal reads before the fault
            c.signal("server-1", signal.SIGKILL)
            t0 = time.monotonic()

            def standby_serving() -> bool:
                return any(p[0] == "standby-1" == p[2] for p in c.view()["partitions"])

            _wait(standby_serving, 60)
            t_standby = time.monotonic() - t0
            _wait(lambda: _ready(c), 60)
            t_all = time.monotonic() - t0
            time.sleep(1.0)  # reads after recovery, so the gap includes the return
            stop.set()
            th.join(15)
            return {
                "all_served_s": t_all,
                "standby_serving_s": t_standby,
                "client_gap_s": stats["gap"],
                "client_errors": stats["errors"],
                "client_ok": stats["ok"],
            }
        finally:
            c.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res: dict[str, list[dict[str, float]]] = {"embedded": [], "etcd": []}
    for _ in range(a.rounds):
        for backend in res:
            res[backend].append(one_round(backend))
    print(f"kill -9 of an active server, 3 servers + 1 standby, lease 2 s, {a.rounds} rounds")
    print(f"{'median':26} {'embedded':>10} {'etcd':>10} {'etcd/embedded':>14}")
    for k in ("all_served_s", "standby_serving_s", "client_gap_s", "client_errors"):
        e = statistics.median(r[k] for r in res["embedded"])
        t = statistics.median(r[k] for r in res["etcd"])
        ratio = f"{t / e:14.2f}" if e else f"{'-':>14}"
        print(f"{k:26} {e:10.2f} {t:10.2f} {ratio}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
