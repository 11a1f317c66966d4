"""Prometheus metrics: one small registry per process, exposed over HTTP.

Every Cohort process builds exactly one of :class:`DirectorMetrics`,
:class:`ServerMetrics` or :class:`CoordinatorMetrics`.  Each owns its own
:class:`prometheus_client.CollectorRegistry` (no global state, so tests can build several
in one process) and exposes it in the Prometheus text format:

* directors on their S3 port at ``/_cohort/metrics``.  Plain ``/metrics`` is *not* served
  there: ``metrics`` is a valid bucket name and ``GET /metrics`` must stay a ListObjects
  of that bucket.  Bucket names cannot start with ``_``, so ``/_cohort/...`` never
  collides with S3.
* servers and the coordinator on a small aiohttp side port (:func:`start_metrics_server`)
  at both ``/metrics`` and ``/_cohort/metrics``.  A server reports its side-port address
  in its member ``meta`` (``{"metrics": "host:port"}``) when it joins; the coordinator
  reports its own in the view (``view["coordinator"]["metrics"]``).

Hot paths only touch pre-resolved counter/histogram children (no per-request label dict
building); everything that is a *level* (partitions owned, members by state) is read at
scrape time through callbacks, so it costs nothing between scrapes.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets (seconds): sub-millisecond RPCs up to multi-second failovers.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
REPLAY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Handler = Callable[[Any], Awaitable[Any]]


# ---------------------------------------------------------------------------------- primitives
# prometheus_client's Counter/Histogram take a lock on every update (and a Histogram walks
# its buckets linearly).  Cohort updates metrics only from its event-loop thread and scrapes
# them from the same thread, so these lock-free versions suffice: an update is an attribute
# add (counter) or a bisect plus two adds (histogram).


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopCounter(Collector):
    """A counter family updated from one thread (the event loop); see above."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.children: dict[tuple[str, ...], _CounterChild] = {}
        if not self.labelnames:
            self._default = self.labels()
        registry.register(self)

    def labels(self, *values: str) -> _CounterChild:
        ch = self.children.get(values)
        if ch is None:
            ch = self.children[values] = _CounterChild()
        return ch

    def inc(self, amount: float = 1.0) -> None:
        self._default.value += amount

    def collect(self) -> Iterable[Metric]:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, ch in list(self.children.items()):
            fam.add_metric(list(values), ch.value)
        yield fam


class LoopHistogram(Collector):
    """A histogram family updated from one thread (the event loop); see above."""

    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.bounds = tuple(sorted(buckets))
        self.children: dict[tuple[str, ...], _HistogramChild] = {}
        if not self.labelnames:
            self._default = self.labels()
        registry.register(self)

    def labels(self, *values: str) -> _HistogramChild:
        ch = self.children.get(values)
        if ch is None:
            ch = self.children[values] = _HistogramChild(self.bounds)
        return ch

    def observe(self, value: float) -> None:
        self._default.observe(value)

    def collect(self) -> Iterable[Metric]:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        les = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        for values, ch in list(self.children.items()):
            acc = 0
            buckets: list[tuple[str, float]] = []
            for le, c in zip(les, ch.counts, strict=True):
                acc += c
                buckets.append((le, float(acc)))
            fam.add_metric(list(values), buckets, ch.sum)
        yield fam


class _Base:
    """A registry with the process collector and an ``info``-style identity gauge."""

    def __init__(self, role: str, member_id: str) -> None:
        self.role = role
        self.member_id = member_id
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        info = Gauge(
            "cohort_member_info",
            "Identity of this process (value is always 1).",
            ["role", "member"],
            registry=self.registry,
        )
        info.labels(role, member_id).set(1)
        self.started = Gauge(
            "cohort_start_time_seconds", "Unix time the process started.", registry=self.registry
        )
        self.started.set(time.time())

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """aiohttp handler for ``GET /metrics``."""
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE})


