"""The chaos harness: clients + nemesis against a running cluster, then the checks.

Contract with the cluster: ``<data-dir>/cluster.json`` as written by
:class:`cohort.cluster.LocalCluster` (``cohort up``)::

    {"s3_endpoint": "http://127.0.0.1:PORT", "access_key": ..., "secret_key": ...,
     "region": "us-east-1",
     "members": [{"role": "coordinator"|"server"|"director", "id": ..., "address": ...,
                  "pid": ...}, ...],
     "storage": "<shared storage dir>", "partitions": N}          # the last two optional

A run:

1. creates the bucket (retrying until ``settle_timeout``);
2. for ``duration`` seconds, ``clients`` threads each do random PUT/GET/DELETE on ``keys``
   keys through boto3 (retries disabled, short timeouts) and record a history, while the
   :class:`~cohort.chaos.nemesis.Nemesis` injects faults and a sampler snapshots the
   partition logs' ``(seq, epoch)`` records (segments are deleted at checkpoints, so
   sampling during the run sees more of them);
3. heals everything, waits until every key can be read again, and reads each key's final
   value (these reads are part of the history);
4. checks linearizability per key, no lost acknowledged writes, lock safety (when lock
   intervals are supplied), single owner per partition log (when the storage is
   readable), and measures per-fault unavailability;
5. prints a summary table and writes a JSON report.

Outcome classification (see :mod:`cohort.chaos.history`): an answer is ``ok``; a 4xx
refusal is ``fail``; anything else on a write (timeouts, connection errors of any kind —
even "could not connect", see :func:`classify` — and 5xx) is ``info``: it may have been
applied.  Failed reads are ``fail``.  GET/DELETE of a missing key are ``ok`` (``None``).

Exit status of :func:`main`: 0 every check passed (skipped checks aside), 1 a check
failed, 2 undecided (checker timeout, cluster never settled) or the run itself broke.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

from cohort.chaos.history import History, Op, OpKind, OpResult, Recorder, Value
from cohort.chaos.linearizability import check_history, lost_acknowledged_writes
from cohort.chaos.lock_check import LockInterval, Violation, check_locks, single_owner
from cohort.chaos.nemesis import ACTIONS, Action, FaultRecord, Member, Nemesis, RestartFn
from cohort.chaos.proxy import FaultProxy

Status: TypeAlias = Literal["pass", "fail", "unknown", "skipped"]


# -- cluster description ---------------------------------------------------------------
@dataclass(slots=True)
class ClusterInfo:
    s3_endpoint: str
    access_key: str
    secret_key: str
    region: str
    members: list[Member]
    storage: str | None = None
    partitions: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> ClusterInfo:
        """Read ``cluster.json`` (a file, or a data directory containing one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "cluster.json"
        d = json.loads(p.read_text())
        return cls(
            s3_endpoint=str(d["s3_endpoint"]),
            access_key=str(d["access_key"]),
            secret_key=str(d["secret_key"]),
            region=str(d.get("region", "us-east-1")),
            members=[Member.from_dict(m) for m in d.get("members", [])],
            storage=d.get("storage"),
            partitions=d.get("partitions"),
        )


@dataclass(slots=True)
class RunConfig:
    """Knobs of one run; every random choice derives from ``seed``."""

    duration: float = 20.0
    clients: int = 4
    keys: int = 3
    seed: int = 0
    bucket: str = "chaos"
    key_prefix: str = "chaos/k"
    nemesis: bool = True
    actions: tuple[Action, ...] = ACTIONS
    roles: tuple[str, ...] = ("coordinator", "server", "director")
    fault_interval: tuple[float, float] = (1.0, 3.0)
    fault_duration: tuple[float, float] = (1.0, 4.0)
    pause_duration: tuple[float, float] | None = None
    mix: tuple[float, float, float] = (0.45, 0.45, 0.10)  # put, get, delete
    think: tuple[float, float] = (0.0, 0.02)  # client pause between operations
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    settle_timeout: float = 60.0
    check_timeout: float = 60.0  # per key
    shrink_budget: float = 10.0
    log_sample_interval: float = 2.0
    report: str | None = None


# -- clients -----------------------------------------------------------------------------
class OpOutcome(Exception):
    """A client call ended without an answer: ``result`` is ``fail`` or ``info``."""

    def __init__(self, result: OpResult, why: str) -> None:
        super().__init__(why)
        self.result = result


class KVClient(Protocol):
    """What the workload needs; raise :class:`OpOutcome` for non-answers."""

    def put(self, key: str, value: str) -> None: ...
    def get(self, key: str) -> Value: ...
    def delete(self, key: str) -> None: ...


def classify(exc: BaseException, write: bool) -> OpOutcome:
    """Map a boto3/botocore exception to ``fail`` (certainly not applied) or ``info``."""
    from botocore import exceptions as bx

    why = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, bx.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if 400 <= status < 500:
            return OpOutcome("fail", why)
        return OpOutcome("info" if write else "fail", why)
    # Not even a connection error proves a write was not applied: a 30-minute-style run
    # saw a PUT fail with EndpointConnectionError although the director had received and
    # applied it before being killed (http.client reconnects on its own and the refused
    # reconnect is what gets reported).  So only a 4xx answer is a certain "fail".
    return OpOutcome("info" if write else "fail", why)


class Boto3KV:
    """A :class:`KVClient` over one boto3 S3 client (one per thread)."""

    def __init__(self, info: ClusterInfo, cfg: RunConfig, endpoint: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = cfg.bucket
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint or info.s3_endpoint,
            aws_access_key_id=info.access_key,
            aws_secret_access_key=info.secret_key,
            region_name=info.region,
            config=Config(
                s3={"addressing_style": "path"},
                # Exactly one attempt: a retry is a second S3 request (a new request id),
                # which the history would record as one operation applied twice.
                # botocore's ``max_attempts`` counts retries, ``total_max_attempts`` does
                # not (``max_attempts: 1`` made seed 5 report a false violation).
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=cfg.connect_timeout,
                read_timeout=cfg.read_timeout,
            ),
        )

    def create_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.s3.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise

    def put(self, key: str, value: str) -> None:
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=value.encode())
        except Exception as e:
            raise classify(e, True) from e

    def get(self, key: str) -> Value:
        from botocore.exceptions import ClientError

        try:
            body: bytes = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise classify(e, False) from e
        except Exception as e:
            raise classify(e, False) from e
        try:
            return body.decode()
        except UnicodeDecodeError:
            return body  # not something any client wrote: the checker will say so

    def delete(self, key: str) -> None:
        try:
            self.s3.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            raise classify(e, True) from e

    def get_versioned(self, key: str) -> tuple[Value, str | None]:
        """The value and its ETag (None, None if the key does not exist)."""
        from botocore.exceptions import ClientError

        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=key)
            body: bytes = r["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise classify(e, False) from e
        except Exception as e:
            raise classify(e, False) from e
        return body.decode(errors="replace"), str(r["ETag"])

    def put_if(self, key: str, value: str, etag: str | None) -> None:
        """A conditional PUT: only over the version ``etag`` (or only if the key does not
        exist, for None).  A 412 comes back as a certain failure."""
        cond = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=value.encode(), **cond)
        except Exception as e:
            raise classify(e, True) from e


