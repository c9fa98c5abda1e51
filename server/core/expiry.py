"""Credentials that run out while their connection is open.

A credential is checked at the handshake; a group that enforces expiry
(``enforce_expiry``, TOML or admin API) also closes a connection when its
credential runs out, unless the client sent a fresh one first (``refresh``,
which moves ``Connection.expires``). Connections are filed by the second
their credential runs out (``deadlines.py``: one timer per instance) and
leave it when they close (``forget``). Whether the
group enforces expiry is read when the second comes (cached a second per
group, so many connections expiring together cost one read).
"""

from __future__ import annotations

import logging
import time

from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.server.backends.base import BackendUnavailable, RecordStore
from herald_presence.server.config import Settings
from herald_presence.server.tasks import TaskSupervisor

from . import group_settings
from .connection import Connection
from .deadlines import Deadlines

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0  # how long a group's enforce_expiry is taken as read
EXPIRED_REASON = "credential expired"


class Expiry:
    def __init__(self, settings: Settings, records: RecordStore, tasks: TaskSupervisor) -> None:
        self._settings = settings
        self._records = records
        self._tasks = tasks
        self._enforced: dict[str, tuple[bool, float]] = {}  # group -> (enforced, read at, monotonic)
        self._deadlines: Deadlines[Connection] = Deadlines(1.0, time.time, self._due)

    def watch(self, conn: Connection, expires: float | None) -> None:
        """``conn``'s credential now runs out at ``expires`` (unix s; None: never)."""
        self.forget(conn)
        conn.expires = expires
        if expires is not None and not conn.closing:
            conn.expiry_slice = self._deadlines.add(conn, expires)

    def forget(self, conn: Connection) -> None:
        """``conn`` closed (or has a new expiry): nothing is due for it."""
        self._deadlines.remove(conn, conn.expiry_slice)
        conn.expiry_slice = None

    def close(self) -> None:
        self._deadlines.close()

    def _due(self, conn: Connection) -> None:
        conn.expiry_slice = None
        if not conn.closing:
            self._tasks.spawn(self._check(conn), f"expiry-{conn.id}")

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
