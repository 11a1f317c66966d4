"""History data types and their JSON form."""

from __future__ import annotations

import math
import threading

import pytest

from cohort.chaos.history import History, Op, Recorder, decode_value, encode_value


def test_op_end_and_describe() -> None:
    ok = Op(1, "put", "k", "v", 1.0, 2.0, "ok")
    assert ok.end == 2.0
    assert Op(1, "put", "k", "v", 1.0, 2.0, "info").end == math.inf
    assert Op(1, "put", "k", "v", 1.0, None, "ok").end == math.inf
    assert "put k='v'" in ok.describe()
    assert "-> None" in Op(2, "get", "k", None, 0, 1, "ok", None).describe()


def test_values_round_trip() -> None:
    for v in (None, "text", b"\x00\xffbytes", b""):
        assert decode_value(encode_value(v)) == v
        assert type(decode_value(encode_value(v))) is type(v)
    with pytest.raises(ValueError):
        decode_value(3)


def test_history_json_round_trip() -> None:
    h = History(
        [
            Op(0, "put", "a", b"\x01", 0.5, 1.5, "ok"),
            Op(1, "get", "a", None, 1.0, 2.0, "ok", read_value=b"\x01"),
            Op(2, "delete", "b", None, 1.0, None, "info", error="timeout"),
            Op(3, "lock", "r", "EX", 2.0, 3.0, "ok", read_value="17"),
            Op(3, "put", "a", "s", 4.0, 5.0, "fail", error="refused"),
        ]
    )
    assert [o.index for o in h] == [0, 1, 2, 3, 4]
    back = History.from_json(h.to_json())
    assert back.ops == h.ops
    assert set(h.by_key()) == {"a", "b", "r"}
    assert [o.index for o in h.by_key(["put"])["a"]] == [0, 4]
    with pytest.raises(ValueError):
        Op.from_dict({**h.ops[0].to_dict(), "kind": "frobnicate"})


def test_recorder_is_thread_safe_and_marks_pending_as_info() -> None:
    t = [0.0]
    lock = threading.Lock()

    def clock() -> float:
        with lock:
            t[0] += 1
            return t[0]

    rec = Recorder(clock)

    def worker(p: int) -> None:
        for i in range(100):
            h = rec.invoke(p, "put", "k", f"{p}-{i}")
            (rec.ok if i % 3 else rec.fail)(h)

    threads = [threading.Thread(target=worker, args=(p,)) for p in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rec.invoke(9, "get", "k")
    h = rec.history()
    assert len(h) == 401
    assert [o.invoke for o in h] == sorted(o.invoke for o in h)
    pending = [o for o in h if o.process == 9]
    assert pending[0].result == "info" and pending[0].complete is None
    assert all(o.complete is not None and o.complete > o.invoke for o in h if o.process != 9)
