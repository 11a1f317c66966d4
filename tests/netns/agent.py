"""Helper run *inside* a network namespace by ``test_partitions.py``.

Every line it prints is one JSON object with ``t`` = ``time.monotonic()`` (the monotonic
clock is shared by all network namespaces, so the test can compare it with its own).

* ``monitor ADDRESS``: follow the coordinator's view; print owners, holders, member states.
* ``probe HOST:PORT``: poll a server's ``status`` RPC; print whether its lease is valid.
* ``load ENDPOINT CREDS BUCKET``: PUT small objects in a loop (two threads); print every
  acknowledged key (``ack``) and every failure (``err``) until stdin closes.
* ``verify ENDPOINT CREDS BUCKET KEYS_FILE``: GET every key listed (one per line) and
  print a summary of missing or wrong bodies.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

_lock = threading.Lock()


def emit(**kw: Any) -> None:
    kw["t"] = time.monotonic()
    line = json.dumps(kw)
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def body_of(key: str) -> bytes:
    return (key + "|").encode() * 8


def s3(endpoint: str, creds_path: str) -> Any:
    import boto3
    from botocore.config import Config

    with open(creds_path) as f:
        creds = json.load(f)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=creds["access_key"],
        aws_secret_access_key=creds["secret_key"],
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=2,
            read_timeout=20,
        ),
    )


async def monitor(address: str) -> None:
    from cohort.coord import connect
    from cohort.rpc import RpcError

    c = connect(address)
    version = -1
    while True:
        try:
            v = await c.watch(version, timeout=1.0)
        except RpcError as e:
            emit(kind="monitor-error", error=str(e))
            await asyncio.sleep(0.2)
            continue
        version = v["version"]
        emit(
            kind="view",
            version=version,
            owners=[p[0] for p in v["partitions"]],
            holders=[p[2] for p in v["partitions"]],
            members={m["id"]: m["state"] for m in v["members"]},
        )


async def probe(address: str, key_file: str) -> None:
    """Ask a server for its status every 50 ms (run in the server's own namespace)."""
    from cohort.auth import ClusterKey
    from cohort.rpc import RpcClient, RpcError

    host, _, port = address.rpartition(":")
    c = RpcClient(host, int(port), ClusterKey.load(key_file).member("probe"))
    while True:
        try:
            st = await c.call("status", None, timeout=1.0)
            emit(kind="status", lease_valid=st["lease_valid"], serving=len(st["serving"]))
        except RpcError as e:
            emit(kind="probe-error", error=str(e))
        await asyncio.sleep(0.05)


def load(endpoint: str, creds_path: str, bucket: str) -> None:
    client = s3(endpoint, creds_path)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            break
        except Exception as e:
            if "BucketAlreadyOwnedByYou" in str(e):
                break
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    stop = threading.Event()

    def worker(n: int) -> None:
        c = s3(endpoint, creds_path)
        i = 0
        while not stop.is_set():
            key = f"w{n}-{i:06d}"
            i += 1
            try:
                c.put_object(Bucket=bucket, Key=key, Body=body_of(key))
                emit(kind="ack", key=key)
            except Exception as e:
                emit(kind="err", key=key, error=str(e)[:200])
                time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(2)]
    for th in threads:
        th.start()
    emit(kind="load-started")
    sys.stdin.read()  # until the test closes our stdin
    stop.set()
    for th in threads:
        th.join(25)
    emit(kind="load-stopped")


def verify(endpoint: str, creds_path: str, bucket: str, keys_file: str) -> None:
    client = s3(endpoint, creds_path)
    with open(keys_file) as f:
        keys = [k.strip() for k in f if k.strip()]
    missing: list[str] = []
    wrong: list[str] = []
    for k in keys:
        try:
            got = client.get_object(Bucket=bucket, Key=k)["Body"].read()
        except Exception as e:
            missing.append(f"{k}: {str(e)[:100]}")
            continue
        if got != body_of(k):
            wrong.append(k)
    emit(
        kind="verify",
        checked=len(keys),
        missing=missing[:20],
        n_missing=len(missing),
        wrong=wrong[:20],
    )


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "monitor":
        asyncio.run(monitor(args[0]))
    elif cmd == "probe":
        asyncio.run(probe(args[0], args[1]))
    elif cmd == "load":
        load(*args)
    elif cmd == "verify":
        verify(*args)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
