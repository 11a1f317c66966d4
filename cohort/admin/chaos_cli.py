"""``cohort chaos``: the fault-injection harness against a fresh local cluster.

Starts a cluster (embedded coordinator or ``--coordinator etcd``, three servers, one
director) in ``--data-dir`` (a temporary directory by default), runs clients that record a history while the seeded
nemesis kills, restarts and pauses members, then heals, settles and checks:
linearizability per key, no lost acknowledged writes, single owner per partition log,
availability per fault.  Exit status 0 = every check held, 1 = a check failed,
2 = undecided or the run could not be made.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from cohort.chaos.nemesis import ACTIONS, Member
from cohort.chaos.runner import (
    Boto3KV,
    ChaosReport,
    ClusterInfo,
    RunConfig,
    run_chaos,
    write_report,
)


def chaos(
    minutes: Annotated[float, typer.Option(help="Length of the workload.")] = 1.0,
    seed: Annotated[
        int, typer.Option(help="Nemesis and workload seed (a failing seed replays).")
    ] = 1,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", "-d", help="Where the cluster lives (default: a temp dir)."),
    ] = None,
    roles: Annotated[
        str, typer.Option(help="Members the nemesis may hit.")
    ] = "server,director,coordinator",
    actions: Annotated[str, typer.Option(help="Fault kinds.")] = "kill,pause",
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 4,
    keys: Annotated[
        int, typer.Option(help="Keys the clients share (small: operations collide).")
    ] = 3,
    partitions: Annotated[int, typer.Option(help="Virtual partitions of the test cluster.")] = 16,
    locks: Annotated[
        bool,
        typer.Option(help="Also run DLM lock clients (lock-safety and fenced-writes checks)."),
    ] = False,
    proxies: Annotated[
        bool,
        typer.Option(
            help="Fault proxies in front of servers and the coordinator "
            "(add proxy-drop,proxy-delay,proxy-blackhole to --actions)."
        ),
    ] = False,
    faulty_store: Annotated[
        str | None,
        typer.Option(help="SEED[:RATE]: servers inject storage write faults (EIO/ENOSPC/slow)."),
    ] = None,
    coordinator: Annotated[
        str,
        typer.Option(
            help="embedded (SQLite) or etcd (real etcd-server processes; the "
            "'coordinator' role then means the etcd members)."
        ),
    ] = "embedded",
    etcd_members: Annotated[int, typer.Option(help="etcd members, with --coordinator etcd.")] = 3,
) -> None:
    """Run the Jepsen-style fault-injection harness against a fresh local cluster."""
    unknown = set(actions.split(",")) - set(ACTIONS)
    if unknown:
        typer.echo(
            f"error: unknown fault kinds {sorted(unknown)}; choose from {', '.join(ACTIONS)}",
            err=True,
        )
        raise typer.Exit(2)
    if coordinator not in ("embedded", "etcd"):
        typer.echo(f"error: --coordinator must be embedded or etcd, not {coordinator!r}", err=True)
        raise typer.Exit(2)
    role_list = [r for r in roles.split(",") if r]
    if coordinator == "etcd":
        from cohort.etcd_server import etcd_available

        if not etcd_available():
            typer.echo(
                "error: etcd-server is not installed (hint: bash scripts/system-deps.sh)", err=True
            )
            raise typer.Exit(2)
        role_list = ["etcd" if r == "coordinator" else r for r in role_list]
    from cohort.cluster import LocalCluster

    tmp = None if data_dir is not None else tempfile.TemporaryDirectory(prefix="cohort-chaos-")
    root = data_dir if data_dir is not None else Path(tmp.name) if tmp else Path(".")
    cluster = LocalCluster(
        root / "cluster", port=0, partitions=partitions, proxies=proxies,
        server_args=["--faulty-store", faulty_store] if faulty_store else None,
        coordinator=coordinator, etcd_members=etcd_members,
    ).start()  # fmt: skip
    code = 2
    try:
        info = ClusterInfo.load(cluster.data_dir)
        cfg = RunConfig(
            duration=minutes * 60, clients=clients, keys=keys, seed=seed,
            roles=tuple(role_list), actions=tuple(a for a in ACTIONS if a in actions.split(",")),
            fault_interval=(1.0, 3.0), fault_duration=(1.0, 4.0), pause_duration=(3.0, 5.0),
            settle_timeout=60,
        )  # fmt: skip

        def restart(m: Member) -> int:
            return int(cluster.restart(m.id).pid)

        async def run() -> ChaosReport:
            if not locks:
                return await run_chaos(
                    info, cfg, restart=restart, proxies=cluster.proxies or None, out=print
                )
            from cohort.chaos.lock_workload import (
                LockWorkload,
                server_addresses,
                tenant_credential_of,
            )

            lw = LockWorkload(server_addresses(cluster.data_dir), clients=3, seed=seed,
                              kv_factory=lambda: Boto3KV(info, cfg),
                              credential=tenant_credential_of(cluster.data_dir))  # fmt: skip
            rep, _ = await asyncio.gather(
                run_chaos(info, cfg, restart=restart, proxies=cluster.proxies or None,
                          lock_intervals=lw.intervals, out=print),
                lw.run(cfg.duration),
            )  # fmt: skip
            rep.checks.append(lw.check())
            return rep

        report = asyncio.run(run())
        path = root / "chaos-report.json"
        write_report(report, path)
        print(report.summary())
        print(f"report: {path}")
        code = report.exit_code
    finally:
        cluster.stop()
        if tmp is not None and code == 0:
            tmp.cleanup()
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(chaos)
