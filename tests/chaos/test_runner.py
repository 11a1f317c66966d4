"""The runner against in-process fake stores: correct ones pass, broken ones are caught."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from cohort.chaos.history import Value
from cohort.chaos.lock_check import LockInterval
from cohort.chaos.runner import (
    ClusterInfo,
    OpOutcome,
    RunConfig,
    classify,
    parse_args,
    run_chaos,
    run_checks,
    write_report,
)


class Register:
    """A linearizable in-memory KV shared by every fake client."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, str] = {}
        self.history: dict[str, list[str | None]] = {}

    def put(self, key: str, value: str) -> None:
        with self.lock:
            self.data[key] = value
            self.history.setdefault(key, []).append(value)

    def get(self, key: str) -> Value:
        with self.lock:
            return self.data.get(key)

    def delete(self, key: str) -> None:
        with self.lock:
            self.data.pop(key, None)
            self.history.setdefault(key, []).append(None)


class StaleReads(Register):
    """Serves a previous value now and then, like a lagging replica."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    def get(self, key: str) -> Value:
        with self.lock:
            h = self.history.get(key, [])
            if len(h) >= 3 and self.rng.random() < 0.2:
                return h[-3]
            return self.data.get(key)


class FlakyButHonest(Register):
    """Times out sometimes, after or before applying: must still pass."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    def put(self, key: str, value: str) -> None:
        x = self.rng.random()
        if x < 0.1:
            raise OpOutcome("fail", "refused")
        if x < 0.2:
            super().put(key, value)
            raise OpOutcome("info", "timeout after apply")
        if x < 0.3:
            raise OpOutcome("info", "timeout before apply")
        super().put(key, value)


