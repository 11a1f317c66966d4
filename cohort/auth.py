"""Peer authentication for every internal TCP surface (server RPC, coordinator RPC, DLM).

Every connection starts with a mutual, keyed challenge-response before a single request
frame is read (see docs/security.md for the threat model and why this rather than TLS)::

    server -> client   HELLO   ["cohort-rpc/1", server_nonce]
    client -> server   PROVE   [kind, name, client_nonce, mac_c]
    server -> client   ACCEPT  [mac_s]                      (or the connection is closed)

    mac_c = HMAC-SHA256(key, "cohort-rpc/1|c|" + server_nonce + client_nonce + kind|name)
    mac_s = HMAC-SHA256(key, "cohort-rpc/1|s|" + server_nonce + client_nonce + kind|name)

Two kinds of peer prove themselves:

* ``member``: a process of the cluster (server, director, coordinator, admin CLI).  Its
  key is derived from the *cluster key*, 32 random bytes made once at cluster creation
  (``<data-dir>/cluster.key``, mode 0600) and handed to every machine of the cluster.
* ``tenant``: an application taking DLM locks with a tenant's access key.  Its key is
  derived from the access key's secret (the same secret SigV4 signs with), so a lock
  session is as authenticated as an S3 request; the server looks the secret up in the
  tenant registry, and a revoked key stops working for new connections at once.

Both sides prove knowledge of the key, and fresh nonces on both sides make a recorded
handshake useless.  The pure functions here (:func:`hello`, :func:`prove`,
:func:`check_proof`, :func:`accept`, :func:`check_accept`) do no I/O; :mod:`cohort.rpc`
drives them over its frames.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTOCOL = "cohort-rpc/1"
NONCE_BYTES = 16
KEY_BYTES = 32
MEMBER = "member"
TENANT = "tenant"
# the longest handshake frame we accept before the peer is authenticated: an outsider
# must not make us allocate a 256 MiB frame buffer
MAX_HANDSHAKE_FRAME = 1024


class AuthError(Exception):
    """The peer did not prove the credential (the message says what to check)."""


@dataclass(frozen=True)
class Principal:
    """Who is on the other end of an authenticated connection.

    ``kind`` is ``"member"`` or ``"tenant"``; ``name`` is the member id a member claims,
    or the tenant a tenant's access key belongs to; ``access_key`` is the key used.
    """

    kind: str
    name: str
    access_key: str = ""

    @property
    def is_member(self) -> bool:
        return self.kind == MEMBER


@dataclass(frozen=True)
class Credential:
    """What a client proves: its kind, the name it claims, and the derived key."""

    kind: str
    name: str
    key: bytes

    def __repr__(self) -> str:  # never print a key
        return f"Credential({self.kind!r}, {self.name!r})"


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return hmac.new(secret, purpose, hashlib.sha256).digest()


class ClusterKey:
    """The cluster credential: 32 random bytes every member holds.

    Load it with :meth:`load` at a process's entry point and pass it down; nothing else
    reads the file.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < KEY_BYTES:
            raise AuthError(f"a cluster key has at least {KEY_BYTES} bytes, not {len(secret)}")
        self._member_key = _derive(secret, b"cohort member rpc v1")
        self.fingerprint = hashlib.sha256(b"fingerprint" + secret).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"ClusterKey(fingerprint={self.fingerprint})"

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    @staticmethod
    def create_file(path: str | os.PathLike[str]) -> None:
        """Write a new key to ``path`` (mode 0600) unless one is there already."""
        p = Path(path)
        if p.exists():
            return
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClusterKey:
        """Read the key file made by ``cohort up`` (or :meth:`create_file`).

        Refuses a file that others may read: a readable cluster key is a cluster anyone
        on the machine can take over.
        """
        p = Path(path)
        try:
            st = p.stat()
            text = p.read_text().strip()
        except FileNotFoundError:
            raise AuthError(
                f"no cluster key at {p}: copy the cluster's cluster.key to this machine "
                "(mode 0600), see docs/security.md"
            ) from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuthError(f"cluster key {p} is readable by others: chmod 600 {p}")
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            raise AuthError(f"cluster key {p} is not hex") from None
        return cls(secret)

    def member(self, name: str) -> Credential:
        """The credential a member process named ``name`` proves itself with."""
        return Credential(MEMBER, name, self._member_key)

    def member_key(self) -> bytes:
        return self._member_key


