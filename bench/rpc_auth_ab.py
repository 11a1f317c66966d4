"""What authentication costs per RPC call: this checkout's cohort/rpc.py next to one from
before authentication, interleaved in one process.

    git worktree add /tmp/auth-pre 8880b3c      # the last commit before authentication
    .venv/bin/python bench/rpc_auth_ab.py --before /tmp/auth-pre [--calls 20000] [--rounds 5]

Each round makes ``--calls`` calls of a 64-byte echo over one connection, 32 in flight,
first with the old module (no handshake), then with this one (authenticated connection);
it prints the median calls/s and CPU µs per call of each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

import cohort.rpc as after
from cohort.auth import ClusterKey, Verifier


def load_before(checkout: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("rpc_before", checkout / "cohort" / "rpc.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no cohort/rpc.py under {checkout}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


async def one(mod: Any, authed: bool, calls: int) -> tuple[float, float]:
    key = ClusterKey.generate()
    srv = mod.RpcServer(Verifier(key)) if authed else mod.RpcServer()

    async def echo(p: Any) -> Any:
        return p

    srv.register("echo", echo)
    port = await srv.start("127.0.0.1", 0)
    args = ("127.0.0.1", port, key.member("bench")) if authed else ("127.0.0.1", port)
    c = mod.RpcClient(*args)
    await c.call("echo", b"x")
    sem = asyncio.Semaphore(32)

    async def call() -> None:
        async with sem:
            await c.call("echo", b"x" * 64)

    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(call() for _ in range(calls)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await c.close()
    await srv.close()
    return calls / wall, cpu / calls * 1e6


async def main(before: ModuleType, calls: int, rounds: int) -> None:
    res: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
    for _ in range(rounds):
        res["before"].append(await one(before, False, calls))
        res["after"].append(await one(after, True, calls))
    med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
           for k, v in res.items()}  # fmt: skip
    print(f"{'':8} {'calls/s':>10} {'CPU us/call':>12}")
    for k, (rate, cpu) in med.items():
        print(f"{k:8} {rate:10.0f} {cpu:12.1f}")
    print(f"{'after/before':8} {med['after'][0] / med['before'][0]:10.3f} "
          f"{med['after'][1] / med['before'][1]:12.3f}")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a checkout from before auth")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    uvloop.run(main(load_before(a.before), a.calls, a.rounds))
