"""The etcd backend of the :class:`~cohort.coord.base.Coordinator` protocol.

Why etcd's JSON gateway over HTTP (aiohttp) rather than a gRPC client: the ``etcd3`` PyPI
client is unmaintained and does not import with protobuf 7; the gateway (``/v3/...``,
base64 keys and values, int64 as strings) is part of every etcd ≥ 3.4 (Debian's 3.4.23
serves ``/v3/`` and the deprecated ``/v3beta/``), needs no generated code, and aiohttp is
already a dependency.  Streaming watches work over it as newline-delimited JSON.

Keys (``<ns>`` is the cluster namespace from the address, default ``default``)::

    /cohort/<ns>/v/config          {cluster_id, partitions, lease_ttl}   created once
    /cohort/<ns>/v/map             {owners, epochs, incs}                 written by the primary only
    /cohort/<ns>/v/members/<id>    member record, attached to the member's lease
    /cohort/<ns>/v/roster/<id>     the same record without a lease (remembers dead/left members)
    /cohort/<ns>/v/locks/<pppp>    {id, inc, epoch} attached to the holder's lease
    /cohort/<ns>/v/buckets/<name>  {name, id, created, tenant}
    /cohort/<ns>/v/primary         the elected primary's name, attached to its lease
    /cohort/<ns>/e/<time>-<rand>   events (outside ``v/`` so they do not wake watchers)

Semantics, as in :mod:`cohort.coord.state`:

* **Membership.** ``join`` grants an etcd lease of ``lease_ttl`` seconds (whole seconds,
  at least 2 with etcd's default election timeout) and writes the member key on it; a
  re-join under the same id revokes the previous incarnation's lease first (its
  partition locks vanish with it).  ``heartbeat`` is a lease keep-alive; once etcd has
  expired the lease it raises ``UnknownMember``.  A server counts its lease from when it
  *sent* the keep-alive that succeeded, so it self-fences before etcd can expire it.
* **Partition map and the primary.** One process at a time is the *primary* (seed 004):
  it wins the election by creating ``v/primary`` on its own lease, and every map write
  is a transaction guarded by ``create_revision(v/primary) == mine`` and
  ``mod_revision(v/map) == the one I read``.  So two primaries can never both write,
  and a primary never overwrites a map it has not seen.  The primary runs the same
  assignment as the embedded coordinator (:meth:`CoordinatorState.rebalance`); an owner
  whose member key is gone (lease expired or revoked) or whose incarnation changed loses
  its partitions with a new epoch.
* **Partition lock.** ``acquire_partition`` is a transaction that checks, at one
  revision, that the member is live with this incarnation, that the map names it owner
  and that no other holder's lock key exists (a lock key lives on its holder's lease, so
  it exists only until the holder released it or its lease died); the token is the
  partition's epoch.
* **Watches.** Each client keeps one streaming etcd watch on ``v/`` and a local copy of
  those keys (an informer); ``watch(since)`` returns as soon as that copy's revision
  exceeds ``since``.  The view's ``version`` is an etcd revision.  The stream's endpoint is
  health-checked with a linearizable read every second, so a watch on an etcd member that
  lost its quorum is moved to another endpoint.

Every etcd or network failure is raised as :class:`~cohort.rpc.RpcError` (``Timeout`` /
``ConnectionError`` / ``EtcdError`` / ``EtcdAuthFailed``), like the embedded backend's RPC
client.

**Authentication** (see :class:`EtcdCredentials`), named in the address's query::

    etcd://h1:2379,h2:2379/prod?ca=/etc/cohort/etcd/ca.crt&cert=/etc/cohort/etcd/client.crt&key=/etc/cohort/etcd/client.key
    etcd://h1:2379/prod?ca=/etc/ssl/etcd-ca.pem&user=cohort&password_file=/etc/cohort/etcd.password
    etcds://h1:2379/prod?user=cohort&password_file=...     (TLS, server checked against the system CAs)

``ca``/``cert``/``key`` (or ``tls=1``, or the ``etcds`` scheme) switch to HTTPS: the
server is verified against ``ca`` (else the system trust store) and ``cert``/``key`` is
the client certificate.  ``user`` + ``password_file`` turn on etcd's user/password auth:
the client gets a token from ``/v3/auth/authenticate`` and sends it in the
``Authorization`` header, and authenticates again when etcd calls the token invalid
(expired, or the member restarted).  The password is read from the file, never from the
address, which ends up on command lines and in logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import random
import ssl
import stat
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp

from cohort.coord.state import CoordinatorState, Member, Partition
from cohort.rpc import RpcConnectionError, RpcError, RpcTimeout

log = logging.getLogger("cohort.coord.etcd")

DEFAULT_LEASE_TTL = 2
DEFAULT_PARTITIONS = 256
GATEWAY = "/v3"


# -- encoding helpers ---------------------------------------------------------------------------
def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


def _dumps(obj: Any) -> str:
    return b64(json.dumps(obj, separators=(",", ":")))


@dataclass
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KV:
        return cls(
            key=unb64(d["key"]).decode(),
            value=unb64(d.get("value", "")),
            create_revision=int(d.get("create_revision", 0)),
            mod_revision=int(d.get("mod_revision", 0)),
            lease=int(d.get("lease", 0)),
        )

    def doc(self) -> dict[str, Any]:
        d: dict[str, Any] = json.loads(self.value)
        return d


class EtcdError(RpcError):
    """etcd answered with an error (``grpc_code`` is the gRPC status code)."""

    def __init__(self, grpc_code: int, message: str, code: str = "EtcdError") -> None:
        super().__init__(code, f"etcd error {grpc_code}: {message}")
        self.grpc_code = grpc_code
        self.etcd_message = message


class EtcdAuthError(EtcdError):
    """etcd refused our credentials: a wrong user or password, no credentials where etcd
    requires them, or a user without permission (code ``EtcdAuthFailed``).
    ``token_expired``: only the token was refused (the client authenticates again)."""

    def __init__(self, grpc_code: int, message: str, *, token_expired: bool = False) -> None:
        super().__init__(grpc_code, message, "EtcdAuthFailed")
        self.token_expired = token_expired


def _auth_error(grpc_code: int, msg: str, creds: EtcdCredentials, path: str) -> EtcdError:
    """The error for an etcd error answer, with what to do about it when it is auth."""
    m = msg.lower()
    user = creds.user
    if "invalid auth token" in m:
        return EtcdAuthError(grpc_code, msg, token_expired=True)
    if "authentication failed" in m or "invalid user id or password" in m:
        return EtcdAuthError(
            grpc_code,
            f"etcd refused user {user!r}: wrong user name or password "
            f"(the password is read from {creds.password_file}) [etcd: {msg}]",
        )
    if "user name is empty" in m or "user name not found" in m:
        return EtcdAuthError(
            grpc_code,
            "etcd requires user authentication"
            + (f" and knows no user {user!r}" if user else " and this client has no user")
            + f": give user=NAME&password_file=FILE in the etcd address [etcd: {msg}]",
        )
    if "commonname of client" in m:
        return EtcdAuthError(
            grpc_code,
            "etcd has user auth on and refuses a client certificate with a CommonName on its "
            "JSON gateway: use a client certificate without CN (EtcdCluster.issue_client "
            f"makes one) [etcd: {msg}]",
        )
    if "permission denied" in m:
        return EtcdAuthError(
            grpc_code,
            f"etcd denied {path} to user {user!r}: grant it a role with readwrite on the "
            f"/cohort/ prefix (or the root role) [etcd: {msg}]",
        )
    return EtcdError(grpc_code, msg)


_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class EtcdCredentials:
    """How to authenticate to etcd, from an address's query options.

    * ``ca``: the CA file the etcd server certificates are checked against (default: the
      system's trust store);
    * ``cert``, ``key``: the client certificate and its key (for ``--client-cert-auth``);
    * ``tls=1`` (implied by any of the above, and by the ``etcds://`` scheme): use HTTPS;
    * ``user``, ``password_file``: etcd user/password auth; the file holds the password
      (one line; a trailing newline is ignored) and should be mode 0600.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    tls: bool = False
    user: str | None = None
    password_file: str | None = None

    @classmethod
    def from_options(cls, opts: dict[str, str]) -> EtcdCredentials:
        if "password" in opts:
            raise ValueError(
                "etcd address: the password never goes in the address (it ends up on command "
                "lines and in logs); write it to a file and name the file with password_file="
            )
        ca, cert, key = opts.get("ca") or None, opts.get("cert") or None, opts.get("key") or None
        user, pwf = opts.get("user") or None, opts.get("password_file") or None
        if key and not cert:
            raise ValueError("etcd address: key= without cert=")
        if bool(user) != bool(pwf):
            raise ValueError("etcd address: user= and password_file= go together")
        tls = bool(ca or cert) or opts.get("tls", "0").lower() not in _FALSE
        return cls(ca=ca, cert=cert, key=key, tls=tls, user=user, password_file=pwf)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS client context (CA, client certificate), or None for plain HTTP."""
        if not self.tls:
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(
                f"etcd TLS files (ca={self.ca}, cert={self.cert}, key={self.key}): {e}"
            ) from e
        return ctx

    def read_password(self) -> str:
        assert self.password_file is not None
        try:
            st = os.stat(self.password_file)
            with open(self.password_file, encoding="utf-8") as f:
                pw = f.read()
        except OSError as e:
            raise EtcdAuthError(0, f"cannot read the etcd password file: {e}") from e
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "etcd password file %s is readable by others (mode %o); chmod 600 it",
                self.password_file,
                stat.S_IMODE(st.st_mode),
            )
        pw = pw.removesuffix("\n").removesuffix("\r")
        if not pw:
            raise EtcdAuthError(0, f"the etcd password file {self.password_file} is empty")
        return pw


def parse_address(address: str) -> tuple[list[str], str, dict[str, str]]:
    """``etcd://h1:p1,h2:p2/ns?lease_ttl=2&partitions=256&campaign=1`` → endpoints, ns, options.

    ``etcds://`` is the same with ``tls=1``; the credential options are in
    :class:`EtcdCredentials`.
    """
    u = urlsplit(address)
    if u.scheme not in ("etcd", "etcds"):
        raise ValueError(f"not an etcd address: {address!r} (expected etcd://host:port,...)")
    endpoints = [e.strip() for e in u.netloc.split(",") if e.strip()]
    if not endpoints:
        raise ValueError(f"no etcd endpoints in {address!r}")
    ns = u.path.strip("/") or "default"
    opts = {k: v[-1] for k, v in parse_qs(u.query).items()}
    if u.scheme == "etcds":
        opts.setdefault("tls", "1")
    return endpoints, ns, opts


# -- the gateway client -------------------------------------------------------------------------
class EtcdClient:
    """A minimal async client of etcd's v3 JSON gateway with endpoint fail-over.

    Requests go to the endpoint that last worked; on a connection error, a timeout or an
    ``Unavailable`` answer the next endpoint is tried, until ``timeout`` has passed.
    With ``credentials`` it speaks TLS (CA, client certificate) and/or sends an etcd auth
    token, authenticating again whenever etcd calls the token invalid.
    """

    RETRY_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE (no leader, request timed out)
    AUTH_BACKOFF = 1.0

    def __init__(
        self,
        endpoints: list[str],
        *,
        attempt_timeout: float = 0.5,
        credentials: EtcdCredentials | None = None,
    ) -> None:
        self.credentials = credentials or EtcdCredentials()
        self.ssl_context = self.credentials.ssl_context()
        scheme = "https" if self.credentials.tls else "http"
        self.endpoints = [e if "://" in e else f"{scheme}://{e}" for e in endpoints]
        self.current = 0
        self.attempt_timeout = attempt_timeout
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None  # None: not authenticated yet; "": auth is off
        self._token_lock: asyncio.Lock | None = None
        # a refused password is not tried again for AUTH_BACKOFF seconds: every retry
        # loop of a misconfigured process would otherwise make etcd run bcrypt 10x a second
        self._auth_refused: tuple[float, EtcdAuthError] | None = None
        self.authentications = 0  # how many tokens this client obtained
        self.auth_attempts = 0  # how many times it asked for one

    @classmethod
    def from_options(cls, endpoints: list[str], opts: dict[str, str]) -> EtcdClient:
        return cls(endpoints, credentials=EtcdCredentials.from_options(opts))

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=64,
                    force_close=False,
                    ssl=self.ssl_context if self.ssl_context is not None else True,
                ),
                json_serialize=json.dumps,
            )
        return self._session

    def rotate(self, idx: int) -> None:
        if self.current == idx:
            self.current = (idx + 1) % len(self.endpoints)

    # -- user/password auth -----------------------------------------------------------------
    async def auth_headers(self, timeout: float = 3.0) -> dict[str, str]:
        """The ``Authorization`` header (authenticating first if needed), or none."""
        if self.credentials.user is None:
            return {}
        if self._token is None:
            if self._token_lock is None:
                self._token_lock = asyncio.Lock()
            async with self._token_lock:
                if self._token is None:
                    self._token = await self._authenticate(timeout)
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self, timeout: float) -> str:
        c = self.credentials
        if self._auth_refused is not None:
            at, err = self._auth_refused
            if time.monotonic() - at < self.AUTH_BACKOFF:
                raise err
            self._auth_refused = None
        body = {"name": c.user, "password": c.read_password()}
        self.auth_attempts += 1
        try:
            doc = await self._call("/auth/authenticate", body, timeout, {})
        except EtcdAuthError as e:
            self._auth_refused = (time.monotonic(), e)
            raise
        except EtcdError as e:
            if "authentication is not enabled" in e.etcd_message:
                log.warning("etcd user %s configured but etcd has auth disabled", c.user)
                return ""
            raise
        token = doc.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdAuthError(0, f"etcd /auth/authenticate gave no token: {doc}")
        self.authentications += 1
        return token

    def _token_refused(self, headers: dict[str, str]) -> None:
        """The token sent in ``headers`` was refused: the next request authenticates again."""
        if headers.get("Authorization", "") == self._token:
            self._token = None

    # -- requests --------------------------------------------------------------------------
    async def _post(
        self, idx: int, path: str, body: dict[str, Any], timeout: float, headers: dict[str, str]
    ) -> dict[str, Any]:
        """One request to endpoint ``idx``; an error answer is raised as EtcdError."""
        url = self.endpoints[idx] + GATEWAY + path
        async with self.session.post(
            url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            text = await r.text()
        try:
            doc: dict[str, Any] = json.loads(text.split("\n", 1)[0]) if text else {}
        except ValueError:
            if r.status < 400:
                raise
            # a plain-text refusal, e.g. etcd's gateway about a client certificate's CN
            msg = f"HTTP {r.status}: {text[:300].strip()}"
            raise _auth_error(14 if r.status >= 500 else 2, msg, self.credentials, path) from None
        if "result" in doc and isinstance(doc["result"], dict):
            doc = doc["result"]
        if "error" in doc or r.status >= 400:
            code = int(doc.get("code", 14 if r.status >= 500 else 2))
            msg = str(doc.get("message") or doc.get("error") or text[:200])
            raise _auth_error(code, msg, self.credentials, path)
        return doc

    async def call(
        self, path: str, body: dict[str, Any], *, timeout: float = 3.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            headers = await self.auth_headers(max(0.1, deadline - time.monotonic()))
            try:
                return await self._call(path, body, deadline - time.monotonic(), headers)
            except EtcdAuthError as e:
                # an expired token; or etcd had auth off when we authenticated, and now on
                stale = e.token_expired or (self._token == "" and not headers)
                if not (stale and self.credentials.user and attempt < 2):
                    raise
                self._token_refused(headers)
        raise AssertionError("unreachable")

    async def call_one(
        self, idx: int, path: str, body: dict[str, Any], *, timeout: float = 1.0
    ) -> dict[str, Any]:
        """One request to endpoint ``idx`` only (no fail-over), authenticated."""
        headers = await self.auth_headers(timeout)
        try:
            return await self._post(idx, path, body, timeout, headers)
        except EtcdAuthError as e:
            if e.token_expired:
                self._token_refused(headers)
            raise

    async def _call(
        self, path: str, body: dict[str, Any], timeout: float, headers: dict[str, str]
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        tried = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (tried >= 2 * len(self.endpoints) and last is not None):
                break
            idx = self.current
            per = min(remaining, max(self.attempt_timeout, remaining / len(self.endpoints)))
            tried += 1
            try:
                return await self._post(idx, path, body, per, headers)
            except EtcdError as e:
                if e.grpc_code in self.RETRY_CODES and not isinstance(e, EtcdAuthError):
                    last = e
                    self.rotate(idx)
                    continue
                raise
            except TimeoutError as e:
                last = e
                self.rotate(idx)
            except (aiohttp.ClientError, OSError, ValueError) as e:
                last = e
                self.rotate(idx)
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if isinstance(last, RpcError):
            raise last
        if isinstance(last, TimeoutError) or last is None:
            raise RpcTimeout(f"etcd {path}: no answer within {timeout:.1f}s")
        raise RpcConnectionError(f"etcd {path}: {last}")

    # -- KV and leases --------------------------------------------------------------------
    async def range_prefix(self, prefix: str, **kw: Any) -> tuple[int, list[KV]]:
        r = await self.call(
            "/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix), **kw}
        )
        return int(r["header"]["revision"]), [KV.from_json(k) for k in r.get("kvs", [])]

    async def get(self, key: str) -> tuple[int, KV | None]:
        r = await self.call("/kv/range", {"key": b64(key)})
        kvs = r.get("kvs", [])
        return int(r["header"]["revision"]), (KV.from_json(kvs[0]) if kvs else None)

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        timeout: float = 3.0,
    ) -> tuple[bool, int, list[dict[str, Any]]]:
        r = await self.call(
            "/kv/txn",
            {"compare": compare, "success": success, "failure": failure or []},
            timeout=timeout,
        )
        return bool(r.get("succeeded", False)), int(r["header"]["revision"]), r.get("responses", [])

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        r = await self.call("/lease/grant", {"TTL": ttl})
        return int(r["ID"]), int(r["TTL"])

    async def lease_keepalive(self, lease: int, *, timeout: float = 1.0) -> tuple[int, int]:
        """Returns (remaining TTL, revision); TTL 0 means the lease no longer exists."""
        r = await self.call("/lease/keepalive", {"ID": str(lease)}, timeout=timeout)
        return int(r.get("TTL", 0)), int(r.get("header", {}).get("revision", 0))

    async def lease_revoke(self, lease: int) -> None:
        try:
            await self.call("/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if e.grpc_code != 5:  # NotFound: already gone
                raise

    async def watch(
        self, idx: int, prefix: str, start_revision: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream watch responses for ``prefix`` from endpoint ``idx`` (no overall timeout)."""
        body = {
            "create_request": {
                "key": b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": start_revision,
                "prev_kv": False,
            }
        }
        url = self.endpoints[idx] + GATEWAY + "/watch"
        headers = await self.auth_headers()
        async with self.session.post(
            url,
            json=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.attempt_timeout),
        ) as r:
            if r.status >= 400:
                text = (await r.text())[:300]
                if "invalid auth token" in text:
                    self._token_refused(headers)
                raise RpcConnectionError(f"etcd watch: HTTP {r.status} {text}")
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while True:
                    # The gateway writes one JSON object per message, newline-delimited.
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1 :]
                    if line.strip():
                        doc = json.loads(line)
                        self._watch_error(doc, headers)
                        yield doc.get("result", doc)
                if buf.strip():
                    try:
                        doc = json.loads(buf)
                    except ValueError:
                        continue
                    buf = b""
                    self._watch_error(doc, headers)
                    yield doc.get("result", doc)

    def _watch_error(self, doc: dict[str, Any], headers: dict[str, str]) -> None:
        err = doc.get("error")
        if not err:
            return
        msg, code = str(err), 2
        if isinstance(err, dict):
            msg = str(err.get("message", err))
            code = int(err.get("grpc_code") or err.get("code") or 2)
        e = _auth_error(code, msg, self.credentials, "/watch")
        if isinstance(e, EtcdAuthError) and e.token_expired:
            self._token_refused(headers)
        raise e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# -- the informer: a local copy of v/ kept by one streaming watch ------------------------------
