"""The operator commands of the ``cohort`` CLI: status, partitions, events, top, drain,
undrain, locks.

Each command is a plain function registered on the Typer app by :func:`register` (called
from :mod:`cohort.admin.cli`), so other command groups can live in ``cli.py`` without
touching these.  Every command prints for humans by default and one JSON document with
``--json``.  Failures print what went wrong and what to try on stderr and exit with 2
(bad address, unreachable coordinator, unknown server) or 1 (the operation itself did not
finish, e.g. a drain that timed out).

The coordinator is found from ``--coordinator HOST:PORT`` (or ``etcd://...``), else
``$COHORT_COORDINATOR``, else ``<data-dir>/cluster.json`` written by ``cohort up``.  The
cluster key the CLI proves itself with is ``$COHORT_CLUSTER_KEY`` (a file), else the one
cluster.json names, else ``<data-dir>/cluster.key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="Cluster data directory.")]
CoordOpt = Annotated[
    str | None,
    typer.Option(
        "--coordinator",
        "-c",
        envvar="COHORT_COORDINATOR",
        help="Coordinator HOST:PORT (or etcd://...); default: from <data-dir>/cluster.json.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]

_ADDR = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


class CliError(Exception):
    def __init__(self, message: str, hint: str = "", code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def fail(message: str, hint: str = "", code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    if hint:
        err.print(f"[dim]hint:[/] {hint}", highlight=False)
    raise typer.Exit(code)


def run(coro: Any) -> Any:
    """Run ``coro``; a :class:`CliError` becomes a message and an exit code."""
    try:
        return asyncio.run(coro)
    except CliError as e:
        fail(e.message, e.hint, e.code)


# ---------------------------------------------------------------------------------- plumbing
def resolve(data_dir: Path, coordinator: str | None) -> str:
    """The coordinator address to use; validates its form."""
    if not coordinator:
        path = data_dir / "cluster.json"
        if not path.exists():
            fail(
                f"no cluster description at {path}",
                "pass --coordinator HOST:PORT (or set COHORT_COORDINATOR), or point "
                "--data-dir at the directory `cohort up` uses",
            )
        coordinator = str(json.loads(path.read_text())["coordinator"])
    if not coordinator.startswith("etcd") and not _ADDR.match(coordinator):
        fail(
            f"bad coordinator address {coordinator!r}",
            "use HOST:PORT, e.g. --coordinator 127.0.0.1:7400 (see cluster.json), "
            "or etcd://HOST:PORT",
        )
    _load_credential(data_dir)
    return coordinator


_credential: list[Any] = []  # the CLI process's member credential, once resolved


def _load_credential(data_dir: Path) -> None:
    import os

    from cohort.auth import AuthError, ClusterKey

    path = os.environ.get("COHORT_CLUSTER_KEY")
    doc_path = data_dir / "cluster.json"
    if not path and doc_path.exists():
        with contextlib.suppress(ValueError, OSError):
            path = json.loads(doc_path.read_text()).get("cluster_key")
    if not path:
        path = str(data_dir / "cluster.key")
    try:
        _credential[:] = [ClusterKey.load(path).member(f"cli-{os.getpid()}")]
    except AuthError as e:
        fail(str(e), "set COHORT_CLUSTER_KEY to the cluster key file, or use --data-dir")
    except OSError as e:
        fail(
            f"cannot read the cluster key {path}: {e}",
            "the CLI needs the cluster key: run it as the user that runs the cluster",
        )


def credential() -> Any:
    """The member credential the CLI proves itself with (after :func:`resolve`)."""
    if not _credential:
        fail("no cluster key loaded", "pass --data-dir or set COHORT_CLUSTER_KEY")
    return _credential[0]


class Session:
    """One coordinator connection for the life of a command."""

    def __init__(self, address: str) -> None:
        from cohort.coord import connect

        self.address = address
        self.coord = connect(address, credential())

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.coord.close()

    async def call(self, what: str, coro: Any) -> Any:
        from cohort.rpc import RpcError

        try:
            return await coro
        except RpcError as e:
            if e.code == "AuthFailed":
                raise CliError(
                    f"the coordinator at {self.address} refused this machine's cluster key: "
                    f"{e.message}",
                    "use the cluster.key of the cluster you mean (--data-dir or "
                    "COHORT_CLUSTER_KEY); see docs/security.md",
                ) from None
            if e.code in ("ConnectionError", "Timeout") or type(e).__name__ in (
                "RpcConnectionError",
                "RpcTimeout",
            ):
                raise CliError(
                    f"cannot reach the coordinator at {self.address}: {e.message or e.code}",
                    "is the cluster running? `cohort up` starts one; check --coordinator "
                    "or --data-dir",
                ) from None
            raise CliError(f"{what} failed: {e.message or e.code}", code=1) from None
        except OSError as e:
            raise CliError(
                f"cannot reach the coordinator at {self.address}: {e}",
                "is the cluster running? check --coordinator or --data-dir",
            ) from None

    async def view(self) -> dict[str, Any]:
        v: dict[str, Any] = await self.call("view", self.coord.view())
        return v

    async def events(self) -> list[dict[str, Any]]:
        e: list[dict[str, Any]] = await self.call("events", self.coord.events())
        return e


def servers_of(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in view["members"] if m["role"] == "server"}


def require_server(view: dict[str, Any], server: str) -> dict[str, Any]:
    servers = servers_of(view)
    if server not in servers:
        known = ", ".join(sorted(servers)) or "none"
        raise CliError(
            f"unknown server {server!r}",
            f"known servers: {known} (see `cohort status`)",
        )
    return servers[server]


def partition_state(p: list[Any]) -> str:
    owner, _, holder = p
    if owner is None:
        return "unassigned"
    return "serving" if holder == owner else "moving"


async def server_status(address: str, timeout: float = 1.0) -> dict[str, Any] | None:
    """The server's ``status`` RPC, or None when it does not answer."""
    from cohort.rpc import RpcClient, RpcError

    host, _, port = address.rpartition(":")
    c = RpcClient(host, int(port), credential(), connect_timeout=timeout)
    try:
        r: dict[str, Any] = await c.call("status", None, timeout=timeout)
        return r
    except (RpcError, OSError):
        return None
    finally:
        await c.close()


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


