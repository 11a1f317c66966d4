"""PUT/GET throughput through a three-layer Cohort cluster vs a one-process file server.

    .venv/bin/python bench/s3_trunk.py [--duration 5] [--procs 2] [--concurrency 8] [--json out.json]

Both targets run on this machine in the same run, one after the other, with the same
load generator (bench/loadgen.py: several processes of asyncio clients that sign
requests themselves).  The client's own CPU seconds are printed so you can tell whether
it was the bottleneck.  On a 2-core machine client and servers share the cores: compare
the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadResult, Target, cluster_target, run_load

from cohort.cluster import LocalCluster, _read_ready

SIZES = [4096, 1 << 20]


def bench_target(t: Target, args: argparse.Namespace) -> dict[tuple[str, int], LoadResult]:
    out = {}
    for size in SIZES:
        for op in ("PUT", "GET"):
            out[(op, size)] = run_load(
                t, op, size, procs=args.procs, concurrency=args.concurrency, duration=args.duration
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster", port=0).start()
        try:
            t = cluster_target(cluster, "bench")
            cohort = bench_target(t, args)
        finally:
            cluster.stop()

        base = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("baseline_server.py")),
                str(Path(tmp) / "baseline"),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            addr = _read_ready(base, "baseline", 20)
            baseline = bench_target(Target(f"http://{addr}", "x", "y", "bench"), args)
        finally:
            base.terminate()
            base.wait()

    rows = []
    print(
        f"\nS3 throughput: {args.procs} client processes x {args.concurrency} tasks, {args.duration:.0f} s per cell"
    )
    print(
        f"{'op':<4} {'size':>8} | {'cohort req/s':>12} {'MB/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'cli cpu':>7} {'err':>4} | "
        f"{'baseline req/s':>14} {'MB/s':>7} {'cli cpu':>7} | {'ratio':>6}"
    )
    for key in cohort:
        c, b = cohort[key], baseline[key]
        ratio = c.rate / b.rate if b.rate else 0.0
        size = f"{key[1] // 1024} KiB" if key[1] < 1 << 20 else f"{key[1] >> 20} MiB"
        print(
            f"{key[0]:<4} {size:>8} | {c.rate:>12.0f} {c.mb_per_s:>7.1f} {c.p50_ms:>7.1f} {c.p99_ms:>7.1f} "
            f"{c.client_cpu_seconds:>6.1f}s {c.errors:>4} | {b.rate:>14.0f} {b.mb_per_s:>7.1f} "
            f"{b.client_cpu_seconds:>6.1f}s | {ratio:>6.2f}"
        )
        rows.append(
            {
                "op": key[0],
                "size": key[1],
                "cohort": c.__dict__,
                "baseline": b.__dict__,
                "ratio": ratio,
            }
        )
    print(
        "client cpu = CPU seconds the load generator itself used (of "
        f"{args.duration * 2:.0f} core-seconds available on 2 cores)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