def _do(rec: Recorder, client: KVClient, process: int, kind: OpKind, key: str, v: str) -> Op:
    h = rec.invoke(process, kind, key, v if kind == "put" else None)
    try:
        if kind == "put":
            client.put(key, v)
            return rec.ok(h)
        if kind == "get":
            return rec.ok(h, client.get(key))
        client.delete(key)
        return rec.ok(h)
    except OpOutcome as o:
        return rec.fail(h, str(o)) if o.result == "fail" else rec.info(h, str(o))
    except Exception as e:  # a client bug must not stop the run; unknown outcome
        return rec.info(h, f"{type(e).__name__}: {e}")


def _client_loop(
    rec: Recorder,
    client: KVClient,
    worker: int,
    cfg: RunConfig,
    keys: Sequence[str],
    stop: threading.Event,
) -> None:
    rng = random.Random(cfg.seed * 1000 + worker)
    process = worker
    n = 0
    while not stop.is_set():
        kinds: list[OpKind] = ["put", "get", "delete"]
        kind = rng.choices(kinds, weights=cfg.mix)[0]
        key = rng.choice(keys)
        n += 1
        op = _do(rec, client, process, kind, key, f"w{worker}-{n}")
        if op.result == "info":
            # like Jepsen: a process whose operation may still be in flight is retired
            process += cfg.clients
        stop.wait(rng.uniform(*cfg.think))


