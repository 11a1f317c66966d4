"""CPU cost per request in each layer (director, server, coordinator), and in the client.

    .venv/bin/python bench/cost.py [--requests 3000] [--size 4096]

Throughput on a shared 2-core machine depends on whatever else runs; CPU seconds spent
per request by each process do not (much).  This runs N PUTs then N GETs through a
three-layer cluster with the lean signing client and reads every process's CPU time from
/proc before and after, so you see where the work goes: the figure to drive down.  The
peer is the one-process file server of bench/baseline_server.py doing the same requests
(PUT durable with fsync, GET), measured the same way in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Target, cluster_target, run_load

from cohort.cluster import LocalCluster, _read_ready

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, kind: str = "all") -> float:
    """User+system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
    return {"user": user, "system": system}.get(kind, user + system)


def measure(t: Target, pids: dict[str, int], op: str, size: int, n: int) -> dict[str, float]:
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    before_sys = {k: cpu_seconds(p, "system") for k, p in pids.items()}
    # run by count, approximately: enough time for n requests at a modest rate
    done = 0
    t0 = time.monotonic()
    total_cli = 0.0
    while done < n and time.monotonic() - t0 < 120:
        r = run_load(t, op, size, procs=1, concurrency=8, duration=2.0, keys=20)
        assert r.errors == 0, f"{r.errors} {op} requests failed"
        done += r.requests
        total_cli += r.client_cpu_seconds
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    after_sys = {k: cpu_seconds(p, "system") for k, p in pids.items()}
    out = {k: (after[k] - before[k]) / max(done, 1) * 1e6 for k in pids}
    out.update({f"{k}_sys": (after_sys[k] - before_sys[k]) / max(done, 1) * 1e6 for k in pids})
    out["client"] = total_cli / max(done, 1) * 1e6
    out["requests"] = done
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cohort-cost-") as tmp:
        cluster = LocalCluster(Path(tmp) / "c", port=0).start()
        try:
            t = cluster_target(cluster, "cost")
            pids = {
                "director": cluster.procs["director-1"].pid,
                "coordinator": cluster.procs["coordinator"].pid,
            }
            server_pids = {k: p.pid for k, p in cluster.procs.items() if p.role == "server"}
            for op in ("PUT", "GET"):
                r = measure(t, {**pids, **server_pids}, op, args.size, args.requests)
                r["servers"] = sum(r.pop(k) for k in server_pids)
                r["servers_sys"] = sum(r.pop(f"{k}_sys") for k in server_pids)
                results.setdefault("cohort", {})[op] = r
        finally:
            cluster.stop()
        base = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("baseline_server.py")),
                str(Path(tmp) / "b"),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            addr = _read_ready(base, "baseline", 20)
            bt = Target(f"http://{addr}", "x", "y", "cost")
            for op in ("PUT", "GET"):
                results.setdefault("baseline", {})[op] = measure(
                    bt, {"server": base.pid}, op, args.size, args.requests
                )
        finally:
            base.terminate()
            base.wait()
    print(f"\nCPU microseconds per request, {args.size}-byte objects (lower is better)")
    print(
        f"{'op':<4} | {'director':>9} {'servers':>9} {'coord':>7} {'total':>9} | {'baseline':>9} | "
        f"{'ratio':>6} | {'client':>7} | kernel share: director, servers, baseline"
    )
    for op in ("PUT", "GET"):
        c = results["cohort"][op]
        b = results["baseline"][op]
        total = c["director"] + c["servers"] + c["coordinator"]
        print(
            f"{op:<4} | {c['director']:>9.0f} {c['servers']:>9.0f} {c['coordinator']:>7.0f} {total:>9.0f} | "
            f"{b['server']:>9.0f} | {total / b['server']:>6.2f} | {c['client']:>7.0f} | "
            f"{c['director_sys']:.0f}, {c['servers_sys']:.0f}, {b['server_sys']:.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
