"""Fault proxies for synchronous code: :class:`FaultProxy` instances on a private loop.

:class:`LocalCluster` is synchronous, and the chaos runner drives faults from its own
event loop, so the proxies that sit in front of cluster members live on a third loop in a
daemon thread (:class:`ProxyLoop`).  :class:`ThreadedFaultProxy` *is* a
:class:`FaultProxy` (the nemesis and ``run_chaos(proxies=...)`` take it as one) whose
controls — :meth:`pass_through`, :meth:`delay`, :meth:`drop`, :meth:`blackhole`,
:meth:`close` — may be called from any thread or loop: they run on the proxy's own loop
and return once applied.  :meth:`retarget` points it at a member that came back on a new
port (a restarted server).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from cohort.chaos.proxy import FaultProxy

T = TypeVar("T")


class ProxyLoop:
    """An asyncio loop running in a daemon thread."""

    def __init__(self, name: str = "fault-proxies") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the loop and return its result (directly when already there)."""
        if self.in_loop():
            return fn()

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        assert not self.in_loop(), "ProxyLoop.run would deadlock on its own thread"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class ThreadedFaultProxy(FaultProxy):
    """A :class:`FaultProxy` on a :class:`ProxyLoop`, controllable from any thread."""

    def __init__(self, ploop: ProxyLoop, *args: Any, **kw: Any) -> None:
        self.ploop = ploop
        super().__init__(*args, **kw)

    def start_sync(self) -> int:
        return self.ploop.run(FaultProxy.start(self))

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def retarget(self, host: str, port: int) -> None:
        """Dial ``host:port`` for new connections (open ones keep their upstream)."""

        def set_target() -> None:
            self.target_host, self.target_port = host, port

        self.ploop.call(set_target)

    def pass_through(self) -> None:
        self.ploop.call(super().pass_through)

    def delay(self, seconds: float) -> None:
        sup = super().delay
        self.ploop.call(lambda: sup(seconds))

    def drop(self) -> None:
        self.ploop.call(super().drop)

    def blackhole(self) -> None:
        self.ploop.call(super().blackhole)

    async def close(self) -> None:
        if self.ploop.in_loop():
            await FaultProxy.close(self)
            return
        fut: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(
            FaultProxy.close(self), self.ploop.loop
        )
        await asyncio.wrap_future(fut)

    def close_sync(self) -> None:
        self.ploop.run(FaultProxy.close(self))