def _ranges(parts: list[int]) -> str:
    out: list[str] = []
    start = prev = None
    for p in sorted(parts):
        if start is None:
            start = prev = p
        elif prev is not None and p == prev + 1:
            prev = p
        else:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = p
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(out)


# ---------------------------------------------------------------------------------- status
async def etcd_health(address: str) -> list[dict[str, Any]]:
    """Each etcd endpoint of ``address``: reachable, leader, raft term and index, db size."""
    from cohort.coord.etcd import EtcdClient, parse_address

    endpoints, _ns, opts = parse_address(address)
    client = EtcdClient.from_options(endpoints, opts)
    out: list[dict[str, Any]] = []
    try:
        for i, ep in enumerate(endpoints):
            t0 = time.monotonic()
            try:
                st = await client.call_one(i, "/maintenance/status", {}, timeout=1.0)
            except Exception as e:  # any failure is "not healthy", with what it was
                out.append({"endpoint": ep, "healthy": False, "error": str(e)[:200]})
                continue
            member = str(st.get("header", {}).get("member_id", ""))
            out.append(
                {
                    "endpoint": ep,
                    "healthy": True,
                    "latency_ms": round((time.monotonic() - t0) * 1000, 2),
                    "leader": str(st.get("leader", "")) == member,
                    "raft_term": int(st.get("raftTerm", 0)),
                    "raft_index": int(st.get("raftIndex", 0)),
                    "db_bytes": int(st.get("dbSize", 0)),
                    "version": st.get("version", ""),
                }
            )
    finally:
        await client.close()
    return out


