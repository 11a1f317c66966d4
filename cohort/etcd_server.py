"""Start real etcd servers (Debian's ``etcd-server``, ``/usr/bin/etcd``) for tests and local clusters.

:class:`EtcdCluster` runs one or more members.  By default every member binds 127.0.0.1 on
free ephemeral ports and keeps its data in a fresh temporary directory; for multi-host
tests a member can bind any address and run under a command prefix (for example
``["ip", "netns", "exec", "host-e1"]``).  Readiness is polled with a deadline (a
linearizable read through the JSON gateway must succeed), never slept for.

etcd's lease TTLs are whole seconds and at least ``1.5 * election timeout``; with the
defaults used here (heartbeat 100 ms, election 1000 ms) the shortest lease is 2 s.

**Authentication.**  By default (``tls=True``) etcd only talks TLS with client
certificates, on both its client and its peer port.  The first start makes, under
``<base_dir>/pki`` (a 0700 directory, every file 0600; later starts reuse them):

* ``ca.crt``/``ca.key``: the CA of the client port; it signs each member's server
  certificate (``etcd-N-server``, SANs: the member's host, 127.0.0.1, localhost) and the
  client certificate Cohort connects with (``client``, CN ``cohort``);
* ``peer-ca.crt``/``peer-ca.key``: a second CA, for the Raft port only; it signs each
  member's peer certificate (``etcd-N-peer``).  Being separate, a Cohort client
  certificate, which every Cohort machine holds, cannot open a peer connection.

:meth:`EtcdCluster.address` names the CA, client certificate and key in the address
(``?ca=...&cert=...&key=...``) so every :func:`cohort.coord.connect` caller connects with
TLS and the certificate.  :meth:`EtcdCluster.enable_auth` additionally turns on etcd's
user/password authentication (for tests of an etcd Cohort did not configure itself).
``tls=False`` runs plain HTTP, without any authentication, as before.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from cohort.daemons import free_port, kill_group, stop_group, wait_for_termination
from cohort.pki import CertificateAuthority, Issued, client_context, private_dir, write_private

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
    tls: bool = False
    server_cert: Issued | None = None  # client port (signed by the cluster's ca.crt)
    peer_cert: Issued | None = None  # peer port (signed by peer-ca.crt)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.peer_port}"

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
        tls: bool = True,
        auth_token_ttl: int | None = None,
    ) -> None:
        self._own_dir = base_dir is None
        self.base_dir = private_dir(base_dir or tempfile.mkdtemp(prefix="cohort-etcd-"))
        self.tls = tls
        self.auth_token_ttl = auth_token_ttl
        # user/password auth, once enable_auth() turned it on (the probes authenticate)
        self._auth: tuple[str, str] | None = None
        self._auth_token: str | None = None
        self._ssl: ssl.SSLContext | None = None
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
                    tls=tls,
                )
            )
        self.client_cert: Issued | None = None
        self.ca_file: Path | None = None
        self.peer_ca_file: Path | None = None
        used = [m.name for m in self.members if (m.data_dir / "member").exists()]
        if tls and used and not self.pki_dir.exists() and len(self.members) > 1:
            # etcd keeps its members' peer URLs in its data: members made with http://
            # peer URLs keep dialling each other in plain HTTP, which TLS peers refuse
            raise RuntimeError(
                f"{self.base_dir}: etcd members {used} were created without TLS; run them with "
                "EtcdCluster(..., tls=False), or start over with an empty data directory"
            )
        if tls:
            self._make_pki()
        if not self._own_dir:
            ports = [[m.client_port, m.peer_port] for m in self.members]
            write_private(ports_file, json.dumps(ports).encode())
            write_private(self.base_dir / "token", json.dumps(self.token).encode())

    # -- credentials ----------------------------------------------------------------------
    @property
    def pki_dir(self) -> Path:
        return self.base_dir / "pki"

    def _make_pki(self) -> None:
        """The two CAs and every certificate (kept if already there and still valid)."""
        d = private_dir(self.pki_dir)
        ca = CertificateAuthority(d, "ca", "Cohort etcd CA")
        peer_ca = CertificateAuthority(d, "peer-ca", "Cohort etcd peer CA")
        self.ca_file, self.peer_ca_file = ca.cert_path, peer_ca.cert_path
        for m in self.members:
            hosts = [m.host, "127.0.0.1", "localhost"]
            # Both usages: etcd 3.4's JSON gateway dials its own gRPC port presenting the
            # server certificate.  The CN is no etcd user name (with user auth on, etcd
            # takes a client certificate's CN as the user).
            m.server_cert = ca.issue(
                d, f"{m.name}-server", f"{m.name}.server.etcd.cohort", hosts=hosts,
                server=True, client=True,
            )  # fmt: skip
            m.peer_cert = peer_ca.issue(
                d, f"{m.name}-peer", f"{m.name}.peer.etcd.cohort", hosts=hosts,
                server=True, client=True,
            )  # fmt: skip
        # no CN: etcd 3.4's gateway refuses a client certificate with a CN once user auth
        # is on (it would not be used as the user, and etcd says so rather than ignore it)
        self.client_cert = ca.issue(d, "client", None, unit="cohort", client=True)

    def issue_client(self, name: str, directory: str | os.PathLike[str] | None = None) -> Issued:
        """Another client certificate (``<directory>/<name>.crt``/``.key``, by default in
        the PKI directory), e.g. one per machine; ``OU=name`` and no CN, like Cohort's own."""
        if not self.tls:
            raise RuntimeError("this etcd runs without TLS")
        ca = CertificateAuthority(self.pki_dir, "ca", "Cohort etcd CA")
        return ca.issue(directory or self.pki_dir, name, None, unit=name, client=True)

    def tls_options(self) -> dict[str, str]:
        """``{"ca", "cert", "key"}`` file paths for an address (empty without TLS)."""
        if self.client_cert is None or self.ca_file is None:
            return {}
        return {
            "ca": str(self.ca_file),
            "cert": str(self.client_cert.cert),
            "key": str(self.client_cert.key),
        }

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (CA + Cohort's client certificate), or None without TLS."""
        if self._ssl is None and self.tls:
            o = self.tls_options()
            self._ssl = client_context(o["ca"], o["cert"], o["key"])
        return self._ssl

    # -- addresses ------------------------------------------------------------------------
    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def address(self, namespace: str = "default", **options: object) -> str:
        """The coordinator address for :func:`cohort.coord.connect`:
        ``etcd://h:p,.../ns?<options>&ca=...&cert=...&key=...`` (the TLS files when TLS is on)."""
        opts = {k: str(v) for k, v in options.items()}
        for k, v in self.tls_options().items():
            opts.setdefault(k, v)
        q = urlencode(opts, safe="/")
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
            *self._tls_args(m),
        ]

    def _tls_args(self, m: EtcdMember) -> list[str]:
        out: list[str] = []
        if self.auth_token_ttl is not None:
            out += ["--auth-token-ttl", str(self.auth_token_ttl)]
        if not self.tls:
            return out
        assert m.server_cert and m.peer_cert and self.ca_file and self.peer_ca_file
        return [
            *out,
            "--client-cert-auth",
            "--trusted-ca-file",
            str(self.ca_file),
            "--cert-file",
            str(m.server_cert.cert),
            "--key-file",
            str(m.server_cert.key),
            "--peer-client-cert-auth",
            "--peer-trusted-ca-file",
            str(self.peer_ca_file),
            "--peer-cert-file",
            str(m.peer_cert.cert),
            "--peer-key-file",
            str(m.peer_cert.key),
        ]

    def start_member(self, i: int) -> None:
        m = self.members[i]
        state = "existing" if (m.data_dir / "member").exists() else "new"
        m.log_path = self.base_dir / f"{m.name}.log"
        # etcd's data and its log are private to the cluster's user, as Cohort's are
        log_fd = os.open(m.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            m.popen = subprocess.Popen(
                self._args(m, state),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o077,
            )
        finally:
            os.close(log_fd)

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
        """POST to member ``i``'s gateway (from inside its namespace when it has a prefix),
        with TLS and the client certificate, and a token once user auth is enabled."""
        doc = self._post(i, path, body, timeout)
        if self._auth is not None and _invalid_token(doc):
            self._auth_token = None  # expired, or the member restarted: authenticate again
            doc = self._post(i, path, body, timeout)
        return doc

    def _post(
        self, i: int, path: str, body: dict[str, object], timeout: float
    ) -> dict[str, object] | None:
        headers: dict[str, str] = {}
        if self._auth is not None and path != "/auth/authenticate":
            if self._auth_token is None:
                name, password = self._auth
                got = self._post(i, "/auth/authenticate", {"name": name, "password": password},
                                 timeout)  # fmt: skip
                token = got.get("token") if got else None
                if not isinstance(token, str):
                    return got
                self._auth_token = token
            headers["Authorization"] = self._auth_token
        m = self.members[i]
        url = m.client_url + "/v3" + path
        data = json.dumps(body)
        if m.prefix:
            # the request goes on stdin: a password or token never shows in a command line
            req = {"url": url, "data": data, "timeout": timeout, "headers": headers,
                   **self.tls_options()}  # fmt: skip
            try:
                out = subprocess.run(
                    [*m.prefix, sys.executable, "-c", _PROBE_CODE],
                    input=json.dumps(req).encode(),
                    capture_output=True,
                    timeout=timeout + 5,
                    check=False,
                )
                doc = json.loads(out.stdout) if out.returncode == 0 else None
            except (subprocess.TimeoutExpired, ValueError):
                return None
            return doc if isinstance(doc, dict) else None
        r = urllib.request.Request(url, data=data.encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(r, timeout=timeout, context=self.ssl_context()) as resp:
                doc = json.loads(resp.read())
                return doc if isinstance(doc, dict) else None
        except urllib.error.HTTPError as e:
            # etcd's gateway answers errors (an invalid token, say) with 4xx/5xx and JSON
            try:
                doc = json.loads(e.read())
            except ValueError:
                return None
            return doc if isinstance(doc, dict) else None
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def enable_auth(self, user: str = "root", password: str = "", *, i: int = 0) -> None:
        """Turn on etcd's user/password auth: add ``user`` with the ``root`` role, enable.

        Afterwards every request needs a token from ``/v3/auth/authenticate`` (this
        object's own probes get one).  Raises RuntimeError if etcd refuses a step.
        """
        if not password:
            raise ValueError("enable_auth needs a password")
        steps: list[tuple[str, dict[str, object]]] = [
            ("/auth/user/add", {"name": user, "password": password}),
            ("/auth/user/grant", {"user": user, "role": "root"}),
            ("/auth/enable", {}),
        ]
        if user != "root":  # etcd requires a root user before it enables auth
            steps.insert(0, ("/auth/user/add", {"name": "root", "password": password}))
            steps.insert(1, ("/auth/user/grant", {"user": "root", "role": "root"}))
        for path, body in steps:
            doc = self._post(i, path, body, 5.0)
            if doc is None or "error" in doc:
                raise RuntimeError(f"etcd {path}: {doc}")
        self._auth = (user, password)
        self._auth_token = None

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
        kill_group(self.members[i].popen)

    def stop_member(self, i: int, timeout: float = 10.0) -> None:
        stop_group(self.members[i].popen, timeout)

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


def _invalid_token(doc: dict[str, object] | None) -> bool:
    return doc is not None and "invalid auth token" in str(doc.get("error") or doc.get("message"))


# run inside a member's network namespace: reads {url, data, timeout, headers, ca, cert, key}
_PROBE_CODE = """
import json, ssl, sys, urllib.error, urllib.request as u
q = json.load(sys.stdin)
ctx = None
if q.get("ca"):
    ctx = ssl.create_default_context(cafile=q["ca"])
    ctx.load_cert_chain(q["cert"], q["key"])
r = u.Request(q["url"], data=q["data"].encode(), method="POST", headers=q["headers"])
try:
    sys.stdout.write(u.urlopen(r, timeout=q["timeout"], context=ctx).read().decode())
except urllib.error.HTTPError as e:
    sys.stdout.write(e.read().decode())
"""


def main(argv: list[str] | None = None) -> None:
    """``python -m cohort.etcd_server [--members N]``: run a local etcd until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(prog="cohort-etcd")
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-tls", action="store_true", help="plain HTTP, no authentication")
    args = ap.parse_args(argv)
    c = EtcdCluster(args.members, base_dir=args.data_dir, tls=not args.no_tls).start()
    print(f"READY {c.address()}", flush=True)
    try:
        wait_for_termination()
    finally:
        c.stop()


if __name__ == "__main__":
    main()