# ---------------------------------------------------------------------------------- director
class DirectorMetrics(_Base):
    """S3 requests by operation and status; router retries; the cached view."""

    def __init__(self, member_id: str) -> None:
        super().__init__("director", member_id)
        r = self.registry
        self.requests = LoopCounter(
            "cohort_s3_requests",
            "S3 requests answered, by operation and HTTP status.",
            ["op", "status"],
            registry=r,
        )
        self.latency = LoopHistogram(
            "cohort_s3_request_seconds",
            "S3 request latency (until the response is complete), by operation and status.",
            ["op", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "cohort_s3_requests_in_flight", "S3 requests in progress.", registry=r
        )
        # (op, status) -> (counter child, histogram child): resolved once, reused
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, op: str, status: int, seconds: float) -> None:
        """Count one finished S3 request (called once per request: keep it cheap)."""
        ch = self._children.get((op, status))
        if ch is None:
            s = str(status)
            ch = (self.requests.labels(op, s), self.latency.labels(op, s))
            self._children[(op, status)] = ch
        ch[0].inc()
        ch[1].observe(seconds)

    def watch_router(self, router: Any) -> None:
        """Read the router's retry count and view version at scrape time."""
        Gauge(
            "cohort_router_retries",
            "Requests re-sent by the router after NotOwner/Recovering/unreachable (total).",
            registry=self.registry,
        ).set_function(lambda: float(router.retries))
        Gauge(
            "cohort_view_version",
            "Version of the coordinator view this process has cached.",
            registry=self.registry,
        ).set_function(lambda: float(router.view.get("version", -1)))


# ---------------------------------------------------------------------------------- server
class ServerMetrics(_Base):
    """RPC calls, partitions, leases, operation-log writes and replays of one server."""

    def __init__(self, member_id: str) -> None:
        super().__init__("server", member_id)
        r = self.registry
        self.rpc_calls = LoopCounter(
            "cohort_rpc_calls", "RPC calls handled, by method.", ["method"], registry=r
        )
        self.rpc_errors = LoopCounter(
            "cohort_rpc_errors",
            "RPC calls that failed, by method and error code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_latency = LoopHistogram(
            "cohort_rpc_seconds",
            "RPC handling time, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lease_renewals = LoopCounter(
            "cohort_lease_renewals", "Heartbeats that renewed the lease.", registry=r
        )
        self.lease_failures = LoopCounter(
            "cohort_lease_renewal_failures",
            "Heartbeats that failed (timeout, unreachable, declared dead).",
            registry=r,
        )
        self.lease_lost = LoopCounter(
            "cohort_lease_lost", "Times the lease ran out and the server self-fenced.", registry=r
        )
        self.dlm_fallbacks = LoopCounter(
            "cohort_dlm_fallbacks",
            "Partitions served under the coordinator's lock alone because the lock manager "
            "did not grant partition/<p> in time.",
            registry=r,
        )
        self.log_appends = LoopCounter(
            "cohort_log_appends",
            "Operation-log segments written (one per group commit).",
            registry=r,
        )
        self.log_bytes = LoopCounter(
            "cohort_log_append_bytes", "Bytes written to operation-log segments.", registry=r
        )
        self.log_fsync = LoopHistogram(
            "cohort_log_append_seconds",
            "Time to write and sync one log segment (create-if-absent, fsync, link).",
            buckets=FSYNC_BUCKETS,
            registry=r,
        )
        self.checkpoints = LoopCounter(
            "cohort_checkpoints", "Partition checkpoints written.", registry=r
        )
        self.store_bytes = LoopCounter(
            "cohort_store_bytes",
            "Bytes this server read from or wrote to shared storage, by direction (read, "
            "write) and kind (log, ckpt, blob, other).",
            ["direction", "kind"],
            registry=r,
        )
        self.replay_seconds = LoopHistogram(
            "cohort_replay_seconds",
            "Partition recovery time (fence + load checkpoint + replay).",
            buckets=REPLAY_BUCKETS,
            registry=r,
        )
        self.replay_records = LoopCounter(
            "cohort_replay_records", "Log records replayed during partition recovery.", registry=r
        )
        self.acquisitions = LoopCounter(
            "cohort_partition_acquisitions", "Partition locks acquired (recoveries).", registry=r
        )

    def instrument(self, method: str, handler: Handler) -> Handler:
        """Wrap an RPC handler to count calls, errors and time by ``method``."""
        calls = self.rpc_calls.labels(method)
        hist = self.rpc_latency.labels(method)
        errors = self.rpc_errors

        async def wrapped(params: Any) -> Any:
            calls.inc()
            t0 = time.perf_counter()
            try:
                return await handler(params)
            except Exception as e:
                errors.labels(method, str(getattr(e, "code", type(e).__name__))).inc()
                raise
            finally:
                hist.observe(time.perf_counter() - t0)

        return wrapped

    def watch_server(self, server: Any) -> None:
        """Partition and lease levels, read from the server object at scrape time."""
        g = Gauge(
            "cohort_partitions",
            "Partitions hosted here, by status (serving, recovering).",
            ["status"],
            registry=self.registry,
        )
        g.labels("serving").set_function(
            lambda: float(sum(1 for h in list(server.hosts.values()) if h.serving))
        )
        g.labels("recovering").set_function(
            lambda: float(sum(1 for h in list(server.hosts.values()) if h.status == "recovering"))
        )
        Gauge(
            "cohort_partitions_owned",
            "Partitions the current map assigns to this server.",
            registry=self.registry,
        ).set_function(
            lambda: float(sum(1 for p in server.view.get("partitions", []) if p[0] == server.id))
        )
        Gauge(
            "cohort_lease_valid", "1 while the lease is valid, else 0.", registry=self.registry
        ).set_function(lambda: 1.0 if server.lease_valid() else 0.0)
        Gauge(
            "cohort_view_version",
            "Version of the coordinator view this process has cached.",
            registry=self.registry,
        ).set_function(lambda: float(server.view.get("version", -1)))
        Gauge(
            "cohort_objects", "Objects in the partitions served here.", registry=self.registry
        ).set_function(
            lambda: float(sum(h.state.object_count() for h in list(server.hosts.values())))
        )
        self.registry.register(_DlmCollector(server))