# -- report ------------------------------------------------------------------------------
@dataclass(slots=True)
class CheckOutcome:
    name: str
    status: Status
    summary: str
    details: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "summary": self.summary,
                "details": self.details}  # fmt: skip


@dataclass(slots=True)
class ChaosReport:
    config: dict[str, Any]
    history: History
    plan: list[dict[str, Any]]
    faults: list[FaultRecord]
    checks: list[CheckOutcome]
    availability: list[dict[str, Any]]
    started: float
    finished: float
    errors: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)  # members' PIDs at the end

    @property
    def status(self) -> Status:
        st = {c.status for c in self.checks}
        if "fail" in st:
            return "fail"
        if "unknown" in st or self.errors:
            return "unknown"
        return "pass"

    @property
    def exit_code(self) -> int:
        return {"pass": 0, "fail": 1}.get(self.status, 2)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "config": self.config,
            "checks": [c.to_dict() for c in self.checks],
            "availability": self.availability,
            "plan": self.plan,
            "faults": [f.to_dict() for f in self.faults],
            "errors": self.errors,
            "started": self.started,
            "finished": self.finished,
            "history": [o.to_dict() for o in self.history.ops],
            "pids": self.pids,
        }

    def summary(self) -> str:
        """A plain-text table of the checks, the ops and the faults."""
        lines = [f"chaos run: {self.status.upper()}  (seed {self.config.get('seed')}, "
                 f"{self.finished - self.started:.1f}s)", ""]  # fmt: skip
        lines.append(f"{'check':<18} {'status':<8} summary")
        lines.append(f"{'-' * 18} {'-' * 8} {'-' * 50}")
        for c in self.checks:
            lines.append(f"{c.name:<18} {c.status:<8} {c.summary}")
        counts: dict[tuple[str, str], int] = {}
        for o in self.history.ops:
            counts[(o.kind, o.result)] = counts.get((o.kind, o.result), 0) + 1
        lines += ["", f"{'op':<8} {'ok':>7} {'fail':>7} {'info':>7}"]
        for kind in ("put", "get", "delete", "lock", "unlock"):
            row = [counts.get((kind, r), 0) for r in ("ok", "fail", "info")]
            if any(row):
                lines.append(f"{kind:<8} {row[0]:>7} {row[1]:>7} {row[2]:>7}")
        if self.availability:
            lines += ["", f"{'fault':<16} {'target':<16} {'dur s':>6} {'unavail s':>9}  note"]
            for a in self.availability:
                un = a["max_unavailable"]
                lines.append(
                    f"{a['action']:<16} {a['target']:<16} {a['duration']:>6.2f} "
                    f"{'never' if un is None else f'{un:.2f}':>9}  {a.get('note', '')}"
                )
        for e in self.errors:
            lines.append(f"error: {e}")
        return "\n".join(lines)


def availability(
    history: History, faults: Sequence[FaultRecord], keys: Sequence[str]
) -> list[dict[str, Any]]:
    """For each fault: per key, seconds from the fault's start until the first operation
    invoked at or after it completed ``ok`` (``None``: none did).  Includes normal latency,
    so a fault that did not affect a key shows that key's latency."""
    out: list[dict[str, Any]] = []
    by_key = history.by_key(("put", "get", "delete"))
    for f in faults:
        per_key: dict[str, float | None] = {}
        for k in keys:
            firsts = [
                o.end - f.start
                for o in by_key.get(k, [])
                if o.invoke >= f.start and o.result == "ok"
            ]
            per_key[k] = min(firsts) if firsts else None
        vals = list(per_key.values())
        worst = (
            None
            if any(v is None for v in vals) or not vals
            else max(v for v in vals if v is not None)
        )
        out.append({
            "action": f.action,
            "target": f.target,
            "start": f.start,
            "duration": (f.end or f.start) - f.start,
            "max_unavailable": worst,
            "per_key": per_key,
            "note": f.error or f.detail,
        })  # fmt: skip
    return out


