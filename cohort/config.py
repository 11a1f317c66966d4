"""Node configuration for real deployments: one TOML file per machine.

Example (``/etc/cohort/cohort.toml``)::

    [cluster]
    coordinator = "etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/prod"  # or "host:port"
    partitions = 256          # fixed when the cluster is created
    lease_ttl = 2             # seconds; whole seconds with etcd (>= 2)
    credentials = "/etc/cohort/credentials.json"   # {"access_key": ..., "secret_key": ...}
    key = "/etc/cohort/cluster.key"                # the cluster key (0600), same on every machine
    master_key = "/etc/cohort/master.key"          # encrypts tenant secrets, same everywhere

    [storage]
    backend = "local"         # a directory every machine mounts at the same path
    path = "/mnt/cohort"
    # or Ceph RADOS (a URL, or its parts):
    # backend = "rados"
    # pool = "cohort"; namespace = "prod"; conf = "/etc/ceph/ceph.conf"
    # keyring = "/etc/ceph/ceph.client.cohort.keyring"; id = "cohort"
    # or any S3 service that honours conditional writes:
    # backend = "s3"
    # bucket = "cohort"; prefix = "prod"; endpoint = "https://s3.example.com"
    # credentials = "/etc/cohort/s3.json"   # {"access_key": ..., "secret_key": ...}
    # or, for either:  url = "rados://cohort/prod?conf=/etc/ceph/ceph.conf"

    [node]
    id = "m1"                 # unique per machine
    address = "10.0.0.1"      # the address this machine binds and others reach it at
    roles = ["server", "director"]   # any of: server, director, coordinator

    [server]
    port = 7000
    capacity = 1.0
    tags = ["eu"]                    # optional labels for the directors' balancing rules
    upload_expiry_seconds = 604800   # abort multipart uploads older than this
    orphan_age_seconds = 3600        # delete blobs nothing references after this long

    [director]
    port = 9000
    domains = ["s3.example.com"]     # optional: virtual-hosted style (bucket.s3.example.com)
    balance = "weighted"             # reads with replicas: round-robin | weighted |
                                     # least-outstanding, or a table of rules:
    # balance = { policy = "rules", then = "weighted", rules = [{ hours = "08-18", tag = "eu" }] }

    [coordinator]             # the embedded coordinator (only without etcd), or with
    port = 7100               # etcd: a dedicated primary candidate (no port, no data)
    data_dir = "/var/lib/cohort/coordinator"

``cohort server|director|coordinator --config FILE`` start one role each.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

ROLES = ("server", "director", "coordinator")
BACKENDS = ("local", "rados", "s3")
# [storage] keys per backend, besides `backend` (and `url` for rados and s3); they become
# the URL's parts and options (cohort.storage.rados / cohort.storage.s3)
RADOS_KEYS = ("pool", "namespace", "conf", "keyring", "id", "mon_host", "stripe", "listing",
              "io", "op_timeout", "window")  # fmt: skip
S3_KEYS = ("bucket", "prefix", "endpoint", "region", "credentials", "addressing",
           "max_connections")  # fmt: skip


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or inconsistent (message says what to fix)."""


