from __future__ import annotations

import asyncio
from collections.abc import Callable

from cohort.dlm.agent import LockAgent
from cohort.dlm.transport import MemoryNetwork


def make_cluster(
    n: int, *, deadlock_wait: float | None = 0.2
) -> tuple[MemoryNetwork, list[LockAgent]]:
    """n agents over an auto-delivering in-memory network, epoch 1."""
    net = MemoryNetwork()
    ids = [f"n{i}" for i in range(n)]
    agents = [LockAgent(i, net.transport(i), deadlock_wait=deadlock_wait) for i in ids]
    for a in agents:
        a.set_membership(1, {i: "" for i in ids})
    return net, agents


async def settle(net: MemoryNetwork) -> None:
    """Let queued in-memory deliveries run (they are loop.call_soon callbacks)."""
    for _ in range(50):
        await asyncio.sleep(0)
        if not net.pending():
            return


async def poll(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.002)
