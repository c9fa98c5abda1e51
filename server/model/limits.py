"""Every limit that keeps one client from costing everyone else.

Each limit has a setting, a default and a defined answer (PROTOCOL.md §6).
The decisions live here; the edge carries out the answer:

=============================  =====================================  ==========================
setting                        checked by                             answer
=============================  =====================================  ==========================
``message_rate``/``_burst``    ``FrameRate`` (each frame)             ``rate_limited``, then 4003
``connections_per_address``    ``ConnectionRate`` (each upgrade)      HTTP 429
``max_connections_per_visitor`` ``presence_rules.join`` (atomic)      close 4004
``max_subscriptions_per_agent`` ``check_subscriptions``               ``limit_exceeded``
``max_presence_bytes/_fields`` ``check_presence``                     ``limit_exceeded``
``max_signal_bytes``           ``check_signal``                       ``limit_exceeded``
``code_lookups_per_*``         ``check_lookups``                      ``rate_limited`` / 429
``max_frame_bytes``            aiohttp's reader and the codec         close 1009
``max_queue``                  ``queue_full`` (the writer)            close 4001
=============================  =====================================  ==========================
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

import msgpack

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server import metrics
from herald_presence.server.config import Settings

WINDOW = 60.0
MAX_TRACKED_ADDRESSES = 50_000
FLOOD_DROPS = 200  # frames refused in a row before a flooding connection is closed


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


def count(error: ProtocolError) -> None:
    """Count a refusal in the metrics if a limit made it."""
    if isinstance(error, LimitExceeded):
        metrics.limit_hit(error.setting)


# -- per connection ----------------------------------------------------------------
class Verdict(Enum):
    ALLOWED = "allowed"
    REFUSED = "refused"  # dropped; the first of a streak is answered with rate_limited
    FIRST_REFUSED = "first_refused"
    FLOODING = "flooding"  # refused FLOOD_DROPS times in a row: close the connection


class FrameRate:
    """A connection's frames per second: a token bucket of ``burst`` frames
    refilled at ``rate`` per second, and the streak of frames refused."""

    __slots__ = ("dropped", "refilled", "tokens")

    def __init__(self) -> None:
        self.tokens = -1.0  # filled on first use
        self.refilled = 0.0
        self.dropped = 0

    def take(self, rate: float, burst: int) -> Verdict:
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens, self.refilled = float(burst), now
        self.tokens = min(float(burst), self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.dropped = 0
            return Verdict.ALLOWED
        self.dropped += 1
        if self.dropped == 1:
            metrics.limit_hit("message_rate")
            return Verdict.FIRST_REFUSED
        return Verdict.FLOODING if self.dropped >= FLOOD_DROPS else Verdict.REFUSED


def queue_full(queued: int, max_queue: int) -> bool:
    """A connection's outbound queue is at ``max_queue``: a slow consumer."""
    if queued < max_queue:
        return False
    metrics.limit_hit("max_queue")
    return True


# -- per address ---------------------------------------------------------------------
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
        if count < self.per_minute:
            return True
        metrics.limit_hit("connections_per_address")
        return False


def check_lookups(per_address: int, per_group: int, settings: Settings) -> None:
    """Short-code look-ups counted this minute, by address and by group: a
    budget for each, so that guessing a live code stays impractical even
    from many addresses."""
    over_address = per_address > settings.code_lookups_per_address
    if over_address or per_group > settings.code_lookups_per_group:
        setting = "code_lookups_per_address" if over_address else "code_lookups_per_group"
        raise LimitExceeded(setting, "too many short-code look-ups; try again in a minute", ErrorCode.RATE_LIMITED)


# -- sizes and counts ------------------------------------------------------------------
def _check_size(data: dict[str, Any] | None, limit: int, setting: str, what: str) -> None:
    if data and len(msgpack.packb(data)) > limit:
        raise LimitExceeded(setting, f"{what} is over {limit} bytes")


def check_presence(data: dict[str, Any], settings: Settings) -> None:
    """A connection's whole presence data (after a merge) within its limits."""
    if len(data) > settings.max_presence_fields:
        raise LimitExceeded("max_presence_fields", f"presence data has more than {settings.max_presence_fields} fields")
    _check_size(data, settings.max_presence_bytes, "max_presence_bytes", "presence data")


def check_signal(data: dict[str, Any] | None, settings: Settings) -> None:
    _check_size(data, settings.max_signal_bytes, "max_signal_bytes", "signal data")


def check_subscriptions(watched: int, adding: int, settings: Settings) -> None:
    """An agent connection that watches ``watched`` visitors asks for ``adding`` more."""
    limit = settings.max_subscriptions_per_agent
    if watched + adding > limit:
        raise LimitExceeded("max_subscriptions_per_agent", f"an agent connection may watch {limit} visitors")
