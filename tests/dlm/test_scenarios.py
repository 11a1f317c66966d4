"""Runs the data-driven scenarios in ``testdata/*.txt`` against the pure lock table."""

from __future__ import annotations

from pathlib import Path

import pytest

from cohort.dlm.modes import Mode
from cohort.dlm.resource import (
    BLOCKING,
    EXPEDITE,
    NOQUEUE,
    QUECVT,
    RANGE_MAX,
    Blocking,
    Denied,
    Event,
    Granted,
    LockTable,
)

FILES = sorted((Path(__file__).parent / "testdata").glob("*.txt"))
FLAGS = {"noqueue": NOQUEUE, "expedite": EXPEDITE, "blocking": BLOCKING, "quecvt": QUECVT}


def fmt(ev: Event) -> str:
    if isinstance(ev, Granted):
        s = f"granted {ev.key} {Mode(ev.mode).name} token={ev.token}"
        if ev.value:
            s += f" value={ev.value.decode()}"
        if not ev.value_valid:
            s += " invalid"
        if ev.dead_holder:
            s += f" dead={ev.dead_holder}"
        return s
    if isinstance(ev, Blocking):
        return f"blocking {ev.key} {Mode(ev.mode).name}"
    assert isinstance(ev, Denied)
    return f"denied {ev.key} {ev.reason}" + (" still_granted" if ev.still_granted else "")


def run(table: LockTable, line: str) -> list[str]:
    cmd, *args = line.split()
    opts = [a for a in args if "=" not in a and a not in Mode.__members__]
    kv = dict(a.split("=", 1) for a in args if "=" in a)
    flags = sum(FLAGS[o] for o in opts if o in FLAGS)
    value = kv["value"].encode() if "value" in kv else None
    if cmd == "request":
        res, key, mode = args[0], args[1], Mode[args[2]]
        start, end = 0, RANGE_MAX
        if "range" in kv:
            a, b = kv["range"].split("-")
            start, end = int(a), int(b)
        evs = table.request(
            res, key, mode, node=key.split(".")[0], flags=flags, start=start, end=end
        )
    elif cmd == "convert":
        evs = table.convert(args[0], Mode[args[1]], flags=flags, value=value)
    elif cmd == "release":
        evs = table.release(args[0], value)
    elif cmd == "cancel":
        evs = table.cancel(args[0])
    elif cmd == "drop":
        evs = table.drop_node(args[0])
    else:
        raise ValueError(f"unknown command {cmd!r}")
    return [fmt(e) for e in evs]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_scenario(path: Path) -> None:
    table = LockTable()
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#") or line.startswith(">"):
            continue
        expected: list[str] = []
        while i < len(lines) and lines[i].startswith(">"):
            e = lines[i][1:].strip()
            if e != "-":
                expected.append(e)
            i += 1
        got = run(table, line)
        assert got == expected, f"{path.name}:{i}: {line}"
