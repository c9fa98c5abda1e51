"""Recording events for the customer's back end (PROTOCOL.md §13).

The services call ``record`` where something happened; the event goes into
its group's log (``EventLog``), from which webhooks deliver it and the
audit trail reads it. When the change and its publish are one atomic step
the event rides in it: a presence change's event is part of its
announcement (``presence_event``), stored with it by the presence store.
Elsewhere the order is: the change is stored, then its event is appended,
then agents are told (sessions, codes), or the event is appended together
with the publish (a visitor's terms answer: both awaited before its ack).
An append that fails (the backend away) is retried in the background until
the log takes it; only an instance that dies meanwhile loses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from herald_presence.server import metrics
from herald_presence.server.backends.base import BackendUnavailable, Event, EventLog
from herald_presence.server.config import Settings
from herald_presence.server.model import events as ev
from herald_presence.server.model import names, presence_rules
from herald_presence.server.model.records import PresenceChange
from herald_presence.server.tasks import TaskSupervisor

log = logging.getLogger(__name__)

MAX_UNRECORDED = 10_000  # events waiting for the backend to come back; older ones are dropped (counted)
RETRY_FIRST, RETRY_MOST = 0.1, 2.0


def presence_event(change: PresenceChange) -> tuple[str, bytes] | None:
    """The event-log entry of a presence change (``visitor.online`` or
    ``visitor.offline``, after the grace period), as one more announcement:
    the store appends it in the change's atomic step. None for other changes
    and for consumers (their presence is their session's)."""
    record = change.record
    if record is None or change.change not in ("online", "offline") or not presence_rules.announced(record.visitor):
        return None
    event_type = ev.VISITOR_ONLINE if change.change == "online" else ev.VISITOR_OFFLINE
    event = ev.new_event(event_type, record.group, visitor=record.visitor, version=change.version)
    return names.event_log_topic(record.group), names.pack(event)


def counted(change: PresenceChange) -> None:
    """A stored presence change's event, counted (once: announcements may be built again on a retry)."""
    record = change.record
    if record is not None and change.change in ("online", "offline") and presence_rules.announced(record.visitor):
        metrics.event_recorded(ev.VISITOR_ONLINE if change.change == "online" else ev.VISITOR_OFFLINE)


class EventRecorder:
    def __init__(self, settings: Settings, events: EventLog, tasks: TaskSupervisor) -> None:
        self.settings = settings
        self.log = events
        self._tasks = tasks
        self._unrecorded: deque[tuple[str, Event, bool, bool]] = deque()
        self._retrying: asyncio.Task[None] | None = None
        events.configure(self.retention, settings.event_log_max)

    def retention(self, group: str) -> float:
        configured = self.settings.groups.get(group)
        if configured is not None and configured.event_retention is not None:
            return configured.event_retention
        return self.settings.event_retention

    async def record(
        self, event_type: str, group: str, *, asks: bool = False, answer: bool = False, **fields: Any
    ) -> None:
        """Append an event (``EventLog.append`` for ``asks`` and ``answer``);
        never raises for the backend being away: the append is retried."""
        event = ev.new_event(event_type, group, **fields)
        try:
            await self.log.append(group, event, asks=asks, answer=answer)
        except BackendUnavailable:
            self._later(group, event, asks, answer)
            return
        metrics.event_recorded(event_type)

    def _later(self, group: str, event: Event, asks: bool, answer: bool) -> None:
        if len(self._unrecorded) >= MAX_UNRECORDED:
            lost = self._unrecorded.popleft()
            metrics.EVENTS_LOST.inc()
            log.error("event log: backend away too long, dropping %s of %s", lost[1]["type"], lost[0])
        self._unrecorded.append((group, event, asks, answer))
        if self._retrying is None or self._retrying.done():
            self._retrying = self._tasks.spawn(self._retry(), "events-retry")

    async def _retry(self) -> None:
        delay = RETRY_FIRST
        while self._unrecorded:
            await asyncio.sleep(delay)
            group, event, asks, answer = self._unrecorded[0]
            try:
                await self.log.append(group, event, asks=asks, answer=answer)
            except BackendUnavailable:
                delay = min(delay * 2, RETRY_MOST)
                continue
            delay = 0.0
            self._unrecorded.popleft()
            metrics.event_recorded(event["type"])

    async def schedule(self, group: str, key: str, due: float, event_type: str, **fields: Any) -> None:
        """An event appended at ``due`` (unix s) unless ``cancel(key)`` comes first."""
        try:
            await self.log.schedule(group, key, due, ev.new_event(event_type, group, **fields))
        except BackendUnavailable:
            log.warning("event log: could not schedule %s for %s of %s", event_type, key, group)

    async def cancel(self, group: str, key: str) -> bool:
        """True if the timer was waiting (and now never fires)."""
        try:
            return await self.log.cancel(group, key)
        except BackendUnavailable:
            return False
