"""Cohort's distributed lock manager (VMS semantics).  See ``docs/dlm.md``.

* :mod:`cohort.dlm.modes` - the six modes and the compatibility matrix
* :mod:`cohort.dlm.resource` - the pure lock table (queues, grants, value blocks)
* :mod:`cohort.dlm.agent` - the per-node lock agent (directory, mastership, recovery)
* :mod:`cohort.dlm.transport` - in-memory and TCP transports
* :mod:`cohort.dlm.client` / :mod:`cohort.dlm.sync` - network client, thread wrapper
"""

from cohort.dlm.agent import Handle, LockAgent
from cohort.dlm.errors import (
    Cancelled,
    DeadlockError,
    DlmError,
    LockLost,
    LockTimeout,
    NotQueued,
    UsageError,
)
from cohort.dlm.modes import Mode, compatible
from cohort.dlm.transport import MemoryNetwork, TcpTransport

__all__ = [
    "Cancelled",
    "DeadlockError",
    "DlmError",
    "Handle",
    "LockAgent",
    "LockLost",
    "LockTimeout",
    "MemoryNetwork",
    "Mode",
    "NotQueued",
    "TcpTransport",
    "UsageError",
    "compatible",
]
