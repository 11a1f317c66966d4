"""Plain data types for a recorded history of client operations, and their JSON form.

An operation is recorded by the client that issued it: ``invoke`` is taken just before the
request is sent and ``complete`` just after its outcome is known, both from one monotonic
clock shared by every recording process (``time.monotonic`` inside one runner process).

``result`` says what the client learned:

* ``"ok"``   — the operation took effect (for a ``get``, ``read_value`` is what it read,
  ``None`` meaning the key was missing);
* ``"fail"`` — the operation definitely did **not** take effect (e.g. connection refused,
  a 4xx answer); checkers drop it;
* ``"info"`` — the outcome is unknown (e.g. a timeout): it may or may not have taken
  effect, at any time after ``invoke``.  Checkers treat it as completing at +infinity.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias, cast

OpKind: TypeAlias = Literal["put", "get", "delete", "lock", "unlock"]
OpResult: TypeAlias = Literal["ok", "fail", "info"]
Value: TypeAlias = bytes | str | None

KINDS: tuple[OpKind, ...] = ("put", "get", "delete", "lock", "unlock")
RESULTS: tuple[OpResult, ...] = ("ok", "fail", "info")


@dataclass(frozen=True, slots=True)
class Op:
    """One client operation.

    ``value`` is the argument (the value written by ``put``, the lock mode of ``lock``,
    ``None`` otherwise); ``read_value`` is what an ``ok`` ``get`` returned (``None`` =
    missing key) or, for ``lock``, the fencing token as text.  ``complete`` is ``None``
    only while the operation is still pending or when its completion was never seen.
    ``error`` is a human-readable reason for ``fail``/``info``; ``index`` is the position
    in the history it was recorded in (``-1`` when not part of a history).
    """

    process: int
    kind: OpKind
    key: str
    value: Value
    invoke: float
    complete: float | None
    result: OpResult
    read_value: Value = None
    error: str | None = None
    index: int = -1

    @property
    def end(self) -> float:
        """The latest time the operation can have taken effect (+inf for ``info``)."""
        if self.result == "info" or self.complete is None:
            return math.inf
        return self.complete

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "process": self.process,
            "kind": self.kind,
            "key": self.key,
            "value": encode_value(self.value),
            "invoke": self.invoke,
            "complete": self.complete,
            "result": self.result,
            "read_value": encode_value(self.read_value),
        }
        if self.error is not None:
            d["error"] = self.error
        if self.index >= 0:
            d["index"] = self.index
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        kind = d["kind"]
        result = d["result"]
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r}")
        if result not in RESULTS:
            raise ValueError(f"unknown op result {result!r}")
        complete = d.get("complete")
        return cls(
            process=int(d["process"]),
            kind=cast(OpKind, kind),
            key=str(d["key"]),
            value=decode_value(d.get("value")),
            invoke=float(d["invoke"]),
            complete=None if complete is None else float(complete),
            result=cast(OpResult, result),
            read_value=decode_value(d.get("read_value")),
            error=d.get("error"),
            index=int(d.get("index", -1)),
        )

    def describe(self) -> str:
        """A one-line human form, e.g. ``p3 put k=b'x' [1.000, 1.020] ok``."""
        end = "inf" if self.complete is None else f"{self.complete:.6f}"
        arg = "" if self.kind in ("get", "delete", "unlock") else f"={self.value!r}"
        out = f" -> {self.read_value!r}" if self.kind == "get" and self.result == "ok" else ""
        return (
            f"#{self.index} p{self.process} {self.kind} {self.key}{arg}{out}"
            f" [{self.invoke:.6f}, {end}] {self.result}"
        )


def encode_value(v: Value) -> Any:
    """JSON form of a value: ``null``, a string, or ``{"b64": ...}`` for bytes."""
    if v is None or isinstance(v, str):
        return v
    return {"b64": base64.b64encode(v).decode("ascii")}


def decode_value(v: Any) -> Value:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("b64"), str):
        return base64.b64decode(v["b64"])
    raise ValueError(f"cannot decode value {v!r}")


@dataclass(slots=True)
class History:
    """An ordered list of operations; ``ops[i].index == i`` once built by this class."""

    ops: list[Op] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ops = [op if op.index == i else replace(op, index=i) for i, op in enumerate(self.ops)]

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def append(self, op: Op) -> Op:
        op = replace(op, index=len(self.ops))
        self.ops.append(op)
        return op

    def by_key(self, kinds: Iterable[OpKind] | None = None) -> dict[str, list[Op]]:
        """Operations grouped by key (in history order), optionally only of ``kinds``."""
        wanted = set(kinds) if kinds is not None else set(KINDS)
        out: dict[str, list[Op]] = {}
        for op in self.ops:
            if op.kind in wanted:
                out.setdefault(op.key, []).append(op)
        return out

    def to_json(self) -> str:
        return json.dumps({"ops": [op.to_dict() for op in self.ops]})

    @classmethod
    def from_json(cls, text: str) -> History:
        doc = json.loads(text)
        return cls([Op.from_dict(d) for d in doc["ops"]])


@dataclass(slots=True)
class _Pending:
    process: int
    kind: OpKind
    key: str
    value: Value
    invoke: float


class Recorder:
    """Thread-safe builder of a :class:`History` for concurrent clients.

    ``h = rec.invoke(p, "put", k, v)`` before sending, then exactly one of
    ``rec.ok(h, read_value)``, ``rec.fail(h, why)`` or ``rec.info(h, why)``.  Operations
    still pending at :meth:`history` time are recorded as ``info`` (outcome unseen).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        self._done: list[Op] = []

    def invoke(self, process: int, kind: OpKind, key: str, value: Value = None) -> int:
        p = _Pending(process, kind, key, value, self.clock())
        with self._lock:
            handle = next(self._ids)
            self._pending[handle] = p
        return handle

    def _finish(self, handle: int, result: OpResult, read_value: Value, error: str | None) -> Op:
        now = self.clock()
        with self._lock:
            p = self._pending.pop(handle)
            op = Op(p.process, p.kind, p.key, p.value, p.invoke, now, result, read_value, error)
            self._done.append(op)
        return op

    def ok(self, handle: int, read_value: Value = None) -> Op:
        return self._finish(handle, "ok", read_value, None)

    def fail(self, handle: int, error: str | None = None) -> Op:
        return self._finish(handle, "fail", None, error)

    def info(self, handle: int, error: str | None = None) -> Op:
        return self._finish(handle, "info", None, error)

    def history(self) -> History:
        """Everything recorded so far, ordered by invocation time."""
        with self._lock:
            ops = list(self._done)
            ops += [
                Op(p.process, p.kind, p.key, p.value, p.invoke, None, "info", None, "pending")
                for p in self._pending.values()
            ]
        ops.sort(key=lambda o: (o.invoke, o.process))
        return History(ops)


def ops_sorted(ops: Sequence[Op]) -> list[Op]:
    """``ops`` by invocation time (ties by completion), the order used in reports."""
    return sorted(ops, key=lambda o: (o.invoke, o.end, o.index))
