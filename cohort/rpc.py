"""Internal RPC: length-prefixed msgpack frames over persistent, pipelined TCP connections.

Wire format (every frame)::

    u32 big-endian length | msgpack body

    request body:  [0, request_id, method, params]
    response body: [1, request_id, ok, result]        # ok=False -> result = [code, message]

One connection carries any number of requests in flight; responses come back in any
order and are matched by ``request_id``.  A request with ``request_id`` 0 is a one-way
notification (:meth:`RpcClient.notify`): handled in order, never answered.  A method handler is an ``async`` callable that
takes the decoded ``params`` and returns something msgpack can encode.  A handler that
raises :class:`RpcError` sends that code and message back; any other exception becomes
``code="Internal"`` (and is logged by the server, never swallowed silently).

Every connection is authenticated before its first request is read: the server sends a
challenge, the client proves a credential (a member's cluster key or a tenant's access
key) and the server proves it back (:mod:`cohort.auth`).  A peer that fails is
disconnected and nothing it sent is acted on.  Handlers learn who called them from
:data:`current_peer`; a method serves tenants only if it was registered with
``tenants=True``, everything else is for members of the cluster.

Why msgspec: it encodes/decodes msgpack several times faster than alternatives and is a
well-kept library; frames stay small (a lock request is well under 64 bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from cohort import auth
from cohort.auth import AuthError, Credential, Principal, Verifier

log = logging.getLogger("cohort.rpc")

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024
_REQUEST = 0
_RESPONSE = 1

Handler = Callable[[Any], Awaitable[Any]]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

# The authenticated peer of the connection a handler is serving (set per connection).
current_peer: contextvars.ContextVar[Principal] = contextvars.ContextVar("current_peer")
HANDSHAKE_TIMEOUT = 5.0


class RpcError(Exception):
    """An error returned by the remote handler (or raised by a local handler to return one).

    ``code`` is a short machine-readable word (e.g. ``"NotOwner"``), ``message`` a
    human-readable explanation.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class RpcConnectionError(RpcError):
    """The connection failed or closed before the response arrived.

    The request may or may not have been executed by the peer.
    """

    def __init__(self, message: str) -> None:
        super().__init__("ConnectionError", message)


