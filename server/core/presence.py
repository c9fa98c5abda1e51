"""The presence service: visitors' connections in, announcements out, and
the snapshots agents start from.

A change is applied by the presence store as one atomic step with its
announcement: one frame, encoded once, published on the visitor's topic and
its group's topic, and queued as the same bytes on every local agent that
watches either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from herald_presence.protocol import codec
from herald_presence.protocol.errors import ProtocolError
from herald_presence.protocol.messages import PresenceChanged, Snapshot, VisitorInfo, VisitorState
from herald_presence.server import metrics
from herald_presence.server.backends.base import Arrival, BackendUnavailable, Mutation, PresenceStore, Refused
from herald_presence.server.config import Settings
from herald_presence.server.model import names, presence_rules
from herald_presence.server.model.limits import allowed_presence, check_presence, check_subscriptions
from herald_presence.server.model.records import ConnectionRecord, PresenceChange, VisitorRecord, offline_state
from herald_presence.server.tasks import TaskSupervisor, until_done

from . import events
from .connection import AgentConnection, UnsentPresence, VisitorConnection
from .inbox import Inbox
from .registry import LocalVisitors, Watchers
from .routes import route_of

log = logging.getLogger(__name__)

REPAIR_FIRST, REPAIR_MAX = 0.1, 2.0  # seconds between attempts to store what the store missed

OnOffline = Callable[[str, str], Coroutine[Any, Any, Any]]


class PresenceService:
    def __init__(
        self,
        settings: Settings,
        store: PresenceStore,
        visitors: LocalVisitors,
        watchers: Watchers,
        inbox: Inbox,
        tasks: TaskSupervisor,
        on_offline: OnOffline,
    ) -> None:
        self.settings = settings
        self._store = store
        self._visitors = visitors
        self._watchers = watchers
        self._inbox = inbox
        self._tasks = tasks
        self._on_offline = on_offline  # (group, visitor): its session ends
        self._unsynced: dict[str, VisitorConnection] = {}  # connection ID -> one whose change the store missed
        self._repairer: asyncio.Task[None] | None = None

    # -- visitors ------------------------------------------------------------
    async def visitor_joined(self, conn: VisitorConnection, arrival: Arrival | None = None) -> bool:
        """Register a new connection (``limit_exceeded`` if the visitor has its
        maximum already, or its presence data is too big); whether it has
        focus. Fields its group does not let agents see are dropped. With
        ``arrival``: ``Refused`` if its ``refused_by`` record exists, and its
        reads filled in, in the registration's own atomic step (one round
        trip for the whole connect)."""
        conn.presence.data = allowed_presence(conn.presence.data, self._presence_fields(conn.group))
        check_presence(conn.presence.data, self.settings)
        self._visitors.add(conn)
        limit = presence_rules.connection_limit(conn.subject, self.settings.max_connections_per_visitor)
        join = partial(presence_rules.join, connection=conn.presence, limit=limit)
        try:
            change = await self._visitor_mutate(conn, join, joined=conn.id, arrival=arrival)
        except (ProtocolError, Refused):
            self._visitors.remove(conn)
            raise
        metrics.connection_opened(conn.role)
        # Without the store (None), the connection is the only one it knows of.
        return change is None or (change.focus_after is not None and change.focus_after.connection == conn.id)

    def _presence_fields(self, group: str) -> list[str] | None:
        configured = self.settings.groups.get(group)
        return configured.presence_fields if configured is not None else None

    async def visitor_updated(self, conn: VisitorConnection, data: dict[str, Any] | None, visible: bool | None) -> None:
        """A connection's ``presence`` frame. At most ``presence_rate`` changes
        a second are stored and announced per connection: a frame that comes
        sooner is merged into the next one (latest value wins), which goes
        out when its turn comes."""
        unsent = conn.unsent
        if data:
            data = allowed_presence(data, self._presence_fields(conn.group))
            if not data and visible is None:
                return  # only fields agents may not see: nothing to store
            # Each frame is within the limits; what it merges into must stay so too.
            merged = {**conn.presence.data, **(unsent.data if unsent else {}), **data}
            check_presence({k: v for k, v in merged.items() if v is not None}, self.settings)
        if unsent is not None:
            unsent.add(data, visible)  # its turn is coming
        elif time.monotonic() >= conn.presence_due:
            conn.presence_due = time.monotonic() + 1 / self.settings.presence_rate
            await self._visitor_mutate(
                conn, partial(presence_rules.update, connection=conn.id, data=data, visible=visible)
            )
        else:
            conn.unsent = UnsentPresence()
            conn.unsent.add(data, visible)
            self._tasks.spawn(self._send_unsent(conn), f"presence-{conn.id}")

    async def _send_unsent(self, conn: VisitorConnection) -> None:
        """Store a connection's coalesced changes at their turn, until none wait."""
        try:
            while conn.unsent and conn.id in self._visitors:
                await asyncio.sleep(conn.presence_due - time.monotonic())
                unsent, conn.unsent = conn.unsent, UnsentPresence()  # what comes meanwhile waits for the next turn
                conn.presence_due = time.monotonic() + 1 / self.settings.presence_rate
                update = partial(presence_rules.update, connection=conn.id, data=unsent.data, visible=unsent.visible)
                await self._visitor_mutate(conn, update)
        finally:
            conn.unsent = None

    async def visitor_left(self, conn: VisitorConnection) -> None:
        self._visitors.remove(conn)
        metrics.CONNECTIONS.labels(role=conn.role).dec()
        try:
            await self._leave(conn)
        except BackendUnavailable:
            log.warning("backend unavailable: the leave of %r is stored once it is back", conn)
            self._repair_later(conn)

    async def _leave(self, conn: VisitorConnection) -> None:
        """Store a connection's end; the last one starts the grace period,
        whose end is retried until it is stored (no ghost outlives a fault)."""
        change = await self._mutate(conn.group, conn.subject, partial(presence_rules.leave, connection=conn.id))
        record = change.record if change else None
        if change is None:
            # Stored already: a write that timed out may still have been applied.
            # Its grace period must end all the same.
            record = await self._store.visitor_record(conn.group, conn.subject)
        away_since = record.away_since if record and not record.connections else None
        if away_since is not None:
            group, visitor = conn.group, conn.subject
            expire = partial(self._mutate, group, visitor, partial(presence_rules.expire_away, away_since=away_since))
            name = f"grace-{group}/{visitor}"
            self._tasks.later(self.settings.grace_period, lambda: until_done(expire, name, BackendUnavailable), name)

    async def restore(self) -> None:
        """The store is back after an outage: drop what closed meanwhile and
        register again what lives here (it may be gone or stale)."""
        for group, visitor, connection in await self._store.registered_connections():
            if connection not in self._visitors:
                await self._mutate(group, visitor, partial(presence_rules.drop, connection=connection))
        for conn in self._visitors.all():
            await self._visitor_mutate(conn, partial(presence_rules.rejoin, connection=conn.presence))

    async def _visitor_mutate(
        self, conn: VisitorConnection, mutation: Mutation, joined: str | None = None, arrival: Arrival | None = None
    ) -> PresenceChange | None:
        """A local connection's presence change. If the store is away the
        connection lives on: the change is applied to its own copy, which is
        registered again as soon as the store takes it (``_repair``)."""
        try:
            return await self._apply(conn, mutation, joined, arrival)
        except BackendUnavailable:
            log.warning("backend unavailable: presence of %r kept locally until it is back", conn)
            mutation(VisitorRecord(conn.group, conn.subject, 0, {conn.id: conn.presence}))
            self._repair_later(conn)
            return None

    async def _apply(
        self, conn: VisitorConnection, mutation: Mutation, joined: str | None = None, arrival: Arrival | None = None
    ) -> PresenceChange | None:
        change = await self._mutate(conn.group, conn.subject, mutation, joined, arrival)
        if change is not None and change.record is not None:
            conn.presence = change.record.connections.get(conn.id, conn.presence)
        return change

    def _repair_later(self, conn: VisitorConnection) -> None:
        self._unsynced[conn.id] = conn
        if self._repairer is None or self._repairer.done():
            self._repairer = self._tasks.spawn(self._repair(), "presence-repair")

    async def _repair(self) -> None:
        """Bring the store in line with the connections whose changes it
        missed: a live one is registered again as it is now, a closed one
        leaves (and its grace period starts). Retried until all are stored."""
        delay = REPAIR_FIRST
        while self._unsynced:
            await asyncio.sleep(delay)
            delay = REPAIR_FIRST
            for connection, conn in list(self._unsynced.items()):
                try:
                    if connection in self._visitors:
                        await self._apply(conn, partial(presence_rules.rejoin, connection=conn.presence))
                    else:
                        await self._leave(conn)
                except BackendUnavailable:
                    delay = min(delay * 2, REPAIR_MAX)
                    break
                self._unsynced.pop(connection, None)

    async def _mutate(
        self, group: str, visitor: str, mutation: Mutation, joined: str | None = None, arrival: Arrival | None = None
    ) -> PresenceChange | None:
        """Change a visitor's presence, announce it, move focus if it moved."""
        change = await self._store.mutate(group, visitor, mutation, self.announcement, arrival)
        if change is not None:
            self.changed(change)
        if change is not None and change.focus_moved:
            live = change.record.connections if change.record else {}
            if change.focus_before and change.focus_before.connection in live:
                await self._tell_focus(change.focus_before, False)
            if change.focus_after and change.focus_after.connection != joined:
                await self._tell_focus(change.focus_after, True)
        return change

    def changed(self, change: PresenceChange) -> None:
        """After a change is stored (here, or by the store reaping a dead
        instance): its event is counted, and a visitor gone offline ends its session."""
        events.counted(change)
        if change.change == "offline" and change.record is not None:
            group, visitor = change.record.group, change.record.visitor
            name = f"end-{group}/{visitor}"
            self._tasks.spawn(until_done(partial(self._on_offline, group, visitor), name, BackendUnavailable), name)

    def announcement(self, change: PresenceChange) -> list[tuple[str, bytes]]:
        """What is published of a change, on the visitor's topic and its
        group's topic: one envelope with the frame agents get (what changed,
        or the whole state; none for a change they do not hear of, like a
        last connection leaving: then on the visitor's topic only), encoded
        once, and the visitor's route for the instances that follow it
        (core/routes.py). Going online or offline (after the grace period)
        is also an event for the group's log (``events.presence_event``),
        which the store appends in the same atomic step. A consumer's presence
        is published nowhere (it belongs to its support session only)."""
        record = change.record
        if record is None or not presence_rules.announced(record.visitor):
            return []
        frame = None
        if change.change is not None:
            delta = change.delta()
            if delta is not None:
                frame = codec.encode(PresenceChanged(change=change.change, delta=delta))
            else:
                state = record.state() if record.online else offline_state(record.visitor, change.version)
                frame = codec.encode(PresenceChanged(change=change.change, state=state))
        route = route_of(record) if record.online else None
        message = names.envelope(names.PRESENCE, record.group, record.visitor, change.version, frame, route)
        topics = [names.visitor_topic(record.group, record.visitor)]
        if frame is not None:  # routes are followed on visitor topics only
            topics.append(names.group_topic(record.group))
        announced = [(topic, message) for topic in topics]
        logged = events.presence_event(change)
        return announced if logged is None else [*announced, logged]

    async def _tell_focus(self, record: ConnectionRecord, focused: bool) -> None:
        await self._inbox.send(record.instance, names.FOCUS, record.connection, focused)

    # -- agents --------------------------------------------------------------
    async def subscribe(self, agent: AgentConnection, request_id: int, visitors: list[str], group: bool) -> None:
        """Watch visitors (or the whole group): a snapshot, then every change after it."""
        fresh = {names.visitor_topic(agent.group, v) for v in visitors} - agent.topics
        check_subscriptions(agent.watched(), len(fresh), self.settings)
        agent.start_snapshot()
        try:
            if group:
                agent.watching_group = True
                await self._watchers.watch(agent, [names.group_topic(agent.group)])
                states = [s for s in await self._store.group_visitors(agent.group) if _shown(s)]
            else:
                await self._watchers.watch(agent, [names.visitor_topic(agent.group, v) for v in visitors])
                states = [await self.visitor(agent.group, v) for v in visitors]
        except BaseException:
            agent.finish_snapshot(None)
            raise
        agent.finish_snapshot(Snapshot(id=request_id, visitors=states, group=group or None))

    async def unsubscribe(self, agent: AgentConnection, visitors: list[str], group: bool) -> None:
        topics = [names.visitor_topic(agent.group, v) for v in visitors]
        agent.forget_floors(visitors)
        if group:
            agent.watching_group = False
            topics.append(names.group_topic(agent.group))
        await self._watchers.unwatch(agent, topics)

    async def lookup(self, agent: AgentConnection, request_id: int, visitor: str) -> None:
        agent.send_message(VisitorInfo(id=request_id, state=await self.visitor(agent.group, visitor)))

    async def visitor(self, group: str, visitor: str) -> VisitorState:
        """The visitor's state now (offline ones with their last version);
        a consumer always looks offline."""
        if not presence_rules.announced(visitor):
            return offline_state(visitor)
        return await self._store.visitor(group, visitor)


def _shown(state: VisitorState) -> bool:
    return presence_rules.announced(state["visitor"])