class _DlmCollector(Collector):
    """Lock-service traffic of this server's agent, read at scrape time.  ``rate()`` of
    ``cohort_dlm_messages_sent_total`` is the lock message rate (0 in steady state); it
    restarts from 0 when the server re-joins (a new agent), which ``rate()`` handles."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterable[CounterMetricFamily]:
        t = getattr(self.server, "dlm_transport", None)
        yield CounterMetricFamily(
            "cohort_dlm_messages_sent",
            "Lock-service messages sent by this server's lock agent (this incarnation).",
            value=float(getattr(t, "messages", 0) if t is not None else 0),
        )
        yield CounterMetricFamily(
            "cohort_dlm_bytes_sent",
            "Bytes of lock-service messages sent by this server's lock agent.",
            value=float(getattr(t, "bytes", 0) if t is not None else 0),
        )


class InstrumentedStore:
    """A :class:`~cohort.storage.base.Store` wrapper that times operation-log writes.

    Every ``put`` of a key under ``parts/<p>/log/`` is one log segment (create-if-absent,
    written and synced): it counts as an append, with its size and latency.  Checkpoint
    writes (``/ckpt/``) are counted too.  Everything else passes straight through.
    """

    def __init__(self, inner: Any, metrics: ServerMetrics) -> None:
        self.inner = inner
        self.m = metrics
        self.size = inner.size
        self.delete = inner.delete

    def _count(self, direction: str, key: str, n: int) -> None:
        """Bytes moved to or from shared storage (``cohort_store_bytes``), by kind."""
        if "/log/" in key:
            kind = "log"
        elif "/ckpt/" in key:
            kind = "ckpt"
        elif key.startswith("blobs/"):
            kind = "blob"
        else:
            kind = "other"
        self.m.store_bytes.labels(direction, kind).inc(n)

    async def get(self, key: str) -> bytes:
        data: bytes = await self.inner.get(key)
        self._count("read", key, len(data))
        return data

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        data: bytes = await self.inner.read_range(key, start, length)
        self._count("read", key, len(data))
        return data

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        n: int = await self.inner.put_stream(key, chunks)
        self._count("write", key, n)
        return n

    async def put(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        self._count("write", key, len(data))
        if "/log/" not in key:
            if "/ckpt/" in key:
                self.m.checkpoints.inc()
            r: str = await self.inner.put(key, data, if_absent=if_absent, if_match=if_match)
            return r
        t0 = time.perf_counter()
        r = await self.inner.put(key, data, if_absent=if_absent, if_match=if_match)
        self.m.log_fsync.observe(time.perf_counter() - t0)
        self.m.log_appends.inc()
        self.m.log_bytes.inc(len(data))
        return r

    def list(self, prefix: str) -> AsyncIterator[str]:
        it: AsyncIterator[str] = self.inner.list(prefix)
        return it


# ---------------------------------------------------------------------------------- coordinator
class _CoordinatorCollector(Collector):
    """Members by role and state, partitions by state: computed from the state at scrape."""

    def __init__(self, state_of: Callable[[], Any]) -> None:
        self.state_of = state_of

    def collect(self) -> Iterable[GaugeMetricFamily]:
        st = self.state_of()
        members = GaugeMetricFamily(
            "cohort_members",
            "Members known to the coordinator, by role and state.",
            labels=["role", "state"],
        )
        counts: dict[tuple[str, str], int] = {}
        for m in list(st.members.values()):
            counts[(m.role, m.state)] = counts.get((m.role, m.state), 0) + 1
        for role in ("server", "director"):
            for state in ("alive", "draining", "dead", "left"):
                members.add_metric([role, state], counts.get((role, state), 0))
        yield members
        parts = GaugeMetricFamily(
            "cohort_map_partitions",
            "Partitions by state: serving (owner holds the lock), moving (owner does not "
            "hold it yet), unassigned (no owner).",
            labels=["state"],
        )
        serving = moving = unassigned = 0
        for p in st.partitions:
            if p.owner is None:
                unassigned += 1
            elif p.holder == p.owner:
                serving += 1
            else:
                moving += 1
        parts.add_metric(["serving"], serving)
        parts.add_metric(["moving"], moving)
        parts.add_metric(["unassigned"], unassigned)
        yield parts
        owned = GaugeMetricFamily(
            "cohort_map_partitions_by_owner",
            "Partitions the map assigns to each server.",
            labels=["owner"],
        )
        by_owner: dict[str, int] = {}
        for p in st.partitions:
            if p.owner is not None:
                by_owner[p.owner] = by_owner.get(p.owner, 0) + 1
        for owner, n in sorted(by_owner.items()):
            owned.add_metric([owner], n)
        yield owned
        yield GaugeMetricFamily("cohort_view_version", "Version of the view.", value=st.version)
        yield GaugeMetricFamily("cohort_buckets", "Buckets.", value=len(st.buckets))


class CoordinatorMetrics(_Base):
    """RPC calls by method (partition-lock and lease traffic among them) and the state."""

    def __init__(self, state_of: Callable[[], Any]) -> None:
        super().__init__("coordinator", "coordinator")
        self.rpc_calls = LoopCounter(
            "cohort_rpc_calls", "RPC calls handled, by method.", ["method"], registry=self.registry
        )
        self.rpc_errors = LoopCounter(
            "cohort_rpc_errors",
            "RPC calls that failed, by method and error code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.registry.register(_CoordinatorCollector(state_of))

    def instrument(self, method: str, handler: Handler) -> Handler:
        calls = self.rpc_calls.labels(method)
        errors = self.rpc_errors

        async def wrapped(params: Any) -> Any:
            calls.inc()
            try:
                return await handler(params)
            except Exception as e:
                errors.labels(method, str(getattr(e, "code", type(e).__name__))).inc()
                raise

        return wrapped


# ---------------------------------------------------------------------------------- HTTP
async def start_metrics_server(
    metrics: _Base, host: str, port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve ``/metrics`` and ``/_cohort/metrics`` on a side port; returns (runner, host:port)."""
    app = web.Application()
    app.router.add_get("/metrics", metrics.handle)
    app.router.add_get("/_cohort/metrics", metrics.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
    await site.start()
    server = site._server
    bound = port
    if server is not None:
        socks = getattr(server, "sockets", None) or []
        if socks:
            bound = socks[0].getsockname()[1]
    return runner, f"{host}:{bound}"
