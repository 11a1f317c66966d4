"""FaultProxy against a small echo server on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from cohort.chaos.proxy import FaultProxy


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    writers: set[asyncio.StreamWriter] = set()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.add(w)
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()
            writers.discard(w)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for w in list(writers):
        w.close()
    await server.wait_closed()


@pytest.fixture
async def proxy(echo: int) -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 0, target_host="127.0.0.1", target_port=echo)
    await p.start()
    yield p
    await p.close()


async def _connect(p: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port)


async def _roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, msg: bytes) -> bytes:
    w.write(msg)
    await w.drain()
    return await r.readexactly(len(msg))


async def _closed_by_peer(r: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True if the connection ends (EOF or reset) within ``timeout``."""
    try:
        return await asyncio.wait_for(r.read(1), timeout) == b""
    except ConnectionError:
        return True


async def _eventually(cond: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    assert callable(cond)
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _close(w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        w.close()


async def test_pass_through(proxy: FaultProxy) -> None:
    assert proxy.port > 0 and proxy.mode == "pass"
    r, w = await _connect(proxy)
    assert await _roundtrip(r, w, b"hello") == b"hello"
    big = bytes(range(256)) * 4096  # 1 MiB, several chunks
    assert await _roundtrip(r, w, big) == big
    assert proxy.stats.bytes_up >= len(big) + 5
    # half-close propagates: the echo server closes, so we see EOF
    w.write_eof()
    assert await r.read() == b""
    _close(w)
    await _eventually(lambda: proxy.connections == 0)


async def test_delay_adds_latency_each_way(proxy: FaultProxy) -> None:
    r, w = await _connect(proxy)
    assert await _roundtrip(r, w, b"warm") == b"warm"
    proxy.delay(0.2)
    assert proxy.mode == "delay"
    t0 = time.monotonic()
    assert await _roundtrip(r, w, b"slow") == b"slow"
    assert time.monotonic() - t0 >= 0.38
    proxy.delay(0)
    assert proxy.mode == "pass"
    t0 = time.monotonic()
    assert await _roundtrip(r, w, b"fast") == b"fast"
    assert time.monotonic() - t0 < 0.2
    _close(w)


async def test_drop_resets_existing_and_new_connections(proxy: FaultProxy) -> None:
    r, w = await _connect(proxy)
    assert await _roundtrip(r, w, b"x") == b"x"
    proxy.drop()
    assert await _closed_by_peer(r)
    _close(w)
    r2, w2 = await _connect(proxy)  # accepted, then reset at once
    assert await _closed_by_peer(r2)
    _close(w2)
    proxy.pass_through()
    r3, w3 = await _connect(proxy)
    assert await _roundtrip(r3, w3, b"back") == b"back"
    _close(w3)


async def test_blackhole_holds_then_heals(proxy: FaultProxy) -> None:
    r, w = await _connect(proxy)
    assert await _roundtrip(r, w, b"a") == b"a"
    proxy.blackhole()
    w.write(b"lost?")
    await w.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r.readexactly(5), 0.3)
    # a new connection is accepted but goes nowhere either
    r2, w2 = await _connect(proxy)
    w2.write(b"new")
    await w2.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r2.readexactly(3), 0.3)
    # healing delivers what was held, in order, on both connections
    proxy.pass_through()
    assert await asyncio.wait_for(r.readexactly(5), 2) == b"lost?"
    assert await asyncio.wait_for(r2.readexactly(3), 2) == b"new"
    _close(w)
    _close(w2)


async def test_blackhole_then_drop(proxy: FaultProxy) -> None:
    r, w = await _connect(proxy)
    proxy.blackhole()
    w.write(b"zzz")
    await w.drain()
    proxy.drop()
    assert await _closed_by_peer(r)
    _close(w)
    await _eventually(lambda: proxy.connections == 0)


async def test_unreachable_target_resets_client() -> None:
    # bind then close a socket to get a port with nothing listening
    s = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead = s.sockets[0].getsockname()[1]
    s.close()
    await s.wait_closed()
    p = FaultProxy("127.0.0.1", 0, target_host="127.0.0.1", target_port=dead)
    await p.start()
    try:
        r, w = await _connect(p)
        assert await _closed_by_peer(r)
        _close(w)
    finally:
        await p.close()


async def test_close_stops_listening(echo: int) -> None:
    p = FaultProxy("127.0.0.1", 0, target_host="127.0.0.1", target_port=echo)
    port = await p.start()
    r, w = await _connect(p)
    assert await _roundtrip(r, w, b"q") == b"q"
    await p.close()
    assert await _closed_by_peer(r)
    _close(w)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
