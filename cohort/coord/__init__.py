"""Coordinator backends and the factory that picks one from an address.

* ``"host:port"`` - the embedded coordinator process (:class:`~cohort.coord.client.RpcCoordinator`);
* ``"etcd://h1:p1,h2:p2[/namespace][?lease_ttl=2&partitions=256&campaign=1]"`` - etcd
  (:class:`~cohort.coord.etcd.EtcdCoordinator`).  More options: TLS and credentials
  (``ca``, ``cert``, ``key``, ``tls=1`` or ``etcds://``, ``user`` + ``password_file``) and
  the rules' settings (``failback``, ``capacity_schedule``, ``load_balance=0``,
  ``load_<field>``), see :mod:`cohort.coord.etcd`.
"""

from __future__ import annotations

from cohort.auth import AuthError, Credential
from cohort.coord.base import Coordinator


def connect(address: str, credential: Credential | None = None) -> Coordinator:
    """A client of the coordinator at ``address`` (see the module docstring for the forms).

    ``credential`` is the member credential the embedded coordinator checks; etcd has its
    own (client certificates or a user, named in the address).
    """
    if address.startswith("etcd"):
        from cohort.coord.etcd import EtcdCoordinator

        return EtcdCoordinator(address)
    from cohort.coord.client import RpcCoordinator

    if credential is None:
        raise AuthError(f"the coordinator at {address} needs a member credential (cluster key)")
    return RpcCoordinator(address, credential)


__all__ = ["Coordinator", "connect"]
