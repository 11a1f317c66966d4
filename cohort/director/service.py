"""The director process: the S3 front door (``python -m cohort.director.service``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from cohort.admin.web import AdminApp
from cohort.auth import ClusterKey
from cohort.coord import connect
from cohort.coord.base import Coordinator
from cohort.director.policy import Chooser, from_config
from cohort.director.router import Router
from cohort.director.s3app import S3App, S3Runner
from cohort.logs import setup_logging
from cohort.metrics import DirectorMetrics
from cohort.rpc import RpcError
from cohort.storage import SPEC_HELP, StorageUnavailable, aclose_store, open_store
from cohort.tenants import KeyCache, TenantRegistry

log = logging.getLogger("cohort.director")


def load_keys(path: str) -> dict[str, str]:
    with open(path) as f:
        creds = json.load(f)
    return {creds["access_key"]: creds["secret_key"]}


async def _membership(coord: Coordinator, member_id: str, address: str) -> None:
    """Directors are stateless; membership only makes them visible (status, dashboard)."""
    incarnation = ""
    while True:
        try:
            if not incarnation:
                r = await coord.join(
                    {"id": member_id, "role": "director", "address": address, "pid": os.getpid()}
                )
                incarnation = r["incarnation"]
            else:
                await coord.heartbeat(member_id, incarnation)
        except RpcError as e:
            if e.code == "UnknownMember":
                incarnation = ""
                continue
        await asyncio.sleep(0.5)


async def serve(args: argparse.Namespace) -> None:
    credential = ClusterKey.load(args.cluster_key).member(args.id)
    coord = connect(args.coordinator, credential)
    router = Router(coord, hot_reads=args.hot_reads, policy=args.balance, credential=credential)
    await router.start()
    keys = load_keys(args.credentials)
    store = await open_store(args.storage)
    master = Path(args.master_key).read_bytes().strip() if args.master_key else None
    key_cache = await KeyCache(store, master, bootstrap=keys).start()
    registry = TenantRegistry(store, master) if master else None
    if registry is not None:
        registry.on_change = key_cache.install  # this director sees its own changes at once
    s3 = S3App(
        router,
        store,
        keys.get,
        member_id=args.id,
        keys=key_cache,
        registry=registry,
        domains=args.domain,
    )
    metrics = DirectorMetrics(args.id)
    metrics.watch_router(router)
    s3.on_request = metrics.observe
    admin = AdminApp(router, metrics, keys.get, args.id)
    s3.admin = admin.handle
    runner = S3Runner(
        s3.app,
        access_log=None,
        handle_signals=False,
        # slowloris: a request head must be complete this soon; idle keep-alive
        # connections close after keepalive_timeout (aiohttp's default is an hour)
        header_timeout=args.header_timeout,
        keepalive_timeout=args.keepalive_timeout,
        # request line: a 1024-byte key percent-encoded (3 KB) plus a presigned query
        max_line_size=16384,
        max_field_size=8190,
        max_headers=128,
    )
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    site = web.SockSite(runner, sock, shutdown_timeout=5.0)
    await site.start()
    address = "{}:{}".format(*sock.getsockname()[:2])
    hb = asyncio.create_task(_membership(coord, args.id, address))
    log.info("S3 endpoint http://%s", address)
    print(f"READY {address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing in-flight requests")
    hb.cancel()
    await admin.close()
    await runner.cleanup()
    await router.close()
    await key_cache.close()
    await aclose_store(store)


def _policy(text: str) -> Chooser:
    """``--balance``: a policy name, or a JSON object for ``policy.from_config``."""
    try:
        return from_config(json.loads(text) if text.lstrip().startswith("{") else text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"bad balancing policy {text!r}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cohort-director")
    ap.add_argument("--id", default="director-1")
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--storage", required=True, help=f"shared storage: {SPEC_HELP}")
    ap.add_argument("--credentials", required=True, help="JSON file with access_key/secret_key")
    ap.add_argument(
        "--master-key", default=None, help="file with the key that encrypts tenant secrets"
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument(
        "--domain",
        action="append",
        default=[],
        help="base domain for virtual-hosted-style requests (bucket.DOMAIN); repeatable",
    )
    ap.add_argument(
        "--hot-reads",
        type=float,
        default=float(os.environ.get("COHORT_HOT_READS", "200")),
        help="reads/s of one partition that start read replicas on other servers (0: never)",
    )
    ap.add_argument(
        "--balance",
        type=_policy,
        default="round-robin",
        metavar="POLICY",
        help="who serves a read of a partition with read replicas: round-robin, weighted "
        "(by server capacity), least-outstanding, or a JSON rules object (docs/operations.md)",
    )
    ap.add_argument(
        "--cluster-key", required=True, help="the cluster key file (0600), see docs/security.md"
    )
    ap.add_argument(
        "--header-timeout",
        type=float,
        default=float(os.environ.get("COHORT_HEADER_TIMEOUT", "20")),
        help="seconds a client has to send a complete request line and headers "
        "(from connecting, or from the first byte of a kept-alive request); 0: no limit",
    )
    ap.add_argument(
        "--keepalive-timeout",
        type=float,
        default=float(os.environ.get("COHORT_KEEPALIVE_TIMEOUT", "60")),
        help="seconds an idle keep-alive connection stays open",
    )
    ap.add_argument("--log-file", default=None)
    args = ap.parse_args(argv)
    os.umask(0o077)  # data, logs and secrets are private to the cluster's user
    setup_logging(args.id, args.log_file)
    import uvloop

    try:
        uvloop.run(serve(args))
    except StorageUnavailable as e:
        log.error("storage unavailable: %s", e)
        print(f"cohort-director: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
