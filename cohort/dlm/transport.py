"""Transports for lock agents: one-way messages, FIFO per (sender, receiver) pair.

A lock agent only needs ``send(dst, msg)``: the DLM protocol is made of one-way
messages (a "request/response" is two of them), exactly the guarantee a TCP connection
gives one direction.  Messages are small msgpack lists; the first item is the opcode.

* :class:`MemoryNetwork` - all agents in one process.  Counts messages and wire bytes
  (msgpack body + 4-byte frame header, as on TCP).  Deliveries are either automatic
  (``loop.call_soon``; for asyncio tests and benchmarks) or manual (a test chooses which
  channel delivers next: reordering across connections, FIFO within one; crashes).
* :class:`TcpTransport` - registers its handler on an existing
  :class:`cohort.rpc.RpcServer` and sends one-way notifications through a
  :class:`cohort.rpc.ClientPool`; one sender task per peer keeps order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from cohort.rpc import ClientPool, RpcServer

log = logging.getLogger("cohort.dlm.transport")

#: ``deliver(src_node, message)``: called in order for each connection; must not block.
Deliver = Callable[[str, list[Any]], None]

RPC_METHOD = "dlm.msg"

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class Transport(Protocol):
    """What a :class:`~cohort.dlm.agent.LockAgent` needs from the network."""

    def attach(self, node_id: str, deliver: Deliver) -> None:
        """Start delivering messages addressed to ``node_id`` to ``deliver``."""

    def set_addresses(self, members: dict[str, str]) -> None:
        """Learn the addresses of the current members (node id -> "host:port")."""

    def send(self, dst: str, msg: list[Any]) -> None:
        """Queue ``msg`` for ``dst``; never blocks; silently dropped if ``dst`` is dead
        (the membership change that follows tells the agent)."""

    def close(self) -> None:
        """Stop sending and delivering."""


class MemoryNetwork:
    """An in-process network of lock agents with message counting.

    ``auto=True`` delivers each message with ``loop.call_soon`` (order kept per
    channel).  ``auto=False`` queues messages until the test calls :meth:`deliver`
    or :meth:`deliver_random`.
    """

    def __init__(self, *, auto: bool = True) -> None:
        self.auto = auto
        self.handlers: dict[str, Deliver] = {}
        self.channels: dict[tuple[str, str], collections.deque[bytes]] = {}
        self.messages = 0
        self.bytes = 0
        self.max_message = 0
        self.by_opcode: collections.Counter[int] = collections.Counter()
        self.dead: set[str] = set()

    def transport(self, node_id: str) -> MemoryTransport:
        return MemoryTransport(self, node_id)

    def reset_counters(self) -> None:
        self.messages = self.bytes = self.max_message = 0
        self.by_opcode.clear()

    def _send(self, src: str, dst: str, msg: list[Any]) -> None:
        if src in self.dead or dst in self.dead:
            return
        data = _enc.encode(msg)
        size = len(data) + 4
        self.messages += 1
        self.bytes += size
        self.by_opcode[msg[0]] += 1
        if size > self.max_message:
            self.max_message = size
        ch = self.channels.get((src, dst))
        if ch is None:
            ch = self.channels[(src, dst)] = collections.deque()
        ch.append(data)
        if self.auto:
            asyncio.get_running_loop().call_soon(self.deliver, src, dst)

    def pending(self) -> list[tuple[str, str]]:
        """Channels with undelivered messages."""
        return [k for k, q in self.channels.items() if q]

    def deliver(self, src: str, dst: str) -> bool:
        """Deliver the oldest message on channel ``src -> dst``; False if none."""
        ch = self.channels.get((src, dst))
        if not ch:
            return False
        data = ch.popleft()
        handler = self.handlers.get(dst)
        if handler is not None and src not in self.dead and dst not in self.dead:
            handler(src, _dec.decode(data))
        return True

    def deliver_random(self, rng: random.Random) -> bool:
        """Deliver the head of a randomly chosen non-empty channel; False if idle."""
        chans = self.pending()
        if not chans:
            return False
        src, dst = rng.choice(chans)
        return self.deliver(src, dst)

    def run_until_idle(self, rng: random.Random | None = None, limit: int = 1_000_000) -> int:
        """Deliver until no message is queued (manual mode); returns how many."""
        n = 0
        while n < limit:
            if rng is not None:
                ok = self.deliver_random(rng)
            else:
                chans = self.pending()
                ok = bool(chans) and self.deliver(*chans[0])
            if not ok:
                return n
            n += 1
        raise RuntimeError("network did not go idle (message storm?)")

    def crash(self, node_id: str) -> None:
        """The node vanishes: its queued messages in both directions are lost."""
        self.dead.add(node_id)
        self.handlers.pop(node_id, None)
        for (s, d), q in self.channels.items():
            if node_id in (s, d):
                q.clear()


class MemoryTransport:
    """One node's end of a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork, node_id: str) -> None:
        self.network = network
        self.node_id = node_id

    def attach(self, node_id: str, deliver: Deliver) -> None:
        self.node_id = node_id
        self.network.dead.discard(node_id)
        self.network.handlers[node_id] = deliver

    def set_addresses(self, members: dict[str, str]) -> None:
        pass

    def send(self, dst: str, msg: list[Any]) -> None:
        self.network._send(self.node_id, dst, msg)

    def close(self) -> None:
        self.network.handlers.pop(self.node_id, None)


