"""The event log of the memory backend: an in-process queue per group.

Events are kept in a bounded deque per group (``max_len``, and the
retention, applied at each append); the consumer group is a cursor (what
was taken) and a table of pending events with their consumer and when it
last renewed them. Nothing awaits, so each operation is atomic on the event
loop; nothing survives the process (PROTOCOL.md §13.2: a graceful stop
delivers what it can within ``drain_timeout`` first).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from herald_presence.server.model.events import (
    MAX_PENDING_TERMS,
    MAX_SESSION_EVENTS,
    TERMS_WINDOW,
    index_plan,
    terms_roles,
)

from .base import Event, EventLog, LogWrite

MAX_DEAD_LETTERS = 1000


@dataclass(slots=True)
class _Log:
    entries: deque[tuple[str, Event]] = field(default_factory=deque)
    by_id: dict[str, Event] = field(default_factory=dict)
    taken: str = ""  # the last ID a consumer took
    pending: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> consumer, renewed at (monotonic)
    sessions: dict[str, list[str]] = field(default_factory=dict)
    terms: dict[str, tuple[list[str], float]] = field(default_factory=dict)  # visitor -> ids, until (monotonic)
    askers: dict[str, tuple[str, float]] = field(default_factory=dict)  # visitor -> agent, until (monotonic)
    timers: list[tuple[float, str]] = field(default_factory=list)  # heap of (due, key)
    timer_events: dict[str, tuple[float, Event]] = field(default_factory=dict)
    dead: deque[Event] = field(default_factory=lambda: deque(maxlen=MAX_DEAD_LETTERS))


def _key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def _after(entries: deque[tuple[str, Event]], floor: tuple[int, int]) -> list[tuple[str, Event]]:
    """The entries after ``floor``, oldest first: looked for from the newest end, where they are."""
    found = []
    for entry in reversed(entries):
        if _key(entry[0]) <= floor:
            break
        found.append(entry)
    found.reverse()
    return found


class MemoryEventLog(EventLog):
    durable = False  # what is not delivered when the process exits is lost (the drain flushes first)

    def __init__(self) -> None:
        self._logs: dict[str, _Log] = {}
        self._last = (0, 0)  # the last ID made: IDs rise even if the clock goes back

    def _log(self, group: str) -> _Log:
        log = self._logs.get(group)
        if log is None:
            log = self._logs[group] = _Log()
        return log

    def _next_id(self) -> str:
        ms = time.time_ns() // 1_000_000
        last_ms, last_seq = self._last
        self._last = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._last[0]}-{self._last[1]}"

    async def append(self, group: str, event: Event, *, asks: bool = False, answer: bool = False) -> str:
        return self._append(group, event, asks, answer)

    def write(self, write: LogWrite) -> None:
        """A change's ``LogWrite``, at once: the backend calls this in the change's own step."""
        group = write.group
        for key in write.cancel:
            self._cancel(group, key)
        claimed = [self._cancel(group, key) for key, _event in write.claim]
        for (_key, event), took in zip(write.claim, claimed, strict=True):
            if took:
                self._append(group, event, *terms_roles(event["type"]))
        for event in write.append:
            self._append(group, event, *terms_roles(event["type"]))
        for key, due, event in write.schedule:
            self._schedule(group, key, due, event)
        write.done(claimed)

    def _append(self, group: str, event: Event, asks: bool = False, answer: bool = False) -> str:
        log, now = self._log(group), time.monotonic()
        visitor = event.get("visitor")
        event = dict(event)
        if answer and event.get("agent") is None and visitor is not None:
            asker = log.askers.get(visitor)
            if asker is not None and asker[1] > now:
                event["agent"] = asker[0]
        if asks and visitor is not None and event.get("agent") is not None:
            log.askers[visitor] = (event["agent"], now + TERMS_WINDOW)
        event_id = self._next_id()
        log.entries.append((event_id, event))
        log.by_id[event_id] = event
        session, takes, pends = index_plan(event)
        if session is not None:
            listed = log.sessions.setdefault(session, [])
            if takes:
                pending = log.terms.pop(visitor, None)
                if pending is not None and pending[1] > now:
                    listed.extend(pending[0])
            listed.append(event_id)
            del listed[:-MAX_SESSION_EVENTS]
        if pends:
            ids = log.terms[visitor][0] if visitor in log.terms and log.terms[visitor][1] > now else []
            log.terms[visitor] = ([*ids, event_id][-MAX_PENDING_TERMS:], now + TERMS_WINDOW)
        self._expire(group, log)
        return event_id

    def _expire(self, group: str, log: _Log) -> None:
        oldest = (time.time() - self.retention(group)) * 1000
        while log.entries and (len(log.entries) > self.max_len or _key(log.entries[0][0])[0] < oldest):
            event_id, _ = log.entries.popleft()
            log.by_id.pop(event_id, None)
            # A session's list and the pending table forget what the log forgot.
        if len(log.sessions) > self.max_len:
            for session in list(log.sessions)[: len(log.sessions) - self.max_len]:
                del log.sessions[session]
        now = time.monotonic()
        for table in (log.terms, log.askers):
            if len(table) > 1024:
                for visitor in [v for v, (_, until) in table.items() if until <= now]:
                    del table[visitor]

    async def read(self, group: str, after: str | None, count: int) -> list[tuple[str, Event]]:
        log = self._logs.get(group)
        if log is None:
            return []
        if after is None:
            return list(itertools.islice(log.entries, count))
        return _after(log.entries, _key(after))[:count]

    async def session_events(self, group: str, session: str) -> list[tuple[str, Event]]:
        log = self._logs.get(group)
        if log is None:
            return []
        ids = log.sessions.get(session, [])
        return [(event_id, log.by_id[event_id]) for event_id in ids if event_id in log.by_id]

    async def take(self, group: str, consumer: str, count: int) -> list[tuple[str, Event]]:
        log = self._logs.get(group)
        if log is None:
            return []
        taken = _after(log.entries, _key(log.taken) if log.taken else (-1, -1))[:count]
        now = time.monotonic()
        for event_id, _ in taken:
            log.pending[event_id] = (consumer, now)
        if taken:
            log.taken = taken[-1][0]
        return taken

    async def skip(self, group: str) -> None:
        log = self._logs.get(group)
        if log is not None and log.entries:
            log.taken = log.entries[-1][0]

    async def reclaim(self, group: str, consumer: str, idle: float, count: int) -> list[tuple[str, Event]]:
        log = self._logs.get(group)
        if log is None:
            return []
        now, claimed = time.monotonic(), []
        for event_id, (_owner, renewed) in list(log.pending.items()):
            if now - renewed < idle:
                continue
            event = log.by_id.get(event_id)
            if event is None:  # the log let it go (retention): nothing left to deliver
                del log.pending[event_id]
                continue
            log.pending[event_id] = (consumer, now)
            claimed.append((event_id, event))
            if len(claimed) >= count:
                break
        return claimed

    async def keep(self, group: str, consumer: str, ids: list[str]) -> None:
        log, now = self._log(group), time.monotonic()
        for event_id in ids:
            if event_id in log.pending:
                log.pending[event_id] = (consumer, now)

    async def ack(self, group: str, ids: list[str]) -> None:
        log = self._log(group)
        for event_id in ids:
            log.pending.pop(event_id, None)

    async def schedule(self, group: str, key: str, due: float, event: Event) -> None:
        self._schedule(group, key, due, event)

    def _schedule(self, group: str, key: str, due: float, event: Event) -> None:
        log = self._log(group)
        log.timer_events[key] = (due, event)
        heapq.heappush(log.timers, (due, key))

    async def cancel(self, group: str, key: str) -> bool:
        return self._cancel(group, key)

    def _cancel(self, group: str, key: str) -> bool:
        return self._log(group).timer_events.pop(key, None) is not None

    async def fire_due(self, group: str) -> int:
        log = self._logs.get(group)
        if log is None:
            return 0
        now, fired = time.time(), 0
        while log.timers and log.timers[0][0] <= now:
            due, key = heapq.heappop(log.timers)
            timer = log.timer_events.get(key)
            if timer is None or timer[0] != due:  # cancelled, or scheduled again for later
                continue
            del log.timer_events[key]
            self._append(group, timer[1])
            fired += 1
        return fired

    async def dead_letter(self, group: str, record: Event) -> None:
        self._log(group).dead.append(dict(record))

    async def dead_letters(self, group: str, count: int) -> list[Event]:
        log = self._logs.get(group)
        return list(reversed(log.dead))[:count] if log else []

    async def trim(self, group: str) -> None:
        log = self._logs.get(group)
        if log is not None:
            self._expire(group, log)
