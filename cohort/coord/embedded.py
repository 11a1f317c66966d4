"""The embedded coordinator: one process, state persisted in SQLite, served over RPC.

Every change that a safety property depends on (membership, partition map, lock holders,
buckets) is written to SQLite (``synchronous=FULL``) *before* the RPC that caused it
returns, so a coordinator crash loses nothing that anybody acted on.  Lease expiry times
are not persisted: after a restart every live member gets a fresh lease and must renew it,
which can only delay (never hasten) declaring a member dead.

RPC methods (params and results are msgpack maps): ``join``, ``heartbeat``, ``leave``,
``view``, ``watch``, ``acquire_partition``, ``release_partition``, ``create_bucket``,
``delete_bucket``, ``set_state``, ``events``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from cohort.auth import ClusterKey, Verifier
from cohort.coord.state import (
    CapacityRule,
    Clock,
    CoordinatorError,
    CoordinatorState,
    IdFactory,
    LoadPolicy,
    random_id,
    system_clock,
)
from cohort.logs import setup_logging
from cohort.metrics import CoordinatorMetrics, start_metrics_server
from cohort.rpc import RpcError, RpcServer

log = logging.getLogger("cohort.coord")


class SqlitePersistence:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY, snapshot BLOB)")

    def load(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT snapshot FROM state WHERE id = 1").fetchone()
        if row is None:
            return None
        snap: dict[str, Any] = msgspec.msgpack.decode(row[0])
        return snap

    def save(self, snap: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO state (id, snapshot) VALUES (1, ?)",
            (msgspec.msgpack.encode(snap),),
        )


class EmbeddedCoordinator:
    def __init__(
        self,
        data_dir: Path,
        *,
        partitions: int = 256,
        lease_ttl: float = 2.5,
        failback: str = "immediate",
        load_policy: LoadPolicy | None = None,
        capacity_schedule: list[CapacityRule] | None = None,
        cluster_key: ClusterKey,
        clock: Clock = system_clock,
        new_id: IdFactory = random_id,
    ) -> None:
        """``clock`` (wall time) and ``new_id`` are injected into the rule engine; tests
        pass fakes (e.g. a clock at a chosen hour for failback windows and schedules)."""
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = SqlitePersistence(data_dir / "coordinator.sqlite")
        snap = self.store.load()
        now = time.monotonic()
        if snap is None:
            self.state = CoordinatorState(
                partitions, lease_ttl, failback, clock=clock, new_id=new_id
            )
            self.store.save(self.state.snapshot())
        else:
            self.state = CoordinatorState.restore(
                snap, lease_ttl, failback, clock=clock, new_id=new_id
            )
            self.state.extend_all_leases(now)
            log.info("restored coordinator state (version %d)", self.state.version)
        if load_policy is not None:
            self.state.load_policy = load_policy
        self.state.capacity_schedule = list(capacity_schedule or [])
        self.persisted_version = self.state.version
        self.changed = asyncio.Condition()
        # only members of the cluster (holders of the cluster key) may talk to us
        self.rpc = RpcServer(Verifier(cluster_key))
        handlers: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "join": self.join,
            "heartbeat": self.heartbeat,
            "leave": self.leave,
            "view": self.view,
            "watch": self.watch,
            "acquire_partition": self.acquire_partition,
            "release_partition": self.release_partition,
            "create_bucket": self.create_bucket,
            "delete_bucket": self.delete_bucket,
            "set_state": self.set_state,
            "events": self.events,
        }
        self.metrics = CoordinatorMetrics(lambda: self.state)
        self.metrics_address = ""
        self._metrics_runner: Any = None
        for name, h in handlers.items():
            self.rpc.register(name, self.metrics.instrument(name, h))
        self._tick_task: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        bound = await self.rpc.start(host, port)
        self._metrics_runner, self.metrics_address = await start_metrics_server(self.metrics, host)
        self._tick_task = asyncio.create_task(self._tick_loop())
        return bound

    async def close(self) -> None:
        if self._tick_task:
            self._tick_task.cancel()
        await self.rpc.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()

    def _view(self) -> dict[str, Any]:
        v = self.state.view()
        v["coordinator"] = {"metrics": self.metrics_address}
        # load-aware balancing, for status tools and benchmarks (soft state)
        v["load"] = {
            "moves": self.state.load_moves,
            "servers": self.state.server_loads(),
        }
        return v

    async def _commit(self) -> None:
        """Persist if anything changed, then wake watchers."""
        if self.state.version != self.persisted_version:
            self.store.save(self.state.snapshot())
            self.persisted_version = self.state.version
            async with self.changed:
                self.changed.notify_all()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            try:
                if self.state.tick(time.monotonic()):
                    for e in self.state.events[-5:]:
                        log.info("event %s: %s", e.kind, e.detail)
                await self._commit()
            except Exception:
                log.exception("coordinator tick failed")

    def _wrap(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except CoordinatorError as e:
            raise RpcError(e.code, e.message) from None

    # -- handlers ------------------------------------------------------------------------------
    async def join(self, p: dict[str, Any]) -> dict[str, Any]:
        m = self._wrap(
            lambda: self.state.join(
                time.monotonic(),
                p["id"],
                p["role"],
                p["address"],
                capacity=float(p.get("capacity", 1.0)),
                standby=bool(p.get("standby", False)),
                pid=int(p.get("pid", 0)),
                meta=p.get("meta") or {},
            )
        )
        await self._commit()
        log.info("member %s (%s) joined at %s", m.id, m.role, m.address)
        return {
            "incarnation": m.incarnation,
            "lease_ttl": self.state.lease_ttl,
            "view": self.state.view(),
        }

    async def heartbeat(self, p: dict[str, Any]) -> dict[str, Any]:
        self._wrap(
            lambda: self.state.heartbeat(time.monotonic(), p["id"], p["incarnation"], p.get("load"))
        )
        return {"version": self.state.version}

    async def leave(self, p: dict[str, Any]) -> None:
        self.state.leave(time.monotonic(), p["id"], p["incarnation"])
        await self._commit()

    async def view(self, p: Any) -> dict[str, Any]:
        return self._view()

    async def watch(self, p: dict[str, Any]) -> dict[str, Any]:
        """Long poll: returns the view once its version exceeds ``since`` (or at timeout)."""
        since = int(p.get("since", -1))
        timeout = float(p.get("timeout", 5.0))
        if self.persisted_version <= since:
            async with self.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.changed.wait_for(lambda: self.persisted_version > since), timeout
                    )
        return self._view()

    async def acquire_partition(self, p: dict[str, Any]) -> dict[str, Any]:
        token = self._wrap(
            lambda: self.state.acquire_partition(
                time.monotonic(), p["id"], p["incarnation"], int(p["partition"])
            )
        )
        await self._commit()
        return {"token": token}

    async def release_partition(self, p: dict[str, Any]) -> None:
        self.state.release_partition(
            time.monotonic(), p["id"], p["incarnation"], int(p["partition"])
        )
        await self._commit()

    async def create_bucket(self, p: dict[str, Any]) -> dict[str, Any]:
        b = self._wrap(lambda: self.state.create_bucket(p["name"], p.get("tenant", "default")))
        await self._commit()
        return msgspec.to_builtins(b)  # type: ignore[no-any-return]

    async def delete_bucket(self, p: dict[str, Any]) -> None:
        self._wrap(lambda: self.state.delete_bucket(p["name"], p["id"]))
        await self._commit()

    async def set_state(self, p: dict[str, Any]) -> dict[str, Any]:
        m = self._wrap(lambda: self.state.set_state(time.monotonic(), p["id"], p["state"]))
        await self._commit()
        return msgspec.to_builtins(m)  # type: ignore[no-any-return]

    async def events(self, p: Any) -> list[Any]:
        return [msgspec.to_builtins(e) for e in self.state.events]


async def serve(args: argparse.Namespace) -> None:
    coord = EmbeddedCoordinator(
        Path(args.data_dir),
        partitions=args.partitions,
        lease_ttl=args.lease_ttl,
        failback=args.failback,
        load_policy=LoadPolicy(
            enabled=not args.no_load_balance,
            threshold=args.load_threshold,
            ticks=args.load_ticks,
            period=args.load_period,
            max_moves=args.load_max_moves,
            cooldown=args.load_cooldown,
            min_rate=args.load_min_rate,
        ),
        capacity_schedule=[CapacityRule.parse(r) for r in args.capacity_schedule],
        cluster_key=ClusterKey.load(args.cluster_key),
    )
    port = await coord.start(args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("coordinator listening on %s:%d", args.host, port)
    # The launcher reads this line to learn the bound port.
    print(f"READY {args.host}:{port}", flush=True)
    await stop.wait()
    await coord.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cohort-coordinator")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--lease-ttl", type=float, default=2.5)
    ap.add_argument(
        "--failback",
        default="immediate",
        help="when partitions leave standby servers: immediate, never, or a daily HH-HH window",
    )
    d = LoadPolicy()
    g = ap.add_argument_group("load-aware rebalancing (servers report per-partition rates)")
    g.add_argument("--no-load-balance", action="store_true", help="move partitions by count only")
    g.add_argument(
        "--load-threshold",
        type=float,
        default=d.threshold,
        help="act when the busiest server's weighted load exceeds the mean by this factor",
    )
    g.add_argument(
        "--load-ticks", type=int, default=d.ticks, help="...for this many evaluations in a row"
    )
    g.add_argument("--load-period", type=float, default=d.period, help="seconds per evaluation")
    g.add_argument("--load-max-moves", type=int, default=d.max_moves, help="moves per decision")
    g.add_argument(
        "--load-cooldown", type=float, default=d.cooldown, help="seconds a moved partition stays"
    )
    g.add_argument(
        "--load-min-rate", type=float, default=d.min_rate, help="ignore load below this req/s"
    )
    ap.add_argument(
        "--capacity-schedule",
        action="append",
        default=[],
        metavar="PATTERN@HH-HH=CAPACITY",
        help="scheduled capacity (follow-the-sun), e.g. 'server-eu-*@08-18=2'; repeatable",
    )
    ap.add_argument(
        "--cluster-key", required=True, help="the cluster key file (0600), see docs/security.md"
    )
    ap.add_argument("--log-file", default=None)
    args = ap.parse_args(argv)
    os.umask(0o077)  # the SQLite state and logs are private to the cluster's user
    setup_logging("coordinator", args.log_file)
    import uvloop

    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
