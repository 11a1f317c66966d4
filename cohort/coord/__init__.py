"""Coordinator backends and the factory that picks one from an address.

* ``"host:port"`` - the embedded coordinator process (:class:`~cohort.coord.client.RpcCoordinator`);
* ``"etcd://h1:p1,h2:p2[/namespace][?lease_ttl=2&partitions=256&campaign=1]"`` - etcd
  (:class:`~cohort.coord.etcd.EtcdCoordinator`).
"""

from __future__ import annotations

from cohort.coord.base import Coordinator


def connect(address: str) -> Coordinator:
    """A client of the coordinator at ``address`` (see the module docstring for the forms)."""
    if address.startswith("etcd://"):
        from cohort.coord.etcd import EtcdCoordinator

        return EtcdCoordinator(address)
    from cohort.coord.client import RpcCoordinator

    return RpcCoordinator(address)


__all__ = ["Coordinator", "connect"]
