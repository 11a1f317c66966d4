"""The AWS CLI, rclone and s3fs against a real cluster: everyday work simply succeeds."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cohort.cluster import LocalCluster

MiB = 1024 * 1024


def make_tree(root: Path) -> dict[str, str]:
    """A small tree with nested dirs, an empty file, odd names and a multipart-sized file."""
    files = {
        "a.txt": b"alpha\n",
        "dir/b.bin": os.urandom(70_000),
        "dir/sub/c with space.txt": b"gamma",
        "dir/sub/ünïcode.txt": "ü".encode() * 100,
        "empty": b"",
        "big.bin": os.urandom(9 * MiB + 7),
    }
    out = {}
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[rel] = hashlib.md5(data).hexdigest()
    return out


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def aws_env(cluster: LocalCluster, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": cluster.creds["access_key"],
        "AWS_SECRET_ACCESS_KEY": cluster.creds["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "HOME": str(home),
    }


def aws(cluster: LocalCluster, home: Path, *args: str) -> str:
    exe = Path(sys.executable).with_name("aws")
    r = subprocess.run(
        [str(exe), "--endpoint-url", cluster.s3_endpoint, *args],
        env=aws_env(cluster, home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"aws {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_aws_cli(cluster: LocalCluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    want = make_tree(src)
    aws(cluster, tmp_path, "s3", "mb", "s3://awscli")
    aws(cluster, tmp_path, "s3", "cp", str(src / "big.bin"), "s3://awscli/single/big.bin")
    aws(cluster, tmp_path, "s3", "sync", str(src), "s3://awscli/tree")
    listing = aws(cluster, tmp_path, "s3", "ls", "--recursive", "s3://awscli/tree/")
    assert "dir/sub/c with space.txt" in listing and "big.bin" in listing
    # a second sync uploads nothing
    again = aws(cluster, tmp_path, "s3", "sync", str(src), "s3://awscli/tree")
    assert "upload:" not in again
    dst = tmp_path / "dst"
    aws(cluster, tmp_path, "s3", "sync", "s3://awscli/tree", str(dst))
    assert digest_tree(dst) == want
    aws(cluster, tmp_path, "s3", "cp", "s3://awscli/single/big.bin", str(tmp_path / "big.copy"))
    assert hashlib.md5((tmp_path / "big.copy").read_bytes()).hexdigest() == want["big.bin"]
    out = aws(
        cluster, tmp_path, "s3api", "head-object", "--bucket", "awscli", "--key", "tree/a.txt"
    )
    assert '"ContentLength": 6' in out
    aws(
        cluster,
        tmp_path,
        "s3api",
        "put-object",
        "--bucket",
        "awscli",
        "--key",
        "api.txt",
        "--body",
        str(src / "a.txt"),
    )
    out = aws(
        cluster,
        tmp_path,
        "s3api",
        "list-objects-v2",
        "--bucket",
        "awscli",
        "--prefix",
        "tree/dir/",
        "--delimiter",
        "/",
    )
    assert "tree/dir/sub/" in out
    aws(cluster, tmp_path, "s3", "rm", "--recursive", "s3://awscli/")
    assert aws(cluster, tmp_path, "s3", "ls", "--recursive", "s3://awscli/").strip() == ""
    aws(cluster, tmp_path, "s3", "rb", "s3://awscli")


def rclone(cluster: LocalCluster, home: Path, *args: str) -> str:
    conf = home / "rclone.conf"
    conf.write_text(
        "[cohort]\ntype = s3\nprovider = Other\n"
        f"access_key_id = {cluster.creds['access_key']}\nsecret_access_key = {cluster.creds['secret_key']}\n"
        f"endpoint = {cluster.s3_endpoint}\nregion = us-east-1\nforce_path_style = true\n"
    )
    # rclone 1.60 cannot combine AWS_CA_BUNDLE with its own transport; we speak plain http
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    r = subprocess.run(
        ["rclone", "--config", str(conf), "--retries", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, f"rclone {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.skipif(
    shutil.which("rclone") is None, reason="rclone is not installed (scripts/test.sh installs it)"
)
def test_rclone(cluster: LocalCluster, tmp_path: Path) -> None:
    src = tmp_path / "src"
    want = make_tree(src)
    rclone(cluster, tmp_path, "mkdir", "cohort:rclone")
    rclone(cluster, tmp_path, "copy", str(src), "cohort:rclone/tree")
    rclone(cluster, tmp_path, "check", str(src), "cohort:rclone/tree")
    # change locally and sync: the remote follows, including the deletion
    (src / "a.txt").write_bytes(b"changed")
    (src / "dir" / "b.bin").unlink()
    rclone(cluster, tmp_path, "sync", str(src), "cohort:rclone/tree")
    rclone(cluster, tmp_path, "check", str(src), "cohort:rclone/tree")
    listing = rclone(cluster, tmp_path, "lsf", "-R", "cohort:rclone/tree")
    assert "dir/b.bin" not in listing and "a.txt" in listing
    dst = tmp_path / "dst"
    rclone(cluster, tmp_path, "sync", "cohort:rclone/tree", str(dst))
    assert digest_tree(dst) == digest_tree(src)
    del want


def test_s3fs(cluster: LocalCluster) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=cluster.creds["access_key"],
        secret=cluster.creds["secret_key"],
        client_kwargs={"endpoint_url": cluster.s3_endpoint, "region_name": "us-east-1"},
        use_listings_cache=False,
    )
    fs.mkdir("fsspec")
    with fs.open("fsspec/dir/file.txt", "wb") as f:
        f.write(b"hello from s3fs")
    big = os.urandom(12 * MiB)
    with fs.open("fsspec/big.bin", "wb", block_size=5 * MiB) as f:
        f.write(big)
    assert fs.cat("fsspec/dir/file.txt") == b"hello from s3fs"
    with fs.open("fsspec/big.bin", "rb") as f:
        f.seek(6 * MiB)
        assert f.read(1000) == big[6 * MiB : 6 * MiB + 1000]
    names: Any = fs.ls("fsspec", detail=False)
    assert sorted(names) == ["fsspec/big.bin", "fsspec/dir"]
    assert fs.info("fsspec/big.bin")["size"] == len(big)
    fs.rm("fsspec/dir/file.txt")
    assert not fs.exists("fsspec/dir/file.txt")
