"""Client of the embedded coordinator (the :class:`~cohort.coord.base.Coordinator` protocol)."""

from __future__ import annotations

from typing import Any

from cohort.auth import Credential
from cohort.rpc import RpcClient


class RpcCoordinator:
    def __init__(self, address: str, credential: Credential, *, timeout: float = 3.0) -> None:
        host, _, port = address.rpartition(":")
        self.address = address
        self.client = RpcClient(host, int(port), credential)
        self.timeout = timeout

    async def _call(self, method: str, params: Any = None, timeout: float | None = None) -> Any:
        return await self.client.call(method, params, timeout=timeout or self.timeout)

    async def join(self, member: dict[str, Any]) -> dict[str, Any]:
        r: dict[str, Any] = await self._call("join", member)
        return r

    async def heartbeat(
        self, member_id: str, incarnation: str, load: list[list[float]] | None = None
    ) -> dict[str, Any]:
        """Renew the lease; a server may add its per-partition ``load``
        (``[[partition, requests/s, bytes/s], ...]``) for load-aware rebalancing."""
        params: dict[str, Any] = {"id": member_id, "incarnation": incarnation}
        if load is not None:
            params["load"] = load
        r: dict[str, Any] = await self._call("heartbeat", params, timeout=1.0)
        return r

    async def leave(self, member_id: str, incarnation: str) -> None:
        await self._call("leave", {"id": member_id, "incarnation": incarnation})

    async def view(self) -> dict[str, Any]:
        r: dict[str, Any] = await self._call("view")
        return r

    async def watch(self, since: int, timeout: float = 5.0) -> dict[str, Any]:
        r: dict[str, Any] = await self._call(
            "watch", {"since": since, "timeout": timeout}, timeout=timeout + 3.0
        )
        return r

    async def acquire_partition(self, member_id: str, incarnation: str, partition: int) -> int:
        r = await self._call(
            "acquire_partition",
            {"id": member_id, "incarnation": incarnation, "partition": partition},
        )
        return int(r["token"])

    async def release_partition(self, member_id: str, incarnation: str, partition: int) -> None:
        await self._call(
            "release_partition",
            {"id": member_id, "incarnation": incarnation, "partition": partition},
        )

    async def create_bucket(self, name: str, tenant: str = "default") -> dict[str, Any]:
        r: dict[str, Any] = await self._call("create_bucket", {"name": name, "tenant": tenant})
        return r

    async def delete_bucket(self, name: str, bucket_id: str) -> None:
        await self._call("delete_bucket", {"name": name, "id": bucket_id})

    async def set_state(self, member_id: str, state: str) -> dict[str, Any]:
        r: dict[str, Any] = await self._call("set_state", {"id": member_id, "state": state})
        return r

    async def events(self) -> list[dict[str, Any]]:
        r: list[dict[str, Any]] = await self._call("events")
        return r

    async def close(self) -> None:
        await self.client.close()