async def _status_doc(address: str, storage: str | None) -> dict[str, Any]:
    async with Session(address) as s:
        t0 = time.monotonic()
        view = await s.view()
        latency = time.monotonic() - t0
    etcd = await etcd_health(address) if address.startswith("etcd") else []
    owners = Counter(p[0] for p in view["partitions"])
    held = Counter(p[2] for p in view["partitions"])
    live = [
        m for m in view["members"] if m["role"] == "server" and m["state"] in ("alive", "draining")
    ]
    statuses = await asyncio.gather(*(server_status(m["address"]) for m in live))
    by_id = {m["id"]: st for m, st in zip(live, statuses, strict=True)}
    members = []
    for m in view["members"]:
        doc: dict[str, Any] = {
            "id": m["id"],
            "role": m["role"],
            "state": m["state"],
            "address": m["address"],
            "pid": m.get("pid", 0),
            "metrics": (m.get("meta") or {}).get("metrics")
            or (f"{m['address']}/_cohort/metrics" if m["role"] == "director" else None),
        }
        if m["role"] == "server":
            st = by_id.get(m["id"])
            doc.update(
                partitions=owners.get(m["id"], 0),
                locks_held=held.get(m["id"], 0),
                capacity=m.get("capacity", 1.0),
                reachable=st is not None if m["state"] in ("alive", "draining") else False,
                serving=len(st["serving"]) if st else 0,
                recovering=len(st["recovering"]) if st else 0,
                lease_valid=bool(st["lease_valid"]) if st else False,
                objects=st.get("objects", 0) if st else 0,
                requests=st.get("requests", 0) if st else 0,
            )
        else:
            doc["partitions"] = None
        members.append(doc)
    servers = [m for m in members if m["role"] == "server"]
    directors = [m for m in members if m["role"] == "director"]
    n_parts = len(view["partitions"])
    unassigned = owners.get(None, 0)
    moving = sum(1 for p in view["partitions"] if partition_state(p) == "moving")
    reasons: list[str] = []
    alive_servers = [m for m in servers if m["state"] in ("alive", "draining")]
    if not alive_servers:
        reasons.append("no live servers")
    if unassigned:
        reasons.append(f"{unassigned} partitions have no owner")
    if moving:
        reasons.append(f"{moving} partitions are moving (recovery or hand-over)")
    for m in servers:
        if m["state"] == "dead":
            reasons.append(f"{m['id']} is dead")
        elif m["state"] in ("alive", "draining") and not m["reachable"]:
            reasons.append(f"{m['id']} does not answer")
        elif m["state"] == "draining" and m["partitions"]:
            reasons.append(f"{m['id']} is draining ({m['partitions']} partitions left)")
    if not [m for m in directors if m["state"] == "alive"]:
        reasons.append("no live directors")
    for e in etcd:
        if not e["healthy"]:
            reasons.append(f"etcd member {e['endpoint']} does not answer")
    if etcd and not any(e.get("leader") for e in etcd):
        reasons.append("no etcd member reports itself leader")
    if not alive_servers or unassigned == n_parts:
        verdict = "down"
    elif reasons:
        verdict = "degraded"
    else:
        verdict = "healthy"

    def count(ms: list[dict[str, Any]]) -> dict[str, int]:
        c = Counter(m["state"] for m in ms)
        return {"total": len(ms), **{k: c.get(k, 0) for k in ("alive", "draining", "dead", "left")}}

    return {
        "verdict": verdict,
        "reasons": reasons,
        "coordinator": address,
        "coordinator_health": {
            "address": address,
            "reachable": True,
            "latency_ms": round(latency * 1000, 2),
            "version": view["version"],
            "lease_ttl": view.get("lease_ttl"),
            "metrics": (view.get("coordinator") or {}).get("metrics"),
        },
        "version": view["version"],
        "layers": {
            "directors": count(directors),
            "servers": count(servers),
            "storage": {"path": storage},
        },
        "partitions": n_parts,
        "unassigned_partitions": unassigned,
        "moving_partitions": moving,
        "buckets": len(view["buckets"]),
        "members": members,
        "etcd": etcd,
    }


