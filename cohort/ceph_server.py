"""Start a small real Ceph (Debian's ``ceph-mon``, ``ceph-osd``, ``radosgw``) for tests,
benchmarks and local clusters.

:class:`CephCluster` runs one monitor, ``osds`` OSDs and optionally one radosgw, with no
manager (RADOS and S3 work without one; it would add ~300 MiB and seconds of CPU), all
bound to 127.0.0.1 on free ephemeral ports, with their data, sockets, logs and keys in one
private directory (a fresh temporary one by default, removed by :meth:`CephCluster.stop`).
Readiness is polled with a deadline, never slept for: the monitor must answer a command,
every OSD must be ``up`` and ``in``, a probe object must be written to and read back from
each pool, and radosgw must answer an S3 request.

The settings that make a one-machine Ceph boot in seconds (measured, see
``../shared/FACTS.md``):

* ``paxos propose interval = 0.05``: radosgw took 9 s to start with the default 1 s;
* 8 placement groups per pool and ``mon max pg per osd = 1000``: few OSDs;
* ``mon allow pool size one``: pools of size 1 must be allowed explicitly;
* ``osd crush chooseleaf type = 0``: replicas are placed per OSD, not per host;
* ``tcp_nodelay=1`` on radosgw's beast frontend: first GETs took ~48 ms without;
* ``objectstore``: ``memstore`` (fast, *not durable*: only where durability is not being
  measured) or ``bluestore`` on a sparse file per OSD (durable).

Authentication is cephx: the client key (``client.admin``) is in ``<base>/keyring``, and
:meth:`CephCluster.rados_url` names the conf file and keyring for
:class:`cohort.storage.rados.RadosStore`.  radosgw gets a user with a random access key
and secret (:attr:`CephCluster.s3_credentials`).

``python -m cohort.ceph_server [--osds N] [--rgw] [--bluestore]`` runs one until Ctrl-C and
prints ``READY <rados url>`` (and ``S3 <endpoint> <access> <secret>``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from cohort.daemons import free_port, stop_group, wait_for_termination

CEPH_MON = os.environ.get("COHORT_CEPH_MON", "/usr/bin/ceph-mon")
CEPH_OSD = os.environ.get("COHORT_CEPH_OSD", "/usr/bin/ceph-osd")
RADOSGW = os.environ.get("COHORT_RADOSGW", "/usr/bin/radosgw")
RADOSGW_ADMIN = os.environ.get("COHORT_RADOSGW_ADMIN", "/usr/bin/radosgw-admin")
CEPH_AUTHTOOL = os.environ.get("COHORT_CEPH_AUTHTOOL", "/usr/bin/ceph-authtool")
MONMAPTOOL = os.environ.get("COHORT_MONMAPTOOL", "/usr/bin/monmaptool")

PACKAGES = "ceph-mon ceph-osd radosgw ceph-common python3-rados"


def rados_module_available() -> bool:
    try:
        importlib.import_module("rados")
    except ImportError:
        return False
    return True


def missing() -> list[str]:
    """What is missing to run a Ceph here (empty when everything is installed)."""
    out = [b for b in (CEPH_MON, CEPH_OSD, CEPH_AUTHTOOL, MONMAPTOOL) if not Path(b).exists()]
    if not rados_module_available():
        out.append("python module rados (python3-rados, linked into .venv by scripts/bootstrap.sh)")
    return out


def ceph_available(rgw: bool = False) -> bool:
    if missing():
        return False
    return not rgw or (Path(RADOSGW).exists() and Path(RADOSGW_ADMIN).exists())


@dataclass
class Daemon:
    name: str  # "mon.a", "osd.0", "client.rgw.gw"
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0


class CephError(RuntimeError):
    pass


class CephCluster:
    """One monitor, N OSDs, optional radosgw; ``start()`` returns once all serve."""

    def __init__(
        self,
        osds: int = 1,
        *,
        base_dir: str | os.PathLike[str] | None = None,
        objectstore: str = "memstore",
        pool: str = "cohort",
        pool_size: int | None = None,
        pg_num: int = 8,
        rgw: bool = False,
        osd_block_bytes: int = 8 << 30,
        memstore_bytes: int = 2 << 30,
        extra_conf: dict[str, str] | None = None,
    ) -> None:
        if objectstore not in ("memstore", "bluestore"):
            raise ValueError("objectstore must be 'memstore' or 'bluestore'")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="cohort-ceph-")).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o700)
        self.n_osds = osds
        self.objectstore = objectstore
        self.pool = pool
        self.pool_size = pool_size if pool_size is not None else min(3, osds)
        self.pg_num = pg_num
        self.want_rgw = rgw
        self.osd_block_bytes = osd_block_bytes
        self.memstore_bytes = memstore_bytes
        self.extra_conf = dict(extra_conf or {})
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_port()
        self.rgw_port = free_port() if rgw else 0
        self.mon: Daemon | None = None
        self.osds: dict[int, Daemon] = {}
        self.rgw: Daemon | None = None
        self.s3_credentials: dict[str, str] = {}
        self._rados: Any = None
        self.boot_seconds = 0.0

    # -- paths and addresses ---------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.base_dir / "ceph.conf"

    @property
    def keyring_path(self) -> Path:
        return self.base_dir / "keyring"

    @property
    def mon_addr(self) -> str:
        return f"127.0.0.1:{self.mon_port}"

    @property
    def s3_endpoint(self) -> str:
        if not self.rgw_port:
            raise CephError("this Ceph runs without radosgw")
        return f"http://127.0.0.1:{self.rgw_port}"

    def rados_url(self, pool: str | None = None, namespace: str = "", **options: str) -> str:
        """``rados://<pool>/<namespace>?conf=...&keyring=...&id=admin`` for RadosStore."""
        opts = {"conf": str(self.conf_path), "keyring": str(self.keyring_path), "id": "admin"}
        opts.update(options)
        path = quote(pool or self.pool) + ("/" + quote(namespace) if namespace else "")
        return f"rados://{path}?{urlencode(opts, safe='/')}"

    # -- configuration ---------------------------------------------------------------------
    def _write_conf(self) -> None:
        b = self.base_dir
        conf = {
            "fsid": self.fsid,
            "mon host": f"v2:{self.mon_addr}",
            "public addr": "127.0.0.1",
            "ms bind ipv6": "false",
            "ms bind msgr1": "false",
            "auth cluster required": "cephx",
            "auth service required": "cephx",
            "auth client required": "cephx",
            "auth allow insecure global id reclaim": "false",
            "keyring": str(self.keyring_path),
            "run dir": str(b / "run"),
            "admin socket": str(b / "run" / "$name.asok"),
            "log file": str(b / "log" / "$name.log"),
            "pid file": str(b / "run" / "$name.pid"),
            "log to stderr": "false",
            "err to stderr": "true",
            "mon cluster log file": str(b / "log" / "cluster.log"),
            # one machine: small, fast, permissive
            "paxos propose interval": "0.05",
            "mon allow pool size one": "true",
            "mon allow pool delete": "true",
            "mon warn on pool no redundancy": "false",
            "mon max pg per osd": "1000",
            "osd pool default size": str(self.pool_size),
            "osd pool default min size": "1",
            "osd pool default pg num": str(self.pg_num),
            "osd pool default pgp num": str(self.pg_num),
            "osd pool default pg autoscale mode": "off",
            "osd crush chooseleaf type": "0",
            "mon osd down out interval": "0",  # never re-replicate by itself in tests
            "mon data avail warn": "2",
            "mon data avail crit": "1",
            "osd objectstore": self.objectstore,
            "osd data": str(b / "osd.$id"),
            "mon data": str(b / "mon.$id"),
            "osd heartbeat grace": "6",
            # one host: every peer counts as one reporter, so one report must do
            "mon osd min down reporters": "1",
            "osd heartbeat interval": "1",
            "osd op num shards": "2",
            "osd op num threads per shard": "1",
            "memstore device bytes": str(self.memstore_bytes),
            "bluestore block create": "true",
            "bluestore block size": str(self.osd_block_bytes),
            "bluestore fsck on mkfs": "false",
            "bluestore cache autotune": "false",
            "bluestore cache size": str(128 << 20),
            "osd memory target": str(1 << 30),
            "rgw thread pool size": "64",
            "rgw enable usage log": "false",
            "rgw dns name": "127.0.0.1",
            **self.extra_conf,
        }
        lines = ["[global]", *(f"{k} = {v}" for k, v in conf.items()), ""]
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))

    def _run(self, args: list[str], timeout: float = 60.0) -> str:
        p = subprocess.run(
            args, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
        if p.returncode != 0:
            raise CephError(f"{' '.join(args)} failed ({p.returncode}): {p.stderr[-2000:]!r}")
        return p.stdout.decode()

    def _spawn(self, name: str, args: list[str]) -> Daemon:
        log_path = self.base_dir / "log" / f"{name}.stderr"
        d = Daemon(name, args, log_path)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            d.popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
            )
        finally:
            os.close(fd)
        return d

    # -- monitor commands ------------------------------------------------------------------
    def client(self) -> Any:
        """A connected ``rados.Rados`` as client.admin (kept; closed by stop())."""
        if self._rados is None:
            rados: Any = importlib.import_module("rados")
            r = rados.Rados(
                conffile=str(self.conf_path),
                rados_id="admin",
                conf={"keyring": str(self.keyring_path), "log file": "", "err to stderr": "false"},
            )
            r.conf_set("client mount timeout", "10")
            r.conf_set("rados osd op timeout", "10")
            r.conf_set("rados mon op timeout", "10")
            r.connect(timeout=10)
            self._rados = r
        return self._rados

    def command(self, prefix: str, **args: Any) -> Any:
        """A monitor command (like the ``ceph`` CLI, without its ~0.3 s start)."""
        cmd = {"prefix": prefix, "format": "json", **args}
        ret, out, err = self.client().mon_command(json.dumps(cmd), b"", timeout=30)
        if ret != 0:
            raise CephError(f"ceph {prefix} {args}: {ret} {err}")
        if not out:
            return None
        try:
            return json.loads(out)
        except ValueError:
            return out.decode(errors="replace")

    # -- start -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> CephCluster:
        gone = missing()
        if gone:
            raise CephError(
                f"Ceph is not installed ({', '.join(gone)}): apt-get install {PACKAGES}"
            )
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            for sub in ("run", "log"):
                (self.base_dir / sub).mkdir(mode=0o700, exist_ok=True)
            self._write_conf()
            self._start_mon(deadline)
            for _ in range(self.n_osds):
                self.add_osd(wait=False)
            self.wait_osds_up(deadline)
            self.create_pool(self.pool, self.pool_size, deadline=deadline)
            if self.want_rgw:
                self._start_rgw(deadline)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def _start_mon(self, deadline: float) -> None:
        kr = str(self.keyring_path)
        self._run([CEPH_AUTHTOOL, "--create-keyring", kr, "--gen-key", "-n", "mon.",
                   "--cap", "mon", "allow *"])  # fmt: skip
        self._run([CEPH_AUTHTOOL, kr, "--gen-key", "-n", "client.admin",
                   "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                   "--cap", "mgr", "allow *", "--cap", "mds", "allow *"])  # fmt: skip
        os.chmod(kr, 0o600)
        monmap = str(self.base_dir / "monmap")
        self._run([MONMAPTOOL, "--create", "--fsid", self.fsid,
                   "--addv", "a", f"[v2:{self.mon_addr}]", monmap])  # fmt: skip
        self._run([CEPH_MON, "-c", str(self.conf_path), "--mkfs", "-i", "a",
                   "--monmap", monmap, "--keyring", kr])  # fmt: skip
        self.mon = self._spawn("mon.a", [CEPH_MON, "-f", "-c", str(self.conf_path), "-i", "a"])
        while True:
            self._check_alive(self.mon)
            try:
                self.command("mon stat")
                return
            except Exception as e:
                self._close_client()
                if time.monotonic() > deadline:
                    raise CephError(f"monitor not ready: {e}: {self.tail('mon.a')}") from e
                time.sleep(0.05)

    def add_osd(self, *, wait: bool = True, timeout: float = 60.0) -> int:
        """Create and start one more OSD (online: Ceph rebalances onto it by itself)."""
        osd_uuid = str(uuid.uuid4())
        key = self._run([CEPH_AUTHTOOL, "--gen-print-key"]).strip()
        # `osd new` with the key in the input: id allocation, auth entry, crush-less
        ret, out, err = self.client().mon_command(
            json.dumps({"prefix": "osd new", "uuid": osd_uuid, "format": "json"}),
            json.dumps({"cephx_secret": key}).encode(),
            timeout=30,
        )
        if ret != 0:
            raise CephError(f"osd new: {ret} {err}")
        osd_id = int(json.loads(out)["osdid"])
        data = self.base_dir / f"osd.{osd_id}"
        data.mkdir(mode=0o700, exist_ok=True)
        (data / "keyring").write_text(f"[osd.{osd_id}]\n\tkey = {key}\n")
        os.chmod(data / "keyring", 0o600)
        conf = ["-c", str(self.conf_path), "-i", str(osd_id), "--keyring", str(data / "keyring")]
        self._run([CEPH_OSD, *conf, "--mkfs", "--osd-uuid", osd_uuid], timeout=120)
        self.osds[osd_id] = self._spawn(f"osd.{osd_id}", [CEPH_OSD, "-f", *conf])
        if wait:
            self.wait_osds_up(time.monotonic() + timeout)
        return osd_id

    def _osd_states(self) -> dict[int, tuple[bool, bool]]:
        dump = self.command("osd dump")
        return {int(o["osd"]): (bool(o["up"]), bool(o["in"])) for o in dump["osds"]}

    def wait_osds_up(self, deadline: float, ids: list[int] | None = None) -> None:
        want = list(self.osds) if ids is None else ids
        while True:
            for i in want:
                self._check_alive(self.osds[i])
            states = self._osd_states()
            if all(states.get(i) == (True, True) for i in want):
                return
            if time.monotonic() > deadline:
                raise CephError(f"OSDs not up: {states}: {self.tail(f'osd.{want[0]}')}")
            time.sleep(0.1)

    def create_pool(
        self, name: str, size: int | None = None, *, pg_num: int | None = None,
        deadline: float | None = None,
    ) -> None:  # fmt: skip
        """A replicated pool of ``size`` copies (1 allowed), ready for writes on return."""
        pg = pg_num or self.pg_num
        self.command("osd pool create", pool=name, pg_num=pg, pgp_num=pg)
        size = size or self.pool_size
        self.command(
            "osd pool set", pool=name, var="size", val=str(size), yes_i_really_mean_it=True
        )
        self.command("osd pool set", pool=name, var="min_size", val=str(max(1, size - 1)))
        self.command("osd pool application enable", pool=name, app="cohort")
        self.wait_pool_writable(name, deadline or time.monotonic() + 60)

    def wait_pool_writable(self, name: str, deadline: float) -> None:
        """Poll until every PG of the pool is active: one probe object per PG hash range
        is not addressable from here, so write a few objects and read them back."""
        r = self.client()
        while True:
            try:
                with r.open_ioctx(name) as io:
                    for i in range(max(8, self.pg_num)):
                        io.write_full(f"~probe.{i}", b"x")
                        io.remove_object(f"~probe.{i}")
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    raise CephError(f"pool {name} not writable: {e}") from e
                time.sleep(0.1)

    def _start_rgw(self, deadline: float) -> None:
        name = "client.rgw.gw"
        kr = self.base_dir / "rgw.keyring"
        self.command("auth get-or-create", entity=name, caps=["mon", "allow *", "osd", "allow *"])
        self._export_key(name, kr)
        rgw_data = self.base_dir / "rgw"
        rgw_data.mkdir(mode=0o700, exist_ok=True)
        args = [
            RADOSGW, "-f", "-c", str(self.conf_path), "-n", name, "--keyring", str(kr),
            "--rgw-data", str(rgw_data),
            "--rgw-frontends", f"beast endpoint=127.0.0.1:{self.rgw_port} tcp_nodelay=1",
        ]  # fmt: skip
        self.rgw = self._spawn("rgw.gw", args)
        access = "CEPH" + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        while True:
            self._check_alive(self.rgw)
            if self._rgw_answers():
                break
            if time.monotonic() > deadline:
                raise CephError(f"radosgw not answering: {self.tail('rgw.gw')}")
            time.sleep(0.05)
        self._run([RADOSGW_ADMIN, "-c", str(self.conf_path), "-n", "client.admin",
                   "user", "create", "--uid", "cohort", "--display-name", "cohort",
                   "--access-key", access, "--secret-key", secret], timeout=60)  # fmt: skip
        self.s3_credentials = {"access_key": access, "secret_key": secret, "region": "us-east-1"}

    def _export_key(self, name: str, path: Path) -> None:
        out = self.command("auth get", entity=name)
        entry = out[0] if isinstance(out, list) else out
        path.write_text(f"[{name}]\n\tkey = {entry['key']}\n")
        os.chmod(path, 0o600)

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.s3_endpoint + "/", timeout=1) as resp:
                return int(resp.status) < 500
        except urllib.error.HTTPError as e:
            return e.code < 500
        except (OSError, urllib.error.URLError):
            return False

    # -- watching and stopping -------------------------------------------------------------
    def _check_alive(self, d: Daemon) -> None:
        if d.popen is not None and d.popen.poll() is not None:
            raise CephError(f"{d.name} exited ({d.popen.poll()}): {self.tail(d.name)}")

    def tail(self, name: str, n: int = 3000) -> str:
        out = ""
        for suffix in ("log", "stderr"):
            p = self.base_dir / "log" / f"{name}.{suffix}"
            if p.exists():
                out += p.read_bytes()[-n:].decode(errors="replace")
        return out

    def kill_osd(self, osd_id: int, sig: int = signal.SIGKILL) -> None:
        d = self.osds[osd_id]
        if d.alive():
            assert d.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(d.popen.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                d.popen.wait()

    def restart_osd(self, osd_id: int, timeout: float = 60.0) -> None:
        d = self.osds[osd_id]
        if d.alive():
            self.kill_osd(osd_id, signal.SIGTERM)
        self.osds[osd_id] = self._spawn(d.name, d.args)
        self.wait_osds_up(time.monotonic() + timeout, [osd_id])

    def _close_client(self) -> None:
        if self._rados is not None:
            with contextlib.suppress(Exception):
                self._rados.shutdown()
            self._rados = None

    @staticmethod
    def _stop_daemon(d: Daemon | None, timeout: float = 10.0) -> None:
        if d is not None:
            stop_group(d.popen, timeout)

    def stop(self) -> None:
        """Stop radosgw, the OSDs, then the monitor (last); remove a temporary directory."""
        self._close_client()
        self._stop_daemon(self.rgw)
        for d in self.osds.values():
            if d.alive():
                assert d.popen is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.popen.pid, signal.SIGTERM)
        for d in self.osds.values():
            self._stop_daemon(d)
        self._stop_daemon(self.mon)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m cohort.ceph_server``: run a local Ceph until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(prog="cohort-ceph")
    ap.add_argument("--osds", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--bluestore", action="store_true", help="durable OSDs (default memstore)")
    ap.add_argument("--rgw", action="store_true", help="also start radosgw (S3)")
    args = ap.parse_args(argv)
    c = CephCluster(
        args.osds,
        base_dir=args.data_dir,
        objectstore="bluestore" if args.bluestore else "memstore",
        pool_size=args.pool_size,
        rgw=args.rgw,
    ).start()
    print(f"READY {c.rados_url()}", flush=True)
    if args.rgw:
        cr = c.s3_credentials
        print(f"S3 {c.s3_endpoint} {cr['access_key']} {cr['secret_key']}", flush=True)
    print(f"booted in {c.boot_seconds:.1f}s", flush=True)
    try:
        wait_for_termination()
    finally:
        c.stop()


if __name__ == "__main__":
    main()
