"""The embedded backend: one process, plain dicts, no Redis.

Nothing here awaits, so every operation is atomic on the event loop. The
bus delivers with ``call_soon``: in publish order, and never re-entrantly
inside the publisher's call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from herald_presence.protocol.messages import VisitorState
from herald_presence.server.model.names import event_log_group, unpack
from herald_presence.server.model.records import HeldSignal, PresenceChange, VisitorRecord, offline_state

from .base import Announce, Arrival, Backend, BackendListener, Changed, LogWrite, Mutation, Refused
from .memory_events import MemoryEventLog

TOMBSTONE_SECONDS = 600.0  # how long an offline visitor's last version is kept


@dataclass(slots=True)
class _Held:
    signal: HeldSignal
    expires: float  # monotonic
    claimed: bool = False  # taken once already (a to_all signal stays for later connections)


class MemoryBackend(Backend):
    def __init__(self, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._groups: dict[str, dict[str, VisitorRecord]] = {}
        self._tombstones: dict[tuple[str, str], tuple[int, float]] = {}  # last version, forget-after
        self._held: dict[tuple[str, str], list[_Held]] = {}
        self._topics: set[str] = set()
        self._kv: dict[str, tuple[bytes, float | None]] = {}  # value, expires at (monotonic)
        self._kv_writes = 0
        self._listener: BackendListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events = MemoryEventLog()

    async def start(self, listener: BackendListener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self._listener = None

    # -- presence --------------------------------------------------------
    def _get(self, group: str, visitor: str) -> VisitorRecord | None:
        visitors = self._groups.get(group)
        return visitors.get(visitor) if visitors else None

    async def mutate(
        self, group: str, visitor: str, mutation: Mutation, announce: Announce, arrival: Arrival | None = None
    ) -> PresenceChange | None:
        if arrival is not None and (guard := await self.kv_get(arrival.refused_by)) is not None:
            raise Refused(guard)
        record = self._get(group, visitor)
        if record is None:
            last, _ = self._tombstones.get((group, visitor), (0, 0.0))
            record = VisitorRecord(group, visitor, last)
        change = mutation(record)
        if change is None:
            return None
        if record.online:
            self._groups.setdefault(group, {})[visitor] = record
            self._tombstones.pop((group, visitor), None)
        else:
            self._remove(record)
        for topic, message in announce(change):
            await self.publish(topic, message)
        if arrival is not None:
            now = time.monotonic()
            arrival.session = await self.kv_get(arrival.session_key)
            arrival.held = any(held.expires > now for held in self._held.get((group, visitor), []))
            arrival.read = True
        return change

    def _remove(self, record: VisitorRecord) -> None:
        visitors = self._groups.get(record.group, {})
        visitors.pop(record.visitor, None)
        if not visitors:
            self._groups.pop(record.group, None)
        now = time.monotonic()
        self._tombstones[(record.group, record.visitor)] = (record.version, now + TOMBSTONE_SECONDS)
        while self._tombstones:  # insertion order is expiry order: drop the expired from the front
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

    async def registered_connections(self) -> list[tuple[str, str, str]]:
        return [
            (group, visitor, connection)
            for group, visitors in self._groups.items()
            for visitor, record in visitors.items()
            for connection in record.connections
        ]

    # -- bus -------------------------------------------------------------
    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)

    async def publish(self, topic: str, message: bytes) -> int:
        group = event_log_group(topic)
        if group is not None:  # a presence change's event (mutate): appended to the log, in the same step
            await self.events.append(group, unpack(message))
            return 1
        if topic not in self._topics or self._listener is None or self._loop is None:
            return 0
        self._loop.call_soon(self._listener.on_bus_message, topic, message)
        return 1

    async def publish_all(self, messages: list[tuple[str, bytes]], log: LogWrite) -> list[int]:
        reached = [await self.publish(topic, message) for topic, message in messages]
        self.events.write(log)
        return reached

    # -- held signals ----------------------------------------------------
    async def hold(self, group: str, visitor: str, signal: HeldSignal, ttl: float) -> None:
        self._held.setdefault((group, visitor), []).append(_Held(signal, time.monotonic() + ttl))

    async def take_held(self, group: str, visitor: str) -> list[tuple[HeldSignal, bool]]:
        now = time.monotonic()
        live = [held for held in self._held.pop((group, visitor), []) if held.expires > now]
        taken = [(held.signal, not held.claimed) for held in live]
        kept = [held for held in live if held.signal.to_all]  # every returning connection gets these
        for held in kept:
            held.claimed = True
        if kept:
            self._held[(group, visitor)] = kept
        return taken

    async def drop_held(self, group: str, visitor: str, key: str) -> bool:
        held = self._held.get((group, visitor), [])
        dropped = next((h for h in held if h.signal.key == key), None)
        if dropped is None:
            return False
        held.remove(dropped)
        if not held:
            del self._held[(group, visitor)]
        return not dropped.claimed and dropped.expires > time.monotonic()

    # -- records -------------------------------------------------------------
    def _live(self, key: str) -> bytes | None:
        item = self._kv.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] <= time.monotonic():
            del self._kv[key]
            return None
        return item[0]

    def _store(self, key: str, value: bytes | None, ttl: float | None, keep_expiry: bool = False) -> None:
        if value is None:
            self._kv.pop(key, None)
            return
        if ttl is not None:
            expires = time.monotonic() + ttl
        else:
            expires = self._kv[key][1] if keep_expiry and key in self._kv else None
        self._kv[key] = (value, expires)
        self._kv_writes += 1
        if self._kv_writes % 1024 == 0:  # forget what expired unread, so nothing grows forever
            now = time.monotonic()
            for stale in [k for k, (_, expires) in self._kv.items() if expires is not None and expires <= now]:
                del self._kv[stale]

    async def kv_get(self, key: str) -> bytes | None:
        return self._live(key)

    async def kv_set(
        self,
        key: str,
        value: bytes,
        ttl: float | None = None,
        only_if_absent: bool = False,
        log: LogWrite | None = None,
    ) -> bool:
        if only_if_absent and self._live(key) is not None:
            return False
        self._store(key, value, ttl)
        if log is not None:
            self.events.write(log)
        return True

    async def kv_delete(self, key: str) -> bool:
        return self._live(key) is not None and self._kv.pop(key, None) is not None

    async def kv_update(
        self,
        key: str,
        update: Callable[[bytes | None], bytes | None],
        ttl: float | None = None,
        log: Changed | None = None,
    ) -> bytes | None:
        before = self._live(key)
        value = update(before)
        written = log(before, value) if log is not None else None
        self._store(key, value, ttl, keep_expiry=True)
        if written is not None:
            self.events.write(written)
        return value

    async def kv_swap(
        self, key: str, value: bytes | None, ttl: float | None = None, log: LogWrite | None = None
    ) -> bytes | None:
        before = self._live(key)
        self._store(key, value, ttl)
        if log is not None and before is not None:
            self.events.write(log)
        return before

    async def kv_delete_if(self, key: str, value: bytes) -> bool:
        if self._live(key) != value:
            return False
        del self._kv[key]
        return True

    async def kv_count(self, key: str, window: float) -> int:
        count = int(self._live(key) or b"0") + 1
        expires = self._kv[key][1] if count > 1 else None
        remaining = window if expires is None else expires - time.monotonic()
        self._store(key, str(count).encode(), remaining)
        return count
