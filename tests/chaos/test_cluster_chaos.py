"""The chaos harness against a real local cluster (processes on 127.0.0.1 ephemeral ports).

Fixed seeds; every run is bounded.  ``test_short_chaos_run`` is the CI run; the others
are ``slow``.  ``test_broken_build_is_caught`` injects a defect into the server processes
(acknowledging a log append before it is durable) through ``sitecustomize`` and checks
the harness reports it, so we know it can see what it claims to see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cohort.chaos.nemesis import Member
from cohort.chaos.proxy import FaultProxy
from cohort.chaos.runner import ChaosReport, ClusterInfo, RunConfig, run_chaos, write_report

cluster_mod = pytest.importorskip(
    "cohort.cluster", reason="cohort.cluster.LocalCluster (the cluster launcher) not importable yet"
)
LocalCluster: Any = cluster_mod.LocalCluster

pytestmark = pytest.mark.chaos


def _start(tmp: Path, **kw: Any) -> Any:
    kw.setdefault("port", 0)
    kw.setdefault("partitions", 16)
    return LocalCluster(tmp, **kw).start()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    c = _start(tmp_path / "cluster")
    yield c
    c.stop()


def _restart(cluster: Any) -> Any:
    def restart(m: Member) -> int:
        return int(cluster.restart(m.id).pid)

    return restart


def _show(rep: ChaosReport, tmp: Path) -> str:
    write_report(rep, tmp / "chaos-report.json")
    return rep.summary() + f"\nreport: {tmp / 'chaos-report.json'}"


async def test_short_chaos_run(cluster: Any, tmp_path: Path) -> None:
    """kill -9 + restart and SIGSTOP pauses longer than the lease, on servers."""
    info = ClusterInfo.load(cluster.data_dir)
    cfg = RunConfig(
        duration=12, clients=4, keys=3, seed=11, roles=("server",), actions=("kill", "pause"),
        fault_interval=(0.5, 1.5), fault_duration=(1.0, 2.5), pause_duration=(3.0, 4.0),
        settle_timeout=45,
    )  # fmt: skip
    rep = await run_chaos(info, cfg, restart=_restart(cluster))
    assert rep.faults, "the nemesis did nothing"
    assert rep.status == "pass", _show(rep, tmp_path)
    assert {c.name: c.status for c in rep.checks}["single-owner"] == "pass"


@pytest.mark.slow
async def test_chaos_with_network_faults(cluster: Any, tmp_path: Path) -> None:
    """Client-to-director link through a FaultProxy (drop / delay / black hole), plus
    kills and pauses of servers and directors.  Black holes produce unknown outcomes."""
    info = ClusterInfo.load(cluster.data_dir)
    host, _, port = info.s3_endpoint.removeprefix("http://").rpartition(":")
    proxy = FaultProxy("127.0.0.1", 0, target_host=host, target_port=int(port))
    await proxy.start()
    try:
        via = dataclasses.replace(info, s3_endpoint=f"http://127.0.0.1:{proxy.port}")
        cfg = RunConfig(
            duration=30, clients=4, keys=3, seed=5, roles=("server", "director"),
            fault_interval=(0.5, 1.5), fault_duration=(1.0, 3.0), pause_duration=(3.0, 4.0),
            read_timeout=2.0, settle_timeout=60,
        )  # fmt: skip
        rep = await run_chaos(via, cfg, restart=_restart(cluster), proxies={"client": proxy})
    finally:
        await proxy.close()
    assert {f.action for f in rep.faults} & {"proxy-drop", "proxy-delay", "proxy-blackhole"}
    assert rep.status == "pass", _show(rep, tmp_path)


_ACK_BEFORE_DURABLE = textwrap.dedent(
    """
    # Injected defect: PartitionLog.append acknowledges before the segment is written.
    import asyncio
    import cohort.oplog.log as _log
    from cohort.oplog import segment as _segment

    async def _append(self, records):
        if self.next_seq < 0:
            raise _log.Fenced("log not recovered")
        seq = self.next_seq
        self.next_seq = seq + 1
        self.segments_since_checkpoint += 1
        hdr = {"seq": seq, "epoch": self.epoch, "owner": self.owner, "kind": "data"}
        data = _segment.encode(hdr, records)

        async def later():
            await asyncio.sleep(1.5)
            try:
                await self.store.put(self._log_key(seq), data, if_absent=True)
            except Exception:
                pass

        asyncio.get_running_loop().create_task(later())
        return seq

    _log.PartitionLog.append = _append
    """
)


@pytest.mark.slow
async def test_broken_build_is_caught(tmp_path: Path) -> None:
    hook = tmp_path / "defect"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_ACK_BEFORE_DURABLE)
    c = _start(tmp_path / "cluster", extra_env={"PYTHONPATH": str(hook)})
    try:
        info = ClusterInfo.load(c.data_dir)
        cfg = RunConfig(
            duration=15, clients=4, keys=2, seed=3, roles=("server",), actions=("kill",),
            mix=(0.6, 0.4, 0.0), fault_interval=(0.5, 1.0), fault_duration=(0.5, 1.0),
            settle_timeout=45,
        )  # fmt: skip
        rep = await run_chaos(info, cfg, restart=_restart(c))
    finally:
        await asyncio.to_thread(c.stop)
    print(rep.summary())
    st = {ch.name: ch.status for ch in rep.checks}
    assert "fail" in (st["linearizability"], st["lost-writes"]), _show(rep, tmp_path)
    assert rep.exit_code == 1
