"""Logging: one JSON object per line in files, human lines on a terminal.

Every record carries the member id (set once per process) and, where one applies, the
epoch (pass ``extra={"epoch": n}``, or ``extra={"partition": p, "epoch": n}``).
"""

from __future__ import annotations

import json
import logging
import sys
import time

_member_id = "-"


class _MemberFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.member = _member_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "member": getattr(record, "member", _member_id),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k in ("epoch", "partition", "event"):
            v = getattr(record, k, None)
            if v is not None:
                obj[k] = v
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


class HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = ""
        p = getattr(record, "partition", None)
        e = getattr(record, "epoch", None)
        if p is not None:
            extra += f" p={p}"
        if e is not None:
            extra += f" epoch={e}"
        line = f"{t} {getattr(record, 'member', _member_id):>12} {record.levelname.lower():7} {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(member_id: str, log_file: str | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger: JSON lines to ``log_file`` if given, human lines to stderr."""
    global _member_id
    _member_id = member_id
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    flt = _MemberFilter()
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(JsonFormatter())
        fh.addFilter(flt)
        root.addHandler(fh)
    else:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(HumanFormatter() if sys.stderr.isatty() else JsonFormatter())
        sh.addFilter(flt)
        root.addHandler(sh)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
