"""The ``cohort`` command line: start a local cluster, look at it, steer it.

Why typer + rich: typer turns typed functions into a CLI with help and validation for
free; rich renders tables and live views on terminals and plain text elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Cohort: a clustered S3-compatible server (a multiserver used as a uniserver).",
)
console = Console()
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="Cluster data directory.")]


def fail(message: str, hint: str = "") -> None:
    err.print(f"[bold red]error:[/] {message}")
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    raise typer.Exit(2)


def read_cluster_json(data_dir: Path) -> dict[str, Any]:
    path = data_dir / "cluster.json"
    if not path.exists():
        fail(
            f"no cluster description at {path}",
            "start a cluster with `cohort up --data-dir DIR`, or pass --coordinator HOST:PORT",
        )
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def coordinator_address(data_dir: Path, coordinator: str | None) -> str:
    if coordinator:
        return coordinator
    return str(read_cluster_json(data_dir)["coordinator"])


@app.command()
def up(
    data_dir: DataDir = Path("./cohort-data"),
    port: Annotated[int, typer.Option(help="S3 endpoint port.")] = 9000,
    servers: Annotated[int, typer.Option(help="Number of middle-layer servers.")] = 3,
    standby: Annotated[
        int, typer.Option(help="Standby servers (N+1): take over a failed server's share.")
    ] = 0,
    failback: Annotated[
        str, typer.Option(help="When partitions leave a standby: immediate, never, or HH-HH.")
    ] = "immediate",
    partitions: Annotated[int, typer.Option(help="Virtual partitions (fixed at creation).")] = 256,
    lease_ttl: Annotated[float, typer.Option(help="Server lease, seconds.")] = 2.5,
    host: Annotated[str, typer.Option(help="Address every process binds.")] = "127.0.0.1",
    storage: Annotated[
        str | None,
        typer.Option(
            help="Shared storage: a directory (default DATA_DIR/storage), "
            "rados://POOL[/NS]?conf=FILE&keyring=FILE&id=NAME, or "
            "s3://BUCKET/PREFIX?endpoint=URL&credentials=FILE; with --ceph: rados or s3.",
        ),
    ] = None,
    ceph: Annotated[
        bool,
        typer.Option(
            "--ceph",
            help="Start a small Ceph here first (1 monitor, --ceph-osds OSDs, radosgw for "
            "--storage s3) and keep the data on it. It is temporary: it goes at Ctrl-C.",
        ),
    ] = False,
    ceph_osds: Annotated[int, typer.Option(help="OSDs of the --ceph Ceph (pool size ≤ 3).")] = 3,
    coordinator: Annotated[
        str,
        typer.Option(
            help="embedded (one SQLite process) or etcd (real etcd members started here, "
            "with client-certificate TLS: the multi-machine mode on one box)."
        ),
    ] = "embedded",
    etcd_members: Annotated[int, typer.Option(help="etcd members, with --coordinator etcd.")] = 3,
) -> None:
    """Start a whole local cluster: coordinator, servers and a director (Ctrl-C stops it)."""
    from cohort.cluster import LocalCluster

    if ceph and storage not in (None, "rados", "s3"):
        fail(
            f"--ceph starts its own Ceph; --storage {storage!r} names another store",
            "use --ceph alone (RADOS), --ceph --storage s3 (its radosgw), or --storage URL",
        )
    if not ceph and storage in ("rados", "s3"):
        fail(
            f"--storage {storage} needs a whole URL, or --ceph to start a Ceph here",
            "e.g. --storage 'rados://cohort?conf=/etc/ceph/ceph.conf', or add --ceph",
        )
    if coordinator not in ("embedded", "etcd"):
        fail(f"unknown coordinator {coordinator!r}", "use --coordinator embedded or etcd")
    if coordinator == "etcd" and not 1 <= etcd_members <= 7:
        fail(f"--etcd-members {etcd_members}: use 1 to 7 (odd numbers keep a majority)")
    try:
        cluster = LocalCluster(
            data_dir,
            coordinator=coordinator,
            etcd_members=etcd_members,
            port=port,
            servers=servers,
            partitions=partitions,
            lease_ttl=lease_ttl,
            host=host,
            standby=standby,
            failback=failback,
            storage=storage,
            ceph=ceph,
            ceph_options={"osds": ceph_osds, "objectstore": "bluestore"},
        )
    except ValueError as e:
        fail(str(e))
        return
    if ceph:
        console.print(f"starting a Ceph ({ceph_osds} bluestore OSDs)…")
    try:
        cluster.start()
    except OSError as e:
        cluster.stop()
        fail(f"cannot start the cluster: {e}", f"is port {port} free? try --port")
    except RuntimeError as e:
        cluster.stop()
        fail(str(e), f"see the logs in {data_dir}/logs")
    doc = json.loads(cluster.cluster_json.read_text())
    console.print(f"[bold green]Cohort is up[/]  S3 endpoint: [bold]{doc['s3_endpoint']}[/]")
    console.print(f"  access key: {doc['access_key']}")
    console.print(f"  secret key: {doc['secret_key']}")
    console.print(f"  region:     {doc['region']}")
    console.print(f"  data:       {cluster.data_dir}   (cluster.json, logs/)")
    if not cluster.local_storage:
        from cohort.storage import redact

        console.print(f"  storage:    {redact(doc['storage'])}")
    if cluster.ceph is not None:
        console.print(
            f"  ceph:       {cluster.ceph.conf_path}   [yellow](temporary: removed at Ctrl-C)[/]"
        )
    console.print(f"  dashboard:  {doc['s3_endpoint']}/_cohort/dashboard   (sign in with the keys)")
    for m in doc["members"]:
        console.print(f"  {m['role']:<12} {m['id']:<12} {m['address']:<22} pid {m['pid']}")
    console.print("Press Ctrl-C to stop.")
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    seen = time.time()
    try:
        while not stopping:
            time.sleep(0.5)
            for p in cluster.procs.values():
                if not p.alive() and not stopping:
                    console.print(
                        f"[yellow]{p.id} exited (code {p.popen.poll() if p.popen else '?'})[/]"
                    )
                    p.popen = None
            try:
                events = asyncio.run(_events(cluster.coordinator_address, cluster.credential()))
            except Exception:
                continue
            for ev in events:
                if ev["time"] > seen:
                    seen = ev["time"]
                    console.print(
                        f"[dim]{time.strftime('%H:%M:%S', time.localtime(ev['time']))}[/] "
                        f"{ev['kind']}: {ev['detail']}"
                    )
    finally:
        console.print("stopping…")
        cluster.stop()
        console.print("stopped.")


async def _events(address: str, credential: Any) -> list[dict[str, Any]]:
    from cohort.coord import connect

    c = connect(address, credential)
    try:
        return await c.events()
    finally:
        await c.close()


# Operator commands (status, partitions, events, top, drain, undrain, locks) live in
# cohort.admin.commands; other command groups can be added here.
from cohort.admin.commands import register as _register_operator_commands  # noqa: E402

_register_operator_commands(app)


def _register_tenant_commands() -> None:
    from cohort.admin.tenant_cli import key_app, tenant_app

    app.add_typer(tenant_app, name="tenant")
    app.add_typer(key_app, name="key")
    from cohort.admin.chaos_cli import register as register_chaos

    register_chaos(app)


_register_tenant_commands()


# -- single roles from a node config file (docs/deploy.md) ----------------------------------------
ConfigFile = Annotated[
    Path, typer.Option("--config", "-c", help="Node config file (TOML); see docs/deploy.md.")
]


def _node_config(path: Path) -> Any:
    from cohort.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        fail(str(e), "see docs/deploy.md for a complete example")


@app.command("server")
def server_role(config: ConfigFile = Path("/etc/cohort/cohort.toml")) -> None:
    """Run this machine's middle-layer server (one role, in the foreground)."""
    from cohort.server import service

    cfg = _node_config(config)
    argv = ["--id", cfg.server_id, "--coordinator", cfg.coordinator_address(),
            "--storage", cfg.storage, "--host", cfg.address,
            "--port", str(cfg.server_port), "--capacity", str(cfg.capacity),
            "--cluster-key", cfg.cluster_key]  # fmt: skip
    if cfg.master_key:
        argv += ["--master-key", cfg.master_key]
    if cfg.credentials:
        argv += ["--credentials", cfg.credentials]
    if cfg.standby:
        argv.append("--standby")
    for t in cfg.tags:
        argv += ["--tag", t]
    argv += ["--upload-expiry-seconds", str(cfg.upload_expiry_seconds),
             "--orphan-age-seconds", str(cfg.orphan_age_seconds)]  # fmt: skip
    if cfg.log_file(cfg.server_id):
        argv += ["--log-file", cfg.log_file(cfg.server_id)]
    service.main(argv)