# -- checks ------------------------------------------------------------------------------
def run_checks(
    history: History,
    finals: Mapping[str, Value] | None,
    cfg: RunConfig,
    *,
    lock_intervals: Sequence[LockInterval] | None = None,
    log_records: Mapping[int, Sequence[tuple[int, int]]] | None = None,
) -> list[CheckOutcome]:
    """Every check over a finished run (``None`` inputs make their check ``skipped``)."""
    out: list[CheckOutcome] = []
    lin = check_history(history, timeout_per_key=cfg.check_timeout,
                        shrink_budget=cfg.shrink_budget)  # fmt: skip
    bad = lin.failures()
    n_ops = sum(r.ops for r in lin.keys.values())
    st: Status = {True: "pass", False: "fail", None: "unknown"}[lin.ok]  # type: ignore[assignment]
    summ = f"{len(lin.keys)} keys, {n_ops} ops"
    if bad:
        summ += f"; NOT linearizable: {', '.join(r.key for r in bad)} ({bad[0].reason[:120]})"
    elif lin.ok is None:
        summ += "; search timed out"
    out.append(CheckOutcome("linearizability", st, summ, lin.to_dict()))

    if finals is None:
        out.append(CheckOutcome("lost-writes", "unknown", "final values could not be read"))
    else:
        by_key = history.by_key(("put", "get", "delete"))
        lost = {k: lost_acknowledged_writes(ops, finals.get(k)) for k, ops in by_key.items()}
        n_lost = sum(len(v) for v in lost.values())
        out.append(CheckOutcome(
            "lost-writes", "fail" if n_lost else "pass",
            f"{n_lost} acknowledged writes lost" if n_lost else "every acknowledged write accounted for",
            {k: [o.to_dict() for o in v] for k, v in lost.items() if v},
        ))  # fmt: skip

    if lock_intervals is None:
        out.append(CheckOutcome("lock-safety", "skipped", "no lock intervals recorded"))
    else:
        vs = check_locks(lock_intervals)
        out.append(_violations("lock-safety", vs, f"{len(lock_intervals)} grants"))

    if log_records is None:
        out.append(CheckOutcome("single-owner", "skipped", "partition logs not readable"))
    else:
        vs = []
        for part, recs in sorted(log_records.items()):
            for v in single_owner(recs):
                vs.append(Violation(v.kind, f"partition {part}: {v.detail}", v.items))
        total = sum(len(r) for r in log_records.values())
        out.append(_violations("single-owner", vs, f"{len(log_records)} logs, {total} segments"))
    return out


def _violations(name: str, vs: Sequence[Violation], what: str) -> CheckOutcome:
    if not vs:
        return CheckOutcome(name, "pass", what)
    return CheckOutcome(name, "fail", f"{what}; {len(vs)} violations: {vs[0].detail}",
                        [v.to_dict() for v in vs])  # fmt: skip


# -- partition-log sampling --------------------------------------------------------------
class LogSampler:
    """Collects ``(seq, epoch)`` of every partition's log segments from shared storage.

    Distinct ``(seq, epoch)`` pairs seen across samples are kept, so a segment replaced
    by one of another epoch shows up as a duplicate sequence number.
    """

    def __init__(self, storage: str, partitions: int) -> None:
        from cohort.storage.local import LocalStore

        self.store = LocalStore(storage, fsync=False)
        self.partitions = partitions
        self.records: dict[int, set[tuple[int, int]]] = {}

    async def sample(self) -> None:
        from cohort.oplog.log import segment_epochs

        for p in range(self.partitions):
            with contextlib.suppress(Exception):  # a segment deleted while listing
                for seq, epoch, _kind in await segment_epochs(self.store, p):
                    self.records.setdefault(p, set()).add((seq, epoch))

    def result(self) -> dict[int, list[tuple[int, int]]]:
        return {p: sorted(r) for p, r in self.records.items()}


