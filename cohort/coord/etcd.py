"""The etcd backend of the :class:`~cohort.coord.base.Coordinator` protocol.

Why etcd's JSON gateway over HTTP (aiohttp) rather than a gRPC client: the ``etcd3`` PyPI
client is unmaintained and does not import with protobuf 7; the gateway (``/v3/...``,
base64 keys and values, int64 as strings) is part of every etcd ≥ 3.4 (Debian's 3.4.23
serves ``/v3/`` and the deprecated ``/v3beta/``), needs no generated code, and aiohttp is
already a dependency.  Streaming watches work over it as newline-delimited JSON.

Keys (``<ns>`` is the cluster namespace from the address, default ``default``)::

    /cohort/<ns>/v/config          {cluster_id, partitions, lease_ttl, rules}   created once
    /cohort/<ns>/v/map             what the rules decided: {owners, epochs, incs, homes, dlm,
                                   members (state, standby), load}   written by the primary only
    /cohort/<ns>/v/members/<id>    member record, attached to the member's lease
    /cohort/<ns>/v/roster/<id>     the same record without a lease (remembers dead/left members)
    /cohort/<ns>/v/locks/<pppp>    {id, inc, epoch} attached to the holder's lease
    /cohort/<ns>/v/buckets/<name>  {name, id, created, tenant}
    /cohort/<ns>/v/primary         the elected primary's name, attached to its lease
    /cohort/<ns>/v/req/<rid>       an operator request (set_state), on a short lease
    /cohort/<ns>/s/state           the rule engine's state (CoordinatorState.snapshot), primary only
    /cohort/<ns>/x/load/<id>       a server's recent load reports, on its lease
    /cohort/<ns>/x/res/<rid>       the primary's answer to it, on the same lease
    /cohort/<ns>/e/<time>-<rand>   events (outside ``v/`` so they do not wake watchers)

One rule engine: this module stores :class:`~cohort.coord.state.CoordinatorState` and
elects the one process that steps it; it decides nothing itself.

* **Membership.** ``join`` grants an etcd lease of ``lease_ttl`` seconds (whole seconds,
  at least 2 with etcd's default election timeout) and writes the member key on it; a
  re-join under the same id revokes the previous incarnation's lease first (its
  partition locks vanish with it).  ``heartbeat`` is a lease keep-alive; once etcd has
  expired the lease it raises ``UnknownMember``.  A server counts its lease from when it
  *sent* the keep-alive that succeeded, so it self-fences before etcd can expire it.
  The leases are the safety mechanism and stay in etcd; the rules learn of them from
  the keys (:meth:`CoordinatorState.sync_members`).
* **The primary steps the rules.** One process at a time is the *primary* (seed 004): it
  wins the election by creating ``v/primary`` on its own lease.  It keeps a
  :class:`CoordinatorState` restored from ``s/state`` and, at every change it sees (and
  every ``STEP_PERIOD``), folds in what etcd shows -- member keys appearing (joins) and
  vanishing (a lease expired: the member is dead, its partitions get new epochs; or it
  left), ``set_state`` requests, load reports, buckets -- runs ``tick`` with its clock
  (assignment, standby take-over and failback windows, capacity schedules, load moves),
  and writes ``s/state``, ``v/map``, the answers and the events in one transaction
  guarded by ``create_revision(v/primary) == mine`` and the mod revisions of the
  documents it continues.  So two primaries never both write, and a primary never
  overwrites a state it has not seen.  Everyone else only watches.
* **The rules' settings** (failback policy, capacity schedule, load policy) come from
  the address (:func:`rules_from_options`) of the client that creates ``v/config``,
  and are kept there, so every primary applies the same ones.
* **Partition lock.** ``acquire_partition`` is a transaction that checks, at one
  revision, that the member is live with this incarnation, that the map names it (this
  incarnation) owner and that no other holder's lock key exists (a lock key lives on its
  holder's lease, so it exists only until the holder released it or its lease died); the
  token is the partition's epoch.
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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import msgspec

from cohort.coord.state import (
    Bucket,
    CapacityRule,
    Clock,
    CoordinatorError,
    CoordinatorState,
    IdFactory,
    LoadPolicy,
    bucket_taken,
    check_failback,
    random_id,
    system_clock,
)
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
        self.listeners: list[asyncio.Event] = []  # set on every change
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
        for ev in self.listeners:
            ev.set()
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
    """The view from a copy of ``v/``: members from their keys (live) and the roster (gone),
    with the states and standby flags the rules decided (``members`` in the map); the
    partitions, the lock managers' membership and the load-move count from the map."""
    cfg_kv = kvs.get(prefix + "config")
    cfg = cfg_kv.doc() if cfg_kv else {}
    n = int(cfg.get("partitions", 0))
    map_kv = kvs.get(prefix + "map")
    mp: dict[str, Any] = map_kv.doc() if map_kv else {"owners": [None] * n, "epochs": [0] * n}
    decided: dict[str, dict[str, Any]] = mp.get("members") or {}
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
        rec = live.get(mid)
        m = dict(rec if rec is not None else roster[mid])
        d = decided.get(mid)
        mine = d is not None and d.get("inc") == m.get("incarnation")
        if rec is not None:
            if mine:  # else: joined a moment ago, not yet folded into the rules
                assert d is not None
                m["state"], m["standby"] = d["state"], d["standby"]
        elif mine and d is not None and d["state"] in ("dead", "left"):
            m["state"] = d["state"]
        elif m.get("state") != "left":
            m["state"] = "dead"  # its lease is gone
        members.append(m)
    view: dict[str, Any] = {
        "version": revision,
        "cluster_id": cfg.get("cluster_id", ""),
        "lease_ttl": float(cfg.get("lease_ttl", DEFAULT_LEASE_TTL)),
        "members": members,
        "partitions": [[mp["owners"][p], mp["epochs"][p], holders[p]] for p in range(n)],
        "buckets": sorted(buckets, key=lambda b: b["name"]),
    }
    if mp.get("dlm"):  # the lock managers' membership, published by the primary
        view["membership_epoch"] = mp["dlm"]["epoch"]
        view["dlm_members"] = mp["dlm"]["members"]
    if "load" in mp:
        view["load"] = mp["load"]
    return view


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