@dataclass
class NodeConfig:
    node_id: str
    address: str
    roles: list[str]
    coordinator: str
    storage_path: str
    credentials: str = ""
    cluster_key: str = "/etc/cohort/cluster.key"
    master_key: str = ""
    storage_backend: str = "local"
    storage_url: str = ""  # rados://... or s3://... (backend rados or s3)
    partitions: int = 256
    lease_ttl: float = 2.0
    server_port: int = 7000
    server_id: str = ""
    capacity: float = 1.0
    tags: list[str] = field(default_factory=list)
    standby: bool = False
    upload_expiry_seconds: float = 7 * 86400.0
    orphan_age_seconds: float = 3600.0
    director_port: int = 9000
    domains: list[str] = field(default_factory=list)
    director_id: str = ""
    balance: str = "round-robin"  # a policy name, or JSON for cohort.director.policy
    coordinator_port: int = 7100
    coordinator_data_dir: str = "/var/lib/cohort/coordinator"
    log_dir: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> str:
        """What every role gets as ``--storage``: the directory, or the store's URL."""
        return self.storage_path if self.storage_backend == "local" else self.storage_url

    @property
    def uses_etcd(self) -> bool:
        return self.coordinator.startswith("etcd")

    def coordinator_address(self) -> str:
        """The address every role connects to; etcd addresses carry partitions and lease TTL."""
        if not self.uses_etcd:
            return self.coordinator
        ttl = max(2, int(-(-self.lease_ttl // 1)))
        # an address may carry options already (TLS files, a user): add only what is missing
        base, _, query = self.coordinator.partition("?")
        opts = [o for o in query.split("&") if o]
        have = {o.split("=", 1)[0] for o in opts}
        for name, value in (("partitions", self.partitions), ("lease_ttl", ttl)):
            if name not in have:
                opts.append(f"{name}={value}")
        return f"{base}?{'&'.join(opts)}"

    def log_file(self, role_id: str) -> str | None:
        """``<log_dir>/<role_id>.log`` (the directory is created), or None: log to stderr."""
        if not self.log_dir:
            return None
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        return str(Path(self.log_dir) / f"{role_id}.log")


def _get(doc: dict[str, Any], section: str, key: str, kind: type, default: Any = None) -> Any:
    sec = doc.get(section, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"[{section}] must be a table")
    if key not in sec:
        if default is None:
            raise ConfigError(f"missing `{key}` in [{section}]")
        return default
    v = sec[key]
    if kind is float and isinstance(v, int):
        v = float(v)
    if not isinstance(v, kind):
        raise ConfigError(f"[{section}] {key} must be a {kind.__name__}, not {v!r}")
    return v


def _balance(value: Any) -> str:
    """``[director] balance``: a policy name or a table, checked now, passed on as text."""
    from cohort.director.policy import from_config

    if not isinstance(value, str | dict):
        raise ConfigError("[director] balance must be a policy name or a table")
    try:
        from_config(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"[director] balance: {e}") from None
    return value if isinstance(value, str) else json.dumps(value)


def _storage(doc: dict[str, Any]) -> tuple[str, str, str]:
    """``[storage]`` -> (backend, path, url): a local directory, or a rados:// / s3:// URL
    given whole (``url``) or by its parts (RADOS_KEYS, S3_KEYS)."""
    sec = doc.get("storage")
    if sec is None:
        raise ConfigError('missing [storage]: give path = DIR, or backend = "rados" / "s3"')
    if not isinstance(sec, dict):
        raise ConfigError("[storage] must be a table")
    url = sec.get("url", "")
    if not isinstance(url, str):
        raise ConfigError(f"[storage] url must be a str, not {url!r}")
    scheme = urlsplit(url).scheme if url else ""
    backend = sec.get("backend", scheme if scheme in ("rados", "s3") else "local")
    if backend not in BACKENDS:
        raise ConfigError(
            f"[storage] backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}"
        )
    if backend == "local":
        unknown = sorted(set(sec) - {"backend", "path"})
        if unknown:
            raise ConfigError(
                f'[storage] backend "local" takes only `path`, not {unknown}; for Ceph or '
                'S3 set backend = "rados" or "s3"'
            )
        return backend, _get(doc, "storage", "path", str), ""
    keys = RADOS_KEYS if backend == "rados" else S3_KEYS
    if "path" in sec:
        raise ConfigError(
            f'[storage] backend "{backend}" takes `url` or its parts ({", ".join(keys)}); '
            '`path` is only for backend "local"'
        )
    unknown = sorted(set(sec) - {"backend", "url", *keys})
    if unknown:
        hint = (
            "; put secrets in a file: credentials = FILE (s3) or keyring = FILE (rados)"
            if {"access_key", "secret_key", "key"} & set(unknown)
            else ""
        )
        raise ConfigError(
            f'[storage] backend "{backend}": unknown keys {unknown}; use url, or '
            f"{', '.join(keys)}{hint}"
        )
    parts = {k: sec[k] for k in keys if k in sec}
    if url:
        if scheme != backend:
            raise ConfigError(
                f'[storage] backend "{backend}" needs a {backend}:// url, not {url!r}'
            )
        if parts:
            raise ConfigError(
                f"[storage] give either url or its parts ({', '.join(sorted(parts))}), not both"
            )
        if not urlsplit(url).netloc:
            what = "pool" if backend == "rados" else "bucket"
            raise ConfigError(f"[storage] url {url!r} names no {what}")
        return backend, "", url
    for k, v in parts.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise ConfigError(f"[storage] {k} must be a string or a number, not {v!r}")
    opts = {k: str(v) for k, v in parts.items()}
    if backend == "rados":
        pool = opts.pop("pool", "")
        if not pool:
            raise ConfigError('[storage] backend "rados" needs `pool` (or a rados:// url)')
        ns = opts.pop("namespace", "")
        where = quote(pool, safe="") + ("/" + quote(ns, safe="") if ns else "")
        query = urlencode(opts, safe="/")
        return backend, "", f"rados://{where}" + (f"?{query}" if query else "")
    bucket = opts.pop("bucket", "")
    if not bucket:
        raise ConfigError('[storage] backend "s3" needs `bucket` (or an s3:// url)')
    prefix = opts.pop("prefix", "").strip("/")
    query = urlencode(opts, safe="/:")
    where = quote(bucket, safe="") + ("/" + quote(prefix, safe="/") if prefix else "")
    return backend, "", f"s3://{where}" + (f"?{query}" if query else "")


def parse_config(text: str, source: str = "<string>") -> NodeConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        roles = _get(doc, "node", "roles", list, ["server"])
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise ConfigError(f"[node] roles: unknown {bad}; choose from {list(ROLES)}")
        node_id = _get(doc, "node", "id", str)
        backend, storage_path, storage_url = _storage(doc)
        cfg = NodeConfig(
            node_id=node_id,
            address=_get(doc, "node", "address", str, "127.0.0.1"),
            roles=list(roles),
            coordinator=_get(doc, "cluster", "coordinator", str),
            storage_path=storage_path,
            storage_backend=backend,
            storage_url=storage_url,
            credentials=_get(doc, "cluster", "credentials", str, ""),
            cluster_key=_get(doc, "cluster", "key", str, "/etc/cohort/cluster.key"),
            master_key=_get(doc, "cluster", "master_key", str, ""),
            partitions=_get(doc, "cluster", "partitions", int, 256),
            lease_ttl=_get(doc, "cluster", "lease_ttl", float, 2.0),
            server_port=_get(doc, "server", "port", int, 7000),
            server_id=_get(doc, "server", "id", str, node_id),
            capacity=_get(doc, "server", "capacity", float, 1.0),
            tags=[str(t) for t in _get(doc, "server", "tags", list, [])],
            standby=bool(doc.get("server", {}).get("standby", False)),
            upload_expiry_seconds=_get(doc, "server", "upload_expiry_seconds", float, 7 * 86400.0),
            orphan_age_seconds=_get(doc, "server", "orphan_age_seconds", float, 3600.0),
            director_port=_get(doc, "director", "port", int, 9000),
            domains=[str(d) for d in doc.get("director", {}).get("domains", [])],
            director_id=_get(doc, "director", "id", str, f"director-{node_id}"),
            balance=_balance(doc.get("director", {}).get("balance", "round-robin")),
            coordinator_port=_get(doc, "coordinator", "port", int, 7100),
            coordinator_data_dir=_get(
                doc, "coordinator", "data_dir", str, "/var/lib/cohort/coordinator"
            ),
            log_dir=_get(doc, "node", "log_dir", str, ""),
            source=source,
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if cfg.partitions < 1:
        raise ConfigError(f"{source}: [cluster] partitions must be at least 1")
    if cfg.lease_ttl <= 0.5:
        raise ConfigError(f"{source}: [cluster] lease_ttl must be more than 0.5 s")
    return cfg


def load_config(path: str | Path) -> NodeConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the config file {p}: {e.strerror}") from None
    return parse_config(text, str(p))
