"""Reading object bodies safely while their objects change: reader leases and the
maximum read duration.

A director reads a body itself, from shared storage, after the owner (or a read replica)
answered its metadata lookup.  Any moment after that answer the object may be replaced or
deleted, which frees its blobs.  Servers delete a freed blob no sooner than the grace
period after the record that freed it (:func:`cohort.server.state.blob_grace`), and never
while a reader lease on it lasts (:class:`cohort.server.host.BlobReclaimer`).  So:

* a read that holds no lease must be done within half the grace period of its lookup
  (small bodies, read into memory before the response starts);
* a longer read (a streamed body, a copy) leases the blobs it reads from the partition's
  owner at once (``obj.lease``) and renews the lease every third of it, for as long as
  the read lasts, up to :func:`max_read_seconds`;
* when a read cannot renew in time, or has lasted the maximum, its :attr:`deadline`
  passes: :meth:`BlobLease.check` raises :class:`ReadExpired` before the next storage
  read, and ``on_expired`` is called (a GET aborts its connection: the client sees a
  short body, never bytes of a blob that may be gone).

Correctness never depends on these clocks: blob names are never reused, so reading a
deleted blob fails (NotFound), it cannot return other data.  The leases make long reads
succeed; the deadline makes a reader that cannot be protected stop cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cohort.server.state import ObjectMeta, blob_grace

log = logging.getLogger("cohort.director.reads")

DEFAULT_MAX_READ = 24 * 3600.0

#: ``renew(blobs, seconds)`` asks the owner for a lease; returns its reply
#: (``{"s": seconds granted, "grace": the server's grace period}``)
Renew = Callable[[list[str], float], Awaitable[Any]]


def max_read_seconds() -> float:
    """The longest a director lets one read of a body last (env
    ``COHORT_MAX_READ_SECONDS``, default a day): a reader that stalls cannot keep a
    replaced blob on storage for longer."""
    try:
        v = float(os.environ.get("COHORT_MAX_READ_SECONDS", DEFAULT_MAX_READ))
    except ValueError:
        return DEFAULT_MAX_READ
    return v if v > 0 else DEFAULT_MAX_READ


class ReadExpired(Exception):
    """The read may no longer touch storage: its lease ran out or it lasted too long."""


def blobs_in_range(meta: ObjectMeta, start: int, length: int) -> list[str]:
    """The blobs holding bytes ``[start, start + length)`` of an object's body."""
    if meta.blob:
        return [meta.blob] if length > 0 else []
    out: list[str] = []
    offset = 0
    end = start + length
    for blob, size in meta.segments:
        if offset < end and offset + size > start:
            out.append(blob)
        offset += size
    return out


def owner_lease(router: Any, p: int, bucket_id: str, key: str) -> Renew:
    """A ``renew`` that asks the owner of partition ``p`` (through the router, which
    follows owner changes) for a lease on blobs of ``bucket_id``/``key``."""

    async def renew(blobs: list[str], seconds: float) -> Any:
        return await router.call(
            p, "obj.lease", {"b": bucket_id, "k": key, "blobs": blobs, "s": seconds}
        )

    return renew


class BlobLease:
    """The time a read of ``blobs`` may go on, kept moving by lease renewals.

    ``started`` is when the metadata lookup was sent (monotonic).  Without ``renew`` the
    read has half the grace period from then.  With it, :meth:`start` asks for a lease
    at once and renews it every third of the lease; each granted lease moves
    :attr:`deadline` to ``send time + granted - margin``, never past ``started +
    max_read``.  ``on_expired`` is called (once) when the deadline passes first.
    """

    def __init__(
        self,
        blobs: list[str],
        renew: Renew | None,
        *,
        started: float,
        grace: float | None = None,
        max_read: float | None = None,
        on_expired: Callable[[], None] | None = None,
    ) -> None:
        self.blobs = blobs
        self.renew = renew
        self.grace = blob_grace() if grace is None else grace
        self.started = started
        self.limit = started + (max_read_seconds() if max_read is None else max_read)
        self.deadline = min(started + self.grace / 2, self.limit)
        self.on_expired = on_expired
        self.expired = False
        self.renewals = 0
        self._task: asyncio.Task[None] | None = None

    def check(self) -> None:
        """Raise :class:`ReadExpired` unless the read may still touch storage."""
        if self.expired or time.monotonic() >= self.deadline:
            self._expire()
            raise ReadExpired(
                f"read of {len(self.blobs)} blob(s) past its deadline "
                f"({time.monotonic() - self.started:.1f}s after the lookup)"
            )

    def start(self) -> None:
        if self._task is None and (self.renew is not None or self.on_expired is not None):
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def __aenter__(self) -> BlobLease:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _expire(self) -> None:
        if self.expired:
            return
        self.expired = True
        if self.on_expired is not None:
            try:
                self.on_expired()
            except Exception:
                log.exception("on_expired failed")

    async def _run(self) -> None:
        next_renew = time.monotonic()
        failures = 0
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                self._expire()
                return
            can_renew = self.renew is not None and self.blobs and self.deadline < self.limit
            if can_renew and now >= next_renew:
                assert self.renew is not None
                try:
                    r = await asyncio.wait_for(
                        self.renew(self.blobs, self.grace), timeout=self.deadline - now
                    )
                    granted = float(r.get("s", 0.0)) if isinstance(r, dict) else 0.0
                    if isinstance(r, dict) and r.get("grace"):
                        self.grace = min(self.grace, float(r["grace"]))
                    if granted > 0:
                        margin = min(1.0, granted / 10)
                        self.deadline = min(max(self.deadline, now + granted - margin), self.limit)
                        self.renewals += 1
                        failures = 0
                    next_renew = now + max(0.05, granted / 3)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    failures += 1
                    if failures == 1:
                        log.warning("reader lease renewal failed (retrying): %s", e)
                    next_renew = time.monotonic() + min(1.0, self.grace / 10)
                continue
            wake = self.deadline if not can_renew else min(self.deadline, next_renew)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
