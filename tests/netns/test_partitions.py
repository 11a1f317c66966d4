"""Network partitions across "hosts" made of network namespaces: no split brain, no lost writes.

Topology (all inside namespaces this test creates; the host's own network is untouched)::

    namespace <p>-sw:  bridge br0 ── veth ── each host's eth0 (10.<r>.<s>.0/24)
    hosts: e1 e2 e3 (etcd members), s1 s2 s3 (servers), d1 (director), c1 (S3 client)

Shared storage is one directory on the host filesystem, which every namespace sees.

The scenario, with S3 PUT traffic from c1 running throughout:

1. cut s1 (``ip link set eth0 down`` inside s1): it self-fences before its lease can
   expire, its partitions move to s2/s3, traffic continues; the time from the cut to
   every moved partition being held by its new owner is printed;
2. link s1 up again: it re-joins as a new incarnation and receives partitions again;
3. cut one etcd member (a follower): the cluster keeps serving;
4. cut the etcd majority (two members): servers stop acknowledging writes (their leases
   cannot be renewed) and resume once it heals;
5. every acknowledged PUT is read back and compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from cohort.auth import ClusterKey
from cohort.cluster import _read_ready, load_credentials
from cohort.etcd_server import EtcdCluster, etcd_available

REPO = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).with_name("agent.py")
PARTITIONS = 64
LEASE_TTL = 2


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"chk{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


_why = _netns_unavailable()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.etcd,
    pytest.mark.skipif(_why is not None, reason=_why or ""),
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
    pytest.mark.timeout(240),
]


def sh(*args: str) -> None:
    r = subprocess.run(list(args), capture_output=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.decode().strip()}")


class Net:
    """Namespaces on one bridge; every name starts with a random prefix; ``close`` removes all."""

    def __init__(self, hosts: list[str]) -> None:
        self.prefix = "ch" + uuid.uuid4().hex[:4]
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(1, 250)}"
        self.sw = f"{self.prefix}-sw"
        self.ns: dict[str, str] = {}
        self.ip: dict[str, str] = {}
        self.created: list[str] = []
        try:
            sh("ip", "netns", "add", self.sw)
            self.created.append(self.sw)
            sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.sw, "link", "set", "br0", "up")
            for i, h in enumerate(hosts, start=1):
                ns = f"{self.prefix}-{h}"
                sh("ip", "netns", "add", ns)
                self.created.append(ns)
                port = f"v{self.prefix[2:]}{h}"
                sh("ip", "-n", self.sw, "link", "add", port, "type", "veth",
                   "peer", "name", "eth0", "netns", ns)  # fmt: skip
                sh("ip", "-n", self.sw, "link", "set", port, "master", "br0", "up")
                self.ip[h] = f"{self.subnet}.{i}"
                sh("ip", "-n", ns, "addr", "add", f"{self.ip[h]}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                self.ns[h] = ns
        except BaseException:
            self.close()
            raise

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host]]

    def link(self, host: str, up: bool) -> None:
        sh("ip", "-n", self.ns[host], "link", "set", "eth0", "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.created.clear()


class Lines:
    """Reads a child's JSON-lines stdout in a thread."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with contextlib.suppress(ValueError):
                doc = json.loads(raw)
                with self.lock:
                    self.items.append(doc)

    def snapshot(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [x for x in self.items if kind is None or x.get("kind") == kind]


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Hosts:
    def __init__(self, net: Net, tmp: Path) -> None:
        self.net = net
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = tmp / "logs"
        self.logs.mkdir()

    def spawn(self, name: str, host: str, args: list[str], *, ready: bool = True,
              stdin: bool = False) -> subprocess.Popen[bytes]:  # fmt: skip
        p = subprocess.Popen(
            [*self.net.exec_prefix(host), sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=open(self.logs / f"{name}.stderr", "ab"),  # noqa: SIM115
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )
        self.procs[name] = p
        if ready:
            _read_ready(p, name, 30)
        return p

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs.values():
            with contextlib.suppress(Exception):
                p.wait(10)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    net = Net(["e1", "e2", "e3", "s1", "s2", "s3", "d1", "c1"])
    hosts = Hosts(net, tmp_path)
    etcd: EtcdCluster | None = None
    try:
        etcd = EtcdCluster(
            hosts=[net.ip[h] for h in ("e1", "e2", "e3")],
            prefixes=[net.exec_prefix(h) for h in ("e1", "e2", "e3")],
            base_dir=tmp_path / "etcd",
            client_port=2379,
            peer_port=2380,
        ).start(timeout=60)
        yield {"net": net, "hosts": hosts, "etcd": etcd, "tmp": tmp_path}
    finally:
        hosts.close()
        if etcd is not None:
            etcd.stop()
        net.close()


def test_partitions_without_split_brain(world: dict[str, Any]) -> None:
    net: Net = world["net"]
    hosts: Hosts = world["hosts"]
    etcd: EtcdCluster = world["etcd"]
    tmp: Path = world["tmp"]
    storage = tmp / "storage"
    storage.mkdir()
    load_credentials(tmp)
    creds = str(tmp / "credentials.json")
    key = str(tmp / "cluster.key")
    ClusterKey.create_file(key)
    # load-based moves off: this test checks that faults alone move nothing (on etcd the
    # primary runs the load rules too, and the load client makes partitions hot)
    address = etcd.address("netns", partitions=PARTITIONS, lease_ttl=LEASE_TTL, load_balance=0)

    for s in ("s1", "s2", "s3"):
        hosts.spawn(s, s, ["-m", "cohort.server.service", "--id", s, "--coordinator", address,
                           "--storage", str(storage), "--host", net.ip[s], "--port", "7000",
                           "--cluster-key", key, "--log-file", str(hosts.logs / f"{s}.log")])  # fmt: skip
    hosts.spawn("d1", "d1", ["-m", "cohort.director.service", "--id", "d1", "--coordinator",
                             address, "--storage", str(storage), "--credentials", creds,
                             "--host", net.ip["d1"], "--port", "9000",
                             "--cluster-key", key, "--log-file", str(hosts.logs / "d1.log")])  # fmt: skip
    mon_p = hosts.spawn("monitor", "c1", [str(AGENT), "monitor", address], ready=False)
    assert mon_p.stdout is not None
    mon = Lines(mon_p.stdout)

    def views() -> list[dict[str, Any]]:
        return mon.snapshot("view")

    def settled(v: dict[str, Any], servers: set[str]) -> bool:
        return all(o in servers and o == h for o, h in zip(v["owners"], v["holders"], strict=True))

    def first_view(cond: Callable[[dict[str, Any]], bool], after: float) -> dict[str, Any] | None:
        return next((v for v in views() if v["t"] >= after and cond(v)), None)

    all3 = {"s1", "s2", "s3"}
    wait_until(lambda: views() and settled(views()[-1], all3)
               and len(set(views()[-1]["owners"])) == 3, 60, "all partitions owned and locked")  # fmt: skip

    endpoint = f"http://{net.ip['d1']}:9000"
    load_p = hosts.spawn("load", "c1", [str(AGENT), "load", endpoint, creds, "netns-bkt"],
                         ready=False, stdin=True)  # fmt: skip
    assert load_p.stdout is not None and load_p.stdin is not None
    load = Lines(load_p.stdout)

    def acks(after: float = 0.0, before: float = float("inf")) -> list[dict[str, Any]]:
        return [a for a in load.snapshot("ack") if after <= a["t"] <= before]

    wait_until(lambda: len(acks()) >= 30, 60, "30 acknowledged PUTs")
    report: dict[str, float] = {}

    probe_p = hosts.spawn("probe", "s1", [str(AGENT), "probe", f"{net.ip['s1']}:7000", key],
                          ready=False)  # fmt: skip
    assert probe_p.stdout is not None
    probe = Lines(probe_p.stdout)
    wait_until(lambda: probe.snapshot("status"), 20, "the probe of s1")

    # -- 1. cut server s1 off --------------------------------------------------------------------
    before = views()[-1]
    s1_parts = [p for p, o in enumerate(before["owners"]) if o == "s1"]
    assert s1_parts
    t_cut = time.monotonic()
    net.link("s1", up=False)

    def moved(v: dict[str, Any]) -> bool:
        return all(v["owners"][p] in ("s2", "s3") and v["holders"][p] == v["owners"][p]
                   for p in s1_parts)  # fmt: skip

    v_moved = wait_until(lambda: first_view(moved, t_cut), 20, "s1's partitions to move")
    report["cut_to_serving_elsewhere_s"] = v_moved["t"] - t_cut
    v_assigned = first_view(lambda v: all(v["owners"][p] != "s1" for p in s1_parts), t_cut)
    assert v_assigned is not None
    report["cut_to_reassigned_s"] = v_assigned["t"] - t_cut
    # traffic continues (keys of every partition, including the moved ones)
    n0 = len(acks(after=v_moved["t"]))
    wait_until(lambda: len(acks(after=v_moved["t"])) >= n0 + 30, 30, "traffic after failover")
    # s1 fenced itself (refuses every request) before its lease could expire in etcd
    fenced = wait_until(
        lambda: next((x for x in probe.snapshot("status") if x["t"] > t_cut
                      and not x["lease_valid"]), None), 10, "s1 to fence itself")  # fmt: skip
    report["cut_to_self_fence_s"] = fenced["t"] - t_cut
    first_grant = first_view(
        lambda v: any(v["holders"][p] not in (None, "s1") for p in s1_parts), t_cut
    )
    assert first_grant is not None
    assert fenced["t"] < first_grant["t"], "a moved partition was granted before s1 fenced"
    assert fenced["t"] - t_cut < LEASE_TTL, "s1 kept serving past its lease"
    # ...and stayed fenced (it answers nothing while its lease is invalid) until the
    # partitions were serving elsewhere
    assert all(not x["lease_valid"] for x in probe.snapshot("status")
               if fenced["t"] < x["t"] < v_moved["t"]), "s1 served again while cut off"  # fmt: skip

    # -- 2. s1 comes back and gets partitions again ----------------------------------------------
    t_up = time.monotonic()
    net.link("s1", up=True)

    def back(v: dict[str, Any]) -> bool:
        return v["members"].get("s1") == "alive" and settled(v, all3) and "s1" in v["owners"]

    v_back = wait_until(lambda: first_view(back, t_up), 60, "s1 to rejoin and serve again")
    report["link_up_to_s1_serving_s"] = v_back["t"] - t_up

    # -- 3. cut one etcd member (a follower): nothing stops --------------------------------------
    leader = etcd.leader_index()
    follower = next(i for i in range(3) if i != leader)
    ehost = ("e1", "e2", "e3")[follower]
    t_e = time.monotonic()
    net.link(ehost, up=False)
    wait_until(lambda: len(acks(after=t_e + 2 * LEASE_TTL)) >= 20, 30,
               "traffic with one etcd member cut off")  # fmt: skip
    errs = [e for e in load.snapshot("err") if e["t"] > t_e]
    assert all(settled(v, all3) for v in views() if v["t"] > t_e), "partitions moved"
    report["errors_with_one_etcd_member_cut"] = len(errs)
    net.link(ehost, up=True)
    wait_until(lambda: etcd.member_healthy(follower), 30, "the etcd member to rejoin")

    # -- 4. cut the etcd majority: writes stop, then resume -------------------------------------
    cut = [h for i, h in enumerate(("e1", "e2", "e3")) if i != follower]
    t_maj = time.monotonic()
    for h in cut:
        net.link(h, up=False)
    # no write may be acknowledged once a server's lease could have lapsed
    quiet_from = t_maj + LEASE_TTL + 1.0
    time_to_wait = quiet_from + 3.0
    wait_until(lambda: time.monotonic() > time_to_wait, 10, "a window with etcd majority gone")
    t_heal = time.monotonic()
    late = acks(after=quiet_from, before=t_heal)
    assert not late, f"{len(late)} writes acknowledged without an etcd quorum: {late[:3]}"
    for h in cut:
        net.link(h, up=True)
    wait_until(lambda: acks(after=t_heal), 40, "writes to resume after the majority heals")
    report["heal_to_first_write_s"] = acks(after=t_heal)[0]["t"] - t_heal
    n1 = len(acks())
    wait_until(lambda: len(acks()) >= n1 + 20, 30, "steady traffic after healing")

    # -- 5. every acknowledged write is readable -------------------------------------------------
    load_p.stdin.close()
    wait_until(lambda: load.snapshot("load-stopped"), 40, "the load to stop")
    keys = sorted({a["key"] for a in acks()})
    keys_file = tmp / "acked.txt"
    keys_file.write_text("\n".join(keys))
    ver_p = hosts.spawn("verify", "c1", [str(AGENT), "verify", endpoint, creds, "netns-bkt",
                                          str(keys_file)], ready=False)  # fmt: skip
    assert ver_p.stdout is not None
    out = ver_p.stdout.read()
    ver_p.wait(60)
    result = json.loads(out.splitlines()[-1])
    report["acknowledged_writes"] = len(keys)
    print("\nnetns partition test:", json.dumps({k: round(v, 3) for k, v in report.items()}))
    assert result["checked"] == len(keys)
    assert result["n_missing"] == 0 and not result["wrong"], result
    assert report["cut_to_serving_elsewhere_s"] < 5.0
