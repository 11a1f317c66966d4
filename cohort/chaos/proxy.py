"""An asyncio fault-injecting TCP proxy.

``FaultProxy`` listens on ``listen_host:listen_port`` (``0``: an ephemeral port, returned
by :meth:`FaultProxy.start`) and forwards every accepted connection to
``target_host:target_port``.  Its mode can be changed at any time from the event loop:

* :meth:`~FaultProxy.pass_through` — forward bytes as they come (the healthy network);
* :meth:`~FaultProxy.delay` — forward every chunk ``seconds`` after it was read, in both
  directions, preserving order (latency, not a throughput cap);
* :meth:`~FaultProxy.drop` — reset every open connection and every new one (a crashed
  peer or a firewall that answers with RST: failures are fast and certain);
* :meth:`~FaultProxy.blackhole` — accept and read but never forward nor answer (packets
  silently lost: the peer sees nothing but timeouts).  As with a real partition that heals
  before TCP gives up, data read meanwhile is held and delivered in order once the mode
  changes back to pass-through or delay; new connections are not even dialled upstream
  until then.  Reading stops after ``hold_limit`` bytes per direction and connection, so
  senders then block as on a dead link.

One chunk is whatever a single ``read`` returned, so message boundaries are not preserved
(TCP has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Literal, TypeAlias

ProxyMode: TypeAlias = Literal["pass", "delay", "drop", "blackhole"]

_CHUNK = 64 * 1024
_Item: TypeAlias = tuple[float, bytes] | None  # (deliver at, data); None = EOF


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN, like a refused or dead peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(slots=True)
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client


class _Conn:
    def __init__(self, cw: asyncio.StreamWriter) -> None:
        self.cw = cw
        self.uw: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.dead = False

    def reset(self) -> None:
        if self.dead:
            return
        self.dead = True
        _reset(self.cw)
        if self.uw is not None:
            _reset(self.uw)
        current = asyncio.current_task()
        for t in self.tasks:
            if t is not current:
                t.cancel()


class FaultProxy:
    """A TCP proxy whose link can be slowed, cut or black-holed at runtime."""

    def __init__(
        self,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        *,
        target_host: str,
        target_port: int,
        hold_limit: int = 1 << 20,
        connect_timeout: float = 5.0,
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self._queue_chunks = max(1, hold_limit // _CHUNK)
        self._mode: ProxyMode = "pass"
        self._delay = 0.0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self.stats = ProxyStats()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> int:
        """Start listening; returns the bound port."""
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    @property
    def port(self) -> int:
        return self.listen_port

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._conns)

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.reset()
        self._forwarding.set()  # release anything waiting so it can notice and exit
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- controls --------------------------------------------------------------------------
    def pass_through(self) -> None:
        """Heal: forward everything, including data held while black-holed."""
        self._mode, self._delay = "pass", 0.0
        self._forwarding.set()

    def delay(self, seconds: float) -> None:
        """Deliver every chunk read from now on ``seconds`` later (both directions)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._mode, self._delay = ("delay" if seconds > 0 else "pass"), seconds
        self._forwarding.set()

    def drop(self) -> None:
        """Reset every open connection, and every new one until the mode changes."""
        self._mode, self._delay = "drop", 0.0
        self._forwarding.set()
        for c in list(self._conns):
            c.reset()
            self.stats.reset += 1

    def blackhole(self) -> None:
        """Accept and read, never forward nor answer, until the mode changes."""
        self._mode = "blackhole"
        self._forwarding.clear()

    # -- forwarding ------------------------------------------------------------------------
    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        if self._mode == "drop" or self._server is None:
            self.stats.reset += 1
            _reset(cw)
            return
        conn = _Conn(cw)
        me = asyncio.current_task()
        assert me is not None
        conn.tasks.add(me)
        self._conns.add(conn)
        loop = asyncio.get_running_loop()
        up: asyncio.Queue[_Item] = asyncio.Queue(self._queue_chunks)
        down: asyncio.Queue[_Item] = asyncio.Queue(self._queue_chunks)
        try:
            conn.tasks.add(loop.create_task(self._pump_in(conn, cr, up)))
            # a black-holed link does not even carry the SYN to the target
            await self._forwarding.wait()
            if conn.dead:
                return
            try:
                ur, uw = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError):
                conn.reset()
                return
            conn.uw = uw
            if conn.dead:  # reset while dialling
                _reset(uw)
                return
            conn.tasks.add(loop.create_task(self._pump_in(conn, ur, down)))
            outs = [
                loop.create_task(self._pump_out(conn, up, uw, True)),
                loop.create_task(self._pump_out(conn, down, cw, False)),
            ]
            conn.tasks.update(outs)
            await asyncio.gather(*outs)
            # both directions finished cleanly
            for w in (uw, cw):
                w.close()
        except asyncio.CancelledError:
            if not conn.dead:
                raise
        except (OSError, ConnectionError):
            conn.reset()
        finally:
            self._conns.discard(conn)
            if not conn.dead:
                conn.dead = True
                for t in conn.tasks:
                    if t is not me:
                        t.cancel()

    async def _pump_in(
        self, conn: _Conn, reader: asyncio.StreamReader, q: asyncio.Queue[_Item]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    await q.put(None)
                    return
                await q.put((loop.time() + self._delay, data))
        except (OSError, ConnectionError):
            conn.reset()

    async def _pump_out(
        self, conn: _Conn, q: asyncio.Queue[_Item], writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await q.get()
            if item is None:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            due, data = item
            await self._forwarding.wait()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                await self._forwarding.wait()  # black-holed while in flight
            writer.write(data)
            await writer.drain()
            if upstream:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
