"""Limits that keep one client from costing everyone else.

Each limit has a setting, a default and a defined answer (PROTOCOL.md §6):
message rate (``rate_limited``, then close 4003), new connections per
address (HTTP 429), connections per visitor (close 4004), subscriptions per
agent, presence and signal sizes (``limit_exceeded``).
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from protocol.errors import ErrorCode, ProtocolError

from . import metrics
from .config import Settings

WINDOW = 60.0
MAX_TRACKED_ADDRESSES = 50_000


class ConnectionRate:
    """New connections per client address per minute, on this instance.

    Counted locally on purpose: it must cost nothing when Redis is slow or
    away, and a flood hits one instance's accept loop, not the cluster's."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, address: str) -> bool:
        now = time.monotonic()
        started, count = self._windows.get(address, (now, 0))
        if now - started >= WINDOW:
            started, count = now, 0
        self._windows[address] = (started, count + 1)
        if len(self._windows) > MAX_TRACKED_ADDRESSES:
            self._windows = {a: w for a, w in self._windows.items() if now - w[0] < WINDOW}
        return count < self.per_minute


class LimitExceeded(ProtocolError):
    """A limit said no; ``setting`` names it (and labels its metric)."""

    def __init__(self, setting: str, message: str, code: ErrorCode = ErrorCode.LIMIT_EXCEEDED) -> None:
        super().__init__(code, message)
        self.setting = setting


class ConnectionLimit(LimitExceeded):
    """The visitor holds its maximum of connections: closed with 4004, and
    a later reconnect (once a tab is gone) may succeed."""

    def __init__(self, limit: int) -> None:
        super().__init__("max_connections_per_visitor", f"this visitor already has {limit} connections")


def check_size(data: dict[str, Any] | None, limit: int, setting: str, what: str) -> None:
    if data and len(msgpack.packb(data)) > limit:
        raise LimitExceeded(setting, f"{what} is over {limit} bytes")


def check_presence(data: dict[str, Any], settings: Settings) -> None:
    """A connection's whole presence data (after a merge) within its limits."""
    if len(data) > settings.max_presence_fields:
        raise LimitExceeded("max_presence_fields", f"presence data has more than {settings.max_presence_fields} fields")
    check_size(data, settings.max_presence_bytes, "max_presence_bytes", "presence data")


def count(error: ProtocolError) -> None:
    """Count a refusal in the metrics if a limit made it."""
    if isinstance(error, LimitExceeded):
        metrics.limit_hit(error.setting)
