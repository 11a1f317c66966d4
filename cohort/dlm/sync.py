"""A blocking wrapper for plain threads.

The agent lives on an asyncio loop (usually the server's).  :class:`SyncLockAgent`
forwards each call to that loop with ``run_coroutine_threadsafe`` and blocks the
calling thread until it completes, so threads can use cluster locks::

    sync = SyncLockAgent(agent, loop)
    with sync.lock("cache/7", "PW", timeout=2) as h:
        h.set_value(b"v2")

Never call it from the agent's own loop thread (it would deadlock); it raises
``RuntimeError`` if you do.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from cohort.dlm.agent import Handle, LockAgent
from cohort.dlm.modes import Mode

T = TypeVar("T")


class SyncHandle:
    """A granted lock, used from a thread."""

    def __init__(self, owner: SyncLockAgent, handle: Handle) -> None:
        self._owner = owner
        self.handle = handle

    @property
    def token(self) -> int:
        return self.handle.token

    @property
    def mode(self) -> Mode | None:
        return self.handle.mode

    @property
    def value(self) -> bytes:
        return self.handle.value

    @property
    def value_valid(self) -> bool:
        return self.handle.value_valid

    @property
    def previous_holder_died(self) -> str | None:
        return self.handle.previous_holder_died

    @property
    def lost(self) -> bool:
        return self.handle.lost.is_set()

    def set_value(self, value: bytes) -> None:
        self.handle.set_value(value)

    def release(self) -> None:
        self._owner._run(self.handle.release())

    def convert(self, mode: Mode | str, *, timeout: float | None = None) -> None:
        self._owner._run(self.handle.convert(mode, timeout=timeout))

    def __enter__(self) -> SyncHandle:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class SyncLockAgent:
    """Thread-side facade of a :class:`LockAgent` running on ``loop``."""

    def __init__(self, agent: LockAgent, loop: asyncio.AbstractEventLoop) -> None:
        self.agent = agent
        self.loop = loop

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RuntimeError("SyncLockAgent called from the agent's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def lock(self, name: str, mode: Mode | str, **kw: Any) -> SyncHandle:
        """Block until granted; same keywords and errors as :meth:`LockAgent.lock`."""

        async def go() -> Handle:
            return await self.agent.lock(name, mode, **kw)

        return SyncHandle(self, self._run(go()))


def run_loop_in_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """Start a fresh event loop in a daemon thread (for programs without one)."""
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, name="dlm-loop", daemon=True)
    t.start()
    return loop, t
