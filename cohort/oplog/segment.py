"""Log segment and checkpoint encoding: checksummed msgpack frames.

::

    b"COHLOG1\\n" | frame* ;  frame = u32 length | u32 crc32c(payload) | payload (msgpack)

The first frame is the header (a map with ``seq``, ``epoch``, ``owner``, ``kind``); the
rest are records.  :func:`decode` verifies every checksum and raises
:class:`CorruptSegment` on a bad magic, a checksum mismatch or a truncated frame, with the
number of intact records before the damage, so a reader can report and truncate instead of
applying garbage.
"""

from __future__ import annotations

import struct
from typing import Any

import crc32c
import msgspec

MAGIC = b"COHLOG1\n"
_FRAME = struct.Struct(">II")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class CorruptSegment(Exception):
    def __init__(self, message: str, intact_records: int) -> None:
        super().__init__(message)
        self.intact_records = intact_records


def encode(header: dict[str, Any], records: list[Any]) -> bytes:
    parts = [MAGIC]
    for obj in (header, *records):
        payload = _enc.encode(obj)
        parts.append(_FRAME.pack(len(payload), crc32c.crc32c(payload)))
        parts.append(payload)
    return b"".join(parts)


def decode(data: bytes) -> tuple[dict[str, Any], list[Any]]:
    if not data.startswith(MAGIC):
        raise CorruptSegment("bad magic", 0)
    pos = len(MAGIC)
    objs: list[Any] = []
    n = len(data)
    while pos < n:
        if pos + _FRAME.size > n:
            raise CorruptSegment(f"truncated frame header at byte {pos}", max(0, len(objs) - 1))
        length, crc = _FRAME.unpack_from(data, pos)
        pos += _FRAME.size
        payload = data[pos : pos + length]
        if len(payload) != length:
            raise CorruptSegment(f"truncated frame at byte {pos}", max(0, len(objs) - 1))
        if crc32c.crc32c(payload) != crc:
            raise CorruptSegment(f"checksum mismatch at byte {pos}", max(0, len(objs) - 1))
        objs.append(_dec.decode(payload))
        pos += length
    if not objs or not isinstance(objs[0], dict):
        raise CorruptSegment("missing header", 0)
    return objs[0], objs[1:]