class Informer:
    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.kvs: dict[str, KV] = {}
        self.revision = 0
        self.loaded = False
        self.healthy_at = 0.0  # monotonic time the stream's endpoint last proved healthy
        self.changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _run(self) -> None:
        while True:
            try:
                rev, kvs = await self.client.range_prefix(self.prefix)
                self.kvs = {kv.key: kv for kv in kvs}
                self.revision = rev
                self.loaded = True
                self.healthy_at = time.monotonic()
                await self._notify()
                await self._stream()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("etcd watch restarting: %s", e)
                self.client.rotate(self.client.current)
                await asyncio.sleep(0.1)

    async def _health(self, idx: int) -> None:
        while True:
            await asyncio.sleep(0.5)
            t = time.monotonic()
            doc = await self.client.call_one(
                idx, "/kv/range", {"key": b64(self.prefix + "config"), "count_only": True},
                timeout=1.0,
            )  # fmt: skip
            if "header" not in doc:
                raise RpcConnectionError(f"etcd endpoint unhealthy: {doc}")
            self.healthy_at = t

    async def _stream(self) -> None:
        idx = self.client.current
        health = asyncio.create_task(self._health(idx))
        reader = asyncio.create_task(self._read(idx))
        try:
            done, _ = await asyncio.wait({health, reader}, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
            raise RpcConnectionError("etcd watch stream ended")
        finally:
            health.cancel()
            reader.cancel()
            for t in (health, reader):
                with contextlib.suppress(BaseException):
                    await t

    async def _read(self, idx: int) -> None:
        async for msg in self.client.watch(idx, self.prefix, self.revision + 1):
            if msg.get("compact_revision") not in (None, "0", 0) or msg.get("canceled"):
                raise RpcConnectionError(f"watch canceled: {msg.get('cancel_reason', '')}")
            events = msg.get("events") or []
            if not events:
                continue
            for ev in events:
                kv = KV.from_json(ev["kv"])
                if ev.get("type") == "DELETE":
                    self.kvs.pop(kv.key, None)
                else:
                    self.kvs[kv.key] = kv
                self.revision = max(self.revision, kv.mod_revision)
            await self._notify()

    async def wait_newer(self, since: int, timeout: float) -> bool:
        """Wait until ``revision > since``; False on timeout."""
        self.start()
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.loaded and self.revision > since), timeout
                )
                return True
            except TimeoutError:
                return False