# -- the rules' settings, from the address into v/config ------------------------------------------
_LOAD_OPTIONS: tuple[tuple[str, Callable[[str], Any]], ...] = (
    ("threshold", float),
    ("ticks", int),
    ("period", float),
    ("max_moves", int),
    ("cooldown", float),
    ("min_rate", float),
    ("stale", float),
    ("smoothing", float),
)


def rules_from_options(opts: dict[str, str]) -> dict[str, Any]:
    """The settings of the rules an address may carry: ``failback`` (immediate, never,
    HH-HH), ``capacity_schedule`` (comma-separated ``PATTERN@HH-HH=CAPACITY``),
    ``load_balance=0`` and ``load_<field>`` of :class:`LoadPolicy`.  They are recorded in
    ``v/config`` by whichever client creates it, so every primary applies the same rules."""
    rules: dict[str, Any] = {}
    if opts.get("failback"):
        check_failback(opts["failback"])
        rules["failback"] = opts["failback"]
    sched = [r.strip() for r in opts.get("capacity_schedule", "").split(",") if r.strip()]
    for r in sched:
        CapacityRule.parse(r)
    if sched:
        rules["capacity_schedule"] = sched
    load: dict[str, Any] = {}
    if "load_balance" in opts:
        load["enabled"] = opts["load_balance"].lower() not in _FALSE
    for name, conv in _LOAD_OPTIONS:
        if f"load_{name}" in opts:
            load[name] = conv(opts[f"load_{name}"])
    if load:
        rules["load"] = load
    return rules


# -- load reports: a server's heartbeats carry them, a key on its lease delivers them -------------
LOAD_FLUSH = 1.0  # seconds between a server's load writes
LOAD_QUIET = 10  # empty reports still written promptly once load stops (the rates decay to ~0)
LOAD_IDLE_REFRESH = 5.0  # an idle server writes this often (within LoadPolicy.stale)
LOAD_KEEP = 50  # reports kept per write at most