class RpcAuthError(RpcConnectionError):
    """The handshake failed: the peer refused our credential or could not prove its own."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = "AuthFailed"


class RpcTimeout(RpcError):
    """No response within the timeout; the request may or may not have been executed."""

    def __init__(self, message: str) -> None:
        super().__init__("Timeout", message)


def encode_frame(body: Any) -> bytes:
    payload = _encoder.encode(body)
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> Any:
    """Read one frame; raises ``asyncio.IncompleteReadError`` at EOF."""
    header = await reader.readexactly(4)
    (length,) = _HEADER.unpack(header)
    if length > limit:
        raise RpcError("FrameTooLarge", f"frame of {length} bytes exceeds {limit}")
    return _decoder.decode(await reader.readexactly(length))


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class RpcServer:
    """Serves registered handlers on a TCP port to authenticated peers.

    ``verifier`` decides who may connect (:class:`cohort.auth.Verifier`).  ``start()``
    returns the bound port.  ``refused`` counts connections that failed the handshake.
    """

    def __init__(self, verifier: Verifier, handlers: dict[str, Handler] | None = None) -> None:
        self.verifier = verifier
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.tenant_methods: set[str] = set()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.refused = 0
        self.handshakes = 0

    def register(self, name: str, handler: Handler, *, tenants: bool = False) -> None:
        """Serve ``name``; to members only unless ``tenants`` (then to tenants too)."""
        self.handlers[name] = handler
        if tenants:
            self.tenant_methods.add(name)
        else:
            self.tenant_methods.discard(name)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve_conn, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Principal | None:
        frame, nonce = auth.hello()
        writer.write(encode_frame(frame))
        try:
            proof = await asyncio.wait_for(
                read_frame(reader, auth.MAX_HANDSHAKE_FRAME), HANDSHAKE_TIMEOUT
            )
            principal, accept = auth.check_proof(self.verifier, nonce, proof)
        except (AuthError, RpcError, TimeoutError, msgspec.DecodeError) as e:
            self.refused += 1
            log.warning("refused rpc peer %s: %s", writer.get_extra_info("peername"), e)
            return None
        except (asyncio.IncompleteReadError, ConnectionError):
            self.refused += 1
            return None
        writer.write(encode_frame(accept))
        self.handshakes += 1
        return principal

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        _nodelay(writer)
        try:
            principal = await self._handshake(reader, writer)
            if principal is None:
                return
            # every handler task started from here inherits the peer (contextvars copy)
            current_peer.set(principal)
            member = principal.is_member
            while True:
                try:
                    frame = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if not isinstance(frame, list) or len(frame) != 4 or frame[0] != _REQUEST:
                    log.warning("dropping malformed rpc frame")
                    return
                _, rid, method, params = frame
                if not member and method not in self.tenant_methods:
                    log.warning("tenant %s called member-only rpc %r", principal.name, method)
                    if rid != 0:
                        writer.write(
                            encode_frame(
                                [_RESPONSE, rid, False, ["AccessDenied", f"{method} is internal"]]
                            )
                        )
                    continue
                if rid == 0:
                    # one-way notification (RpcClient.notify): run inline, in arrival
                    # order, no response; the handler must not block for long.
                    await self._notify(method, params)
                    continue
                task = asyncio.create_task(self._dispatch(writer, rid, method, params))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:  # pragma: no cover - defensive: never kill the server
            log.exception("rpc connection failed")
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _notify(self, method: str, params: Any) -> None:
        handler = self.handlers.get(method)
        if handler is None:
            log.warning("dropping notification for unknown rpc method %r", method)
            return
        try:
            await handler(params)
        except Exception:
            log.exception("rpc notification handler %s failed", method)

    async def _dispatch(
        self, writer: asyncio.StreamWriter, rid: int, method: str, params: Any
    ) -> None:
        handler = self.handlers.get(method)
        body: list[Any]
        if handler is None:
            body = [_RESPONSE, rid, False, ["UnknownMethod", f"no rpc method {method!r}"]]
        else:
            try:
                result = await handler(params)
                body = [_RESPONSE, rid, True, result]
            except RpcError as e:
                body = [_RESPONSE, rid, False, [e.code, e.message]]
            except asyncio.CancelledError:
                return
            except Exception as e:
                log.exception("rpc handler %s failed", method)
                body = [_RESPONSE, rid, False, ["Internal", f"{type(e).__name__}: {e}"]]
        if writer.is_closing():
            return
        try:
            writer.write(encode_frame(body))
        except Exception:
            log.exception("cannot encode rpc response for %s", method)
            writer.write(encode_frame([_RESPONSE, rid, False, ["Internal", "unencodable result"]]))


class RpcClient:
    """A persistent, pipelined connection to one RPC server; reconnects on demand.

    ``call`` is safe to use from many tasks at once.  When the connection drops, every
    pending call fails with :class:`RpcConnectionError`; the next call reconnects.
    """

    def __init__(
        self, host: str, port: int, credential: Credential, *, connect_timeout: float = 2.0
    ) -> None:
        self.host = host
        self.port = port
        self.credential = credential
        self.connect_timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._connect_lock = asyncio.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _ensure_connected(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        async with self._connect_lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            if self._closed:
                raise RpcConnectionError(f"client for {self.address} is closed")
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.connect_timeout
                )
            except (OSError, TimeoutError) as e:
                raise RpcConnectionError(f"cannot connect to {self.address}: {e}") from None
            _nodelay(writer)
            try:
                await asyncio.wait_for(self._handshake(reader, writer), self.connect_timeout)
            except BaseException as e:
                writer.close()
                if isinstance(e, AuthError):
                    raise RpcAuthError(f"{self.address}: {e}") from None
                if isinstance(e, TimeoutError):
                    raise RpcConnectionError(f"handshake with {self.address} timed out") from None
                if isinstance(e, (OSError, asyncio.IncompleteReadError, RpcError)):
                    raise RpcAuthError(
                        f"{self.address} closed the connection during the handshake "
                        "(does it have the same cluster key, or is the access key valid?)"
                    ) from None
                raise
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_loop(reader, writer))
            return writer

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_frame(reader, auth.MAX_HANDSHAKE_FRAME)
        frame, sn, cn = auth.prove(self.credential, hello)
        writer.write(encode_frame(frame))
        accept = await read_frame(reader, auth.MAX_HANDSHAKE_FRAME)
        auth.check_accept(self.credential, sn, cn, accept)

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reason = "connection closed"
        try:
            while True:
                frame = await read_frame(reader)
                _, rid, ok, result = frame
                fut = self._pending.pop(rid, None)
                if fut is None or fut.done():
                    continue
                if ok:
                    fut.set_result(result)
                else:
                    code, message = result
                    fut.set_exception(RpcError(code, message))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            reason = f"connection to {self.address} lost: {type(e).__name__}"
        except asyncio.CancelledError:
            reason = "client closed"
        except Exception as e:  # malformed frame
            reason = f"bad frame from {self.address}: {e}"
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(RpcConnectionError(reason))

    async def send(self, method: str, params: Any = None) -> tuple[int, asyncio.Future[Any]]:
        """Send a request; returns its id and the future of its result (no timeout).

        The caller must await the future or :meth:`forget` the id.
        """
        writer = await self._ensure_connected()
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            writer.write(encode_frame([_REQUEST, rid, method, params]))
        except (OSError, RuntimeError) as e:  # the transport broke under us
            self._pending.pop(rid, None)
            raise RpcConnectionError(f"cannot send to {self.address}: {e}") from None
        except Exception:
            self._pending.pop(rid, None)
            raise
        return rid, fut

    def forget(self, rid: int) -> None:
        """Stop waiting for request ``rid`` (a late response is dropped)."""
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def call(self, method: str, params: Any = None, *, timeout: float = 10.0) -> Any:
        """Call ``method`` remotely and return its result.

        Raises :class:`RpcError` (the remote handler's error), :class:`RpcTimeout` or
        :class:`RpcConnectionError`.
        """
        rid, fut = await self.send(method, params)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RpcTimeout(f"{method} to {self.address} timed out after {timeout}s") from None
        finally:
            self._pending.pop(rid, None)

    async def notify(self, method: str, params: Any = None) -> None:
        """Send a one-way notification: no response, no request id (frame id 0).

        Notifications from one client are handled by the server in the order sent
        (inline, not in parallel tasks).  Raises :class:`RpcConnectionError` if the
        connection cannot be made; delivery is not confirmed.
        """
        writer = await self._ensure_connected()
        writer.write(encode_frame([_REQUEST, 0, method, params]))

    def notify_nowait(self, method: str, params: Any = None) -> bool:
        """Like :meth:`notify` on an already open connection; False if not connected."""
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(encode_frame([_REQUEST, 0, method, params]))
        return True

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task


class ClientPool:
    """One :class:`RpcClient` per address, created on first use, all with one credential."""

    def __init__(self, credential: Credential) -> None:
        self.credential = credential
        self._clients: dict[str, RpcClient] = {}

    def get(self, address: str) -> RpcClient:
        client = self._clients.get(address)
        if client is None:
            host, _, port = address.rpartition(":")
            client = RpcClient(host, int(port), self.credential)
            self._clients[address] = client
        return client

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
