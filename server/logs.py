"""Logging set-up: text for people, JSON lines for log pipelines.

Every record carries the ID of the connection it is about (when there is
one) and the instance's ID, so one client's story can be followed through
a cluster's interleaved logs. The connection ID comes from a context
variable set by the websocket handler: tasks and timers started while
serving a connection inherit it, so nothing has to pass it along.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

CONNECTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("herald_connection", default=None)
_instance: str | None = None

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(connection)s]: %(message)s"
EXTRA_FIELDS = ("http",)  # structured extras a JSON line carries as they are


def set_instance(instance: str) -> None:
    global _instance
    _instance = instance


class ContextFilter(logging.Filter):
    """Stamps each record with the connection and instance it belongs to."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.connection = CONNECTION.get() or "-"
        record.instance = _instance or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, connection,
    instance, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("connection", "instance"):
            value = getattr(record, name, "-")
            if value != "-":
                line[name] = value
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str, fmt: str) -> None:
    """Route every logger (aiohttp's access log too) to stderr in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
