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

ROLES = ("server", "director", "coordinator")


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
        cfg = NodeConfig(
            node_id=node_id,
            address=_get(doc, "node", "address", str, "127.0.0.1"),
            roles=list(roles),
            coordinator=_get(doc, "cluster", "coordinator", str),
            storage_path=_get(doc, "storage", "path", str),
            storage_backend=_get(doc, "storage", "backend", str, "local"),
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
    if cfg.storage_backend != "local":
        raise ConfigError(
            f'{source}: [storage] backend {cfg.storage_backend!r} is not available; use "local"'
            " (a directory on a mount every machine shares)"
        )
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
