"""Start real etcd servers (Debian's ``etcd-server``, ``/usr/bin/etcd``) for tests and local clusters.

:class:`EtcdCluster` runs one or more members.  By default every member binds 127.0.0.1 on
free ephemeral ports and keeps its data in a fresh temporary directory; for multi-host
tests a member can bind any address and run under a command prefix (for example
``["ip", "netns", "exec", "host-e1"]``).  Readiness is polled with a deadline (a
linearizable read through the JSON gateway must succeed), never slept for.

etcd's lease TTLs are whole seconds and at least ``1.5 * election timeout``; with the
defaults used here (heartbeat 100 ms, election 1000 ms) the shortest lease is 2 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ETCD_BINARY = os.environ.get("COHORT_ETCD_BINARY", "/usr/bin/etcd")


def etcd_available() -> bool:
    return Path(ETCD_BINARY).exists() or shutil.which("etcd") is not None


def _binary() -> str:
    if Path(ETCD_BINARY).exists():
        return ETCD_BINARY
    found = shutil.which("etcd")
    if found is None:
        raise RuntimeError(
            "etcd is not installed: `apt-get install etcd-server` (Debian) or set COHORT_ETCD_BINARY"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    prefix: list[str] = field(default_factory=list)  # e.g. ["ip", "netns", "exec", "ns"]
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class EtcdCluster:
    """One or more etcd members; ``start()`` waits until the cluster serves linearizable reads."""

    def __init__(
        self,
        members: int = 1,
        *,
        hosts: list[str] | None = None,
        prefixes: list[list[str]] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        token: str | None = None,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="cohort-etcd-"))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.token = token or f"cohort-{os.getpid()}-{int(time.time() * 1000)}"
        hosts = hosts or ["127.0.0.1"] * members
        prefixes = prefixes or [[] for _ in hosts]
        # A data directory used before keeps its ports (etcd remembers its peer URLs).
        ports_file = self.base_dir / "ports.json"
        saved: list[list[int]] = []
        if ports_file.exists():
            saved = json.loads(ports_file.read_text())
            self.token = json.loads((self.base_dir / "token").read_text())
        self.members: list[EtcdMember] = []
        for i, (host, prefix) in enumerate(zip(hosts, prefixes, strict=True)):
            cp, pp = saved[i] if i < len(saved) else (0, 0)
            self.members.append(
                EtcdMember(
                    name=f"etcd-{i + 1}",
                    host=host,
                    client_port=client_port or cp or free_port(host),
                    peer_port=peer_port or pp or free_port(host),
                    data_dir=self.base_dir / f"etcd-{i + 1}",
                    prefix=list(prefix),
                )
            )
        if not self._own_dir:
            ports_file.write_text(json.dumps([[m.client_port, m.peer_port] for m in self.members]))
            (self.base_dir / "token").write_text(json.dumps(self.token))

    # -- addresses ------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def address(self, namespace: str = "default", **options: object) -> str:
        """The coordinator address for :func:`cohort.coord.connect` (``etcd://h:p,.../ns``)."""
        q = "&".join(f"{k}={v}" for k, v in options.items())
        return f"etcd://{','.join(self.endpoints)}/{namespace}" + (f"?{q}" if q else "")

    # -- processes ------------------------------------------------------------------------
    def _args(self, m: EtcdMember, state: str) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            *m.prefix,
            _binary(),
            "--name",
            m.name,
            "--data-dir",
            str(m.data_dir),
            "--listen-client-urls",
            m.client_url,
            "--advertise-client-urls",
            m.client_url,
            "--listen-peer-urls",
            m.peer_url,
            "--initial-advertise-peer-urls",
            m.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            self.token,
            "--heartbeat-interval",
            str(self.heartbeat_ms),
            "--election-timeout",
            str(self.election_ms),
            "--log-level",
            "warn",
            "--logger",
            "zap",
        ]

    def start_member(self, i: int) -> None:
        m = self.members[i]
        state = "existing" if (m.data_dir / "member").exists() else "new"
        m.log_path = self.base_dir / f"{m.name}.log"
        m.popen = subprocess.Popen(
            self._args(m, state),
            stdin=subprocess.DEVNULL,
            stdout=open(m.log_path, "ab"),  # noqa: SIM115 - owned by the child
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        try:
            for i in range(len(self.members)):
                self.start_member(i)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0, members: list[int] | None = None) -> None:
        """Poll until each listed member answers a linearizable read (quorum reachable)."""
        deadline = time.monotonic() + timeout
        for i in members if members is not None else range(len(self.members)):
            m = self.members[i]
            while True:
                if m.popen is not None and m.popen.poll() is not None:
                    raise RuntimeError(f"{m.name} exited ({m.popen.poll()}): {self.tail(i)}")
                if self.member_healthy(i):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{m.name} not ready after {timeout}s: {self.tail(i)}")
                time.sleep(0.05)

    def probe(
        self, i: int, path: str, body: dict[str, object], timeout: float = 1.0
    ) -> dict[str, object] | None:
        """POST to member ``i``'s gateway (from inside its namespace when it has a prefix)."""
        m = self.members[i]
        url = m.client_url + "/v3" + path
        data = json.dumps(body)
        if m.prefix:
            code = (
                "import sys,urllib.request as u;"
                "r=u.urlopen(u.Request(sys.argv[1],data=sys.argv[2].encode(),method='POST'),"
                "timeout=float(sys.argv[3]));sys.stdout.write(r.read().decode())"
            )
            try:
                out = subprocess.run(
                    [*m.prefix, sys.executable, "-c", code, url, data, str(timeout)],
                    capture_output=True,
                    timeout=timeout + 5,
                    check=False,
                )
                doc = json.loads(out.stdout) if out.returncode == 0 else None
            except (subprocess.TimeoutExpired, ValueError):
                return None
            return doc if isinstance(doc, dict) else None
        req = urllib.request.Request(url, data=data.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                doc = json.loads(r.read())
                return doc if isinstance(doc, dict) else None
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def member_healthy(self, i: int, timeout: float = 1.0) -> bool:
        """A linearizable read through member ``i`` succeeds (it is part of a quorum)."""
        doc = self.probe(i, "/kv/range", {"key": "aGVhbHRo"}, timeout)
        return doc is not None and "header" in doc

    def leader_index(self) -> int | None:
        """Index of the current leader, asking each member in turn."""
        for i in range(len(self.members)):
            doc = self.probe(i, "/maintenance/status", {})
            if doc is None:
                continue
            header = doc.get("header")
            if isinstance(header, dict) and header.get("member_id") == doc.get("leader"):
                return i
        return None

    def tail(self, i: int, n: int = 3000) -> str:
        p = self.members[i].log_path
        if p is None or not p.exists():
            return ""
        return p.read_bytes()[-n:].decode(errors="replace")

    def kill_member(self, i: int) -> None:
        m = self.members[i]
        if m.popen is not None and m.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.popen.pid, signal.SIGKILL)
            m.popen.wait()

    def stop_member(self, i: int, timeout: float = 10.0) -> None:
        m = self.members[i]
        if m.popen is None:
            return
        if m.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(m.popen.pid, signal.SIGTERM)
            try:
                m.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_member(i)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop every member and start them again on the same ports and data."""
        for i in range(len(self.members)):
            self.stop_member(i)
        for i in range(len(self.members)):
            self.start_member(i)
        self.wait_ready(timeout)

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.stop_member(i)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m cohort.etcd_server [--members N]``: run a local etcd until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(prog="cohort-etcd")
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    c = EtcdCluster(args.members, base_dir=args.data_dir).start()
    print(f"READY {c.address()}", flush=True)
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        signal.sigwait(sigs)
    finally:
        c.stop()


if __name__ == "__main__":
    main()
