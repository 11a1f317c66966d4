"""Lock modes and the VMS compatibility matrix (seed 003, "compatibility matrix").

Six modes, weakest to strongest::

    NL  null              - no access; keeps the resource (and its value block) known
    CR  concurrent read   - read, others may write (CW/PW)
    CW  concurrent write  - write, others may read/write unprotected (CR/CW)
    PR  protected read    - shared read, no writers
    PW  protected write   - one writer, others may only CR
    EX  exclusive         - nobody else except NL

The matrix is symmetric and copied verbatim from the seed::

              NL  CR  CW  PR  PW  EX      (requested)
    NL        yes yes yes yes yes yes
    CR        yes yes yes yes yes no
    CW        yes yes yes no  no  no
    PR        yes yes no  yes no  no
    PW        yes yes no  no  no  no
    EX        yes no  no  no  no  no
    (existing)
"""

from __future__ import annotations

from enum import IntEnum


class Mode(IntEnum):
    """A lock mode.  Integer order is weakest to strongest (only a partial order for
    access rights: CW and PR are incomparable), which is what ``max`` is used for when
    choosing the mode to report in a blocking notification."""

    NL = 0
    CR = 1
    CW = 2
    PR = 3
    PW = 4
    EX = 5


_Y, _N = True, False
#: COMPATIBLE[existing][requested], exactly the seed's table.
COMPATIBLE: tuple[tuple[bool, ...], ...] = (
    (_Y, _Y, _Y, _Y, _Y, _Y),  # NL
    (_Y, _Y, _Y, _Y, _Y, _N),  # CR
    (_Y, _Y, _Y, _N, _N, _N),  # CW
    (_Y, _Y, _N, _Y, _N, _N),  # PR
    (_Y, _Y, _N, _N, _N, _N),  # PW
    (_Y, _N, _N, _N, _N, _N),  # EX
)

#: COMPAT_MASK[m] has bit k set iff mode k is compatible with m (fast path checks).
COMPAT_MASK: tuple[int, ...] = tuple(
    sum(1 << k for k in range(6) if COMPATIBLE[m][k]) for m in range(6)
)

#: Modes whose holder may change the lock value block (written on release/down-convert).
WRITER_MODES = frozenset({Mode.PW, Mode.EX})


def compatible(existing: int, requested: int) -> bool:
    """True iff a lock in ``requested`` mode can be granted beside one in ``existing``."""
    return (COMPAT_MASK[existing] >> requested) & 1 == 1


def parse_mode(m: Mode | str | int) -> Mode:
    """Accept ``Mode.PR``, ``"PR"``/``"pr"`` or ``3``; raise ``ValueError`` otherwise."""
    if isinstance(m, Mode):
        return m
    if isinstance(m, str):
        try:
            return Mode[m.upper()]
        except KeyError:
            raise ValueError(f"unknown lock mode {m!r}; use one of NL CR CW PR PW EX") from None
    return Mode(m)