# -- the run -----------------------------------------------------------------------------
async def run_chaos(
    info: ClusterInfo,
    cfg: RunConfig,
    *,
    restart: RestartFn | None = None,
    proxies: Mapping[str, FaultProxy] | None = None,
    client_factory: Callable[[], KVClient] | None = None,
    lock_intervals: Callable[[], Sequence[LockInterval]] | None = None,
    log_sampler: LogSampler | None = None,
    out: Callable[[str], None] | None = None,
) -> ChaosReport:
    """One chaos run (see the module docstring).  ``restart`` brings a killed member back
    (kill faults are only scheduled with it); ``client_factory`` builds one client per
    thread (default: :class:`Boto3KV`); ``lock_intervals`` returns the DLM grants the
    workload recorded, if any."""
    say = out or (lambda s: None)
    started = time.monotonic()
    rec = Recorder()
    errors: list[str] = []
    factory: Callable[[], KVClient] = client_factory or (lambda: Boto3KV(info, cfg))
    keys = [f"{cfg.key_prefix}{i}" for i in range(cfg.keys)]
    if log_sampler is None and info.storage and info.partitions:
        with contextlib.suppress(Exception):
            log_sampler = LogSampler(info.storage, int(info.partitions))

    # 1. bucket
    if client_factory is None:
        boto = Boto3KV(info, cfg)
        deadline = time.monotonic() + cfg.settle_timeout
        while True:
            try:
                await asyncio.to_thread(boto.create_bucket)
                break
            except Exception as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot create bucket {cfg.bucket}: {e}") from e
                await asyncio.sleep(0.5)

    # 2. workload + nemesis + log sampling
    nem = Nemesis(
        info.members if cfg.nemesis else [],
        seed=cfg.seed,
        restart=restart,
        proxies=proxies if cfg.nemesis else None,
        actions=cfg.actions,
        roles=cfg.roles,
        interval=cfg.fault_interval,
        duration=cfg.fault_duration,
        pause=cfg.pause_duration,
    )
    plan = nem.plan(cfg.duration)
    say(f"running {cfg.clients} clients on {len(keys)} keys for {cfg.duration:.0f}s "
        f"with {len(plan)} faults planned (seed {cfg.seed})")  # fmt: skip
    stop = threading.Event()
    clients = [factory() for _ in range(cfg.clients)]
    threads = [
        threading.Thread(target=_client_loop, args=(rec, c, i, cfg, keys, stop),
                         name=f"chaos-client-{i}", daemon=True)
        for i, c in enumerate(clients)
    ]  # fmt: skip
    for t in threads:
        t.start()
    sampling = asyncio.Event()

    async def sample_loop() -> None:
        assert log_sampler is not None
        while not sampling.is_set():
            try:
                await log_sampler.sample()
            except Exception as e:
                errors.append(f"log sampling: {e}")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sampling.wait(), cfg.log_sample_interval)

    sampler_task = asyncio.create_task(sample_loop()) if log_sampler is not None else None
    try:
        await nem.run(cfg.duration)
        # the plan may end early; keep the workload going for the full duration
        remaining = started + cfg.duration - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)
    finally:
        await nem.heal()
        stop.set()
        for t in threads:
            await asyncio.to_thread(t.join, cfg.read_timeout + cfg.connect_timeout + 5)
    say(f"workload done: {len(rec.history())} ops, {len(nem.records)} faults; settling")

    # 3. settle: every key readable again; those reads are part of the history
    finals: dict[str, Value] | None = {}
    settle_client = factory()
    deadline = time.monotonic() + cfg.settle_timeout
    assert finals is not None
    for k in keys:
        while True:
            op = await asyncio.to_thread(_do, rec, settle_client, 10**6, "get", k, "")
            if op.result == "ok":
                finals[k] = op.read_value
                break
            if time.monotonic() > deadline:
                errors.append(f"cluster did not settle: {k} unreadable after {cfg.settle_timeout}s")
                finals = None
                break
            await asyncio.sleep(0.2)
        if finals is None:
            break
    if sampler_task is not None:
        sampling.set()
        await sampler_task
        assert log_sampler is not None
        with contextlib.suppress(Exception):
            await log_sampler.sample()  # the settled state too

    # 4. checks
    history = rec.history()
    say("checking")
    checks = await asyncio.to_thread(
        run_checks, history, finals, cfg,
        lock_intervals=list(lock_intervals()) if lock_intervals else None,
        log_records=log_sampler.result() if log_sampler is not None else None,
    )  # fmt: skip
    broken = [f for f in nem.records if f.error]
    if broken:
        # a member that could not be restarted (or a fault that could not be applied)
        # means the rest of the run tested a different cluster than intended
        checks.append(CheckOutcome(
            "nemesis", "unknown",
            f"{len(broken)}/{len(nem.records)} faults had errors: {broken[0].error}",
            [f.to_dict() for f in broken],
        ))  # fmt: skip
    else:
        checks.append(
            CheckOutcome("nemesis", "pass", f"{len(nem.records)} faults applied and healed")
        )
    return ChaosReport(
        config=asdict(cfg),
        history=history,
        plan=[f.to_dict() for f in plan],
        faults=list(nem.records),
        checks=checks,
        availability=availability(history, nem.records, keys),
        started=started,
        finished=time.monotonic(),
        errors=errors,
        pids=nem.pids(),
    )


