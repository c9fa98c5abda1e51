"""Recording events for the customer's back end (PROTOCOL.md §13).

Events go into their group's log (``EventLog``), from which webhooks
deliver them and the audit trail reads them. An event rides in the atomic
step of the change it records, so that an instance dying in between can
leave neither a change without its event nor an event without its change:

* a presence change's event is part of its announcement
  (``presence_event``), stored with it by the presence store;
* a session's and a code's events (started, joined, left, ended; created,
  redeemed) are the ``LogWrite`` of the session record's write
  (``RecordStore``), with the timers of its end and its code's expiry;
* a visitor's terms answer is the ``LogWrite`` of its publish
  (``Bus.publish_all``), awaited before its ack.

Either the step happens, events included, or it fails as a whole (the
backend away) and the change fails with it. ``written`` counts what such a
step appended. ``record`` appends an event on its own: ``terms.requested``,
stored before the signal it records can reach the visitor (queued ahead of
a delivery through another instance on one ordered connection, else awaited
first: ``SignalRouter.to_visitor``), and a terms answer the backend refused while this instance's own
agents still heard it. An append that fails is retried in the background
until the log takes it; only an instance that dies meanwhile loses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from herald_presence.server import metrics
from herald_presence.server.backends.base import BackendUnavailable, Event, EventLog, LogWrite
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

    def written(self, write: LogWrite) -> None:
        """A change's step is done: count the events it appended."""
        for event_type in write.appended:
            metrics.event_recorded(event_type)
