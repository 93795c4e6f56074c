"""The server's log lines: text for people, or one JSON object per line for log collectors (--log-format).

A JSON line holds `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`, `pid` and `worker`
(the worker's index, 0..N-1, or null in the supervisor), plus the structured fields a line was logged with
(`extra=`): a refused call carries `peer`, `service`, `method`, `code` and `reason`; an exception adds
`exception` (the formatted traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s tensorps[%(process)d] %(message)s"

# What every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_worker: list[int | None] = [None]


def set_worker(index: int | None) -> None:
    """Name this process's worker index in its JSON lines (None: the supervisor)."""
    _worker[0] = index


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        line: dict[str, Any] = {
            "time": f"{stamp}.{int((record.created - seconds) * 1000):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "worker": _worker[0],
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level` in `fmt` ("text" or "json"); replaces any handler set before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python's warnings would otherwise go to stderr as plain text, between the JSON lines.
    logging.captureWarnings(fmt == "json")