# -- view building (shared by view() and watch()) -------------------------------------------------
def build_view(prefix: str, revision: int, kvs: dict[str, KV]) -> dict[str, Any]:
    cfg_kv = kvs.get(prefix + "config")
    cfg = cfg_kv.doc() if cfg_kv else {}
    n = int(cfg.get("partitions", 0))
    map_kv = kvs.get(prefix + "map")
    mp: dict[str, Any] = map_kv.doc() if map_kv else {"owners": [None] * n, "epochs": [0] * n}
    holders: list[str | None] = [None] * n
    live: dict[str, dict[str, Any]] = {}
    roster: dict[str, dict[str, Any]] = {}
    buckets: list[dict[str, Any]] = []
    for key, kv in kvs.items():
        rest = key[len(prefix) :]
        if rest.startswith("locks/"):
            p = int(rest[6:])
            if p < n:
                holders[p] = kv.doc()["id"]
        elif rest.startswith("members/"):
            live[rest[8:]] = kv.doc()
        elif rest.startswith("roster/"):
            roster[rest[7:]] = kv.doc()
        elif rest.startswith("buckets/"):
            buckets.append(kv.doc())
    members = []
    for mid in sorted(set(roster) | set(live)):
        m = live.get(mid)
        if m is None:
            m = dict(roster[mid])
            if m.get("state") != "left":
                m["state"] = "dead"
        members.append(m)
    return {
        "version": revision,
        "cluster_id": cfg.get("cluster_id", ""),
        "lease_ttl": float(cfg.get("lease_ttl", DEFAULT_LEASE_TTL)),
        "members": members,
        "partitions": [[mp["owners"][p], mp["epochs"][p], holders[p]] for p in range(n)],
        # the lock managers' membership, published by the primary with the map
        **(
            {"membership_epoch": mp["dlm"]["epoch"], "dlm_members": mp["dlm"]["members"]}
            if mp.get("dlm")
            else {}
        ),
        "buckets": sorted(buckets, key=lambda b: b["name"]),
    }


