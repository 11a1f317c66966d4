"""``cohort chaos``: the fault-injection harness against a fresh local cluster.

Starts a cluster (embedded coordinator, three servers, one director) in ``--data-dir``
(a temporary directory by default), runs clients that record a history while the seeded
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
from cohort.chaos.runner import ClusterInfo, RunConfig, run_chaos, write_report


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
) -> None:
    """Run the Jepsen-style fault-injection harness against a fresh local cluster."""
    unknown = set(actions.split(",")) - set(ACTIONS)
    if unknown:
        typer.echo(
            f"error: unknown fault kinds {sorted(unknown)}; choose from {', '.join(ACTIONS)}",
            err=True,
        )
        raise typer.Exit(2)
    from cohort.cluster import LocalCluster

    tmp = None if data_dir is not None else tempfile.TemporaryDirectory(prefix="cohort-chaos-")
    root = data_dir if data_dir is not None else Path(tmp.name) if tmp else Path(".")
    cluster = LocalCluster(root / "cluster", port=0, partitions=partitions).start()
    try:
        info = ClusterInfo.load(cluster.data_dir)
        cfg = RunConfig(
            duration=minutes * 60, clients=clients, keys=keys, seed=seed,
            roles=tuple(r for r in roles.split(",") if r), actions=tuple(a for a in ACTIONS if a in actions.split(",")),
            fault_interval=(1.0, 3.0), fault_duration=(1.0, 4.0), pause_duration=(3.0, 5.0),
            settle_timeout=60,
        )  # fmt: skip

        def restart(m: Member) -> int:
            return int(cluster.restart(m.id).pid)

        report = asyncio.run(run_chaos(info, cfg, restart=restart, out=print))
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
