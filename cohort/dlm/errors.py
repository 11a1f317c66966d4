"""Errors raised by the lock manager.  Every one says what happened and what to do."""

from __future__ import annotations


class DlmError(Exception):
    """Base class of all lock-manager errors."""


class NotQueued(DlmError):
    """NOQUEUE was given and the request could not be granted at once.  Nothing is held."""


class LockTimeout(DlmError, TimeoutError):
    """The request waited longer than its timeout and was withdrawn.  Nothing new is held
    (a timed-out conversion keeps the lock in its previous mode)."""


class DeadlockError(DlmError):
    """This request was chosen as the victim of a deadlock and withdrawn.  Release the
    locks this owner holds (or retry later); the other requests in the cycle proceed.
    A victim conversion keeps its previous mode."""


class LockLost(DlmError):
    """The lock is no longer held: the agent lost its membership lease, was removed from
    the cluster, or was shut down.  The fencing token is stale: stop using the resource
    and do not write anything guarded by it."""


class Cancelled(DlmError):
    """The request was cancelled by the caller before it was granted."""


class UsageError(DlmError):
    """The call is not valid in the lock's current state (e.g. releasing a parent that
    still has child locks, converting a lock that is not granted)."""


def denial_error(reason: str, name: str) -> DlmError:
    """Map a core denial reason to the exception the API raises."""
    if reason == "notqueued":
        return NotQueued(f"lock on {name!r} not grantable at once (NOQUEUE)")
    if reason == "timeout":
        return LockTimeout(f"lock on {name!r} timed out")
    if reason == "deadlock":
        return DeadlockError(
            f"deadlock on {name!r}: this request was chosen as victim; release held locks and retry"
        )
    if reason == "lost":
        return LockLost(f"lock on {name!r} lost (lease lost or node fenced); token is stale")
    if reason == "cancelled":
        return Cancelled(f"request on {name!r} cancelled")
    return DlmError(f"lock on {name!r} refused: {reason}")
