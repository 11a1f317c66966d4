"""An acquisition that is awaitable, schedulable as a task, and an async context manager.

``LockAgent.lock`` (in-process) and ``DlmClient.lock`` (over TCP) both return one:
``h = await agent.lock(...)``, ``asyncio.create_task(agent.lock(...))`` and
``async with agent.lock(...) as h:`` all work.  The acquisition coroutine is made on
first use, so a call that is never awaited costs nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

H = TypeVar("H")


class AcquireCall(Coroutine[Any, Any, H], Generic[H]):
    """``acquire()`` makes the coroutine that returns a handle; ``release(handle)`` runs
    when an ``async with`` block exits (it may return an awaitable)."""

    __slots__ = ("_acquire", "_coro", "_release", "handle")

    def __init__(
        self,
        acquire: Callable[[], Coroutine[Any, Any, H]],
        release: Callable[[H], Awaitable[None] | None],
    ) -> None:
        self._acquire = acquire
        self._release = release
        self._coro: Coroutine[Any, Any, H] | None = None
        self.handle: H | None = None

    def _get(self) -> Coroutine[Any, Any, H]:
        if self._coro is None:
            self._coro = self._acquire()
        return self._coro

    def __await__(self) -> Generator[Any, None, H]:
        return self._get().__await__()

    def send(self, value: Any) -> Any:
        return self._get().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        return self._get().throw(typ, val, tb)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    async def __aenter__(self) -> H:
        self.handle = await self._get()
        return self.handle

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.handle is not None:
            pending = self._release(self.handle)
            if pending is not None:
                await pending