def _cmp_mod(key: str, rev: int) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(rev)}


def _cmp_create(key: str, rev: int) -> dict[str, Any]:
    return {"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": str(rev)}


def _put(key: str, doc: Any, lease: int = 0) -> dict[str, Any]:
    req: dict[str, Any] = {"key": b64(key), "value": _dumps(doc)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def _range(key: str) -> dict[str, Any]:
    return {"request_range": {"key": b64(key)}}


def _kvs_of(responses: list[dict[str, Any]], i: int) -> KV | None:
    kvs = responses[i].get("response_range", {}).get("kvs", [])
    return KV.from_json(kvs[0]) if kvs else None


# -- the coordinator ---------------------------------------------------------------------------------
class EtcdCoordinator:
    """A :class:`~cohort.coord.base.Coordinator` whose state lives in etcd.

    ``campaign``: whether this process stands for election as the primary (which runs
    partition assignment).  By default a process stands once it joins as a server, so a
    cluster of servers needs no extra process; ``cohort coordinator`` with an etcd
    address runs a dedicated candidate (:meth:`run_primary`).
    """

    def __init__(
        self,
        address: str,
        *,
        campaign: bool | None = None,
        partitions: int | None = None,
        lease_ttl: int | None = None,
        name: str | None = None,
    ) -> None:
        endpoints, ns, opts = parse_address(address)
        self.address = address
        self.namespace = ns
        self.client = EtcdClient(endpoints, credentials=EtcdCredentials.from_options(opts))
        self.prefix = f"/cohort/{ns}/v/"
        self.events_prefix = f"/cohort/{ns}/e/"
        self.partitions = int(partitions or opts.get("partitions") or DEFAULT_PARTITIONS)
        self.lease_ttl = math.ceil(float(lease_ttl or opts.get("lease_ttl") or DEFAULT_LEASE_TTL))
        self.campaign = campaign if campaign is not None else opts.get("campaign", "1") != "0"
        self.name = name or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.informer = Informer(self.client, self.prefix)
        self._config: dict[str, Any] | None = None
        self._leases: dict[tuple[str, str], int] = {}
        self._primary_task: asyncio.Task[None] | None = None
        self.is_primary = False
        self.primary_writes = 0

    def k(self, rest: str) -> str:
        return self.prefix + rest

    # -- config ---------------------------------------------------------------------------
    async def config(self, *, create: bool = True) -> dict[str, Any]:
        """The cluster's config key; created from this client's settings if ``create``."""
        if self._config is None and not create:
            _, kv = await self.client.get(self.k("config"))
            if kv is None:
                return {}
            self._config = kv.doc()
        if self._config is None:
            key = self.k("config")
            want = {
                "cluster_id": uuid.uuid4().hex,
                "partitions": self.partitions,
                "lease_ttl": self.lease_ttl,
            }
            ok, _, resp = await self.client.txn(
                [_cmp_create(key, 0)], [_put(key, want)], [_range(key)]
            )
            if ok:
                self._config = want
            else:
                kv = _kvs_of(resp, 0)
                assert kv is not None
                self._config = kv.doc()
        return self._config

    async def _event(self, kind: str, detail: str) -> None:
        with contextlib.suppress(RpcError):
            await self.client.call("/kv/put", self._event_put(kind, detail)["request_put"])

    def _event_put(self, kind: str, detail: str) -> dict[str, Any]:
        now = time.time()
        key = f"{self.events_prefix}{int(now * 1e6):020d}-{random.getrandbits(32):08x}"
        return _put(key, {"time": now, "kind": kind, "detail": detail})

    # -- membership -----------------------------------------------------------------------
    async def join(self, member: dict[str, Any]) -> dict[str, Any]:
        cfg = await self.config()
        ttl = int(cfg["lease_ttl"])
        mid = str(member["id"])
        role = str(member["role"])
        key = self.k(f"members/{mid}")
        _, old = await self.client.get(key)
        if old is not None and old.lease:
            # A new incarnation: the previous process lost its state; fence it out now.
            await self.client.lease_revoke(old.lease)
        lease, _ = await self.client.lease_grant(ttl)
        incarnation = uuid.uuid4().hex[:12]
        rec: dict[str, Any] = {
            "id": mid,
            "role": role,
            "address": str(member["address"]),
            "incarnation": incarnation,
            "lease_expiry": 0.0,
            "state": "alive",
            "capacity": float(member.get("capacity", 1.0)),
            "standby": bool(member.get("standby", False)),
            "pid": int(member.get("pid", 0)),
            "joined_at": time.time(),
            "meta": member.get("meta") or {},
        }
        await self.client.txn(
            [],
            [
                _put(key, rec, lease),
                _put(self.k(f"roster/{mid}"), rec),
                self._event_put("join", f"{role} {mid} at {rec['address']}"),
            ],
        )
        self._leases[(mid, incarnation)] = lease
        if role == "server" and self.campaign:
            self.start_primary()
        return {
            "incarnation": incarnation,
            "lease_ttl": float(ttl),
            "view": await self.view(),
        }

    async def _member(self, member_id: str) -> KV | None:
        _, kv = await self.client.get(self.k(f"members/{member_id}"))
        return kv

    async def _lease_of(self, member_id: str, incarnation: str) -> int:
        lease = self._leases.get((member_id, incarnation))
        if lease is None:
            kv = await self._member(member_id)
            if kv is None or kv.doc().get("incarnation") != incarnation:
                raise RpcError("UnknownMember", f"{member_id} is not a live member; re-join")
            lease = kv.lease
            self._leases[(member_id, incarnation)] = lease
        return lease

    async def heartbeat(
        self, member_id: str, incarnation: str, load: list[list[float]] | None = None
    ) -> dict[str, Any]:
        """Keep the member's lease alive.  ``load`` is accepted and ignored (load-aware
        rebalancing runs in the embedded coordinator only, for now)."""
        lease = await self._lease_of(member_id, incarnation)
        ttl, rev = await self.client.lease_keepalive(lease, timeout=1.0)
        if ttl <= 0:
            self._leases.pop((member_id, incarnation), None)
            raise RpcError("UnknownMember", f"{member_id} is not a live member; re-join")
        return {"version": rev}

    async def leave(self, member_id: str, incarnation: str) -> None:
        kv = await self._member(member_id)
        if kv is None or kv.doc().get("incarnation") != incarnation:
            return
        rec = kv.doc()
        rec["state"] = "left"
        await self.client.txn(
            [_cmp_mod(kv.key, kv.mod_revision)],
            [_put(self.k(f"roster/{member_id}"), rec), self._event_put("member-left", member_id)],
        )
        await self.client.lease_revoke(kv.lease)
        self._leases.pop((member_id, incarnation), None)

    async def set_state(self, member_id: str, state: str) -> dict[str, Any]:
        for _ in range(20):
            kv = await self._member(member_id)
            if kv is None:
                _, ros = await self.client.get(self.k(f"roster/{member_id}"))
                if ros is not None and ros.doc().get("role") == "server":
                    gone = "left" if ros.doc().get("state") == "left" else "dead"
                    raise RpcError("MemberDown", f"{member_id} is {gone}")
                raise RpcError("UnknownMember", f"no server named {member_id!r}")
            rec = kv.doc()
            if rec.get("role") != "server":
                raise RpcError("UnknownMember", f"no server named {member_id!r}")
            if state not in ("alive", "draining"):
                raise RpcError("InvalidState", f"unknown member state {state!r}")
            rec["state"] = state
            ok, _, _ = await self.client.txn(
                [_cmp_mod(kv.key, kv.mod_revision)],
                [
                    _put(kv.key, rec, kv.lease),
                    _put(self.k(f"roster/{member_id}"), rec),
                    self._event_put("drain" if state == "draining" else "undrain", member_id),
                ],
            )
            if ok:
                return rec
        raise RpcError("Conflict", f"member {member_id} changed too often")

    # -- views ----------------------------------------------------------------------------------
    async def view(self) -> dict[str, Any]:
        rev, kvs = await self.client.range_prefix(self.prefix)
        return build_view(self.prefix, rev, {kv.key: kv for kv in kvs})

    async def watch(self, since: int, timeout: float = 5.0) -> dict[str, Any]:
        self.informer.start()
        await self.informer.wait_newer(since, timeout)
        if not self.informer.loaded or time.monotonic() - self.informer.healthy_at > 2.0:
            raise RpcConnectionError("etcd watch is not connected to a healthy endpoint")
        return build_view(self.prefix, self.informer.revision, self.informer.kvs)

    # -- partition lock --------------------------------------------------------------------------
    async def acquire_partition(self, member_id: str, incarnation: str, partition: int) -> int:
        mkey, lkey, mapkey = (
            self.k(f"members/{member_id}"),
            self.k(f"locks/{partition:04d}"),
            self.k("map"),
        )
        for _ in range(50):
            _, _, resp = await self.client.txn([], [_range(mkey), _range(mapkey), _range(lkey)])
            mkv, mapkv, lkv = _kvs_of(resp, 0), _kvs_of(resp, 1), _kvs_of(resp, 2)
            if mkv is None or mkv.doc().get("incarnation") != incarnation:
                raise RpcError("UnknownMember", f"{member_id} is not a live member")
            mp = mapkv.doc() if mapkv else None
            owner = mp["owners"][partition] if mp else None
            if owner != member_id:
                raise RpcError("NotOwner", f"partition {partition} is assigned to {owner}")
            assert mp is not None and mapkv is not None
            epoch = int(mp["epochs"][partition])
            if lkv is not None:
                h = lkv.doc()
                if h.get("id") != member_id or h.get("inc") != incarnation:
                    raise RpcError("Busy", f"partition {partition} still held by {h.get('id')}")
            ok, _, _ = await self.client.txn(
                [
                    _cmp_mod(mkey, mkv.mod_revision),
                    _cmp_mod(mapkey, mapkv.mod_revision),
                    _cmp_mod(lkey, lkv.mod_revision if lkv else 0),
                ],
                [_put(lkey, {"id": member_id, "inc": incarnation, "epoch": epoch}, mkv.lease)],
            )
            if ok:
                return epoch
        raise RpcError("Busy", f"partition {partition}: too much contention")

    async def release_partition(self, member_id: str, incarnation: str, partition: int) -> None:
        lkey = self.k(f"locks/{partition:04d}")
        for _ in range(20):
            _, kv = await self.client.get(lkey)
            if kv is None:
                return
            h = kv.doc()
            if h.get("id") != member_id or h.get("inc") != incarnation:
                return
            ok, _, _ = await self.client.txn([_cmp_mod(lkey, kv.mod_revision)], [_delete(lkey)])
            if ok:
                return

    # -- buckets -------------------------------------------------------------------------------
    async def create_bucket(self, name: str, tenant: str = "default") -> dict[str, Any]:
        key = self.k(f"buckets/{name}")
        b = {"name": name, "id": uuid.uuid4().hex[:16], "created": time.time(), "tenant": tenant}
        ok, _, resp = await self.client.txn(
            [_cmp_create(key, 0)],
            [_put(key, b), self._event_put("bucket-create", name)],
            [_range(key)],
        )
        if ok:
            return b
        kv = _kvs_of(resp, 0)
        if kv is not None and kv.doc().get("tenant") == tenant:
            raise RpcError("BucketAlreadyOwnedByYou", name)
        raise RpcError("BucketAlreadyExists", name)

    async def delete_bucket(self, name: str, bucket_id: str) -> None:
        key = self.k(f"buckets/{name}")
        _, kv = await self.client.get(key)
        if kv is None or kv.doc().get("id") != bucket_id:
            raise RpcError("NoSuchBucket", name)
        ok, _, _ = await self.client.txn(
            [_cmp_mod(key, kv.mod_revision)],
            [_delete(key), self._event_put("bucket-delete", name)],
        )
        if not ok:
            raise RpcError("NoSuchBucket", name)

    async def events(self) -> list[dict[str, Any]]:
        _, kvs = await self.client.range_prefix(self.events_prefix)
        return [kv.doc() for kv in kvs[-500:]]

    # -- the primary ----------------------------------------------------------------------------
    def start_primary(self) -> None:
        if self._primary_task is None:
            self._primary_task = asyncio.create_task(self.run_primary())

    async def run_primary(self) -> None:
        """Stand for election forever; while elected, keep the partition map assigned."""
        while True:
            try:
                await self._campaign_and_lead()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("primary candidate %s: %s", self.name, e)
                await asyncio.sleep(0.2)
            finally:
                self.is_primary = False

    async def _campaign_and_lead(self) -> None:
        cfg = await self.config()
        ttl = int(cfg["lease_ttl"])
        lease, _ = await self.client.lease_grant(ttl)
        deadline = [time.monotonic() + ttl - 0.4]
        lost = asyncio.Event()

        async def keepalive() -> None:
            while not lost.is_set():
                await asyncio.sleep(ttl / 6)
                t = time.monotonic()
                try:
                    left, _ = await self.client.lease_keepalive(lease, timeout=ttl / 3)
                    if left <= 0:
                        lost.set()
                        return
                    deadline[0] = max(deadline[0], t + ttl - 0.4)
                except RpcError:
                    if time.monotonic() > deadline[0]:
                        lost.set()
                        return

        ka = asyncio.create_task(keepalive())
        pkey = self.k("primary")
        self.informer.start()
        try:
            # campaign: create v/primary on our lease, or wait for it to vanish
            while not lost.is_set():
                ok, rev, _ = await self.client.txn(
                    [_cmp_create(pkey, 0)], [_put(pkey, {"name": self.name}, lease)]
                )
                if ok:
                    my_rev = rev
                    break
                since = self.informer.revision
                if pkey in self.informer.kvs or not self.informer.loaded:
                    await self.informer.wait_newer(since, 1.0)
            else:
                return
            self.is_primary = True
            log.info("%s is the primary (revision %d)", self.name, my_rev)
            await self._event("primary", self.name)
            while not lost.is_set() and time.monotonic() < deadline[0]:
                since = self.informer.revision
                if self.informer.loaded and self.informer.revision >= my_rev:
                    cur = self.informer.kvs.get(pkey)
                    if cur is None or cur.create_revision != my_rev:
                        log.warning("%s lost the primary key", self.name)
                        return
                    await self._assign_once(my_rev)
                await self.informer.wait_newer(since, 0.5)
            log.warning("%s stops being primary (lease lost)", self.name)
        finally:
            self.is_primary = False
            ka.cancel()
            with contextlib.suppress(BaseException):
                await ka
            with contextlib.suppress(Exception):
                await self.client.lease_revoke(lease)

    async def _assign_once(self, my_rev: int) -> bool:
        """Compute the assignment from the informer's copy and write it if it changed."""
        cfg = await self.config()
        n = int(cfg["partitions"])
        kvs = self.informer.kvs
        mapkv = kvs.get(self.k("map"))
        empty: dict[str, Any] = {"owners": [None] * n, "epochs": [0] * n, "incs": [None] * n}
        mp: dict[str, Any] = mapkv.doc() if mapkv else empty
        owners: list[str | None] = list(mp["owners"])
        epochs: list[int] = [int(e) for e in mp["epochs"]]
        incs: list[str | None] = list(mp.get("incs") or [None] * n)
        live: dict[str, dict[str, Any]] = {}
        for key, kv in kvs.items():
            if key.startswith(self.k("members/")):
                rec = kv.doc()
                live[rec["id"]] = rec
        state = CoordinatorState(n, float(cfg["lease_ttl"]))
        state.members = {
            mid: Member(
                id=mid,
                role=r["role"],
                address=r["address"],
                incarnation=r["incarnation"],
                lease_expiry=math.inf,
                state=r.get("state", "alive"),
                capacity=float(r.get("capacity", 1.0)),
                standby=bool(r.get("standby", False)),
                pid=int(r.get("pid", 0)),
            )
            for mid, r in live.items()
        }
        dead: set[str] = set()
        for p in range(n):
            o = owners[p]
            if o is not None and (o not in live or live[o]["incarnation"] != incs[p]):
                dead.add(o)
                owners[p] = None
                epochs[p] += 1
        state.partitions = [Partition(owner=owners[p], epoch=epochs[p]) for p in range(n)]
        state.rebalance(0.0)
        new_owners = [p.owner for p in state.partitions]
        new_epochs = [p.epoch for p in state.partitions]
        new_incs = [live[o]["incarnation"] if o is not None else None for o in new_owners]
        # The lock managers' membership: its epoch changes exactly when the set of live
        # servers does, and travels in the same document, so every agent agrees.  A new
        # member's agent ignores the epochs published before it (cohort.dlm.agent).
        old_dlm: dict[str, Any] = mp.get("dlm") or {"epoch": 0, "members": {}}
        dlm_members = {
            f"{r['id']}~{r['incarnation']}": r["address"]
            for r in live.values()
            if r["role"] == "server" and r.get("state", "alive") in ("alive", "draining")
        }
        dlm = old_dlm
        if dlm_members != old_dlm.get("members"):
            dlm = {"epoch": int(old_dlm.get("epoch", 0)) + 1, "members": dlm_members}
        if (
            mapkv is not None
            and new_owners == mp["owners"]
            and new_epochs == mp["epochs"]
            and dlm is old_dlm
        ):
            return False
        moved = sum(1 for p in range(n) if new_owners[p] != mp["owners"][p])
        doc = {"owners": new_owners, "epochs": new_epochs, "incs": new_incs, "dlm": dlm}
        ops = [_put(self.k("map"), doc)]
        for d in sorted(dead):
            ops.append(self._event_put("member-dead", f"{d} (lease expired or restarted)"))
        if moved:
            ops.append(self._event_put("rebalance", f"{moved} partitions assigned"))
        ok, _, _ = await self.client.txn(
            [
                _cmp_create(self.k("primary"), my_rev),
                _cmp_mod(self.k("map"), mapkv.mod_revision if mapkv else 0),
            ],
            ops,
        )
        if ok:
            self.primary_writes += 1
            if dead:
                log.info("primary: members gone %s; %d partitions reassigned", sorted(dead), moved)
        return ok

    async def close(self) -> None:
        if self._primary_task is not None:
            self._primary_task.cancel()
            # bounded: the primary's clean-up revokes its lease over HTTP, which can hang
            # on an etcd member that is restarting
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._primary_task, 5.0)
            self._primary_task = None
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(self.informer.close(), 5.0)
        await self.client.close()
