"""Keepalive: a ping after a connection's silence, and a connection that
does not answer it dropped (half-open TCP: a peer whose network vanished).

Each connection has its own period, 0.8-0.85 x ``keepalive`` (from its ID),
and is checked at most a tenth of ``keepalive`` after it is due: pinged
after 0.8-0.95 x ``keepalive`` of silence, so clients that connected
together, after a deploy or a drain, drift apart instead of being pinged in
one burst, and dropped within 1.5 x ``keepalive`` of its last frame
(PROTOCOL.md §7). Any frame from the client counts as
heard (``Connection.heard``, set as each frame is read), its pong too. A
connection silent for its period is pinged; still silent half a period
later, its socket is aborted (a peer that does not answer a ping would not
read a close frame either) and it ends as any lost socket does.
Connections are filed by when they are next due (``deadlines.py``: one
timer per instance, slices of at most 50 ms), not on aiohttp's heartbeat,
whose timer per connection weighed ~0.5 KiB of every idle connection and
was pushed back by a callback scheduled for every frame received.
"""

from __future__ import annotations

import logging
import time

from .connection import Connection
from .deadlines import Deadlines

log = logging.getLogger(__name__)

SLICES = 10  # a connection is checked at most keepalive / SLICES after it is due
# ... and at most this many seconds: slices of keepalive / 10 (2.5 s by
# default) put a few hundred of 5,000 idle connections' pings in one loop
# turn, a stall every slice (p99 at 500 round trips/s went from ~15 to
# 75-155 ms in the benchmark); slices this short keep each turn to a few.
RESOLUTION_MAX = 0.05


class Keepalive:
    def __init__(self, keepalive: float) -> None:
        self._keepalive = keepalive
        resolution = min(keepalive / SLICES, RESOLUTION_MAX)
        self._deadlines: Deadlines[Connection] = Deadlines(resolution, time.monotonic, self._due)

    def watch(self, conn: Connection) -> None:
        """From now on ``conn`` is pinged when silent (after its welcome)."""
        if not conn.closing:
            conn.keepalive_slice = self._deadlines.add(conn, conn.heard + self._period(conn))

    def forget(self, conn: Connection) -> None:
        self._deadlines.remove(conn, conn.keepalive_slice)
        conn.keepalive_slice = None

    def close(self) -> None:
        self._deadlines.close()

    def _period(self, conn: Connection) -> float:
        return self._keepalive * (0.8 + 0.05 * int(conn.id[-4:], 16) / 0xFFFF)

    def _due(self, conn: Connection) -> None:
        conn.keepalive_slice = None
        if conn.closing:
            return
        now, period = time.monotonic(), self._period(conn)
        if conn.pinged is not None and conn.heard < conn.pinged:  # no answer yet
            if now - conn.pinged >= period / 2:
                log.info("dropping %r: no answer to a keepalive ping", conn)
                conn.drop()
                return
            when = conn.pinged + period / 2
        elif now - conn.heard >= period:
            conn.ping()
            conn.pinged, when = now, now + period / 2
        else:
            conn.pinged, when = None, conn.heard + period
        conn.keepalive_slice = self._deadlines.add(conn, when)
