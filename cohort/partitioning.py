"""Which virtual partition a key belongs to.

``partition_of(bucket_id, key, P)`` hashes the bucket's unique id and the key with
BLAKE2b (fast, in C, well distributed) into one of ``P`` partitions.  ``P`` is fixed when
the cluster is created.  Directors and servers use this one function, so they always agree.
"""

from __future__ import annotations

from hashlib import blake2b


def partition_of(bucket_id: str, key: str, partitions: int) -> int:
    h = blake2b(f"{bucket_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % partitions


def blob_key(partition: int, blob_id: str) -> str:
    """Storage key of an object body (immutable; written before its metadata commits)."""
    # fan out on the id's last two characters (ids end in a counter's low digits)
    return f"blobs/{partition:04d}/{blob_id[-2:]}/{blob_id}"