def write_report(report: ChaosReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=1, default=str))


# -- command line ------------------------------------------------------------------------
def _pair(s: str) -> tuple[float, float]:
    a, _, b = s.partition(",")
    return float(a), float(b or a)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Path, RunConfig, bool]:
    ap = argparse.ArgumentParser(
        prog="python -m cohort.chaos.runner",
        description="Run clients and a nemesis against a cluster, then check the history.",
    )
    ap.add_argument("--data-dir", required=True, help="directory holding cluster.json")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of workload")
    ap.add_argument("--minutes", type=float, help="duration in minutes (overrides --duration)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--bucket", default="chaos")
    ap.add_argument("--no-nemesis", action="store_true", help="no faults (a baseline run)")
    ap.add_argument("--actions", default=",".join(ACTIONS),
                    help="comma-separated fault kinds: " + ",".join(ACTIONS))  # fmt: skip
    ap.add_argument("--roles", default="coordinator,server,director")
    ap.add_argument("--interval", type=_pair, default=(1.0, 3.0), help="MIN,MAX s between faults")
    ap.add_argument("--fault-duration", type=_pair, default=(1.0, 4.0), help="MIN,MAX s")
    ap.add_argument("--pause-duration", type=_pair, help="MIN,MAX s of SIGSTOP pauses")
    ap.add_argument("--no-restart", action="store_true",
                    help="never kill (no way to restart members from here)")  # fmt: skip
    ap.add_argument("--report", help="JSON report path (default <data-dir>/chaos-report.json)")
    a = ap.parse_args(argv)
    actions = tuple(x for x in ACTIONS if x in a.actions.split(","))
    unknown = set(a.actions.split(",")) - set(ACTIONS) - {""}
    if unknown:
        ap.error(f"unknown actions: {', '.join(sorted(unknown))}")
    cfg = RunConfig(
        duration=a.minutes * 60 if a.minutes else a.duration,
        clients=a.clients,
        keys=a.keys,
        seed=a.seed,
        bucket=a.bucket,
        nemesis=not a.no_nemesis,
        actions=actions,
        roles=tuple(a.roles.split(",")),
        fault_interval=a.interval,
        fault_duration=a.fault_duration,
        pause_duration=a.pause_duration,
        report=a.report,
    )
    return Path(a.data_dir), cfg, not a.no_restart


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: run against ``--data-dir``'s cluster; restarts killed members by
    re-running their command lines (:class:`~cohort.chaos.nemesis.CmdlineRestarter`)."""
    from cohort.chaos.nemesis import CmdlineRestarter

    data_dir, cfg, can_restart = parse_args(argv)
    try:
        info = ClusterInfo.load(data_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot read {data_dir}/cluster.json: {e}", file=sys.stderr)
        return 2
    restart = None
    if can_restart:
        logs = data_dir / "logs"
        restart = CmdlineRestarter(info.members, str(logs) if logs.is_dir() else None)
    try:
        report = asyncio.run(run_chaos(info, cfg, restart=restart, out=print))
    except Exception as e:
        print(f"chaos run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    path = cfg.report or str(data_dir / "chaos-report.json")
    write_report(report, path)
    print(report.summary())
    print(f"report: {path}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
