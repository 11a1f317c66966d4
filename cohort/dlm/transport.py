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
import time
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


class _Outbound:
    """One sender's stream to one peer: numbered messages not yet acknowledged."""

    __slots__ = ("backoff", "next_seq", "sent_at", "task", "unacked", "wake")

    def __init__(self) -> None:
        self.next_seq = 1
        self.unacked: collections.deque[tuple[int, list[Any]]] = collections.deque()
        self.sent_at = 0.0  # when the oldest unacknowledged message was (re)sent
        self.wake = False  # a retransmission is due once the sender task's batch is out
        self.task: asyncio.Task[None] | None = None
        self.backoff = RETRANSMIT_AFTER

    @property
    def base(self) -> int:
        """The oldest number not acknowledged yet (every earlier one was delivered)."""
        return self.unacked[0][0] if self.unacked else self.next_seq


class _Inbound:
    """One receiver's view of one peer's stream: its session, and the last number
    delivered from it."""

    __slots__ = ("delivered", "session")

    def __init__(self, session: int, delivered: int) -> None:
        self.session = session
        self.delivered = delivered


#: Unacknowledged messages are sent again after this long (doubling up to the cap while
#: the peer stays silent); receivers acknowledge within :data:`ACK_DELAY` when no message
#: of their own carries the acknowledgement sooner.
RETRANSMIT_AFTER = 0.2
RETRANSMIT_CAP = 2.0
ACK_DELAY = 0.02