def tenant_credential(access_key: str, secret_key: str) -> Credential:
    """The credential of an application using a tenant's access key (DLM sessions)."""
    return Credential(TENANT, access_key, tenant_key(secret_key))


def tenant_key(secret_key: str) -> bytes:
    return _derive(secret_key.encode(), b"cohort tenant rpc v1")


# access key -> (secret, tenant) of an active key, or None (cohort.tenants.KeyCache.lookup)
TenantLookup = Callable[[str], "tuple[str, str] | None"]


class Verifier:
    """The server side's knowledge: the cluster key and, optionally, tenants' keys."""

    def __init__(self, cluster_key: ClusterKey, tenants: TenantLookup | None = None) -> None:
        self.cluster_key = cluster_key
        self.tenants = tenants

    def key_for(self, kind: str, name: str) -> tuple[bytes, Principal] | None:
        if kind == MEMBER:
            return self.cluster_key.member_key(), Principal(MEMBER, name)
        if kind == TENANT and self.tenants is not None:
            found = None
            with contextlib.suppress(Exception):
                found = self.tenants(name)
            if found is None:
                return None
            secret, tenant = found
            return tenant_key(secret), Principal(TENANT, tenant, access_key=name)
        return None


def _mac(key: bytes, side: bytes, sn: bytes, cn: bytes, kind: str, name: str) -> bytes:
    msg = b"|".join([PROTOCOL.encode(), side, sn, cn, kind.encode(), name.encode()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def hello() -> tuple[list[Any], bytes]:
    """The server's first frame and its nonce."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return [PROTOCOL, nonce], nonce


def prove(credential: Credential, hello_frame: Any) -> tuple[list[Any], bytes, bytes]:
    """The client's answer to HELLO: ``(frame, server_nonce, client_nonce)``."""
    if (
        not isinstance(hello_frame, list)
        or len(hello_frame) != 2
        or hello_frame[0] != PROTOCOL
        or not isinstance(hello_frame[1], bytes)
        or len(hello_frame[1]) != NONCE_BYTES
    ):
        raise AuthError("the peer does not speak cohort-rpc/1 (is this a Cohort port?)")
    sn = hello_frame[1]
    cn = secrets.token_bytes(NONCE_BYTES)
    mac = _mac(credential.key, b"c", sn, cn, credential.kind, credential.name)
    return [credential.kind, credential.name, cn, mac], sn, cn


def check_proof(verifier: Verifier, server_nonce: bytes, frame: Any) -> tuple[Principal, list[Any]]:
    """Verify PROVE; returns the peer and the ACCEPT frame, or raises :class:`AuthError`."""
    if (
        not isinstance(frame, list)
        or len(frame) != 4
        or not isinstance(frame[0], str)
        or not isinstance(frame[1], str)
        or not isinstance(frame[2], bytes)
        or not isinstance(frame[3], bytes)
        or len(frame[2]) != NONCE_BYTES
        or len(frame[1]) > 200
    ):
        raise AuthError("malformed handshake")
    kind, name, cn, mac = frame
    found = verifier.key_for(kind, name)
    if found is None:
        # compute a MAC anyway so that an unknown key costs what a wrong one does
        _mac(b"\0" * 32, b"c", server_nonce, cn, kind, name)
        raise AuthError(f"unknown {kind} {name!r}")
    key, principal = found
    if not hmac.compare_digest(mac, _mac(key, b"c", server_nonce, cn, kind, name)):
        raise AuthError(f"wrong credential for {kind} {name!r}")
    return principal, [_mac(key, b"s", server_nonce, cn, kind, name)]


def check_accept(
    credential: Credential, server_nonce: bytes, client_nonce: bytes, frame: Any
) -> None:
    """Verify ACCEPT: the server knows the key too (we are not talking to an impostor)."""
    want = _mac(credential.key, b"s", server_nonce, client_nonce, credential.kind, credential.name)
    if (
        not isinstance(frame, list)
        or len(frame) != 1
        or not isinstance(frame[0], bytes)
        or not hmac.compare_digest(frame[0], want)
    ):
        raise AuthError("the peer could not prove the cluster credential (an impostor?)")
