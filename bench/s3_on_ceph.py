"""Cohort on Ceph next to Ceph's own S3 gateway, on the same OSDs, through S3 both ways.

    .venv/bin/python bench/s3_on_ceph.py [--osds 1] [--memstore] [--servers 2]
        [--duration 5] [--procs 2] [--concurrency 8] [--with-local] [--json out.json]

Starts one real Ceph (cohort.ceph_server: 1 monitor, --osds bluestore OSDs on files
unless --memstore, and radosgw), then measures one system at a time with the lean load
generator (bench/loadgen.py: aiohttp, Cohort's own SigV4, --procs processes x
--concurrency tasks), 4 KiB and 1 MiB PUT then GET for --duration seconds each:

* ``radosgw``: Ceph's S3 gateway, straight;
* ``cohort/rados``: a Cohort cluster (1 director, --servers servers, embedded
  coordinator) whose storage is the Ceph pool (``LocalCluster(ceph=...)``), through
  Cohort's S3 front end;
* ``cohort/s3``: a Cohort cluster whose storage is that radosgw (the s3 backend), with
  the S3 requests Cohort issued per client request, from radosgw's own request counters
  (its admin socket's ``perf dump``: every request Cohort's servers and directors made,
  background ones included, such as the tenant registry's refresh once a second per
  process);
* ``cohort/local`` (--with-local): a Cohort cluster on a local directory, for reference.

Each row also gives the CPU seconds each system's processes used per 1000 requests
(``/proc/<pid>/stat``), which says where the time goes.  The client's own CPU is given
too: it runs on the same 2 shared cores.

Figures on a shared 2-core machine vary by +-20% between runs: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import LoadResult, Target, cluster_target, run_load

from cohort.ceph_server import CephCluster
from cohort.cluster import LocalCluster
from cohort.s3.sigv4 import sign_request

KiB = 1024
MiB = 1024 * 1024
SIZES = (4 * KiB, 1 * MiB)
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` (and their reaped children) so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / TICK  # utime stime cutime cstime
    return total


def rgw_counters(ceph: CephCluster) -> dict[str, int]:
    """radosgw's request counters (``ceph --admin-daemon <asok> perf dump``)."""
    asok = ceph.base_dir / "run" / "client.rgw.gw.asok"
    out = subprocess.run(
        ["ceph", "--admin-daemon", str(asok), "perf", "dump"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rgw = json.loads(out)["rgw"]
    return {k: int(rgw[k]) for k in ("req", "failed_req", "get", "put")}


def rgw_bucket(ceph: CephCluster, bucket: str) -> Target:
    cr = ceph.s3_credentials
    url = f"{ceph.s3_endpoint}/{bucket}"
    headers = sign_request(
        "PUT", url, {}, EMPTY_SHA256, cr["access_key"], cr["secret_key"], "us-east-1"
    )
    req = urllib.request.Request(url, data=b"", method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30):
            pass
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise
    return Target(ceph.s3_endpoint, cr["access_key"], cr["secret_key"], bucket)


def ceph_pids(ceph: CephCluster) -> list[int]:
    ds = [ceph.mon, ceph.rgw, *ceph.osds.values()]
    return [d.popen.pid for d in ds if d is not None and d.popen is not None]


def cohort_pids(cluster: LocalCluster) -> list[int]:
    return [p.pid for p in cluster.procs.values() if p.alive()]


def measure(
    system: str,
    t: Target,
    args: argparse.Namespace,
    ceph: CephCluster,
    cohort: LocalCluster | None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        conc = args.concurrency if size < MiB else max(1, args.concurrency // 2)
        for op in ("PUT", "GET"):
            c0, k0 = (
                cpu_seconds(ceph_pids(ceph)),
                cpu_seconds(cohort_pids(cohort) if cohort else []),
            )
            r0 = rgw_counters(ceph)
            res: LoadResult = run_load(
                t, op, size, procs=args.procs, concurrency=conc, duration=args.duration
            )
            r1 = rgw_counters(ceph)
            c1, k1 = (
                cpu_seconds(ceph_pids(ceph)),
                cpu_seconds(cohort_pids(cohort) if cohort else []),
            )
            n = max(1, res.requests)
            row: dict[str, Any] = {
                "system": system,
                "op": op,
                "size": size,
                "in_flight": args.procs * conc,
                "rate": res.rate,
                "mb_s": res.mb_per_s,
                "p50_ms": res.p50_ms,
                "p99_ms": res.p99_ms,
                "requests": res.requests,
                "errors": res.errors,
                "client_cpu_s": res.client_cpu_seconds,
                "ceph_cpu_ms_per_req": (c1 - c0) * 1000 / n,
                "cohort_cpu_ms_per_req": (k1 - k0) * 1000 / n,
                "rgw_requests": r1["req"] - r0["req"],
                "rgw_puts": r1["put"] - r0["put"],
                "rgw_gets": r1["get"] - r0["get"],
                "rgw_failed": r1["failed_req"] - r0["failed_req"],
            }
            row["rgw_requests_per_req"] = row["rgw_requests"] / n
            rows.append(row)
            print(
                f"  {system:<13} {op} {size // KiB:>5} KiB  {res.rate:7.0f}/s  "
                f"p50 {res.p50_ms:6.1f} ms  p99 {res.p99_ms:6.1f} ms  errors {res.errors}  "
                f"rgw req/req {row['rgw_requests_per_req']:.3f}",
                flush=True,
            )
    return rows


def idle_rgw_rate(ceph: CephCluster, seconds: float) -> float:
    """Requests per second radosgw receives while nobody uses Cohort (background work)."""
    r0 = rgw_counters(ceph)
    time.sleep(seconds)
    return (rgw_counters(ceph)["req"] - r0["req"]) / seconds


def cohort_cluster(data: Path, args: argparse.Namespace, **kw: Any) -> LocalCluster:
    """A started cluster whose every partition has an owner holding its lock."""
    c = LocalCluster(data, port=0, servers=args.servers, partitions=args.partitions, **kw)
    c.start()
    deadline = time.monotonic() + 120
    while not all(p[0] is not None and p[0] == p[2] for p in c.view()["partitions"]):
        if time.monotonic() > deadline:
            c.stop()
            raise RuntimeError("partitions not owned after 120 s")
        time.sleep(0.1)
    return c


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"args": vars(args), "rows": []}
    rows: list[dict[str, Any]] = out["rows"]
    t0 = time.monotonic()
    ceph = CephCluster(
        args.osds, objectstore="memstore" if args.memstore else "bluestore", rgw=True
    ).start(timeout=180)
    out["ceph_boot_s"] = time.monotonic() - t0
    print(f"Ceph: {args.osds} {'memstore' if args.memstore else 'bluestore'} OSD(s), "
          f"radosgw; booted in {out['ceph_boot_s']:.1f} s", flush=True)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(
            prefix="cohort-bench-ceph-", dir=os.environ.get("COHORT_BENCH_DIR")
        ) as tmp:
            rows += measure("radosgw", rgw_bucket(ceph, "bench-rgw"), args, ceph, None)

            c = cohort_cluster(Path(tmp) / "rados", args, ceph=ceph)
            try:
                rows += measure("cohort/rados", cluster_target(c, "bench"), args, ceph, c)
            finally:
                c.stop()

            c = cohort_cluster(Path(tmp) / "s3", args, ceph=ceph, storage="s3")
            try:
                t = cluster_target(c, "bench")
                out["cohort_s3_idle_rgw_req_per_s"] = idle_rgw_rate(ceph, 5.0)
                rows += measure("cohort/s3", t, args, ceph, c)
            finally:
                c.stop()

            if args.with_local:
                c = cohort_cluster(Path(tmp) / "local", args)
                try:
                    rows += measure("cohort/local", cluster_target(c, "bench"), args, ceph, c)
                finally:
                    c.stop()
    finally:
        ceph.stop()
    return out


def report(out: dict[str, Any]) -> None:
    rows = out["rows"]
    by = {(r["system"], r["op"], r["size"]): r for r in rows}
    systems = [s for s in ("cohort/rados", "cohort/s3", "cohort/local") if (s, "PUT", 4096) in by]
    a = out["args"]
    print(
        f"\nS3 through each front end, same Ceph ({a['osds']} "
        f"{'memstore' if a['memstore'] else 'bluestore'} OSD(s)); {a['procs']} client processes,"
        f" {a['concurrency']} tasks each ({a['concurrency'] // 2} for 1 MiB); Cohort: 1 director,"
        f" {a['servers']} servers, {a['partitions']} partitions; 2 shared cores\n"
    )
    head = "| op | size | radosgw /s |" + "".join(f" {s} /s | x rgw |" for s in systems)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for size in SIZES:
        for op in ("PUT", "GET"):
            g = by[("radosgw", op, size)]
            line = f"| {op} | {size // KiB} KiB | {g['rate']:.0f} |"
            for s in systems:
                r = by[(s, op, size)]
                line += f" {r['rate']:.0f} | {r['rate'] / g['rate']:.2f} |" if g["rate"] else " - |"
            print(line)
    print("\nlatency p50 / p99 ms, errors, CPU ms per request (Ceph daemons; Cohort processes):")
    for r in rows:
        print(
            f"  {r['system']:<13} {r['op']} {r['size'] // KiB:>5} KiB  "
            f"{r['p50_ms']:6.1f} / {r['p99_ms']:6.1f}  errors {r['errors']}  "
            f"ceph {r['ceph_cpu_ms_per_req']:5.2f}  cohort {r['cohort_cpu_ms_per_req']:5.2f}  "
            f"client cpu {r['client_cpu_s']:.1f} s"
        )
    if ("cohort/s3", "PUT", 4096) in by:
        print("\nS3 requests Cohort issued to radosgw per client request (s3 backend):")
        for size in SIZES:
            for op in ("PUT", "GET"):
                r = by[("cohort/s3", op, size)]
                extra = ""
                if op == "PUT":
                    # each client PUT below 8 MiB writes its blob with one PutObject; the
                    # rest are log segments (one per group commit) and the like
                    others = (r["rgw_puts"] - r["requests"]) / max(1, r["requests"])
                    extra = f"; other PUTs (log segments...) per client PUT {others:.3f}"
                print(
                    f"  {op} {size // KiB:>5} KiB: {r['rgw_requests_per_req']:.3f} "
                    f"({r['rgw_requests']} requests: {r['rgw_puts']} PUT, {r['rgw_gets']} GET; "
                    f"{r['rgw_failed']} failed; for {r['requests']} client requests{extra})"
                )
        print(
            f"  idle (background, before the load): "
            f"{out['cohort_s3_idle_rgw_req_per_s']:.1f} requests/s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--osds", type=int, default=1)
    ap.add_argument("--memstore", action="store_true", help="OSDs in memory (not durable)")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--with-local", action="store_true", help="also Cohort on a directory")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()
    out = run(args)
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
