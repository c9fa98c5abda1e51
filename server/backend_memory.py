"""The embedded backend: one process, plain dicts, no Redis.

Every operation runs without awaiting anything, so each is atomic on the
event loop. The bus delivers with ``call_soon``: in publish order, never
re-entrantly inside the publisher's call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from protocol.messages import VisitorState

from .backend import (
    Backend,
    BusHandler,
    ConnectionRecord,
    HeldSignal,
    PresenceChange,
    VisitorRecord,
    offline_state,
)

TOMBSTONE_SECONDS = 600.0


def next_version(previous: int) -> int:
    """Microseconds since the epoch, or one more than before if that is
    larger: versions stay increasing across offline periods without
    remembering every visitor forever."""
    return max(previous + 1, time.time_ns() // 1000)


class MemoryBackend(Backend):
    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._groups: dict[str, dict[str, VisitorRecord]] = {}
        self._tombstones: dict[tuple[str, str], tuple[int, float]] = {}  # last version of offline visitors
        self._held: dict[tuple[str, str], list[tuple[HeldSignal, float]]] = {}
        self._topics: set[str] = set()
        self._on_message: BusHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, on_message: BusHandler) -> None:
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self._on_message = None

    # -- presence --------------------------------------------------------
    def _get(self, group: str, visitor: str) -> VisitorRecord | None:
        visitors = self._groups.get(group)
        return visitors.get(visitor) if visitors else None

    def _bump(self, record: VisitorRecord) -> int:
        record.version = next_version(record.version)
        return record.version

    async def join(self, group: str, visitor: str, record: ConnectionRecord) -> PresenceChange:
        current = self._get(group, visitor)
        if current is None:
            last, _ = self._tombstones.pop((group, visitor), (0, 0.0))
            current = VisitorRecord(group, visitor, last)
            self._groups.setdefault(group, {})[visitor] = current
            change = "online"
        else:
            change = "connections"
        before = current.focused()
        current.away_since = None
        record.active = self._bump(current)
        current.connections[record.connection] = record
        return PresenceChange(current, change, current.version, before, record)

    async def update(
        self, group: str, visitor: str, connection: str, data: dict[str, Any] | None, visible: bool | None
    ) -> PresenceChange | None:
        current = self._get(group, visitor)
        conn = current.connections.get(connection) if current else None
        if current is None or conn is None:
            return None
        before = current.focused()
        change = None
        if data:
            merged = {**conn.data, **data}
            conn.data = {k: v for k, v in merged.items() if v is not None}
            change = "data"
        if visible is not None and visible != conn.visible:
            conn.visible = visible
            change = change or "visibility"
        version = self._bump(current)
        if data or visible:
            conn.active = version
        return PresenceChange(current, change, version, before, current.focused())

    async def leave(self, group: str, visitor: str, connection: str) -> PresenceChange | None:
        current = self._get(group, visitor)
        if current is None or connection not in current.connections:
            return None
        before = current.focused()
        del current.connections[connection]
        version = self._bump(current)
        if current.connections:
            return PresenceChange(current, "connections", version, before, current.focused())
        current.away_since = version
        return PresenceChange(current, None, version)

    async def expire_away(self, group: str, visitor: str, away_since: int) -> PresenceChange | None:
        current = self._get(group, visitor)
        if current is None or current.away_since != away_since:
            return None
        visitors = self._groups[group]
        del visitors[visitor]
        if not visitors:
            del self._groups[group]
        version = self._bump(current)
        self._bury((group, visitor), version)
        current.away_since = None
        return PresenceChange(current, "offline", version)

    def _bury(self, key: tuple[str, str], version: int) -> None:
        now = time.monotonic()
        self._tombstones[key] = (version, now + TOMBSTONE_SECONDS)
        while self._tombstones:  # oldest first: insertion order is expiry order
            oldest = next(iter(self._tombstones))
            if self._tombstones[oldest][1] > now:
                break
            del self._tombstones[oldest]

    async def visitor(self, group: str, visitor: str) -> VisitorState:
        record = self._get(group, visitor)
        if record is not None:
            return record.state()
        return offline_state(visitor, self._tombstones.get((group, visitor), (0, 0.0))[0])

    async def visitor_record(self, group: str, visitor: str) -> VisitorRecord | None:
        return self._get(group, visitor)

    async def group_visitors(self, group: str) -> list[VisitorState]:
        return [record.state() for record in self._groups.get(group, {}).values()]

    # -- bus -------------------------------------------------------------
    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)

    async def publish(self, topic: str, message: bytes) -> int:
        if topic not in self._topics or self._on_message is None or self._loop is None:
            return 0
        self._loop.call_soon(self._on_message, topic, message)
        return 1

    # -- held signals ----------------------------------------------------
    async def hold(self, group: str, visitor: str, signal: HeldSignal, ttl: float) -> None:
        self._held.setdefault((group, visitor), []).append((signal, time.monotonic() + ttl))

    async def take_held(self, group: str, visitor: str) -> list[HeldSignal]:
        now = time.monotonic()
        return [s for s, expires in self._held.pop((group, visitor), []) if expires > now]

    async def drop_held(self, group: str, visitor: str, key: str) -> bool:
        held = self._held.get((group, visitor))
        if not held:
            return False
        kept = [(s, e) for s, e in held if s.key != key]
        if kept:
            self._held[(group, visitor)] = kept
        else:
            del self._held[(group, visitor)]
        return len(kept) != len(held)
