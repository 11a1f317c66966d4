"""The etcd connection authenticates: client-certificate TLS when Cohort starts etcd, and
etcd user/password auth for an etcd Cohort did not start.

Outsiders use real sockets (urllib, raw ``ssl``, aiohttp through Cohort's own client):
plain HTTP, HTTPS without a client certificate, a certificate from another CA, and a
Cohort client certificate on the Raft peer port.  Each one tries to write a key; an
authenticated read afterwards proves the key is not there and etcd's revision did not move.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import stat
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cohort.coord.etcd import (
    EtcdAuthError,
    EtcdClient,
    EtcdCoordinator,
    EtcdCredentials,
    parse_address,
    prefix_end,
)
from cohort.etcd_server import EtcdCluster, etcd_available
from cohort.pki import CertificateAuthority, client_context
from cohort.rpc import RpcConnectionError, RpcError, RpcTimeout

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="etcd is not installed (etcd-server)"),
]

PASSWORD = "correct horse battery staple"


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture(scope="module")
def etcd_tls() -> Iterator[EtcdCluster]:
    with EtcdCluster(1) as e:
        yield e


@pytest.fixture(scope="module")
def etcd_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """TLS with client certificates *and* user/password auth (tokens live 1 s)."""
    with EtcdCluster(1, auth_token_ttl=1) as e:
        e.enable_auth("root", PASSWORD)
        yield e


def password_file(tmp: Path, text: str) -> Path:
    p = tmp / f"pw-{uuid.uuid4().hex[:6]}"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return p


def revision_and_value(e: EtcdCluster, key: str) -> tuple[int, Any]:
    """An authenticated read (the cluster's own probe): etcd's revision and the key's kvs."""
    doc = e.probe(0, "/kv/range", {"key": b64(key)}, timeout=3.0)
    assert doc is not None and "header" in doc, doc
    header = doc["header"]
    assert isinstance(header, dict)
    return int(header["revision"]), doc.get("kvs")


def put_body(key: str) -> bytes:
    return json.dumps({"key": b64(key), "value": b64("pwned")}).encode()


# -- the files ------------------------------------------------------------------------------
def test_credentials_are_private_files(etcd_tls: EtcdCluster) -> None:
    pki = etcd_tls.pki_dir
    assert stat.S_IMODE(etcd_tls.base_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    names = {p.name for p in pki.iterdir()}
    for want in ("ca.key", "peer-ca.key", "client.key", "etcd-1-server.key", "etcd-1-peer.key"):
        assert want in names
    for p in pki.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # etcd was started with client-certificate auth on both ports
    args = etcd_tls._args(etcd_tls.members[0], "new")
    for flag in ("--client-cert-auth", "--peer-client-cert-auth", "--trusted-ca-file"):
        assert flag in args
    assert etcd_tls.members[0].client_url.startswith("https://")
    # the address carries the CA, certificate and key, so connect() callers use them
    _, _, opts = parse_address(etcd_tls.address("x", partitions=4))
    assert opts["partitions"] == "4"
    assert opts["ca"] == str(etcd_tls.ca_file)
    assert {opts["cert"], opts["key"]} == {str(p) for p in etcd_tls.tls_options().values()} - {
        str(etcd_tls.ca_file)
    }


def test_restart_keeps_the_pki(tmp_path: Path) -> None:
    e = EtcdCluster(1, base_dir=tmp_path / "etcd")
    ca = (e.pki_dir / "ca.crt").read_bytes()
    client = (e.pki_dir / "client.key").read_bytes()
    again = EtcdCluster(1, base_dir=tmp_path / "etcd")
    assert (again.pki_dir / "ca.crt").read_bytes() == ca
    assert (again.pki_dir / "client.key").read_bytes() == client
    assert again.members[0].client_port == e.members[0].client_port


# -- outsiders ------------------------------------------------------------------------------
def test_unauthenticated_clients_are_refused(etcd_tls: EtcdCluster, tmp_path: Path) -> None:
    e = etcd_tls
    m = e.members[0]
    assert e.member_healthy(0)  # the readiness probe itself speaks TLS with the certificate
    rev0, _ = revision_and_value(e, "outsider/")
    tried: dict[str, str] = {}

    def attempt(name: str, url: str, ctx: ssl.SSLContext | None) -> None:
        req = urllib.request.Request(url, data=put_body(f"outsider/{name}"), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=3, context=ctx) as r:
                pytest.fail(f"{name}: etcd answered {r.status}: {r.read()[:200]!r}")
        except urllib.error.HTTPError as err:
            pytest.fail(f"{name}: etcd answered HTTP {err.code}: {err.read()[:200]!r}")
        except (urllib.error.URLError, OSError) as err:
            tried[name] = f"{type(err).__name__}: {err}"

    # 1. plain HTTP to the client port
    attempt("plain-http", f"http://{m.host}:{m.client_port}/v3/kv/put", None)
    # 2. HTTPS that checks the server but presents no client certificate
    attempt("no-cert", m.client_url + "/v3/kv/put", client_context(e.ca_file))
    # 3. a client certificate from another CA (made the same way, same subject)
    other = CertificateAuthority(tmp_path / "other", "ca", "Cohort etcd CA")
    forged = other.issue(tmp_path / "other", "client", None, unit="cohort", client=True)
    attempt(
        "other-ca", m.client_url + "/v3/kv/put", client_context(e.ca_file, *forged_paths(forged))
    )
    # 4. the real Cohort client certificate on the Raft peer port (its CA is separate)
    o = e.tls_options()
    assert e.peer_ca_file is not None
    peer_ctx = client_context(e.peer_ca_file, o["cert"], o["key"])
    with pytest.raises((ssl.SSLError, OSError)):
        raw = socket.create_connection((m.host, m.peer_port), timeout=3)
        with peer_ctx.wrap_socket(raw, server_hostname=m.host) as s:
            s.sendall(b"GET /members HTTP/1.1\r\nHost: etcd\r\n\r\n")
            if not s.recv(100):  # TLS 1.3: the refusal can arrive after the handshake
                raise OSError("closed")
    # 5. raw bytes of an etcd JSON request on a plain socket
    with socket.create_connection((m.host, m.client_port), timeout=3) as s:
        body = put_body("outsider/raw")
        s.sendall(
            b"POST /v3/kv/put HTTP/1.1\r\nHost: etcd\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        s.settimeout(3)
        try:
            got = s.recv(1000)
        except OSError:
            got = b""
        assert b"200 OK" not in got and b"header" not in got, got

    print("refused:", json.dumps(tried, indent=1))
    assert set(tried) == {"plain-http", "no-cert", "other-ca"}
    rev1, kvs = revision_and_value(e, "outsider/plain-http")
    for name in ("no-cert", "other-ca", "raw"):
        assert revision_and_value(e, f"outsider/{name}")[1] is None
    assert kvs is None and rev1 == rev0, "an outsider changed etcd"


def forged_paths(forged: Any) -> tuple[str, str]:
    return str(forged.cert), str(forged.key)


async def test_cohort_client_without_the_right_certificate_fails(
    etcd_tls: EtcdCluster, tmp_path: Path
) -> None:
    e = etcd_tls
    eps = ",".join(e.endpoints)
    other = CertificateAuthority(tmp_path / "other", "ca", "x")
    forged = other.issue(tmp_path / "other", "client", None, client=True)
    for address in (
        f"etcd://{eps}/o",  # plain HTTP
        f"etcd://{eps}/o?ca={e.ca_file}",  # TLS, no client certificate
        f"etcd://{eps}/o?ca={e.ca_file}&cert={forged.cert}&key={forged.key}",
        # the right certificate, but the server is checked against the wrong CA
        f"etcd://{eps}/o?ca={other.cert_path}&cert={e.tls_options()['cert']}"
        f"&key={e.tls_options()['key']}",
    ):
        c = EtcdCoordinator(address)
        try:
            with pytest.raises((RpcConnectionError, RpcTimeout)):
                await c.client.call("/kv/put", {"key": b64("/o/x"), "value": b64("v")}, timeout=1.0)
        finally:
            await c.close()
    assert revision_and_value(e, "/o/x")[1] is None
    # and with the cluster's address it works
    c = EtcdCoordinator(e.address("o" + uuid.uuid4().hex[:6], partitions=4, lease_ttl=2))
    try:
        assert c.client.endpoints[0].startswith("https://")
        inc = (await c.join({"id": "s1", "role": "server", "address": "x:1"}))["incarnation"]
        await c.heartbeat("s1", inc)
        b = await c.create_bucket("tls-bucket")
        v = await c.watch(-1, timeout=3.0)
        assert b in v["buckets"]
    finally:
        await c.close()


def test_address_options() -> None:
    eps, ns, opts = parse_address("etcds://a:1/prod?user=u&password_file=/p")
    assert eps == ["a:1"] and ns == "prod"
    creds = EtcdCredentials.from_options(opts)
    assert creds.tls and creds.user == "u" and creds.password_file == "/p" and creds.ca is None
    assert not EtcdCredentials.from_options({}).tls
    assert EtcdCredentials.from_options({"tls": "1"}).tls
    with pytest.raises(ValueError, match="password_file"):
        EtcdCredentials.from_options({"user": "u", "password": "hunter2"})
    with pytest.raises(ValueError, match="go together"):
        EtcdCredentials.from_options({"user": "u"})
    with pytest.raises(ValueError, match="key= without cert="):
        EtcdCredentials.from_options({"key": "/k"})
    with pytest.raises(ValueError, match="etcd TLS files"):
        EtcdClient(["a:1"], credentials=EtcdCredentials.from_options({"ca": "/nonexistent"}))


# -- user/password --------------------------------------------------------------------------
async def test_password_auth(etcd_user: EtcdCluster, tmp_path: Path) -> None:
    e = etcd_user
    ns = "u" + uuid.uuid4().hex[:6]
    pw = password_file(tmp_path, PASSWORD)
    good = e.address(ns, partitions=4, lease_ttl=2) + f"&user=root&password_file={pw}"
    # no primary candidate and no watch yet: either would keep the token in use (etcd
    # extends a simple token's life on every request), and this test wants it to lapse
    c = EtcdCoordinator(good, campaign=False)
    try:
        inc = (await c.join({"id": "s1", "role": "server", "address": "x:1"}))["incarnation"]
        await c.heartbeat("s1", inc)
        await c.create_bucket("pw-bucket")
        assert [b["name"] for b in (await c.view())["buckets"]] == ["pw-bucket"]
        assert c.client.authentications == 1
        # the token lives 1 s; once it lapsed the client authenticates again by itself
        await asyncio.sleep(2.5)
        await c.create_bucket("after-expiry")
        assert c.client.authentications == 2
        v = await c.watch(-1, timeout=3.0)  # the watch stream sends the token too
        assert [b["name"] for b in v["buckets"]] == ["after-expiry", "pw-bucket"]
        await c.create_bucket("watched")
        deadline = time.monotonic() + 5
        while "watched" not in [b["name"] for b in v["buckets"]]:
            assert time.monotonic() < deadline
            v = await c.watch(v["version"], timeout=2.0)
    finally:
        await c.close()


async def test_wrong_or_missing_password_fails_clearly(
    etcd_user: EtcdCluster, tmp_path: Path
) -> None:
    e = etcd_user
    ns = "w" + uuid.uuid4().hex[:6]
    rev0, _ = revision_and_value(e, f"/cohort/{ns}/v/config")
    base = e.address(ns, partitions=4, lease_ttl=2)
    wrong = password_file(tmp_path, "not the password")
    c = EtcdCoordinator(base + f"&user=root&password_file={wrong}")
    t0 = time.monotonic()
    try:
        with pytest.raises(EtcdAuthError, match="wrong user name or password") as exc:
            await c.config()
        assert exc.value.code == "EtcdAuthFailed" and str(wrong) in str(exc.value)
        assert time.monotonic() - t0 < 2.0  # refused at once, not retried until a timeout
        # a retry loop right after does not make etcd check the password again (bcrypt)
        with pytest.raises(EtcdAuthError, match="wrong user name or password"):
            await c.view()
        assert c.client.auth_attempts == 1
    finally:
        await c.close()
    # the client certificate alone is not enough once etcd has user auth
    c = EtcdCoordinator(base)
    try:
        with pytest.raises(EtcdAuthError, match="requires user authentication"):
            await c.config()
    finally:
        await c.close()
    # an unknown user
    c = EtcdCoordinator(base + f"&user=mallory&password_file={wrong}")
    try:
        with pytest.raises(EtcdAuthError):
            await c.config()
    finally:
        await c.close()
    # a certificate with a CN (etcd's gateway refuses those once user auth is on)
    assert e.ca_file is not None
    ca = CertificateAuthority(e.pki_dir, "ca", "Cohort etcd CA")
    cn = ca.issue(tmp_path, "with-cn", "root", client=True)
    good = password_file(tmp_path, PASSWORD)
    c = EtcdCoordinator(
        f"etcd://{','.join(e.endpoints)}/{ns}?ca={e.ca_file}&cert={cn.cert}&key={cn.key}"
        f"&user=root&password_file={good}"
    )
    try:
        with pytest.raises(EtcdAuthError, match="CommonName"):
            await c.config()
    finally:
        await c.close()
    rev1, kvs = revision_and_value(e, f"/cohort/{ns}/v/config")
    assert kvs is None
    # (authentications are Raft entries too, so the revision is not compared here)
    assert rev1 >= rev0


async def test_password_auth_over_plain_http(tmp_path: Path) -> None:
    """An etcd without TLS that only has user auth (one Cohort did not start): an
    anonymous client writes nothing, the right user works."""
    with EtcdCluster(1, tls=False) as e:
        assert e.members[0].client_url.startswith("http://")
        pw = password_file(tmp_path, PASSWORD)
        early = EtcdCoordinator(
            e.address("plain", partitions=4) + f"&user=cohort&password_file={pw}"
        )
        try:
            # configured for a user before etcd has auth on: it works (with a warning)...
            assert (await early.config())["partitions"] == 4
            e.enable_auth("cohort", PASSWORD)
            # ...and keeps working once it is on: the refusal makes it authenticate
            await early.view()
            assert early.client.authentications == 1
        finally:
            await early.close()
        m = e.members[0]
        req = urllib.request.Request(
            m.client_url + "/v3/kv/put", data=put_body("/anon"), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=3)
        assert b"user name is empty" in err.value.read()
        assert revision_and_value(e, "/anon")[1] is None
        c = EtcdCoordinator(e.address("plain", partitions=4) + f"&user=cohort&password_file={pw}")
        try:
            assert (await c.config())["partitions"] == 4
        finally:
            await c.close()
        c = EtcdCoordinator(e.address("plain", partitions=4))
        try:
            with pytest.raises(RpcError, match="requires user authentication"):
                await c.view()
        finally:
            await c.close()


def test_a_plain_data_directory_moves_to_tls(tmp_path: Path) -> None:
    """A one-member etcd made before TLS (LocalCluster's default) restarts with TLS and keeps its
    data; several members made without TLS are refused with what to do (their stored
    peer URLs are http://)."""
    e = EtcdCluster(1, base_dir=tmp_path / "one", tls=False).start()
    try:
        assert e.probe(0, "/kv/put", {"key": b64("kept"), "value": b64("v")}) is not None
    finally:
        e.stop()
    e = EtcdCluster(1, base_dir=tmp_path / "one").start()
    try:
        assert e.members[0].client_url.startswith("https://")
        assert revision_and_value(e, "kept")[1] is not None
    finally:
        e.stop()
    for i in (1, 2, 3):
        (tmp_path / "three" / f"etcd-{i}" / "member").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="created without TLS"):
        EtcdCluster(3, base_dir=tmp_path / "three")


def test_readiness_through_a_command_prefix() -> None:
    """Members run under a prefix (``ip netns exec ...`` in the netns tests) are probed by a
    child process that gets the request, TLS file names and token on stdin; ``env`` stands
    in for the namespace here."""
    with EtcdCluster(1, prefixes=[["env"]]) as e:
        assert e.member_healthy(0)
        e.enable_auth("root", PASSWORD)
        assert e.member_healthy(0)  # authenticated through the child too
        assert e.leader_index() == 0


async def test_a_user_limited_to_the_cohort_prefix(etcd_user: EtcdCluster, tmp_path: Path) -> None:
    """The role docs/deploy.md asks for (readwrite on /cohort/, nothing else) is enough for
    everything a member does: join, heartbeat, the primary's map, buckets, watch, leave."""
    e = etcd_user
    steps: list[tuple[str, dict[str, object]]] = [
        ("/auth/role/add", {"name": "cohort"}),
        ("/auth/role/grant", {"name": "cohort", "perm": {
            "permType": "READWRITE", "key": b64("/cohort/"), "range_end": prefix_end("/cohort/")}}),
        ("/auth/user/add", {"name": "cohort", "password": "member-pw"}),
        ("/auth/user/grant", {"user": "cohort", "role": "cohort"}),
    ]  # fmt: skip
    for path, body in steps:
        doc = e.probe(0, path, body, timeout=5.0)
        assert doc is not None and "error" not in doc, (path, doc)
    pw = password_file(tmp_path, "member-pw")
    ns = "r" + uuid.uuid4().hex[:6]
    c = EtcdCoordinator(
        e.address(ns, partitions=4, lease_ttl=2) + f"&user=cohort&password_file={pw}"
    )
    try:
        inc = (await c.join({"id": "s1", "role": "server", "address": "x:1"}))["incarnation"]
        deadline = time.monotonic() + 10
        while not c.is_primary or any(p[0] != "s1" for p in (await c.view())["partitions"]):
            assert time.monotonic() < deadline, "the primary never assigned the partitions"
            await c.heartbeat("s1", inc)
            await asyncio.sleep(0.1)
        assert await c.acquire_partition("s1", inc, 0) >= 1
        await c.create_bucket("limited")
        # the watch's copy catches up with the bucket a moment later (watch(-1) answers
        # with the copy as it is)
        v = await c.watch(-1, timeout=3.0)
        while "limited" not in [b["name"] for b in v["buckets"]]:
            assert time.monotonic() < deadline + 5, "the watch never delivered the bucket"
            v = await c.watch(v["version"], timeout=1.0)
        await c.leave("s1", inc)
        with pytest.raises(EtcdAuthError, match="denied"):
            await c.client.call("/kv/range", {"key": b64("/elsewhere")})
    finally:
        await c.close()