class TcpTransport:
    """DLM messages over the project's RPC layer (one-way notifications), delivered
    exactly once and in order per (sender, receiver) pair, across connection resets.

    Registers ``dlm.msg`` on ``server`` (an :class:`RpcServer` the host already runs)
    and reaches peers through ``pool`` by their "host:port" addresses.

    A TCP connection keeps order, but a reset loses whatever was in flight, and the lock
    protocol cannot afford a lost GRANT or REL (a lock would be stranded).  So each
    frame is ``[src, dst, session, seq, base, ack_session, ack, msg]``:

    * ``session`` (random per transport) and ``seq`` number the sender's stream to
      ``dst``; ``base`` is its oldest unacknowledged number.  The receiver delivers only
      the next number it expects and drops anything else (a duplicate, or a frame after
      a gap).  A stream it has no state for (first contact, a restarted sender, or a
      restarted receiver under the same node id) starts at ``base``: everything before
      it was acknowledged, by this receiver or by its predecessor.
    * ``ack`` is the last number delivered from the reverse stream, whose session is
      ``ack_session``.  Lock traffic is request/reply, so acknowledgements mostly ride
      on replies; otherwise a bare one (``msg`` None) leaves after :data:`ACK_DELAY`.
    * The sender keeps what is unacknowledged and, when the oldest has waited
      :data:`RETRANSMIT_AFTER`, sends all of it again, in order (go-back-N: simple,
      and resets are rare).
    * ``dst`` is checked because a server's next incarnation is a new node id on the
      same address.
    """

    def __init__(self, server: RpcServer, pool: ClientPool, *, own_pool: bool = False) -> None:
        # ``pool`` carries the member credential peers check; ``server`` checks theirs.
        # ``own_pool``: close the pool with the transport.
        self.server = server
        self.pool = pool
        self._own_pool = own_pool
        self.node_id = ""
        self.session = random.getrandbits(31)
        self._deliver: Deliver | None = None
        self.addresses: dict[str, str] = {}
        self._out: dict[str, _Outbound] = {}
        self._in: dict[str, _Inbound] = {}
        self._ack_due: dict[str, float] = {}  # peer -> when a bare ack must go out
        self._timer: asyncio.Task[None] | None = None
        self.messages = 0
        self.bytes = 0
        self.retransmitted = 0
        self.dropped = 0  # duplicates and out-of-order arrivals, discarded
        self._closed = False

    def attach(self, node_id: str, deliver: Deliver) -> None:
        self.node_id = node_id
        self._deliver = deliver
        self.server.register(RPC_METHOD, self._handle)

    async def _handle(self, params: Any) -> None:
        self.receive(params)

    def receive(self, params: Any) -> None:
        """One frame from a peer (also for frames a host kept before attaching)."""
        if self._closed or self._deliver is None:
            return
        try:
            src, dst, session, seq, base, ack_session, ack, msg = params
        except (TypeError, ValueError):
            log.warning("malformed DLM frame dropped: %.200r", params)
            return
        if dst != self.node_id:
            return  # meant for an earlier incarnation of this node
        out = self._out.get(src)
        if out is not None and ack_session == self.session:
            self._acked(out, ack)
        inb = self._in.get(src)
        if inb is None or inb.session != session:
            inb = self._in[src] = _Inbound(session, base - 1)
        if msg is None:
            return
        if seq != inb.delivered + 1:
            self.dropped += 1
            if seq <= inb.delivered:
                self._ack_soon(src)  # the sender missed our acknowledgement: repeat it
            return
        inb.delivered = seq
        self._ack_soon(src)
        self._deliver(src, msg)

    def _acked(self, out: _Outbound, ack: int) -> None:
        progressed = False
        while out.unacked and out.unacked[0][0] <= ack:
            out.unacked.popleft()
            progressed = True
        if progressed:
            out.sent_at = time.monotonic()
            out.backoff = RETRANSMIT_AFTER

    def _ack_soon(self, src: str) -> None:
        if src not in self._ack_due:
            self._ack_due[src] = time.monotonic() + ACK_DELAY
            self._ensure_timer()

    def set_addresses(self, members: dict[str, str]) -> None:
        self.addresses = dict(members)
        for node in list(self._out):
            if node not in members:
                out = self._out.pop(node)
                if out.task is not None:
                    out.task.cancel()
        for node in list(self._in):
            if node not in members:
                del self._in[node]
                self._ack_due.pop(node, None)

    def _frame(self, dst: str, out: _Outbound, seq: int, msg: list[Any] | None) -> list[Any]:
        inb = self._in.get(dst)
        self._ack_due.pop(dst, None)  # this frame carries the acknowledgement
        if inb is None:
            return [self.node_id, dst, self.session, seq, out.base, 0, 0, msg]
        return [self.node_id, dst, self.session, seq, out.base, inb.session, inb.delivered, msg]

    def _stream(self, dst: str) -> _Outbound:
        out = self._out.get(dst)
        if out is None:
            out = self._out[dst] = _Outbound()
        return out

    def send(self, dst: str, msg: list[Any]) -> None:
        if self._closed or dst not in self.addresses:
            return
        self.messages += 1
        out = self._stream(dst)
        seq = out.next_seq
        out.next_seq += 1
        if not out.unacked:
            out.sent_at = time.monotonic()
        out.unacked.append((seq, msg))
        self._ensure_timer()
        if out.task is not None and not out.task.done():
            return  # the sender task is sending; it picks this one up in order
        # fast path: connection open -> write now
        client = self.pool.get(self.addresses[dst])
        if not client.notify_nowait(RPC_METHOD, self._frame(dst, out, seq, msg)):
            # not connected: whatever is unacknowledged was probably lost with the old
            # connection, so send it all again (duplicates are dropped by the receiver)
            out.task = asyncio.get_running_loop().create_task(self._sender(dst, out, out.base))

    async def _sender(self, dst: str, out: _Outbound, next_seq: int) -> None:
        """Sends ``dst``'s unacknowledged messages from ``next_seq`` on, and whatever is
        queued meanwhile (the fast path holds back while this runs, so order is kept);
        starts over from the oldest when a retransmission comes due."""
        while not self._closed:
            if out.wake:
                out.wake = False
                next_seq = out.base
            todo = [(s, m) for s, m in out.unacked if s >= next_seq]
            addr = self.addresses.get(dst)
            if not todo or addr is None:
                return
            try:
                client = self.pool.get(addr)
                for s, m in todo:
                    await client.notify(RPC_METHOD, self._frame(dst, out, s, m))
                    next_seq = s + 1
            except Exception as e:
                # the peer is down or unreachable: the retransmission timer tries again
                # (backing off), until a membership change removes the peer
                log.debug("dlm send to %s failed: %s", dst, e)
                return

    def _retransmit(self, dst: str, out: _Outbound) -> None:
        self.retransmitted += len(out.unacked)
        if out.task is not None and not out.task.done():
            out.wake = True
        else:
            out.task = asyncio.get_running_loop().create_task(self._sender(dst, out, out.base))

    def _ensure_timer(self) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Bare acknowledgements and retransmissions; ends when neither is pending."""
        while not self._closed:
            await asyncio.sleep(ACK_DELAY)
            now = time.monotonic()
            for dst, due in list(self._ack_due.items()):
                addr = self.addresses.get(dst)
                if due <= now:
                    self._ack_due.pop(dst, None)
                    if addr is not None:
                        # not connected: a later frame or retransmission carries it
                        self.pool.get(addr).notify_nowait(
                            RPC_METHOD, self._frame(dst, self._stream(dst), 0, None)
                        )
            for dst, out in self._out.items():
                if out.unacked and now - out.sent_at >= out.backoff:
                    out.sent_at = now
                    out.backoff = min(out.backoff * 2, RETRANSMIT_CAP)
                    self._retransmit(dst, out)
            if not self._ack_due and not any(o.unacked for o in self._out.values()):
                self._timer = None
                return

    def close(self) -> None:
        self._closed = True
        for out in self._out.values():
            if out.task is not None:
                out.task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    async def aclose(self) -> None:
        self.close()
        if self._own_pool:
            with contextlib.suppress(Exception):
                await self.pool.close()
