"""The ``Coordinator`` protocol: what servers, directors and tools need from the global state.

The embedded backend (``cohort.coord.embedded`` + :class:`RpcCoordinator`) and the etcd
backend implement the same methods with the same semantics:

* ``join`` returns ``{"incarnation", "lease_ttl", "view"}``; the member must then call
  ``heartbeat`` well within ``lease_ttl`` or be declared dead (its partitions move).
* ``heartbeat`` raises ``RpcError("UnknownMember")`` once the member was declared dead:
  it must stop serving and re-join.  A server may pass ``load``, its per-partition
  ``[partition, requests/s, bytes/s]`` rows, for load-aware rebalancing (a backend that
  does not balance by load ignores it).
* ``watch(since)`` returns the view as soon as its ``version`` exceeds ``since``, or the
  current view after ``timeout`` seconds.
* ``acquire_partition`` grants the lock ``partition/p`` (EX) to the map's owner and returns
  the fencing token (the partition's epoch); ``Busy`` while the previous holder has not
  released it, ``NotOwner`` if the map names someone else.

The view is a map: ``version``, ``cluster_id``, ``lease_ttl``, ``members`` (list of maps with
``id role address incarnation state capacity standby pid``), ``partitions`` (list indexed by
partition of ``[owner, epoch, holder]``), ``buckets`` (list of ``name id created tenant``).
"""

from __future__ import annotations

from typing import Any, Protocol


class Coordinator(Protocol):
    async def join(self, member: dict[str, Any]) -> dict[str, Any]: ...
    async def heartbeat(
        self, member_id: str, incarnation: str, load: list[list[float]] | None = None
    ) -> dict[str, Any]: ...
    async def leave(self, member_id: str, incarnation: str) -> None: ...
    async def view(self) -> dict[str, Any]: ...
    async def watch(self, since: int, timeout: float = 5.0) -> dict[str, Any]: ...
    async def acquire_partition(self, member_id: str, incarnation: str, partition: int) -> int: ...
    async def release_partition(self, member_id: str, incarnation: str, partition: int) -> None: ...
    async def create_bucket(self, name: str, tenant: str = "default") -> dict[str, Any]: ...
    async def delete_bucket(self, name: str, bucket_id: str) -> None: ...
    async def set_state(self, member_id: str, state: str) -> dict[str, Any]: ...
    async def events(self) -> list[dict[str, Any]]: ...
    async def close(self) -> None: ...
