"""Start and manage a whole local cluster as real processes (``cohort up``, tests, benches).

:class:`LocalCluster` starts one embedded coordinator, N middle-layer servers and M
directors as separate Python processes talking over loopback TCP, all sharing one storage
directory, and writes ``<data-dir>/cluster.json``::

    {"s3_endpoint": "http://127.0.0.1:9000", "access_key": ..., "secret_key": ...,
     "region": "us-east-1", "data_dir": ..., "storage": ...,
     "members": [{"role": "coordinator"|"server"|"director", "id": ..., "address": ...,
                  "pid": ..., "log": ...}, ...]}

Shared storage is ``<data-dir>/storage`` (a directory) unless ``storage`` names another:
a ``rados://`` or ``s3://`` URL (cohort.storage.open_store), given to every server and
director as ``--storage`` and written to cluster.json.  ``ceph=True`` first starts a small
real Ceph (cohort.ceph_server.CephCluster, as ``coordinator="etcd"`` starts etcd) and puts
the cluster on its RADOS pool, or with ``storage="s3"`` on its radosgw.  That Ceph lives in
a temporary directory and goes when the cluster stops (``stop(keep_ceph=True)`` keeps it
running, and ``LocalCluster(..., ceph=that_ceph)`` starts a cluster on it again).

Each child prints ``READY host:port`` once it listens; the launcher waits for that line.
Logs go to ``<data-dir>/logs/<id>.log`` as JSON lines.  Credentials are created on first
start in ``<data-dir>/credentials.json`` (mode 0600) and reused afterwards, and so is the
cluster key every member proves itself with (``<data-dir>/cluster.key``, named in
cluster.json as ``cluster_key``).  Everything under the data directory is private to its
owner: directories 0700, files 0600 (the launcher and its children run with umask 077).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cohort.auth import ClusterKey, Credential
from cohort.chaos.proxy_thread import ProxyLoop, ThreadedFaultProxy
from cohort.tenants import load_or_create_master_key


@dataclass
class Proc:
    role: str
    id: str
    args: list[str]
    popen: subprocess.Popen[bytes] | None = None
    address: str = ""
    log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def _read_ready(p: subprocess.Popen[bytes], what: str, timeout: float) -> str:
    assert p.stdout is not None
    out: IO[bytes] = p.stdout
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([out], [], [], 0.1)
        if r:
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.split(b"\n"):
                if line.startswith(b"READY "):
                    return line[6:].decode().strip()
        if p.poll() is not None:
            break
    raise RuntimeError(f"{what} did not start (exit code {p.poll()}); output: {buf[-2000:]!r}")


def _private_dir(path: Path) -> None:
    """Make ``path`` (and missing parents) a directory only its owner can enter."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _private_append(path: Path) -> IO[bytes]:
    """``path`` opened for appending, created 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab")


CEPH_S3_BUCKET = "cohort"  # on the radosgw of a Ceph started by LocalCluster(ceph=True)
CEPH_S3_PREFIX = "data"


def _is_url(spec: str) -> bool:
    head, sep, _ = spec.partition("://")
    return bool(sep) and head.isalnum()


def _create_rgw_bucket(endpoint: str, creds: dict[str, str], bucket: str) -> None:
    """Create ``bucket`` on radosgw (already there and ours: fine)."""
    import urllib.error
    import urllib.request

    from cohort.s3.sigv4 import sign_request

    url = f"{endpoint}/{bucket}"
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256(b"")
    headers = sign_request(
        "PUT", url, {}, empty, creds["access_key"], creds["secret_key"], "us-east-1"
    )
    req = urllib.request.Request(url, data=b"", method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30):
            pass
    except urllib.error.HTTPError as e:
        if e.code != 409:  # BucketAlreadyOwnedByYou / BucketAlreadyExists
            raise RuntimeError(f"cannot create bucket {bucket} on radosgw: {e}") from e


def load_credentials(data_dir: Path) -> dict[str, str]:
    path = data_dir / "credentials.json"
    if path.exists():
        creds: dict[str, str] = json.loads(path.read_text())
        return creds
    creds = {
        "access_key": os.environ.get("COHORT_ACCESS_KEY") or "CH" + secrets.token_hex(9).upper(),
        "secret_key": os.environ.get("COHORT_SECRET_KEY") or secrets.token_urlsafe(30),
        "region": "us-east-1",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds


class LocalCluster:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int = 9000,
        servers: int = 3,
        directors: int = 1,
        partitions: int = 256,
        lease_ttl: float = 2.5,
        host: str = "127.0.0.1",
        coordinator_port: int = 0,
        extra_env: dict[str, str] | None = None,
        coordinator: str = "embedded",
        etcd_members: int = 1,
        standby: int = 0,
        failback: str = "immediate",
        server_args: list[str] | None = None,
        director_args: list[str] | None = None,
        coordinator_args: list[str] | None = None,
        proxies: bool = False,
        storage: str | None = None,
        ceph: Any = False,
        ceph_options: dict[str, Any] | None = None,
    ) -> None:
        # storage: None (the directory <data-dir>/storage), a directory, or a rados:// or
        # s3:// URL; with ceph, None or "rados" (its pool) or "s3" (its radosgw).
        # ceph: False, True (start a CephCluster with ceph_options, stop it with the
        # cluster), or a running CephCluster to use (never stopped here).
        if ceph:
            if storage not in (None, "rados", "s3"):
                raise ValueError('with ceph, storage is None or "rados" (its pool) or "s3"')
        elif storage in ("rados", "s3"):
            raise ValueError(
                f"storage={storage!r} needs ceph=True (a Ceph started here), or a whole URL"
            )
        self.storage_arg = storage
        self.use_ceph = bool(ceph)
        self.ceph: Any = None if isinstance(ceph, bool) else ceph
        self.own_ceph = isinstance(ceph, bool)
        self.ceph_options = dict(ceph_options or {})
        if storage == "s3":
            self.ceph_options["rgw"] = True
        # proxies=True: a FaultProxy (cohort.chaos) in front of every server and of the
        # embedded coordinator; servers advertise their proxy, and every member dials the
        # coordinator's, so director->server, server->server (DLM) and member->coordinator
        # traffic crosses them.  ``self.proxies`` maps member id -> proxy.
        self.use_proxies = proxies
        self.proxies: dict[str, ThreadedFaultProxy] = {}
        self._ploop: ProxyLoop | None = None
        # extra flags for the embedded coordinator (e.g. ``--load-cooldown 5``)
        self.coordinator_args = list(coordinator_args or [])
        # extra command-line flags for every server / director (e.g. ``--domain``)
        self.server_args = list(server_args or [])
        self.director_args = list(director_args or [])
        self.n_standby = standby
        self.failback = failback
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.n_servers = servers
        self.n_directors = directors
        self.partitions = partitions
        self.lease_ttl = lease_ttl
        self.host = host
        self.coordinator_port = coordinator_port
        self.coordinator = coordinator  # "embedded" | "etcd" (real etcd-server processes)
        self.etcd_members = etcd_members
        self.etcd: Any = None  # cohort.etcd_server.EtcdCluster when coordinator == "etcd"
        self.procs: dict[str, Proc] = {}
        self.env = {**os.environ, **(extra_env or {})}
        self.python = sys.executable

    # -- paths --------------------------------------------------------------------------
    @property
    def storage(self) -> Path:
        return self.data_dir / "storage"

    @property
    def storage_spec(self) -> str:
        """What servers and directors get as ``--storage`` (and cluster.json says)."""
        if self.use_ceph:
            if self.ceph is None:
                raise RuntimeError("the cluster's Ceph is not started yet")
            if self.storage_arg == "s3":
                creds = self.data_dir / "ceph-s3.json"
                return (
                    f"s3://{CEPH_S3_BUCKET}/{CEPH_S3_PREFIX}?endpoint={self.ceph.s3_endpoint}"
                    f"&credentials={creds}"
                )
            return str(self.ceph.rados_url())
        if self.storage_arg:
            return self.storage_arg
        return str(self.storage)

    @property
    def local_storage(self) -> bool:
        return not self.use_ceph and not _is_url(self.storage_arg or "")

    @property
    def master_key_path(self) -> Path:
        return self.data_dir / "master.key"

    @property
    def cluster_key_path(self) -> Path:
        return self.data_dir / "cluster.key"

    def credential(self, name: str = "launcher") -> Credential:
        """A member credential (for tests, benches and tools driving this cluster)."""
        return ClusterKey.load(self.cluster_key_path).member(name)

    @property
    def cluster_json(self) -> Path:
        return self.data_dir / "cluster.json"

    @property
    def coordinator_address(self) -> str:
        if self.etcd is not None:
            return str(
                self.etcd.address(
                    "cohort",
                    partitions=self.partitions,
                    lease_ttl=math.ceil(self.lease_ttl),
                    **self._etcd_rule_options(),
                )
            )
        proxy = self.proxies.get("coordinator")
        if proxy is not None:
            return proxy.address
        return self.procs["coordinator"].address

    def _etcd_rule_options(self) -> dict[str, str]:
        """The embedded coordinator's rule flags as etcd address options (the etcd
        primary applies the same rules: cohort.coord.etcd.rules_from_options)."""
        opts: dict[str, str] = {}
        if self.failback != "immediate":
            opts["failback"] = self.failback
        args, schedule = list(self.coordinator_args), []
        while args:
            flag = args.pop(0)
            if flag == "--no-load-balance":
                opts["load_balance"] = "0"
            elif flag == "--capacity-schedule" and args:
                schedule.append(args.pop(0))
            elif flag.startswith("--load-") and args:
                opts["load_" + flag[len("--load-") :].replace("-", "_")] = args.pop(0)
        if schedule:
            opts["capacity_schedule"] = ",".join(schedule)
        return opts

    @property
    def coordinator_direct(self) -> str:
        """The coordinator's own address (not through its proxy), for the launcher."""
        if self.etcd is not None or "coordinator" not in self.procs:
            return self.coordinator_address
        return self.procs["coordinator"].address

    def _proxy(self, member_id: str, target: str) -> ThreadedFaultProxy:
        """Start (or return) the proxy in front of ``member_id``, forwarding to ``target``."""
        if member_id in self.proxies:
            return self.proxies[member_id]
        if self._ploop is None:
            self._ploop = ProxyLoop()
        host, _, port = target.rpartition(":")
        proxy = ThreadedFaultProxy(
            self._ploop, self.host, 0, target_host=host or self.host, target_port=int(port)
        )
        proxy.start_sync()
        self.proxies[member_id] = proxy
        return proxy

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.procs['director-1'].address}"

    # -- start/stop -----------------------------------------------------------------------
    def _spawn(self, proc: Proc, timeout: float = 30.0) -> None:
        logs = self.data_dir / "logs"
        _private_dir(logs)
        proc.log = str(logs / f"{proc.id}.log")
        stderr_path = logs / f"{proc.id}.stderr"
        stderr_start = stderr_path.stat().st_size if stderr_path.exists() else 0
        proc.popen = subprocess.Popen(
            [self.python, "-m", *proc.args, "--log-file", proc.log],
            stdout=subprocess.PIPE,
            stderr=_private_append(stderr_path),
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # Ctrl-C in a terminal reaches the launcher only
            umask=0o077,
        )
        try:
            proc.address = _read_ready(proc.popen, proc.id, timeout)
        except RuntimeError as e:
            # what the child said on the way out (a storage error, a traceback)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(2)
            with contextlib.suppress(OSError):
                said = stderr_path.read_bytes()[stderr_start:][-1500:].decode(errors="replace")
                if said.strip():
                    raise RuntimeError(f"{e}; stderr: {said.strip()}") from None
            raise

    def start(self) -> LocalCluster:
        # data, logs, SQLite and secrets are the cluster's alone: the directories are
        # 0700 here and every child runs with umask 077
        _private_dir(self.data_dir)
        if self.local_storage:
            _private_dir(Path(self.storage_spec))
        self.creds = load_credentials(self.data_dir)
        load_or_create_master_key(self.master_key_path)
        ClusterKey.create_file(self.cluster_key_path)
        if self.use_ceph:
            self._start_ceph()
        if self.coordinator == "etcd":
            from cohort.etcd_server import EtcdCluster

            self.etcd = EtcdCluster(self.etcd_members, base_dir=self.data_dir / "etcd").start()
            return self._start_members()
        coord = Proc(
            "coordinator",
            "coordinator",
            [
                "cohort.coord.embedded",
                "--data-dir",
                str(self.data_dir / "coordinator"),
                "--host",
                self.host,
                "--port",
                str(self.coordinator_port),
                "--partitions",
                str(self.partitions),
                "--lease-ttl",
                str(self.lease_ttl),
                "--failback",
                self.failback,
                "--cluster-key",
                str(self.cluster_key_path),
                *self.coordinator_args,
            ],
        )
        self.procs[coord.id] = coord
        self._spawn(coord)
        if self.use_proxies:
            self._proxy("coordinator", coord.address)
        return self._start_members()

    def _start_ceph(self) -> None:
        """Start the cluster's own Ceph (unless given one), and radosgw's bucket for s3."""
        if self.ceph is None:
            from cohort.ceph_server import CephCluster

            opts = {"osds": 1, "objectstore": "memstore", **self.ceph_options}
            timeout = float(opts.pop("timeout", 120.0))
            self.ceph = CephCluster(**opts).start(timeout=timeout)
        if self.storage_arg == "s3":
            creds = self.ceph.s3_credentials
            path = self.data_dir / "ceph-s3.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(creds, f)
            _create_rgw_bucket(self.ceph.s3_endpoint, creds, CEPH_S3_BUCKET)

    def _start_members(self) -> LocalCluster:
        for i in range(1, self.n_servers + 1):
            self.add_server(f"server-{i}", write=False)
        for i in range(1, self.n_standby + 1):
            self.add_server(f"standby-{i}", write=False, standby=True)
        for i in range(1, self.n_directors + 1):
            self._add_director(f"director-{i}", self.port if i == 1 else 0)
        self.write_cluster_json()
        return self

    def add_server(
        self,
        sid: str,
        *,
        write: bool = True,
        capacity: float = 1.0,
        standby: bool = False,
        tags: list[str] | None = None,
    ) -> Proc:
        advertise: list[str] = []
        if self.use_proxies:
            # the server's port is not known yet: dial nothing until it is (port 0 is
            # refused, which peers see as a server still starting)
            advertise = ["--advertise", self._proxy(sid, f"{self.host}:0").address]
        proc = Proc(
            "server",
            sid,
            [
                "cohort.server.service",
                "--id",
                sid,
                "--coordinator",
                self.coordinator_address,
                "--storage",
                self.storage_spec,
                "--host",
                self.host,
                "--capacity",
                str(capacity),
                "--cluster-key",
                str(self.cluster_key_path),
                "--master-key",
                str(self.master_key_path),
                "--credentials",
                str(self.data_dir / "credentials.json"),
                *(["--standby"] if standby else []),
                *(a for t in tags or [] for a in ("--tag", t)),
                *advertise,
                *self.server_args,
            ],
        )
        self.procs[sid] = proc
        self._spawn(proc)
        self._retarget(proc)
        if write:
            self.write_cluster_json()
        return proc

    def _add_director(self, did: str, port: int) -> Proc:
        proc = Proc(
            "director",
            did,
            [
                "cohort.director.service",
                "--id",
                did,
                "--coordinator",
                self.coordinator_address,
                "--storage",
                self.storage_spec,
                "--credentials",
                str(self.data_dir / "credentials.json"),
                "--master-key",
                str(self.master_key_path),
                "--cluster-key",
                str(self.cluster_key_path),
                "--host",
                self.host,
                "--port",
                str(port),
                *self.director_args,
            ],
        )
        self.procs[did] = proc
        self._spawn(proc)
        return proc

    def _retarget(self, proc: Proc) -> None:
        proxy = self.proxies.get(proc.id)
        if proxy is not None and proc.role == "server":
            host, _, port = proc.address.rpartition(":")
            proxy.retarget(host, int(port))

    def view(self, timeout: float = 15.0) -> dict[str, Any]:
        """The coordinator's current cluster view (members, partition map, buckets).

        Blocking; callable from plain code and from inside an event loop (a test's
        callback), where ``asyncio.run`` cannot nest and a helper thread is used."""
        import asyncio
        import concurrent.futures

        from cohort.coord import connect

        async def get_view() -> dict[str, Any]:
            c = connect(self.coordinator_direct, self.credential())
            try:
                return await c.view()
            finally:
                await c.close()

        def fetch() -> dict[str, Any]:
            return asyncio.run(asyncio.wait_for(get_view(), timeout))

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fetch()
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(fetch).result(timeout=timeout + 1)

    def metrics_urls(self) -> dict[str, str]:
        """Each member's Prometheus endpoint, as it reported it to the coordinator (servers
        and the coordinator use a side port; directors serve ``/_cohort/metrics``)."""
        try:
            view = self.view()
        except Exception:  # best effort: cluster.json must be written regardless
            return {}
        out = {
            m["id"]: f"http://{m['meta']['metrics']}/metrics"
            for m in view["members"]
            if (m.get("meta") or {}).get("metrics")
        }
        for p in self.procs.values():
            if p.role == "director":
                out[p.id] = f"http://{p.address}/_cohort/metrics"
        coord = (view.get("coordinator") or {}).get("metrics")
        if coord:
            out["coordinator"] = f"http://{coord}/metrics"
        return out

    def write_cluster_json(self) -> None:
        metrics = self.metrics_urls()
        doc = {
            "s3_endpoint": self.s3_endpoint,
            "access_key": self.creds["access_key"],
            "secret_key": self.creds["secret_key"],
            "region": self.creds.get("region", "us-east-1"),
            "data_dir": str(self.data_dir),
            "storage": self.storage_spec,
            "coordinator": self.coordinator_address,
            "cluster_key": str(self.cluster_key_path),
            "partitions": self.partitions,
            "members": [
                {
                    "role": p.role,
                    "id": p.id,
                    "address": p.address,
                    "pid": p.pid,
                    "log": p.log,
                    "metrics": metrics.get(p.id, ""),
                }
                for p in self.procs.values()
            ]
            + [
                # etcd members too, so the chaos harness can kill and pause them
                {
                    "role": "etcd",
                    "id": m.name,
                    "address": m.endpoint,
                    "pid": m.popen.pid if m.popen is not None else 0,
                    "log": str(m.log_path or ""),
                    "metrics": "",
                }
                for m in (self.etcd.members if self.etcd is not None else [])
            ],
        }
        if self.ceph is not None:
            doc["ceph"] = {
                "rados_url": self.ceph.rados_url(),
                "conf": str(self.ceph.conf_path),
                "s3_endpoint": self.ceph.s3_endpoint if self.ceph.rgw_port else "",
                "osds": sorted(self.ceph.osds),
            }
        tmp = self.cluster_json.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, self.cluster_json)

    def stop(self, timeout: float = 15.0, *, keep_ceph: bool = False) -> None:
        """SIGTERM directors, then servers, then the coordinator; SIGKILL stragglers; then
        the Ceph this cluster started (unless ``keep_ceph``)."""
        order = [p for p in self.procs.values() if p.role == "director"]
        order += [p for p in self.procs.values() if p.role == "server"]
        order += [p for p in self.procs.values() if p.role == "coordinator"]
        for group in (
            [p for p in order if p.role == "director"],
            [p for p in order if p.role == "server"],
            [p for p in order if p.role == "coordinator"],
        ):
            for p in group:
                if p.alive():
                    with contextlib.suppress(ProcessLookupError):
                        assert p.popen is not None
                        os.kill(p.popen.pid, signal.SIGCONT)
                        p.popen.terminate()
            for p in group:
                if p.popen is None:
                    continue
                try:
                    p.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
                if p.popen.stdout:
                    p.popen.stdout.close()
        if self.etcd is not None:
            self.etcd.stop()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.close_sync()
        self.proxies.clear()
        if self._ploop is not None:
            self._ploop.stop()
            self._ploop = None
        if self.ceph is not None and self.own_ceph and not keep_ceph:
            self.ceph.stop()
            self.ceph = None

    # -- fault injection helpers (tests, chaos) ------------------------------------------
    def signal(self, member_id: str, sig: int) -> None:
        p = self.procs[member_id]
        assert p.popen is not None
        os.kill(p.popen.pid, sig)

    def kill(self, member_id: str) -> None:
        p = self.procs[member_id]
        assert p.popen is not None
        p.popen.kill()
        p.popen.wait()

    def restart(self, member_id: str) -> Proc:
        if member_id not in self.procs and self.etcd is not None:
            return self._restart_etcd_member(member_id)
        p = self.procs[member_id]
        if p.alive():
            self.kill(member_id)
        if p.popen is not None and p.popen.stdout:
            p.popen.stdout.close()
        if p.role in ("coordinator", "director"):
            # come back on the same port, so clients and members find it again
            idx = p.args.index("--port")
            p.args[idx + 1] = p.address.rpartition(":")[2]
        if p.role == "server":
            # keep the same coordinator address
            idx = p.args.index("--coordinator")
            p.args[idx + 1] = self.coordinator_address
        self._spawn(p)
        self._retarget(p)
        self.write_cluster_json()
        return p

    def _restart_etcd_member(self, name: str) -> Proc:
        """Kill (if running) and start etcd member ``name`` again on its data directory
        and ports; it catches up from its peers."""
        assert self.etcd is not None
        for i, m in enumerate(self.etcd.members):
            if m.name == name:
                self.etcd.kill_member(i)
                self.etcd.start_member(i)
                self.write_cluster_json()
                return Proc(
                    "etcd", name, [], popen=m.popen, address=m.endpoint, log=str(m.log_path)
                )
        raise KeyError(name)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
