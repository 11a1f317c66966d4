"""``[storage]`` in a node config: a directory, or RADOS / S3 by URL or by parts; what the
role commands pass on as ``--storage``."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from cohort.config import ConfigError, parse_config
from cohort.storage.s3 import S3Store

BASE = """
[cluster]
coordinator = "10.0.0.9:7100"

[node]
id = "m1"
"""


def cfg(storage: str) -> Any:
    return parse_config(BASE + "\n[storage]\n" + storage)


def test_local_is_the_default() -> None:
    c = cfg('path = "/mnt/cohort"')
    assert (c.storage_backend, c.storage, c.storage_path) == ("local", "/mnt/cohort", "/mnt/cohort")
    assert cfg('backend = "local"\npath = "/mnt/x"').storage == "/mnt/x"


def test_rados_by_url_or_by_parts() -> None:
    url = "rados://cohort/prod?conf=/etc/ceph/ceph.conf&id=cohort"
    c = cfg(f'backend = "rados"\nurl = "{url}"')
    assert (c.storage_backend, c.storage, c.storage_path) == ("rados", url, "")
    assert cfg(f'url = "{url}"').storage_backend == "rados"  # the scheme says which
    c = cfg(
        'backend = "rados"\npool = "cohort"\nnamespace = "prod"\n'
        'conf = "/etc/ceph/ceph.conf"\nkeyring = "/etc/ceph/k"\nid = "cohort"\nstripe = 1048576'
    )
    assert c.storage == (
        "rados://cohort/prod?conf=/etc/ceph/ceph.conf&keyring=/etc/ceph/k&id=cohort&stripe=1048576"
    )
    assert cfg('backend = "rados"\npool = "p"').storage == "rados://p"
    u = urlsplit(cfg('backend = "rados"\npool = "a b"\nnamespace = "n/s"').storage)
    assert (unquote(u.netloc), unquote(u.path.lstrip("/"))) == ("a b", "n/s")  # as from_url reads


def test_s3_by_url_or_by_parts(tmp_path: Path) -> None:
    creds = tmp_path / "s3.json"
    creds.write_text('{"access_key": "AK", "secret_key": "SK"}')
    c = cfg(
        f'backend = "s3"\nbucket = "data"\nprefix = "/cohort/prod/"\n'
        f'endpoint = "http://127.0.0.1:7480"\nregion = "eu-west-1"\ncredentials = "{creds}"'
    )
    assert c.storage_backend == "s3" and c.storage_path == ""
    assert c.storage.startswith("s3://data/cohort/prod?endpoint=http://127.0.0.1:7480&")
    s = S3Store.from_url(c.storage)
    assert (s.bucket, s.prefix, s.endpoint, s.region) == (
        "data", "cohort/prod/", "http://127.0.0.1:7480", "eu-west-1"
    )  # fmt: skip
    assert (s._access_key, s._secret_key) == ("AK", "SK")
    url = "s3://b/p?endpoint=https://s3.example.com"
    assert cfg(f'url = "{url}"').storage == url


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ('backend = "nfs"\npath = "/x"', "backend 'nfs' is unknown"),
        ('backend = "s3"\npath = "/x"', '`path` is only for backend "local"'),
        ('backend = "rados"\nnamespace = "x"', 'backend "rados" needs `pool`'),
        ('backend = "s3"\nendpoint = "http://h"', 'backend "s3" needs `bucket`'),
        ('backend = "s3"\nurl = "rados://p"', "needs a s3:// url"),
        ('backend = "rados"\nurl = "rados://p"\npool = "q"', "either url or its parts"),
        ('backend = "rados"\nurl = "rados:///ns"', "names no pool"),
        ('backend = "s3"\nbucket = "b"\nsecret_key = "x"', "credentials = FILE"),
        ('backend = "rados"\npool = "p"\ncolour = "blue"', "unknown keys ['colour']"),
        ('path = "/x"\nbucket = "b"', 'backend "local" takes only `path`'),
        ('backend = "rados"\npool = ["p"]', "pool must be a string"),
        ("", "missing `path` in [storage]"),
    ],
)
def test_storage_errors_say_what_to_fix(storage: str, message: str) -> None:
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg(storage)


def test_role_commands_pass_the_url_as_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cohort server|director --config`` give the URL to the role as ``--storage``."""
    from cohort.admin import cli
    from cohort.director import service as director_service
    from cohort.server import service as server_service

    seen: dict[str, list[str]] = {}
    monkeypatch.setattr(server_service, "main", lambda argv: seen.setdefault("server", argv))
    monkeypatch.setattr(director_service, "main", lambda argv: seen.setdefault("director", argv))
    conf = tmp_path / "cohort.toml"
    conf.write_text(
        '[cluster]\ncoordinator = "10.0.0.9:7100"\ncredentials = "/etc/cohort/creds.json"\n'
        '[node]\nid = "m1"\nroles = ["server", "director"]\n'
        '[storage]\nbackend = "rados"\npool = "cohort"\nconf = "/etc/ceph/ceph.conf"\n'
    )
    cli.server_role(conf)
    cli.director_role(conf)
    for role in ("server", "director"):
        argv = seen[role]
        assert argv[argv.index("--storage") + 1] == "rados://cohort?conf=/etc/ceph/ceph.conf"