class AckBeforeDurable(Register):
    """Acknowledges writes that a 'crash' then loses: the classic durability bug."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def put(self, key: str, value: str) -> None:
        with self.lock:
            self.n += 1
            if self.n % 7 == 0:
                return  # acknowledged, never applied
            self.data[key] = value


def _info() -> ClusterInfo:
    return ClusterInfo("http://127.0.0.1:1", "a", "s", "us-east-1", [])


def _cfg(**kw: object) -> RunConfig:
    base = dict(duration=1.0, clients=3, keys=2, seed=1, nemesis=False, think=(0.0, 0.002),
                settle_timeout=2.0, check_timeout=20.0, shrink_budget=2.0)  # fmt: skip
    base.update(kw)
    return RunConfig(**base)  # type: ignore[arg-type]


async def test_healthy_run_passes(tmp_path: Path) -> None:
    reg = Register()
    rep = await run_chaos(_info(), _cfg(), client_factory=lambda: reg)
    assert rep.status == "pass" and rep.exit_code == 0, rep.summary()
    names = {c.name: c.status for c in rep.checks}
    assert names == {"linearizability": "pass", "lost-writes": "pass", "nemesis": "pass",
                     "lock-safety": "skipped", "single-owner": "skipped"}  # fmt: skip
    assert len(rep.history) > 50
    text = rep.summary()
    assert "linearizability" in text and "PASS" in text
    write_report(rep, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["status"] == "pass" and len(doc["history"]) == len(rep.history)


async def test_unknown_outcomes_are_tolerated() -> None:
    reg = FlakyButHonest(2)
    rep = await run_chaos(_info(), _cfg(), client_factory=lambda: reg)
    results = {o.result for o in rep.history}
    assert {"ok", "fail", "info"} <= results
    assert rep.status == "pass", rep.summary()


async def test_stale_reads_are_caught() -> None:
    reg = StaleReads(3)
    rep = await run_chaos(_info(), _cfg(), client_factory=lambda: reg)
    assert rep.status == "fail" and rep.exit_code == 1
    lin = next(c for c in rep.checks if c.name == "linearizability")
    assert lin.status == "fail"
    bad = [k for k, r in lin.details["keys"].items() if r["linearizable"] is False]
    assert bad and all(1 <= len(lin.details["keys"][k]["counterexample"]) <= 10 for k in bad)


async def test_acknowledged_but_lost_writes_are_caught() -> None:
    reg = AckBeforeDurable()
    rep = await run_chaos(_info(), _cfg(mix=(0.6, 0.4, 0.0)), client_factory=lambda: reg)
    st = {c.name: c.status for c in rep.checks}
    assert st["linearizability"] == "fail"
    assert rep.exit_code == 1


def test_lost_writes_check_uses_final_values() -> None:
    from cohort.chaos.history import History, Op

    h = History([Op(0, "put", "k", "a", 0, 1, "ok"), Op(0, "put", "k", "b", 2, 3, "ok")])
    checks = {c.name: c for c in run_checks(h, {"k": "a"}, _cfg())}
    assert checks["lost-writes"].status == "fail"
    assert checks["linearizability"].status == "pass"  # no read saw it: only the final value
    checks = {c.name: c for c in run_checks(h, None, _cfg())}
    assert checks["lost-writes"].status == "unknown"


def test_lock_and_log_checks_are_wired() -> None:
    from cohort.chaos.history import History

    ivs = [LockInterval("a", "r", "EX", 0, 5, 1), LockInterval("b", "r", "EX", 3, 6, 2)]
    checks = {c.name: c for c in run_checks(History(), {}, _cfg(), lock_intervals=ivs,
                                            log_records={7: [(1, 1), (2, 2), (3, 1)]})}  # fmt: skip
    assert checks["lock-safety"].status == "fail"
    assert checks["single-owner"].status == "fail"
    assert "partition 7" in checks["single-owner"].summary


def test_classify_botocore_errors() -> None:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    def ce(status: int) -> ClientError:
        return ClientError({"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")  # fmt: skip

    # regression (seed 21, 8-minute run): a PUT reported as EndpointConnectionError had
    # been applied by a director killed mid-request, so connection errors are not "fail"
    assert classify(EndpointConnectionError(endpoint_url="x"), True).result == "info"
    assert classify(EndpointConnectionError(endpoint_url="x"), False).result == "fail"
    assert classify(ConnectTimeoutError(endpoint_url="x"), True).result == "info"
    assert classify(ReadTimeoutError(endpoint_url="x"), True).result == "info"
    assert classify(ReadTimeoutError(endpoint_url="x"), False).result == "fail"
    assert classify(ConnectionClosedError(endpoint_url="x"), True).result == "info"
    assert classify(ce(403), True).result == "fail"
    assert classify(ce(503), True).result == "info"
    assert classify(ce(500), False).result == "fail"


def test_cluster_json_and_cli_args(tmp_path: Path) -> None:
    doc = {
        "s3_endpoint": "http://127.0.0.1:9000", "access_key": "AK", "secret_key": "SK",
        "region": "us-east-1", "storage": str(tmp_path / "storage"), "partitions": 16,
        "members": [{"role": "server", "id": "server-1", "address": "127.0.0.1:5", "pid": 42}],
    }  # fmt: skip
    (tmp_path / "cluster.json").write_text(json.dumps(doc))
    info = ClusterInfo.load(tmp_path)
    assert info.members[0].pid == 42 and info.partitions == 16
    d, cfg, restart = parse_args(["--data-dir", str(tmp_path), "--minutes", "0.5", "--seed",
                                  "9", "--actions", "pause,proxy-drop", "--no-restart"])  # fmt: skip
    assert d == tmp_path and cfg.duration == 30 and cfg.seed == 9 and not restart
    assert cfg.actions == ("pause", "proxy-drop")
    with pytest.raises(SystemExit):
        parse_args(["--data-dir", str(tmp_path), "--actions", "nuke"])


def test_main_reports_unreadable_cluster(tmp_path: Path) -> None:
    from cohort.chaos.runner import main

    assert main(["--data-dir", str(tmp_path)]) == 2


async def test_run_with_time_budget() -> None:
    t0 = time.monotonic()
    reg = Register()
    rep = await run_chaos(_info(), _cfg(duration=0.5), client_factory=lambda: reg)
    assert rep.status == "pass"
    assert time.monotonic() - t0 < 10


def test_boto3_client_sends_each_operation_once() -> None:
    """Regression (seed 5, network faults): botocore's ``max_attempts: 1`` still allowed one
    retry, so a PUT that timed out was re-sent as a second S3 request and applied twice,
    and the checker reported a violation that was the harness's own.  A silent server
    here counts the requests one timed-out PUT makes."""
    import socket

    from cohort.chaos.runner import Boto3KV

    requests: list[bytes] = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            held.append(c)  # never answered: the client's read times out
            requests.append(c.recv(64))

    threading.Thread(target=accept, daemon=True).start()
    try:
        info = ClusterInfo(f"http://127.0.0.1:{srv.getsockname()[1]}", "AK", "SK", "us-east-1", [])
        kv = Boto3KV(info, RunConfig(duration=1, read_timeout=0.5, connect_timeout=0.5))
        with pytest.raises(OpOutcome) as e:
            kv.put("k", "v")
        assert e.value.result == "info"  # a write whose answer never came: unknown
        deadline = time.monotonic() + 2
        while not requests and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # room for a (wrong) second attempt to show up
        assert len(requests) == 1, requests
        assert requests[0].startswith(b"PUT ")
    finally:
        srv.close()
        for c in held:
            c.close()


def test_chaos_cli_rejects_bad_options() -> None:
    """``cohort chaos`` answers bad options with a one-line error and exit status 2,
    before starting anything."""
    from typer.testing import CliRunner

    from cohort.admin.cli import app

    r = CliRunner().invoke(app, ["chaos", "--coordinator", "zookeeper"])
    assert r.exit_code == 2 and "--coordinator must be embedded or etcd" in r.stderr
    r = CliRunner().invoke(app, ["chaos", "--actions", "kill,nuke"])
    assert r.exit_code == 2 and "unknown fault kinds ['nuke']" in r.stderr