class TcpTransport:
    """DLM messages over the project's RPC layer (one-way notifications).

    Registers ``dlm.msg`` on ``server`` (an :class:`RpcServer` the host already runs)
    and reaches peers through ``pool`` by their "host:port" addresses.  Each peer has
    one sender task, so messages to it leave in the order they were sent.
    """

    def __init__(self, server: RpcServer, pool: ClientPool | None = None) -> None:
        self.server = server
        self.pool = pool if pool is not None else ClientPool()
        self._own_pool = pool is None
        self.node_id = ""
        self._deliver: Deliver | None = None
        self.addresses: dict[str, str] = {}
        self._queues: dict[str, list[list[Any]]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._senders: dict[str, asyncio.Task[None]] = {}
        self.messages = 0
        self.bytes = 0
        self._closed = False

    def attach(self, node_id: str, deliver: Deliver) -> None:
        self.node_id = node_id
        self._deliver = deliver
        self.server.register(RPC_METHOD, self._handle)

    async def _handle(self, params: Any) -> None:
        src, msg = params
        if self._deliver is not None and not self._closed:
            self._deliver(src, msg)

    def set_addresses(self, members: dict[str, str]) -> None:
        self.addresses = dict(members)
        for node in list(self._senders):
            if node not in members:
                self._senders.pop(node).cancel()
                self._queues.pop(node, None)
                self._wake.pop(node, None)

    def send(self, dst: str, msg: list[Any]) -> None:
        if self._closed or dst not in self.addresses:
            return
        self.messages += 1
        q = self._queues.get(dst)
        if q is None:
            q = self._queues[dst] = []
        # fast path: connection already open and nothing queued ahead -> write now
        if not q:
            client = self.pool.get(self.addresses[dst])
            if client.notify_nowait(RPC_METHOD, [self.node_id, msg]):
                return
        q.append(msg)
        if dst not in self._senders:
            self._wake[dst] = asyncio.Event()
            self._senders[dst] = asyncio.get_running_loop().create_task(self._sender(dst))
        self._wake[dst].set()

    async def _sender(self, dst: str) -> None:
        wake = self._wake[dst]
        while not self._closed:
            await wake.wait()
            wake.clear()
            q = self._queues.get(dst)
            while q:
                addr = self.addresses.get(dst)
                if addr is None:
                    q.clear()
                    break
                try:
                    await self.pool.get(addr).notify(RPC_METHOD, [self.node_id, q[0]])
                    q.pop(0)
                except Exception as e:
                    # the peer is down or unreachable: keep order, retry until the
                    # membership change that removes it arrives
                    log.debug("dlm send to %s failed: %s", dst, e)
                    await asyncio.sleep(0.05)

    def close(self) -> None:
        self._closed = True
        for t in self._senders.values():
            t.cancel()
        self._senders.clear()

    async def aclose(self) -> None:
        self.close()
        if self._own_pool:
            with contextlib.suppress(Exception):
                await self.pool.close()
