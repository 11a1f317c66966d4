"""``cohort tenant ...`` and ``cohort key ...``: accounts and their access keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cohort.tenants import TenantError, TenantRegistry

console = Console()
err = Console(stderr=True, soft_wrap=True)

tenant_app = typer.Typer(no_args_is_help=True, help="Manage tenants (accounts that own buckets).")
key_app = typer.Typer(no_args_is_help=True, help="Manage access keys of tenants.")

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="Cluster data directory.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str, hint: str = "") -> None:
    err.print(f"[bold red]error:[/] {message}")
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    raise typer.Exit(2)


class _Registry:
    """The registry of the cluster in a data directory, on whatever storage it uses
    (cluster.json's ``storage``: a directory, rados://... or s3://...)."""

    def __init__(self, data_dir: Path) -> None:
        doc_path = data_dir / "cluster.json"
        key_path = data_dir / "master.key"
        if not doc_path.exists() or not key_path.exists():
            _fail(
                f"{data_dir} is not a Cohort data directory (no cluster.json / master.key)",
                "pass --data-dir of a cluster started with `cohort up`",
            )
        self.doc: dict[str, Any] = json.loads(doc_path.read_text())
        self.master = key_path.read_bytes().strip()

    def run(self, op: Callable[[TenantRegistry], Awaitable[Any]]) -> Any:
        from cohort.storage import StorageUnavailable, aclose_store, open_store

        async def go() -> Any:
            store = await open_store(self.doc["storage"])
            try:
                return await op(TenantRegistry(store, self.master))
            finally:
                await aclose_store(store)

        try:
            return asyncio.run(go())
        except TenantError as e:
            _fail(str(e))
        except StorageUnavailable as e:
            _fail(str(e), "is the cluster's storage reachable from here?")


def _print_key(tenant: str, access: str, secret: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"tenant": tenant, "access_key": access, "secret_key": secret}))
        return
    console.print(f"tenant:     {tenant}\naccess key: {access}\nsecret key: {secret}")
    console.print("[dim]The secret is shown once; store it now.[/]")


@tenant_app.command("create")
def tenant_create(
    name: str, data_dir: DataDir = Path("./cohort-data"), as_json: AsJson = False
) -> None:
    """Create a tenant and its first access key."""
    access, secret = _Registry(data_dir).run(lambda reg: reg.create_tenant(name))
    _print_key(name, access, secret, as_json)


@tenant_app.command("list")
def tenant_list(data_dir: DataDir = Path("./cohort-data"), as_json: AsJson = False) -> None:
    """Tenants and their active keys."""
    tenants = _Registry(data_dir).run(lambda reg: reg.list())
    if as_json:
        print(json.dumps(tenants, indent=2))
        return
    t = Table(title="Tenants")
    t.add_column("tenant")
    t.add_column("active keys")
    for name, info in sorted(tenants.items()):
        t.add_row(name, ", ".join(info["keys"]) or "-")
    console.print(t)


@tenant_app.command("delete")
def tenant_delete(name: str, data_dir: DataDir = Path("./cohort-data")) -> None:
    """Delete a tenant (it must own no buckets) and all its keys."""
    reg = _Registry(data_dir)
    doc = reg.doc
    from cohort.coord import connect

    async def owned() -> list[str]:
        from cohort.auth import ClusterKey

        key = ClusterKey.load(doc.get("cluster_key") or data_dir / "cluster.key")
        c = connect(doc["coordinator"], key.member("cli"))
        try:
            view = await c.view()
        finally:
            await c.close()
        return [b["name"] for b in view["buckets"] if b.get("tenant") == name]

    try:
        buckets = asyncio.run(owned())
    except Exception as e:
        _fail(
            f"cannot reach the coordinator at {doc['coordinator']}: {e}", "is the cluster running?"
        )
        return
    reg.run(lambda r: r.delete_tenant(name, buckets))
    console.print(f"deleted tenant {name}")


@key_app.command("create")
def key_create(
    tenant: str, data_dir: DataDir = Path("./cohort-data"), as_json: AsJson = False
) -> None:
    """Add an access key to a tenant."""
    access, secret = _Registry(data_dir).run(lambda reg: reg.create_key(tenant))
    _print_key(tenant, access, secret, as_json)


@key_app.command("revoke")
def key_revoke(access_key: str, data_dir: DataDir = Path("./cohort-data")) -> None:
    """Revoke an access key: it stops at the next request (within ~1 s on RADOS or S3)."""
    tenant = _Registry(data_dir).run(lambda reg: reg.revoke_key(access_key))
    console.print(f"revoked {access_key} (tenant {tenant})")
