"""The director's routing: partition map cache, owner lookup, transparent retry.

The router keeps the coordinator's view (members, partition map, buckets) fresh by a
long-poll watch.  :meth:`Router.call` sends an RPC to the server that owns a partition and
retries, with a refreshed view and a short backoff, while the answer says the request was
*not executed* (``NotOwner``, ``Recovering``, connection refused) - which is what a
failover or a hand-over looks like from here - until ``deadline`` seconds have passed.

A request whose outcome is unknown (timeout or connection lost after sending) is retried
only when the caller marks it idempotent; mutations carry a request id that the server
de-duplicates, so a retried PUT or DELETE is applied at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import Any

from cohort.auth import Credential
from cohort.coord.base import Coordinator
from cohort.director.policy import Candidate, Chooser, NoCandidate, Request, RoundRobin
from cohort.rpc import ClientPool, RpcConnectionError, RpcError, RpcTimeout

log = logging.getLogger("cohort.director.router")

RETRYABLE = {"NotOwner", "Recovering"}


class Unavailable(Exception):
    """No owner answered within the deadline."""


class Router:
    def __init__(
        self,
        coord: Coordinator,
        *,
        deadline: float = 15.0,
        rpc_timeout: float = 5.0,
        hot_reads: float = 0.0,
        policy: Chooser | None = None,
        credential: Credential,
    ) -> None:
        # hot read-only spreading: a partition read more than ``hot_reads`` times a
        # second (0 = never) gets read replicas on other servers
        self.hot_reads = hot_reads
        self.readers: dict[int, list[str]] = {}
        self._read_window: dict[int, list[float]] = {}  # p -> [window start, reads]
        self._spreading: set[int] = set()
        # who serves a read that owner and replicas could both serve (docs/architecture.md,
        # "Balancing policies"); everything else goes to the owner
        self.policy: Chooser = policy if policy is not None else RoundRobin()
        self.candidates: dict[str, Candidate] = {}  # address -> the server, as a candidate
        self._bg: set[asyncio.Task[Any]] = set()
        self.coord = coord
        self.pool = ClientPool(credential)  # servers check it before they act
        self.deadline = deadline
        self.rpc_timeout = rpc_timeout
        self.view: dict[str, Any] = {"version": -1, "partitions": [], "members": [], "buckets": []}
        self.addresses: dict[str, str] = {}
        self.buckets: dict[str, dict[str, Any]] = {}
        self.partition_count = 0
        self._watch_task: asyncio.Task[None] | None = None
        self._refreshed = asyncio.Event()
        self.retries = 0

    async def start(self) -> None:
        while True:
            try:
                self._apply(await self.coord.view())
                break
            except RpcError as e:
                log.warning("coordinator not reachable yet: %s", e)
                await asyncio.sleep(0.3)
        self._watch_task = asyncio.create_task(self._watch_loop())

    async def close(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            with contextlib.suppress(BaseException):
                await self._watch_task
        await self.pool.close()
        await self.coord.close()

    def _apply(self, view: dict[str, Any]) -> None:
        if view["version"] < self.view["version"]:
            return
        self.view = view
        self.partition_count = len(view["partitions"])
        self.addresses = {
            m["id"]: m["address"]
            for m in view["members"]
            if m["role"] == "server" and m["state"] in ("alive", "draining")
        }
        self.candidates = {
            m["address"]: Candidate(
                address=m["address"],
                server=m["id"],
                capacity=float(m.get("capacity") or 1.0),
                tags=frozenset((m.get("meta") or {}).get("tags") or ()),
            )
            for m in view["members"]
            if m["role"] == "server" and m["state"] in ("alive", "draining")
        }
        self.buckets = {b["name"]: b for b in view["buckets"]}
        live = set(self.addresses.values())
        for p, readers in list(self.readers.items()):
            readers[:] = [a for a in readers if a in live]
            if not readers:
                del self.readers[p]
        self._refreshed.set()
        self._refreshed = asyncio.Event()

    async def _watch_loop(self) -> None:
        while True:
            try:
                self._apply(await self.coord.watch(self.view["version"], timeout=2.0))
            except RpcError as e:
                log.warning("watch failed: %s", e)
                await asyncio.sleep(0.2)
            except Exception:
                log.exception("applying the cluster view failed")
                await asyncio.sleep(0.2)

    # -- reads: owner or read replicas ----------------------------------------------------
    async def read(
        self,
        p: int,
        method: str,
        params: dict[str, Any],
        *,
        bucket: str = "",
        tenant: str = "default",
    ) -> Any:
        """A read of partition ``p``: from its owner or, when the partition is hot and
        has read replicas, from the owner or a replica as the balancing policy chooses.
        A replica that no longer holds its copy answers ``NotReader`` and is forgotten;
        the owner answers instead."""
        if self.hot_reads > 0:
            self._count_read(p)
            readers = self.readers.get(p)
            owner = self.owner_address(p)
            if readers and owner is not None:
                pick = self._choose(p, owner, readers, method, bucket, tenant)
                if pick is not None:
                    self.policy.started(pick)
                    try:
                        if pick.owner:
                            return await self.call(p, method, params)
                        return await self.pool.get(pick.address).call(
                            method, {**params, "replica": True}, timeout=self.rpc_timeout
                        )
                    except RpcError:
                        if pick.owner:
                            raise
                        if pick.address in readers:
                            readers.remove(pick.address)
                    finally:
                        self.policy.finished(pick)
        return await self.call(p, method, params)

    def _choose(
        self, p: int, owner: str, readers: list[str], method: str, bucket: str, tenant: str
    ) -> Candidate | None:
        """The policy's pick among the owner and the replicas of ``p`` (None: no
        candidate, e.g. a strict rule nobody matches; the owner then answers)."""
        cands: list[Candidate] = []
        for addr in [owner, *readers]:
            c = self.candidates.get(addr) or Candidate(address=addr)
            cands.append(replace(c, owner=addr == owner))
        try:
            return self.policy.choose(
                Request(partition=p, bucket=bucket, tenant=tenant, method=method), cands
            )
        except NoCandidate:
            return None

    def _count_read(self, p: int) -> None:
        now = time.monotonic()
        w = self._read_window.get(p)
        if w is None or now - w[0] >= 1.0:
            self._read_window[p] = [now, 1.0]
            return
        w[1] += 1
        if w[1] >= self.hot_reads and p not in self._spreading:
            owner = self.owner_address(p)
            candidates = [
                a
                for a in sorted(set(self.addresses.values()))
                if a != owner and a not in self.readers.get(p, [])
            ]
            if candidates:
                self._spreading.add(p)
                t = asyncio.create_task(self._add_reader(p, candidates[0]))
                self._bg.add(t)
                t.add_done_callback(self._bg.discard)

    async def _add_reader(self, p: int, addr: str) -> None:
        try:
            r = await self.pool.get(addr).call("part.read", {"p": p}, timeout=self.rpc_timeout)
            if r.get("role") == "reader":
                readers = self.readers.setdefault(p, [])
                if addr not in readers:
                    readers.append(addr)
                    log.info("partition %d: read replica on %s", p, addr)
        except RpcError as e:
            log.info("partition %d: no read replica on %s: %s", p, addr, e)
        finally:
            self._spreading.discard(p)

    async def refresh(self) -> None:
        with contextlib.suppress(RpcError):
            self._apply(await self.coord.view())

    def owner_address(self, p: int) -> str | None:
        owner = self.view["partitions"][p][0]
        return None if owner is None else self.addresses.get(owner)

    async def call(self, p: int, method: str, params: Any, *, idempotent: bool = True) -> Any:
        """Call ``method`` on the owner of partition ``p``; see the module docstring."""
        give_up = time.monotonic() + self.deadline
        delay = 0.02
        last: Exception | None = None
        while True:
            addr = self.owner_address(p)
            if addr is not None:
                try:
                    return await self._call_owner(p, addr, method, params)
                except RpcTimeout as e:
                    if not idempotent:
                        raise
                    last = e
                except RpcConnectionError as e:
                    # refused/reset: nothing executed if we never got a connection; if the
                    # connection broke after sending, the request may have executed, which
                    # is safe to repeat only for idempotent (de-duplicated) requests.
                    if not idempotent and "cannot connect" not in e.message:
                        raise
                    last = e
                except RpcError as e:
                    if e.code not in RETRYABLE:
                        raise
                    last = e
            if time.monotonic() + delay > give_up:
                raise Unavailable(f"partition {p}: no owner answered ({last})")
            self.retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            if isinstance(last, RpcError) and last.code == "Recovering":
                continue
            await self.refresh()

    async def _call_owner(self, p: int, addr: str, method: str, params: Any) -> Any:
        """One attempt at ``addr``.  Gives up early (as a timeout: outcome unknown) when
        the map moves ``p`` elsewhere meanwhile, so a paused owner costs the failover
        time, not the whole RPC timeout."""
        client = self.pool.get(addr)
        rid, fut = await client.send(method, params)
        give_up = time.monotonic() + self.rpc_timeout
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), 0.25)
                except TimeoutError:
                    if self.owner_address(p) != addr or time.monotonic() > give_up:
                        raise RpcTimeout(f"{method} to {addr}: no answer, owner changed") from None
        finally:
            if not fut.done():
                client.forget(rid)

    def partitions_by_owner(self, parts: list[int] | None = None) -> dict[str | None, list[int]]:
        out: dict[str | None, list[int]] = {}
        for p in parts if parts is not None else range(self.partition_count):
            out.setdefault(self.owner_address(p), []).append(p)
        return out

    async def scatter(
        self, method: str, params: dict[str, Any], parts: list[int] | None = None
    ) -> list[Any]:
        """Call ``method`` once per owner with ``params["parts"]`` set to its partitions
        (all partitions, or those in ``parts``); partitions reported ``not_owned`` are
        retried with a fresh view.  Returns the list of results; each carries the
        partitions it answered for under ``"_parts"``."""
        results: list[Any] = []
        todo = list(range(self.partition_count)) if parts is None else list(parts)
        give_up = time.monotonic() + self.deadline
        delay = 0.02
        while todo:
            groups = self.partitions_by_owner(todo)
            todo = list(groups.pop(None, []))

            async def one(addr: str, parts: list[int]) -> tuple[Any, list[int]]:
                try:
                    r = await self.pool.get(addr).call(
                        method, {**params, "parts": parts}, timeout=self.rpc_timeout
                    )
                    missing = list(r.get("not_owned", []))
                    r["_parts"] = [p for p in parts if p not in set(missing)]
                    return r, missing
                except (RpcConnectionError, RpcTimeout):
                    return None, parts
                except RpcError as e:
                    if e.code in RETRYABLE:
                        return None, parts
                    raise

            outs = await asyncio.gather(*(one(a, ps) for a, ps in groups.items() if a is not None))
            for r, missing in outs:
                if r is not None:
                    results.append(r)
                todo.extend(missing)
            if todo:
                if time.monotonic() > give_up:
                    raise Unavailable(f"{len(todo)} partitions unavailable for {method}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
                await self.refresh()
        return results
