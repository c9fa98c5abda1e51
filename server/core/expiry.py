"""Credentials that run out while their connection is open.

A credential is checked at the handshake; a group that enforces expiry
(``enforce_expiry``, TOML or admin API) also closes a connection when its
credential runs out, unless the client sent a fresh one first (``refresh``,
which moves ``Connection.expires``). Connections are filed by the second
their credential runs out, and one timer per instance waits for the earliest
second (a timer per connection weighed 0.6 KiB of every idle connection);
a connection leaves its second when it closes (``forget``). Whether the
group enforces expiry is read when the second comes (cached a second per
group, so many connections expiring together cost one read).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time

from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.server.backends.base import BackendUnavailable, RecordStore
from herald_presence.server.config import Settings
from herald_presence.server.tasks import TaskSupervisor

from . import group_settings
from .connection import Connection

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0  # how long a group's enforce_expiry is taken as read
EXPIRED_REASON = "credential expired"


class Expiry:
    def __init__(self, settings: Settings, records: RecordStore, tasks: TaskSupervisor) -> None:
        self._settings = settings
        self._records = records
        self._tasks = tasks
        self._enforced: dict[str, tuple[bool, float]] = {}  # group -> (enforced, read at, monotonic)
        self._due: dict[int, set[Connection]] = {}  # unix second -> the connections whose credential ends then
        self._seconds: list[int] = []  # a heap of those seconds (and of some emptied since)
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, conn: Connection, expires: float | None) -> None:
        """``conn``'s credential now runs out at ``expires`` (unix s; None: never)."""
        self.forget(conn)
        conn.expires = expires
        if expires is None or conn.closing:
            return
        second = math.ceil(expires)
        waiting = self._due.get(second)
        if waiting is None:
            waiting = self._due[second] = set()
            if len(self._seconds) > 2 * len(self._due) + 64:  # mostly emptied seconds: start afresh
                self._seconds = list(self._due)
                heapq.heapify(self._seconds)
            else:
                heapq.heappush(self._seconds, second)
            if self._seconds[0] == second:
                self._wait_for_earliest()
        waiting.add(conn)
        conn.expiry_second = second

    def forget(self, conn: Connection) -> None:
        """``conn`` closed (or has a new expiry): nothing is due for it."""
        second, conn.expiry_second = conn.expiry_second, None
        waiting = None if second is None else self._due.get(second)
        if second is not None and waiting is not None:
            waiting.discard(conn)
            if not waiting:
                del self._due[second]

    def _wait_for_earliest(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, self._seconds[0] - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._due_now)

    def _due_now(self) -> None:
        self._timer = None
        now = time.time()
        while self._seconds and self._seconds[0] <= now:
            for conn in self._due.pop(heapq.heappop(self._seconds), ()):
                conn.expiry_second = None
                if not conn.closing:
                    self._tasks.spawn(self._check(conn), f"expiry-{conn.id}")
        if self._seconds:
            self._wait_for_earliest()

    async def _check(self, conn: Connection) -> None:
        if conn.closing:
            return
        if conn.expires is not None and conn.expires > time.time():  # a refresh came meanwhile
            self.watch(conn, conn.expires)
            return
        if not await self.enforced(conn.group):
            return  # the group lets connections outlive their credential
        log.info("closing %r: its credential expired without a refresh", conn)
        conn.send_error(ErrorCode.TOKEN_EXPIRED, "this connection's credential expired; send refresh before it does")
        conn.close(CloseCode.UNAUTHORIZED, EXPIRED_REASON, flush=True)

    async def enforced(self, group: str) -> bool:
        now = time.monotonic()
        cached = self._enforced.get(group)
        if cached is not None and now - cached[1] < CACHE_SECONDS:
            return cached[0]
        try:
            enforced = (await group_settings.load(self._records, self._settings, group)).enforce_expiry
        except BackendUnavailable:  # the configured value: run-time changes are unknown while Redis is away
            configured = self._settings.groups.get(group)
            enforced = configured is not None and configured.enforce_expiry
        self._enforced[group] = (enforced, now)
        return enforced
