"""What authenticating a connection costs: the handshake, next to a bare TCP connect.

    .venv/bin/python bench/handshake.py [--connections 2000] [--calls 20000] [--json PATH]

Every internal connection starts with the keyed challenge-response of
:mod:`cohort.auth` (two round trips, three HMAC-SHA256 on each side).  Measured in one
process on loopback, side by side in the same run:

* a bare TCP connect to the same server (what any connection costs anyway);
* connect + handshake (what a Cohort member pays per new connection);
* one RPC call on an established, authenticated connection (the hot path: the
  handshake is not repeated, so per-request authentication costs nothing more).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cohort.auth import ClusterKey, Verifier
from cohort.rpc import RpcClient, RpcServer


async def main(connections: int, calls: int) -> dict[str, Any]:
    key = ClusterKey.generate()
    server = RpcServer(Verifier(key))

    async def echo(params: Any) -> Any:
        return params

    server.register("echo", echo)
    port = await server.start("127.0.0.1", 0)
    cred = key.member("bench")

    # bare TCP connects (the server sends its challenge; we just close)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(connections):
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        await w.wait_closed()
    bare = (time.perf_counter() - t0) / connections
    bare_cpu = (time.process_time() - c0) / connections

    # connect + handshake (+ close)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(connections):
        c = RpcClient("127.0.0.1", port, cred)
        await c._ensure_connected()
        await c.close()
    auth = (time.perf_counter() - t0) / connections
    auth_cpu = (time.process_time() - c0) / connections

    # calls on one established connection
    c = RpcClient("127.0.0.1", port, cred)
    await c.call("echo", b"x")
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        await c.call("echo", b"x" * 64)
    call = (time.perf_counter() - t0) / calls
    call_cpu = (time.process_time() - c0) / calls
    await c.close()
    await server.close()
    return {
        "bare_connect_us": bare * 1e6,
        "bare_connect_cpu_us": bare_cpu * 1e6,
        "connect_handshake_us": auth * 1e6,
        "connect_handshake_cpu_us": auth_cpu * 1e6,
        "handshake_extra_us": (auth - bare) * 1e6,
        "call_on_open_connection_us": call * 1e6,
        "call_cpu_us": call_cpu * 1e6,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    r = asyncio.run(main(a.connections, a.calls))
    print(f"{'what':42} {'wall us':>9} {'cpu us (client+server)':>24}")
    print(
        f"{'bare TCP connect + close':42} {r['bare_connect_us']:9.1f} {r['bare_connect_cpu_us']:24.1f}"
    )
    print(f"{'connect + handshake + close':42} {r['connect_handshake_us']:9.1f} "
          f"{r['connect_handshake_cpu_us']:24.1f}")  # fmt: skip
    print(f"{'  ratio handshake/bare':42} {r['connect_handshake_us'] / r['bare_connect_us']:9.2f}x")
    print(f"{'one call on an open connection':42} {r['call_on_open_connection_us']:9.1f} "
          f"{r['call_cpu_us']:24.1f}")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
