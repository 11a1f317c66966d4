"""A stand-alone lock-agent process (tests, benchmarks, and small deployments).

``python -m cohort.dlm.node --id n1 --cluster-key FILE [--port 0]`` serves the DLM over TCP on 127.0.0.1,
prints ``READY <port>`` on stdout, and waits.  Membership comes from outside through
``dlm.admin.membership [epoch, {node: "host:port"}]`` (the coordinator's job); programs
take locks through :class:`cohort.dlm.client.DlmClient`.  ``dlm.admin.ping`` answers
"pong" (lease renewal probe for a test coordinator).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

from cohort.auth import ClusterKey, Verifier
from cohort.dlm.agent import LockAgent
from cohort.dlm.client import ClientService
from cohort.dlm.transport import TcpTransport
from cohort.rpc import ClientPool, RpcServer


async def serve(node_id: str, host: str, port: int, deadlock_wait: float, key: ClusterKey) -> None:
    # members (peer agents, the test coordinator, DlmClients with the member credential)
    server = RpcServer(Verifier(key))
    transport = TcpTransport(server, ClientPool(key.member(node_id)), own_pool=True)
    agent = LockAgent(node_id, transport, deadlock_wait=deadlock_wait)
    service = ClientService(agent, server)

    async def membership(params: Any) -> None:
        epoch, members = params
        agent.set_membership(int(epoch), dict(members))

    async def ping(params: Any) -> str:
        return "pong"

    async def lease_lost(params: Any) -> None:
        agent.lease_lost()

    async def status(params: Any) -> dict[str, Any]:
        return agent.status()

    server.register("dlm.admin.membership", membership)
    server.register("dlm.admin.ping", ping)
    server.register("dlm.admin.lease_lost", lease_lost)
    server.register("dlm.admin.status", status)
    bound = await server.start(host, port)
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    service.close()
    await transport.aclose()
    await server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--id", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--deadlock-wait", type=float, default=1.0)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--cluster-key", required=True, help="the cluster key file (0600)")
    a = p.parse_args()
    os.umask(0o077)
    if a.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(a.id, a.host, a.port, a.deadlock_wait, ClusterKey.load(a.cluster_key)))


if __name__ == "__main__":
    main()