@dataclass
class _LoadOut:
    incarnation: str
    lease: int
    reports: list[Any] = field(default_factory=list)
    flushed_at: float = -1e18
    quiet: int = 0  # empty reports written since the last one with load
    task: asyncio.Task[None] | None = None


REQUEST_TTL = 15  # seconds an unanswered operator request lives
STEP_PERIOD = 0.25  # the primary steps the rules at least this often (windows, schedules)
COMPACT_PERIOD = 300.0  # the primary compacts etcd's history to what it was this long ago
MAX_TXN_OPS = 120  # etcd's --max-txn-ops is 128 by default


# -- the coordinator ---------------------------------------------------------------------------------
class EtcdCoordinator:
    """A :class:`~cohort.coord.base.Coordinator` whose state lives in etcd.

    ``campaign``: whether this process stands for election as the primary (which steps
    the rules).  By default a process stands once it joins as a server, so a cluster of
    servers needs no extra process; ``cohort coordinator`` with an etcd address runs a
    dedicated candidate (:meth:`run_primary`).  ``clock`` (wall time) and ``new_id`` are
    injected into the rule engine when this process is the primary.
    """

    def __init__(
        self,
        address: str,
        *,
        campaign: bool | None = None,
        partitions: int | None = None,
        lease_ttl: int | None = None,
        name: str | None = None,
        clock: Clock = system_clock,
        new_id: IdFactory = random_id,
    ) -> None:
        endpoints, ns, opts = parse_address(address)
        self.address = address
        self.namespace = ns
        self.client = EtcdClient(endpoints, credentials=EtcdCredentials.from_options(opts))
        self.prefix = f"/cohort/{ns}/v/"
        self.events_prefix = f"/cohort/{ns}/e/"
        self.xprefix = f"/cohort/{ns}/x/"
        self.state_key = f"/cohort/{ns}/s/state"
        self.partitions = int(partitions or opts.get("partitions") or DEFAULT_PARTITIONS)
        self.lease_ttl = math.ceil(float(lease_ttl or opts.get("lease_ttl") or DEFAULT_LEASE_TTL))
        self.rules_options = rules_from_options(opts)
        self.campaign = campaign if campaign is not None else opts.get("campaign", "1") != "0"
        self.name = name or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.clock = clock
        self.new_id = new_id
        self.informer = Informer(self.client, self.prefix)
        self._config: dict[str, Any] | None = None
        self._leases: dict[tuple[str, str], int] = {}
        self._load_out: dict[str, _LoadOut] = {}
        self._primary_task: asyncio.Task[None] | None = None
        self.is_primary = False
        self.primary_writes = 0
        # the primary's side: the rule engine and what it has taken in and written
        self.x_informer = Informer(self.client, self.xprefix)
        self._wake = asyncio.Event()
        self.informer.listeners.append(self._wake)
        self.x_informer.listeners.append(self._wake)
        self.rules: CoordinatorState | None = None
        self._loaded_at = 0  # the revision of the documents the rules were loaded from
        self._state_rev = 0  # mod_revision of the state document the rules continue
        self._map_rev = 0  # ... and of the map
        self._written_version = -1  # rules.version last written
        self._events_sent = 0  # rules.event_seq last written
        self._answered: dict[str, int] = {}  # request key -> mod_revision answered
        self._load_seen: dict[str, int] = {}  # load key -> mod_revision taken in
        self._compact_rev = 0
        self._compact_next = 0.0

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
                "rules": self.rules_options,
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

    def _event_put(self, kind: str, detail: str, at: float | None = None) -> dict[str, Any]:
        t = time.time() if at is None else at
        key = f"{self.events_prefix}{int(t * 1e6):020d}-{random.getrandbits(32):08x}"
        return _put(key, {"time": t, "kind": kind, "detail": detail})

    # -- membership -----------------------------------------------------------------------
    async def join(self, member: dict[str, Any]) -> dict[str, Any]:
        """Write the member's record on a new lease; the primary folds the join into the
        rules (new epochs, assignment) when it sees the key."""
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
        await self.client.txn([], [_put(key, rec, lease), _put(self.k(f"roster/{mid}"), rec)])
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
        """Keep the member's lease alive.  ``load`` (per-partition rates) is passed on to
        the primary's rules: written with the reports since the last write, at most once
        a second, to ``x/load/<id>`` on the member's lease, in the background."""
        lease = await self._lease_of(member_id, incarnation)
        ttl, rev = await self.client.lease_keepalive(lease, timeout=1.0)
        if ttl <= 0:
            self._leases.pop((member_id, incarnation), None)
            raise RpcError("UnknownMember", f"{member_id} is not a live member; re-join")
        if load is not None:
            self._queue_load(member_id, incarnation, lease, load)
        return {"version": rev}

    def _queue_load(self, member_id: str, incarnation: str, lease: int, load: Any) -> None:
        out = self._load_out.get(member_id)
        if out is None or out.incarnation != incarnation:
            out = self._load_out[member_id] = _LoadOut(incarnation, lease)
        out.reports.append(load)
        del out.reports[:-LOAD_KEEP]
        now = time.monotonic()
        if (out.task is not None and not out.task.done()) or now - out.flushed_at < LOAD_FLUSH:
            return
        busy = any(out.reports)
        if not busy and out.quiet >= LOAD_QUIET and now - out.flushed_at < LOAD_IDLE_REFRESH:
            return  # idle, and the primary knows it: refresh now and then only
        reports, out.reports = out.reports, []
        trailing = next((i for i, r in enumerate(reversed(reports)) if r), len(reports))
        out.quiet = trailing if busy else out.quiet + len(reports)
        out.flushed_at = now
        doc = {"inc": incarnation, "reports": reports}
        put = _put(self.xprefix + f"load/{member_id}", doc, lease)["request_put"]
        out.task = asyncio.create_task(self._put_quietly(put))

    async def _put_quietly(self, put: dict[str, Any]) -> None:
        with contextlib.suppress(RpcError):
            await self.client.call("/kv/put", put, timeout=1.0)

    async def leave(self, member_id: str, incarnation: str) -> None:
        kv = await self._member(member_id)
        if kv is None or kv.doc().get("incarnation") != incarnation:
            return
        rec = kv.doc()
        rec["state"] = "left"
        await self.client.txn(
            [_cmp_mod(kv.key, kv.mod_revision)], [_put(self.k(f"roster/{member_id}"), rec)]
        )
        await self.client.lease_revoke(kv.lease)
        self._leases.pop((member_id, incarnation), None)

    async def set_state(
        self, member_id: str, state: str, *, timeout: float = 10.0
    ) -> dict[str, Any]:
        """Operator action (``draining``, ``alive``, ``standby``, ``active``): a request key
        that the primary answers after applying it to the rules (in the same transaction
        as the map it produces).  ``Timeout`` if no primary answers within ``timeout``."""
        rid = uuid.uuid4().hex
        lease, _ = await self.client.lease_grant(max(REQUEST_TTL, math.ceil(timeout) + 5))
        res_key = self.xprefix + f"res/{rid}"
        try:
            req = {"op": "set_state", "id": member_id, "state": state}
            await self.client.txn([], [_put(self.k(f"req/{rid}"), req, lease)])
            deadline = time.monotonic() + timeout
            while True:
                _, kv = await self.client.get(res_key)
                if kv is not None:
                    res = kv.doc()
                    break
                if time.monotonic() > deadline:
                    raise RpcTimeout(f"set_state {member_id} {state}: no primary answered")
                await asyncio.sleep(0.02)
        finally:
            with contextlib.suppress(RpcError):
                await self.client.lease_revoke(lease)
        if not res.get("ok"):
            raise RpcError(str(res.get("code")), str(res.get("message", "")))
        member: dict[str, Any] = res["member"]
        return member

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
        """A transaction that checks, at one revision, that this incarnation is live, that
        the map names it (this incarnation) owner and that no other holder's lock key
        exists, then writes the lock key on the member's lease; the token is the epoch."""
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
            inc = (mp.get("incs") or [None] * (partition + 1))[partition]
            if inc is not None and inc != incarnation:
                # the map still names the previous incarnation (its epoch): wait for the
                # primary to fold in the re-join, which gives the partition a new epoch
                raise RpcError("NotOwner", f"partition {partition} is assigned to {owner}~{inc}")
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
        """Created by a transaction on the bucket's key (so a name is taken exactly once);
        the rules' bucket-name rule decides the error; the primary mirrors the keys."""
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
        e = bucket_taken(kv.doc() if kv is not None else {}, name, tenant)
        raise RpcError(e.code, e.message)

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

    # -- the primary: election ------------------------------------------------------------------
    def start_primary(self) -> None:
        if self._primary_task is None:
            self._primary_task = asyncio.create_task(self.run_primary())

    async def run_primary(self) -> None:
        """Stand for election forever; while elected, step the rules."""
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
                self.rules = None

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
        self.x_informer.start()
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
            self.rules = None
            log.info("%s is the primary (revision %d)", self.name, my_rev)
            await self._event("primary", self.name)
            while not lost.is_set() and time.monotonic() < deadline[0]:
                self._wake.clear()
                if self.informer.loaded and self.informer.revision >= my_rev:
                    cur = self.informer.kvs.get(pkey)
                    if cur is None or cur.create_revision != my_rev:
                        log.warning("%s lost the primary key", self.name)
                        return
                    await self._step(my_rev)
                    await self._maybe_compact()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), STEP_PERIOD)
            log.warning("%s stops being primary (lease lost)", self.name)
        finally:
            self.is_primary = False
            self.rules = None
            ka.cancel()
            with contextlib.suppress(BaseException):
                await ka
            with contextlib.suppress(Exception):
                await self.client.lease_revoke(lease)

    async def _maybe_compact(self) -> None:
        """Every COMPACT_PERIOD, drop etcd's history older than the previous period (load
        reports and map writes would otherwise grow it without bound)."""
        now = time.monotonic()
        if now < self._compact_next:
            return
        target, self._compact_rev = self._compact_rev, self.informer.revision
        self._compact_next = now + COMPACT_PERIOD
        if target > 0:
            try:
                await self.client.call("/kv/compaction", {"revision": str(target)})
            except RpcError as e:
                log.debug("compaction to %d: %s", target, e)

    # -- the primary: stepping the rules --------------------------------------------------------
    def _engine(self, cfg: dict[str, Any], snap: dict[str, Any] | None) -> CoordinatorState:
        rules: dict[str, Any] = cfg.get("rules") or {}
        failback = str(rules.get("failback", "immediate"))
        ttl = float(cfg["lease_ttl"])
        if snap is None:
            s = CoordinatorState(
                int(cfg["partitions"]), ttl, failback, clock=self.clock, new_id=self.new_id
            )
            s.cluster_id = str(cfg["cluster_id"])
        else:
            s = CoordinatorState.restore(snap, ttl, failback, clock=self.clock, new_id=self.new_id)
            # etcd holds exactly what was published: continue its numbers, skip none
            s.version = int(snap["version"])
            s.membership_epoch = int(snap["membership_epoch"])
            s.load_moves = int(snap.get("load_moves", 0))
        s.load_policy = LoadPolicy(**(rules.get("load") or {}))
        s.capacity_schedule = [CapacityRule.parse(r) for r in rules.get("capacity_schedule", [])]
        return s

    async def _load_rules(self, cfg: dict[str, Any]) -> CoordinatorState:
        """The rule engine as etcd holds it: the state document, or (a cluster whose map
        was written before the rules ran on etcd) one adopted from the map."""
        _, _, resp = await self.client.txn([], [_range(self.state_key), _range(self.k("map"))])
        skv, mkv = _kvs_of(resp, 0), _kvs_of(resp, 1)
        self._state_rev = skv.mod_revision if skv else 0
        self._map_rev = mkv.mod_revision if mkv else 0
        # both are written in one transaction, the map under v/: once the informer has
        # seen it, what it shows is at least as new as what the state document reflects
        self._loaded_at = max(self._state_rev, self._map_rev)
        self._answered, self._load_seen = {}, {}
        s = self._engine(cfg, skv.doc() if skv else None)
        self._written_version = s.version if skv else -1
        self._events_sent = s.event_seq
        if skv is None and mkv is not None:
            mp = mkv.doc()
            dlm = mp.get("dlm") or {}
            s.adopt(
                time.monotonic(),
                mp["owners"],
                mp["epochs"],
                mp.get("incs"),
                self._live_records(self.informer.kvs),
                int(dlm.get("epoch", 0)),
                dlm.get("members") or {},
            )
        return s

    def _live_records(self, kvs: dict[str, KV]) -> list[dict[str, Any]]:
        """The records of the members whose lease exists, in the order they joined."""
        pre = self.k("members/")
        kvl = sorted((kv for key, kv in kvs.items() if key.startswith(pre)), key=_by_creation)
        out = []
        for kv in kvl:
            with contextlib.suppress(ValueError, KeyError):
                rec = kv.doc()
                if {"id", "role", "address", "incarnation"} <= set(rec):
                    out.append(rec)
        return out

    async def _step(self, my_rev: int) -> bool:
        """One step of the rules as the primary: fold in what etcd shows (member keys
        appearing and vanishing, operator requests, load reports, buckets), tick, and write
        the result if it changed.  True if a write landed."""
        cfg = await self.config()
        if self.rules is None:
            self.rules = await self._load_rules(cfg)
        if self.informer.revision < self._loaded_at:
            return False  # observe only what is at least as new as the state document
        s = self.rules
        now = time.monotonic()
        kvs = self.informer.kvs
        left = {}
        for key, kv in kvs.items():
            if key.startswith(self.k("roster/")):
                with contextlib.suppress(ValueError, KeyError):
                    r = kv.doc()
                    if r.get("state") == "left":
                        left[r["id"]] = r["incarnation"]
        s.sync_members(now, self._live_records(kvs), left)
        self._mirror_buckets(s, kvs)
        answers = self._answer_requests(s, now)
        self._take_load(s, now)
        s.tick(now)
        if s.version == self._written_version and not answers:
            return False
        try:
            ok = await self._write(s, my_rev, answers)
        except BaseException:
            self.rules = None  # unknown outcome: start again from what etcd holds
            raise
        if not ok:
            self.rules = None  # someone else wrote: start again from what etcd holds
        return ok

    def _mirror_buckets(self, s: CoordinatorState, kvs: dict[str, KV]) -> None:
        pre = self.k("buckets/")
        want: dict[str, Bucket] = {}
        for key, kv in kvs.items():
            if key.startswith(pre):
                with contextlib.suppress(ValueError, msgspec.ValidationError):
                    b = msgspec.convert(kv.doc(), Bucket)
                    want[b.name] = b
        if want != s.buckets:
            s.buckets = want  # the keys are the record (soft here: no version, no write)

    def _answer_requests(
        self, s: CoordinatorState, now: float
    ) -> list[tuple[str, KV, dict[str, Any]]]:
        """Apply the operator requests not yet answered.  They live under ``v/``, so the
        informer delivers them in order with the member keys: a request made after a
        join is never judged by a copy that lacks the member."""
        answers: list[tuple[str, KV, dict[str, Any]]] = []
        vk = self.informer.kvs
        self._answered = {k: r for k, r in self._answered.items() if k in vk}
        pre = self.k("req/")
        reqs = [(key, kv) for key, kv in vk.items() if key.startswith(pre)]
        for key, kv in sorted(reqs, key=lambda i: _by_creation(i[1])):
            if not key.startswith(pre) or self._answered.get(key) == kv.mod_revision:
                continue
            try:
                req = kv.doc()
                if req.get("op") != "set_state":
                    raise CoordinatorError("InvalidRequest", f"unknown request {req.get('op')!r}")
                m = s.set_state(now, str(req["id"]), str(req["state"]))
                res: dict[str, Any] = {"ok": True, "member": msgspec.to_builtins(m)}
            except CoordinatorError as e:
                res = {"ok": False, "code": e.code, "message": e.message}
            except (ValueError, KeyError) as e:
                res = {"ok": False, "code": "InvalidRequest", "message": str(e)}
            answers.append((key, kv, res))
            if len(answers) >= 20:
                break
        return answers

    def _take_load(self, s: CoordinatorState, now: float) -> None:
        """Feed every load record not yet taken in to the rules (each report once)."""
        if not self.x_informer.loaded:
            return
        pre = self.xprefix + "load/"
        for key, kv in self.x_informer.kvs.items():
            if not key.startswith(pre) or self._load_seen.get(key) == kv.mod_revision:
                continue
            self._load_seen[key] = kv.mod_revision
            mid = key[len(pre) :]
            m = s.members.get(mid)
            with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                doc = kv.doc()
                if m is None or m.incarnation != doc.get("inc"):
                    continue
                if m.role != "server" or m.state not in ("alive", "draining"):
                    continue
                for rows in doc.get("reports") or []:
                    s.report_load(now, mid, rows)

    def _map_doc(self, s: CoordinatorState) -> dict[str, Any]:
        """What the rules decided, published to everyone (v/map)."""
        parts = s.partitions
        return {
            "owners": [p.owner for p in parts],
            "epochs": [p.epoch for p in parts],
            "incs": [
                s.members[p.owner].incarnation if p.owner in s.members else None for p in parts
            ],
            "homes": [p.home for p in parts],
            "dlm": {"epoch": s.membership_epoch, "members": s.dlm_members()},
            "members": {
                m.id: {"inc": m.incarnation, "state": m.state, "standby": m.standby}
                for m in s.members.values()
            },
            "load": {"moves": s.load_moves},
        }

    async def _write(
        self, s: CoordinatorState, my_rev: int, answers: list[tuple[str, KV, dict[str, Any]]]
    ) -> bool:
        """One transaction, guarded by our primary key and the documents we continue: the
        state document, the map, the answers to the requests taken in (each guarded: a
        request whose lease ran out is not answered), and the new events."""
        snap = s.snapshot()
        snap["events"], snap["buckets"] = [], []  # events go to e/, buckets are their keys
        snap["load_moves"] = s.load_moves
        cmps = [
            _cmp_create(self.k("primary"), my_rev),
            _cmp_mod(self.state_key, self._state_rev),
            _cmp_mod(self.k("map"), self._map_rev),
        ]
        ops = [_put(self.state_key, snap), _put(self.k("map"), self._map_doc(s))]
        for key, kv, res in answers:
            cmps.append(_cmp_mod(key, kv.mod_revision))
            ops += [
                _delete(key),
                _put(self.xprefix + "res/" + key.rsplit("/", 1)[1], res, kv.lease),
            ]
        events = s.events_since(self._events_sent)
        room = MAX_TXN_OPS - len(ops)
        if len(events) > room:
            log.info("primary: %d events not recorded (too many at once)", len(events) - room)
            events = events[len(events) - room :]
        ops += [self._event_put(e.kind, e.detail, e.time) for e in events]
        ok, rev, _ = await self.client.txn(cmps, ops)
        if ok:
            self.primary_writes += 1
            self._state_rev = self._map_rev = rev
            self._written_version = s.version
            self._events_sent = s.event_seq
            for key, kv, _res in answers:
                self._answered[key] = kv.mod_revision
            for e in events:
                if e.kind in ("member-dead", "member-left", "rebalance", "load-rebalance"):
                    log.info("primary: %s %s", e.kind, e.detail)
        return ok

    async def close(self) -> None:
        if self._primary_task is not None:
            self._primary_task.cancel()
            # bounded: the primary's clean-up revokes its lease over HTTP, which can hang
            # on an etcd member that is restarting
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._primary_task, 5.0)
            self._primary_task = None
        for out in self._load_out.values():
            if out.task is not None:
                out.task.cancel()
        for inf in (self.informer, self.x_informer):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(inf.close(), 5.0)
        await self.client.close()


def _by_creation(kv: KV) -> int:
    return kv.create_revision