@app.command("director")
def director_role(config: ConfigFile = Path("/etc/cohort/cohort.toml")) -> None:
    """Run this machine's S3 director (one role, in the foreground)."""
    from cohort.director import service

    cfg = _node_config(config)
    if not cfg.credentials:
        fail(f"{config}: [cluster] credentials is not set", "point it at a JSON file with "
             '{"access_key": ..., "secret_key": ...} readable only by cohort')  # fmt: skip
    argv = ["--id", cfg.director_id, "--coordinator", cfg.coordinator_address(),
            "--storage", cfg.storage, "--credentials", cfg.credentials,
            "--host", cfg.address, "--port", str(cfg.director_port),
            "--cluster-key", cfg.cluster_key]  # fmt: skip
    if cfg.master_key:
        argv += ["--master-key", cfg.master_key]
    for d in cfg.domains:
        argv += ["--domain", d]
    argv += ["--balance", cfg.balance]
    if cfg.log_file(cfg.director_id):
        argv += ["--log-file", cfg.log_file(cfg.director_id)]
    service.main(argv)


@app.command("coordinator")
def coordinator_role(config: ConfigFile = Path("/etc/cohort/cohort.toml")) -> None:
    """Run the coordinator role: the embedded coordinator, or with etcd a primary candidate."""
    cfg = _node_config(config)
    if not cfg.uses_etcd:
        from cohort.coord import embedded

        argv = ["--data-dir", cfg.coordinator_data_dir, "--host", cfg.address,
                "--port", str(cfg.coordinator_port), "--partitions", str(cfg.partitions),
                "--lease-ttl", str(cfg.lease_ttl), "--cluster-key", cfg.cluster_key]  # fmt: skip
        if cfg.log_file("coordinator"):
            argv += ["--log-file", cfg.log_file("coordinator")]
        embedded.main(argv)
        return
    from cohort.logs import setup_logging

    setup_logging(f"primary-{cfg.node_id}", cfg.log_file(f"primary-{cfg.node_id}"))
    asyncio.run(_primary_candidate(cfg.coordinator_address(), f"primary-{cfg.node_id}"))


async def _primary_candidate(address: str, name: str) -> None:
    """Stand for election as the primary (partition assignment) until SIGTERM/SIGINT."""
    from cohort.coord.etcd import EtcdCoordinator

    coord = EtcdCoordinator(address, campaign=True, name=name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(coord.run_primary())
    print(f"READY primary candidate {name} on {address}", flush=True)
    await stop.wait()
    task.cancel()
    await coord.close()


def main() -> None:
    os.umask(0o077)  # every file the CLI (and `cohort up`'s children) make is private
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