def status(
    data_dir: DataDir = Path("./cohort-data"),
    coordinator: CoordOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Layers, members (role, state, address, load, partitions), coordinator health, verdict."""
    addr = resolve(data_dir, coordinator)
    storage = None
    cj = data_dir / "cluster.json"
    if cj.exists():
        storage = json.loads(cj.read_text()).get("storage")
    doc = run(_status_doc(addr, storage))
    if as_json:
        print_json(doc)
        return
    ch = doc["coordinator_health"]
    lay = doc["layers"]
    console.print(
        f"[bold]coordinator[/] {addr}  view v{doc['version']}  "
        f"answered in {ch['latency_ms']:.1f} ms  lease {ch['lease_ttl']}s",
        highlight=False,
    )
    console.print(
        f"[bold]directors[/] {lay['directors']['alive']}/{lay['directors']['total']} alive   "
        f"[bold]servers[/] {lay['servers']['alive']} alive, {lay['servers']['draining']} draining, "
        f"{lay['servers']['dead']} dead   [bold]storage[/] {lay['storage']['path'] or '(shared)'}",
        highlight=False,
    )
    for e in doc["etcd"]:
        if e["healthy"]:
            console.print(
                f"[bold]etcd[/] {e['endpoint']}  {'leader' if e['leader'] else 'follower'}  "
                f"term {e['raft_term']}  index {e['raft_index']}  {e['latency_ms']:.1f} ms",
                highlight=False,
            )
        else:
            console.print(f"[bold]etcd[/] {e['endpoint']}  [red]unreachable[/]: {e['error']}")
    t = Table(show_edge=False)
    widths = {
        "id": max([len(m["id"]) for m in doc["members"]] + [2]),
        "address": max([len(m["address"]) for m in doc["members"]] + [7]),
        "state": 8,
    }
    widths["role"] = 8
    for col in ("role", "id", "state", "address", "parts", "objs", "reqs"):
        t.add_column(
            col,
            justify="right" if col in ("parts", "objs", "reqs") else "left",
            min_width=widths.get(col),
            no_wrap=col in widths,
        )
    order = {"director": 0, "server": 1}
    for m in sorted(doc["members"], key=lambda m: (order.get(m["role"], 2), m["id"])):
        style = {"alive": "green", "draining": "yellow"}.get(m["state"], "red")
        state = m["state"]
        if m["role"] == "server" and state in ("alive", "draining") and not m["reachable"]:
            state += " (no answer)"
            style = "red"
        if m["role"] == "server":
            parts = str(m["partitions"])
            if m["locks_held"] != m["partitions"] or m["recovering"]:
                parts += f" ({m['locks_held']} locked, {m['recovering']} recovering)"
            row = [parts, str(m["objects"]), str(m["requests"])]
        else:
            row = ["", "", ""]
        t.add_row(m["role"], m["id"], f"[{style}]{state}[/]", m["address"], *row)
    console.print(t)
    colour = {"healthy": "green", "degraded": "yellow", "down": "red"}[doc["verdict"]]
    detail = "; ".join(doc["reasons"]) or (
        f"{lay['servers']['alive']} servers serve all {doc['partitions']} partitions"
    )
    drained = [m["id"] for m in doc["members"] if m["state"] == "draining" and not m["partitions"]]
    if drained:
        detail += f" ({', '.join(drained)} drained: undrain to use again)"
    console.print(f"[bold {colour}]{doc['verdict']}[/]: {detail}", highlight=False)


# ---------------------------------------------------------------------------------- partitions
def partitions(
    data_dir: DataDir = Path("./cohort-data"),
    coordinator: CoordOpt = None,
    owner: Annotated[
        str | None, typer.Option("--owner", "-o", help="Only partitions owned by this server.")
    ] = None,
    every: Annotated[bool, typer.Option("--list", "-l", help="One row per partition.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The partition map: owner, epoch (fencing token) and lock holder of every partition."""
    addr = resolve(data_dir, coordinator)

    async def go() -> dict[str, Any]:
        async with Session(addr) as s:
            view = await s.view()
        if owner is not None:
            require_server(view, owner)
        rows = [
            {
                "partition": i,
                "owner": p[0],
                "epoch": p[1],
                "holder": p[2],
                "state": partition_state(p),
            }
            for i, p in enumerate(view["partitions"])
            if owner is None or p[0] == owner
        ]
        return {"version": view["version"], "total": len(view["partitions"]), "partitions": rows}

    doc = run(go())
    rows = doc["partitions"]
    if as_json:
        print_json(doc)
        return
    if every:
        t = Table(show_edge=False)
        for col in ("partition", "owner", "epoch", "holder", "state"):
            t.add_column(col)
        for r in rows:
            st = r["state"]
            colour = {"serving": "green", "moving": "yellow"}.get(st, "red")
            t.add_row(
                str(r["partition"]),
                r["owner"] or "-",
                str(r["epoch"]),
                r["holder"] or "-",
                f"[{colour}]{st}[/]",
            )
        console.print(t)
    else:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(r["owner"] or "(unassigned)", []).append(r)
        t = Table(show_edge=False)
        for col in ("owner", "partitions", "epochs", "moving", "which"):
            t.add_column(col)
        for o, rs in sorted(groups.items()):
            epochs = [r["epoch"] for r in rs]
            t.add_row(
                o,
                str(len(rs)),
                f"{min(epochs)}-{max(epochs)}" if min(epochs) != max(epochs) else str(epochs[0]),
                str(sum(1 for r in rs if r["state"] == "moving")),
                _ranges([r["partition"] for r in rs]),
            )
        console.print(t)
    console.print(
        f"{len(rows)} of {doc['total']} partitions (view v{doc['version']})"
        + ("" if every else "; --list shows one row per partition"),
        highlight=False,
    )


# ---------------------------------------------------------------------------------- events
def events(
    data_dir: DataDir = Path("./cohort-data"),
    coordinator: CoordOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Show the last N events.")] = 50,
    kind: Annotated[
        str | None, typer.Option("--kind", "-k", help="Only events of this kind (prefix).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Joins, deaths (lease expiry), drains, rebalances and bucket changes, with times."""
    addr = resolve(data_dir, coordinator)

    def pick(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in evs if kind is None or e["kind"].startswith(kind)]

    async def fetch() -> list[dict[str, Any]]:
        async with Session(addr) as s:
            return await s.events()

    evs = pick(run(fetch()))[-limit:] if limit > 0 else []
    if as_json and not follow:
        print_json(evs)
        return

    def show(e: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(e), flush=True)
            return
        colour = {"member-dead": "red", "join": "green", "drain": "yellow"}.get(e["kind"], "cyan")
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        console.print(f"[dim]{ts}[/] [{colour}]{e['kind']:<14}[/] {e['detail']}", highlight=False)

    for e in evs:
        show(e)
    if not follow:
        if not evs and not as_json:
            console.print("no events", style="dim")
        return
    last = evs[-1]["time"] if evs else 0.0
    try:
        while True:
            time.sleep(1.0)
            for e in pick(run(fetch())):
                if e["time"] > last:
                    last = e["time"]
                    show(e)
    except KeyboardInterrupt:
        return


# ---------------------------------------------------------------------------------- top
async def _top_sample(addr: str, interval: float) -> dict[str, Any]:
    import aiohttp

    from cohort.admin.scrape import metrics_targets, rates, scrape_all

    async with Session(addr) as s:
        view = await s.view()
    targets = metrics_targets(view)
    async with aiohttp.ClientSession() as http:
        a = await scrape_all(http, targets)
        await asyncio.sleep(interval)
        b = await scrape_all(http, targets)
    members = {}
    for mid, smp in b.items():
        if mid in a:
            members[mid] = {"role": smp["role"], **rates(a[mid], smp, smp["t"] - a[mid]["t"])}
    missing = sorted({t[0] for t in targets} - set(members))
    return {"time": time.time(), "interval": interval, "members": members, "unreachable": missing}


def _top_table(doc: dict[str, Any], addr: str) -> Table:
    t = Table(
        title=f"cohort top  {addr}  {time.strftime('%H:%M:%S')}  (rates over {doc['interval']:.1f}s)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    width = max([len(m) for m in doc["members"]] + [len(m) for m in doc["unreachable"]] + [6])
    t.add_column("member", no_wrap=True, min_width=width)
    for col in ("req/s", "err/s", "mean ms", "p99 ms", "lock/s", "renew/s", "log/s", "parts"):
        t.add_column(col, justify="right")
    order = {"coordinator": 0, "director": 1, "server": 2}

    def f(v: Any, nd: int = 1) -> str:
        return "-" if v is None else f"{v:.{nd}f}"

    for mid, m in sorted(
        doc["members"].items(), key=lambda kv: (order.get(kv[1]["role"], 3), kv[0])
    ):
        t.add_row(
            mid,
            f(m["rps"]),
            f(m["errors_ps"]),
            f(m["mean_ms"], 2),
            f(m["p99_ms"], 2),
            f(m["lock_ops_ps"] + m["lock_msgs_ps"]),
            f(m["heartbeats_ps"]),
            f(m["log_appends_ps"]),
            "-" if m["partitions"] is None else str(int(m["partitions"])),
        )
    for mid in doc["unreachable"]:
        t.add_row(mid, "[red]no metrics[/]", *[""] * 7)
    return t


def top(
    data_dir: DataDir = Path("./cohort-data"),
    coordinator: CoordOpt = None,
    interval: Annotated[float, typer.Option("--interval", "-i", help="Seconds per refresh.")] = 2.0,
    count: Annotated[
        int, typer.Option("--count", "-n", help="Refreshes before exiting (0 = until Ctrl-C).")
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Live request rates, latencies, lock traffic and log appends per member (from /metrics)."""
    addr = resolve(data_dir, coordinator)
    if as_json:
        print_json(run(_top_sample(addr, interval)))
        return
    n = 0
    try:
        with Live(console=console, auto_refresh=False) as live:
            while count == 0 or n < count:
                doc = run(_top_sample(addr, interval))
                live.update(_top_table(doc, addr), refresh=True)
                n += 1
    except KeyboardInterrupt:
        return


# ---------------------------------------------------------------------------------- drain
def _owned(view: dict[str, Any], server: str) -> int:
    return sum(1 for p in view["partitions"] if p[0] == server or p[2] == server)


def _not_yet_moved(view: dict[str, Any], server: str, moving: set[int]) -> int:
    """Partitions still owned or locked by ``server``, plus those of ``moving`` that no
    other server serves yet (its new owner has not taken the lock and replayed)."""
    n = 0
    for i, (owner, _, holder) in enumerate(view["partitions"]):
        still_here = server in (owner, holder)
        unserved = i in moving and (owner is None or holder != owner)
        n += still_here or unserved
    return n


def _set_state(
    addr: str, server: str, state: str, wait: bool, timeout: float, as_json: bool
) -> None:
    async def change() -> tuple[set[int], dict[str, Any]]:
        async with Session(addr) as s:
            view = await s.view()
            m = require_server(view, server)
            if m["state"] in ("dead", "left"):
                raise CliError(
                    f"{server} is {m['state']}",
                    "only live servers can be drained; a dead server's partitions have "
                    "already moved (see `cohort partitions`)",
                )
            mine = {i for i, p in enumerate(view["partitions"]) if server in (p[0], p[2])}
            r = await s.call(f"set_state {state}", s.coord.set_state(server, state))
            return mine, r

    moving, _ = run(change())
    before = len(moving)
    t0 = time.monotonic()

    async def poll() -> int:
        async with Session(addr) as s:
            view = await s.view()
        if state == "draining":  # done once every partition is served elsewhere
            return _not_yet_moved(view, server, moving)
        return _owned(view, server)

    now = before
    done = True
    if wait and state == "draining":
        progress = Progress(
            TextColumn("draining {task.fields[server]}"),
            BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f} partitions moved"),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
            transient=False,
        )
        with progress:
            task = progress.add_task("drain", total=max(before, 1), server=server)
            while True:
                now = run(poll())
                progress.update(task, completed=before - now if before else 1)
                if now == 0:
                    break
                if time.monotonic() - t0 > timeout:
                    done = False
                    break
                time.sleep(0.2)
    elif wait and state == "alive":
        while True:
            now = run(poll())
            if now > 0 or time.monotonic() - t0 > timeout:
                done = now > 0
                break
            time.sleep(0.2)
    doc = {
        "server": server,
        "state": state,
        "partitions_before": before,
        "partitions_now": now,
        "seconds": round(time.monotonic() - t0, 2),
        "done": done,
    }
    if as_json:
        print_json(doc)
    elif state == "draining":
        if not wait:
            console.print(f"{server} is draining; `cohort status` shows its partitions leave")
        elif done:
            console.print(
                f"[green]{server} drained[/]: {before} partitions moved in {doc['seconds']} s; "
                f"it stays a member (undrain with `cohort undrain {server}`)",
                highlight=False,
            )
    else:
        console.print(
            f"[green]{server} is alive again[/]; the map rebalances partitions onto it"
            + (f" ({now} so far)" if wait else ""),
            highlight=False,
        )
    if not done:
        fail(
            f"{server} still owns {now} partitions after {timeout:.0f} s",
            "see `cohort events` and the server's log; the drain goes on in the background",
            code=1,
        )


def drain(
    server: Annotated[str, typer.Argument(help="Server id, e.g. server-2.")],
    data_dir: DataDir = Path("./cohort-data"),
    coordinator: CoordOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until it owns nothing.")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Move every partition away from SERVER (checkpoint + lock hand-over, no data copied).

    Waits until every one of its partitions is served by another server.
    """
    _set_state(resolve(data_dir, coordinator), server, "draining", wait, timeout, as_json)


def undrain(
    server: Annotated[str, typer.Argument(help="Server id, e.g. server-2.")],
    data_dir: DataDir = Path("./cohort-data"),
    coordinator: CoordOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until it owns partitions again.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Make a drained SERVER eligible for partitions again (the map rebalances onto it)."""
    _set_state(resolve(data_dir, coordinator), server, "alive", wait, timeout, as_json)


# ---------------------------------------------------------------------------------- locks
async def _locks(addr: str, node: str | None) -> dict[str, Any]:
    from cohort.rpc import RpcClient, RpcError

    async with Session(addr) as s:
        view = await s.view()
    servers = [
        m for m in view["members"] if m["role"] == "server" and m["state"] in ("alive", "draining")
    ]
    if node is not None:
        require_server(view, node)
        servers = [m for m in servers if m["id"] == node]
    out: dict[str, Any] = {}
    unsupported = 0
    for m in servers:
        host, _, port = m["address"].rpartition(":")
        c = RpcClient(host, int(port), credential(), connect_timeout=1.0)
        try:
            out[m["id"]] = await c.call("dlm.status", None, timeout=2.0)
        except RpcError as e:
            if e.code == "UnknownMethod":
                unsupported += 1
            out[m["id"]] = {"error": e.message or e.code}
        finally:
            await c.close()
    available = bool(servers) and unsupported < len(servers)
    partition_locks = [
        {"resource": f"partition/{i}", "mode": "EX", "holder": p[2], "token": p[1]}
        for i, p in enumerate(view["partitions"])
        if p[2] is not None and (node is None or p[2] == node)
    ]
    return {
        "dlm_available": available,
        "reason": None
        if available
        else "the servers do not expose the DLM yet (no `dlm.status` RPC): the lock "
        "manager (cohort.dlm) is not wired into the server process",
        "agents": out if available else {},
        "partition_locks": partition_locks,
    }


def locks(
    data_dir: DataDir = Path("./cohort-data"),
    coordinator: CoordOpt = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this server's locks.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The DLM's view per server (says so plainly while servers do not run the DLM)."""
    addr = resolve(data_dir, coordinator)
    doc = run(_locks(addr, node))
    if as_json:
        print_json(doc)
        if not doc["dlm_available"]:
            raise typer.Exit(1)
        return
    if not doc["dlm_available"]:
        err.print(f"[yellow]no DLM view:[/] {doc['reason']}.", highlight=False)
        err.print(
            "[dim]hint:[/] partition ownership locks are held in the coordinator today: "
            "`cohort partitions --list` shows each one's holder and fencing token (epoch)",
            highlight=False,
        )
        console.print(
            f"{len(doc['partition_locks'])} partition locks (EX) held in the coordinator",
            highlight=False,
        )
        raise typer.Exit(1)
    t = Table(show_edge=False)
    keys = ["epoch", "fenced", "locks", "partition_locks", "directory_entries", "messages_sent"]
    t.add_column("server")
    for k in keys:
        t.add_column(k)
    t.add_column("mastered")
    for sid, st in sorted(doc["agents"].items()):
        mastered = st.get("mastered", [])
        t.add_row(
            sid,
            *[str(len(v)) if isinstance(v := st.get(k, ""), dict | list) else str(v) for k in keys],
            f"{len(mastered)}" if isinstance(mastered, list) else str(mastered),
        )
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add these commands to the ``cohort`` Typer app."""
    app.command()(status)
    app.command()(partitions)
    app.command()(events)
    app.command()(top)
    app.command()(drain)
    app.command()(undrain)
    app.command()(locks)
