"""The instance's router: local connections in, backend and bus out.

The hub knows which visitor and agent connections this instance holds and
which bus topics they need; everything shared goes through the backend. A
presence change is encoded once as a client frame, published once per topic,
and the same bytes are queued on every local agent that watches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from functools import partial
from typing import Any

from protocol import codec
from protocol.errors import CloseCode, ProtocolError
from protocol.messages import Focus, PresenceChanged, Signal, Snapshot, VisitorInfo

from . import metrics, presence, topics
from .backend import (
    Backend,
    BackendUnavailable,
    ConnectionRecord,
    Mutation,
    PresenceChange,
    VisitorRecord,
    offline_state,
)
from .config import Settings
from .connection import Connection, VisitorConnection
from .delivery import Delivery
from .limits import ConnectionRate, LimitExceeded, check_presence, check_size
from .sessions import CONSUMER_PREFIX, Sessions

log = logging.getLogger(__name__)

FLOOR_SECONDS = 10.0  # how long after a snapshot stale bus events may still arrive


class AgentConnection(Connection):
    """An agent's connection and what it watches.

    While a subscribe is in flight, events are parked in ``pending`` so that
    the snapshot goes out first. ``floors`` holds the snapshot's version per
    visitor for a short while: bus events published before the snapshot was
    read can still arrive after it and must not be shown twice.
    """

    __slots__ = ("floors", "floors_until", "pending", "recent_events", "sessions", "topics", "watching_group")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topics: set[str] = set()
        self.watching_group = False
        self.sessions: set[str] = set()  # support sessions joined through this connection
        self.recent_events: deque[str] | None = None  # dedupe keys of session events seen lately
        self.pending: list[tuple[str, int | None, bytes]] | None = None
        self.floors: dict[str, int] | None = None
        self.floors_until = 0.0

    def deliver(self, visitor: str, version: int | None, frame: bytes) -> None:
        if self.pending is not None:
            self.pending.append((visitor, version, frame))
            return
        if self.floors is not None and version is not None:
            if time.monotonic() > self.floors_until:
                self.floors = None
            else:
                floor = self.floors.pop(visitor, None)
                if floor is not None and version <= floor:
                    self.floors[visitor] = floor
                    return
        self.send(frame)

    def deliver_event(self, frame: bytes, dedupe: str | None) -> None:
        """A frame that may reach this agent on several topics: once only."""
        if dedupe is not None:
            if self.recent_events is None:
                self.recent_events = deque(maxlen=32)
            elif dedupe in self.recent_events:
                return
            self.recent_events.append(dedupe)
        self.send(frame)

    def start_snapshot(self) -> None:
        self.pending = []

    def finish_snapshot(self, snapshot: Snapshot | None) -> None:
        """Send the snapshot (None: the subscribe failed), then what was parked."""
        if snapshot is not None:
            floors = self.floors if self.floors is not None else {}
            floors.update((state["visitor"], state["version"]) for state in snapshot.visitors)
            self.floors, self.floors_until = floors, time.monotonic() + FLOOR_SECONDS
            self.send_message(snapshot)
        parked, self.pending = self.pending or [], None
        for visitor, version, frame in parked:
            self.deliver(visitor, version, frame)


class Hub:
    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.instance = backend.instance_id
        self.visitors: dict[str, Connection] = {}  # connection ID -> local visitor connection
        self.watchers: dict[str, set[AgentConnection]] = {}  # topic -> local agents on it
        self.delivery = Delivery(self)
        self.sessions = Sessions(self)
        self.connection_rate = ConnectionRate(settings.connections_per_address)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self.draining = False  # SIGTERM came: not ready, no new connections

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start(self)
        # Without the backend yet, the subscription is still recorded and
        # made when it comes back: the instance starts degraded, not dead.
        with contextlib.suppress(BackendUnavailable):
            await self.backend.subscribe(topics.inbox_topic(self.instance))

    async def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.close()

    def agents(self) -> set[AgentConnection]:
        return {agent for watchers in self.watchers.values() for agent in watchers}

    async def backend_restored(self) -> None:
        """The cluster backend is back after an outage: what we registered may
        be gone or stale, and agents may have missed changes."""
        metrics.BACKEND_RECONNECTS.inc()
        local = dict(self.visitors)
        for group, visitor, connection in await self.backend.registered_connections():
            if connection not in local:  # it closed while the backend was away
                await self._mutate(group, visitor, partial(presence.drop, connection=connection))
        for conn in local.values():
            await self._visitor_mutate(conn, partial(presence.rejoin, connection=conn.presence))
        # Changes published while the bus was down never reached our agents:
        # they reconnect at once and start again from a fresh snapshot.
        for agent in self.agents():
            agent.close(CloseCode.RECONNECT, "resync after a cluster backend outage")

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run owned background work; its failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def later(self, delay: float, coro_factory: Any, name: str) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            self.spawn(coro_factory(), name)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    # -- visitors ----------------------------------------------------------
    async def visitor_joined(self, conn: VisitorConnection) -> None:
        """Register a new connection (``limit_exceeded`` if the visitor has its
        maximum already, or its presence data is too big)."""
        check_presence(conn.presence.data, self.settings)
        self.visitors[conn.id] = conn
        join = partial(presence.join, connection=conn.presence, limit=self.settings.max_connections_per_visitor)
        try:
            await self._visitor_mutate(conn, join, joined=conn.id)
        except ProtocolError:
            del self.visitors[conn.id]
            raise
        metrics.connection_opened(conn.role)

    async def release_held(self, conn: VisitorConnection) -> None:
        """After the welcome: the visitor's live session follows this
        connection, and signals held while it was away are delivered."""
        with contextlib.suppress(BackendUnavailable):  # they stay held; their senders hear of it
            if not conn.subject.startswith(CONSUMER_PREFIX):  # a consumer attaches with its token
                await self.sessions.visitor_connected(conn)
            await self.delivery.release_held(conn)

    async def visitor_updated(self, conn: VisitorConnection, data: dict[str, Any] | None, visible: bool | None) -> None:
        if data:
            # Each frame is within the limits; what it merges into must stay so too.
            merged = {k: v for k, v in {**conn.presence.data, **data}.items() if v is not None}
            check_presence(merged, self.settings)
        await self._visitor_mutate(conn, partial(presence.update, connection=conn.id, data=data, visible=visible))

    async def visitor_left(self, conn: VisitorConnection) -> None:
        self.visitors.pop(conn.id, None)
        metrics.CONNECTIONS.labels(role=conn.role).dec()
        change = await self._visitor_mutate(conn, partial(presence.leave, connection=conn.id))
        away_since = change.record.away_since if change and change.record else None
        if away_since is not None:
            group, visitor = conn.group, conn.subject
            self.later(
                self.settings.grace_period,
                lambda: self._mutate(group, visitor, partial(presence.expire_away, away_since=away_since)),
                f"grace-{group}/{visitor}",
            )

    async def _visitor_mutate(
        self, conn: VisitorConnection, mutation: Mutation, joined: str | None = None
    ) -> PresenceChange | None:
        """A local connection's presence change. If the backend is away the
        connection lives on: the change is applied to its own copy, and
        ``backend_restored`` registers that copy again."""
        try:
            change = await self._mutate(conn.group, conn.subject, mutation, joined)
        except BackendUnavailable:
            log.warning("backend unavailable: presence of %r kept locally until it is back", conn)
            mutation(VisitorRecord(conn.group, conn.subject, 0, {conn.id: conn.presence}))
            return None
        if change is not None and change.record is not None:
            conn.presence = change.record.connections.get(conn.id, conn.presence)
        return change

    async def _mutate(
        self, group: str, visitor: str, mutation: Mutation, joined: str | None = None
    ) -> PresenceChange | None:
        """Change a visitor's presence, announce it, move focus if it moved."""
        change = await self.backend.mutate(group, visitor, mutation, self.announcement)
        if change is not None:
            self.presence_changed(change)
        if change is not None and change.focus_moved:
            live = change.record.connections if change.record else {}
            if change.focus_before and change.focus_before.connection in live:
                await self.tell_focus(change.focus_before, False)
            if change.focus_after and change.focus_after.connection != joined:
                await self.tell_focus(change.focus_after, True)
        return change

    def presence_changed(self, change: PresenceChange) -> None:
        """After a change is stored: a visitor gone offline ends its session."""
        if change.change == "offline" and change.record is not None:
            group, visitor = change.record.group, change.record.visitor
            self.spawn(self.sessions.end_visitor_session(group, visitor, "visitor_offline"), f"end-{group}/{visitor}")

    def announcement(self, change: PresenceChange) -> list[tuple[str, bytes]]:
        """What agents are told of a change: one frame, encoded once, on the
        visitor's topic and its group's topic."""
        if change.change is None or change.record is None:
            return []
        record = change.record
        state = record.state() if record.online else offline_state(record.visitor, change.version)
        frame = codec.encode(PresenceChanged(change=change.change, state=state))
        envelope = topics.pack(topics.PRESENCE, record.group, record.visitor, change.version, frame)
        return [
            (topics.visitor_topic(record.group, record.visitor), envelope),
            (topics.group_topic(record.group), envelope),
        ]

    async def tell_focus(self, record: ConnectionRecord, focused: bool) -> None:
        if record.instance == self.instance:
            self.focus_local(record.connection, focused)
        else:
            envelope = topics.pack(topics.FOCUS, record.connection, focused)
            await self.backend.publish(topics.inbox_topic(record.instance), envelope)

    async def push(self, instance: str, connections: list[str], frame: bytes) -> None:
        """Queue a frame on visitor connections wherever they are held."""
        if instance == self.instance:
            self.delivery.deliver_local(connections, frame)
        else:
            await self.backend.publish(topics.inbox_topic(instance), topics.pack(topics.PUSH, connections, frame))

    def focus_local(self, connection: str, focused: bool) -> None:
        conn = self.visitors.get(connection)
        if conn is not None:
            conn.send_message(Focus(focused=focused))

    async def visitor_signal(self, conn: Connection, message: Signal) -> int:
        """Relay a visitor's signal; returns how many instances it reached."""
        check_size(message.data, self.settings.max_signal_bytes, "max_signal_bytes", "signal data")
        frame = codec.encode(
            Signal(event=message.event, data=message.data or {}, visitor=conn.subject, connection=conn.id)
        )
        envelope = topics.pack(topics.EVENT, conn.group, conn.subject, frame, None)
        if message.agent is not None:
            names = [topics.agent_topic(conn.group, message.agent)]
        else:
            names = [topics.visitor_topic(conn.group, conn.subject), topics.group_topic(conn.group)]
        # Both topics at once: the backend sends them in one write. Each topic
        # keeps this visitor's order, since the next frame waits for these.
        counts = await asyncio.gather(*(self._publish_event(topic, conn.subject, envelope, frame) for topic in names))
        if message.agent is not None and counts[0] is None:
            raise BackendUnavailable()
        return sum(count or 0 for count in counts)

    async def _publish_event(self, topic: str, visitor: str, envelope: bytes, frame: bytes) -> int | None:
        """Subscribers reached, or, when the cluster is unreachable, 1 if this
        instance's own agents on the topic still heard it (None if none did)."""
        try:
            return await self.backend.publish(topic, envelope)
        except BackendUnavailable:
            return 1 if self._to_watchers(topic, visitor, None, frame) else None

    # -- agents ------------------------------------------------------------
    async def agent_joined(self, agent: AgentConnection) -> None:
        metrics.connection_opened(agent.role)
        with contextlib.suppress(BackendUnavailable):  # recorded; made when the backend is back
            await self.watch(agent, [topics.agent_topic(agent.group, agent.subject)])

    async def agent_left(self, agent: AgentConnection) -> None:
        metrics.CONNECTIONS.labels(role=agent.role).dec()
        for session in list(agent.sessions):  # its guest seats go with it
            with contextlib.suppress(ProtocolError):
                await self.sessions.leave(agent, session)
        await self.unwatch(agent, list(agent.topics))

    async def subscribe(self, agent: AgentConnection, request_id: int, visitors: list[str], group: bool) -> None:
        watched = sum(topic.startswith("v:") for topic in agent.topics)
        fresh = {topics.visitor_topic(agent.group, v) for v in visitors} - agent.topics
        if watched + len(fresh) > self.settings.max_subscriptions_per_agent:
            limit = self.settings.max_subscriptions_per_agent
            raise LimitExceeded("max_subscriptions_per_agent", f"an agent connection may watch {limit} visitors")
        agent.start_snapshot()
        try:
            if group:
                agent.watching_group = True
                await self.watch(agent, [topics.group_topic(agent.group)])
                states = await self.backend.group_visitors(agent.group)
            else:
                await self.watch(agent, [topics.visitor_topic(agent.group, v) for v in visitors])
                states = [await self.backend.visitor(agent.group, v) for v in visitors]
        except BaseException:
            agent.finish_snapshot(None)
            raise
        agent.finish_snapshot(Snapshot(id=request_id, visitors=states, group=group or None))

    async def unsubscribe(self, agent: AgentConnection, visitors: list[str], group: bool) -> None:
        names = [topics.visitor_topic(agent.group, v) for v in visitors]
        if group:
            agent.watching_group = False
            names.append(topics.group_topic(agent.group))
        await self.unwatch(agent, names)

    async def lookup(self, agent: AgentConnection, request_id: int, visitor: str) -> None:
        agent.send_message(VisitorInfo(id=request_id, state=await self.backend.visitor(agent.group, visitor)))

    async def watch(self, agent: AgentConnection, names: Iterable[str]) -> None:
        for topic in names:
            if topic not in agent.topics:
                agent.topics.add(topic)
                self.watchers.setdefault(topic, set()).add(agent)
            # Every watcher waits for the subscription to be confirmed, even
            # if another started it: its snapshot must not precede it.
            await self.backend.subscribe(topic)

    async def unwatch(self, agent: AgentConnection, names: Iterable[str]) -> None:
        for topic in names:
            if topic not in agent.topics:
                continue
            agent.topics.discard(topic)
            watchers = self.watchers.get(topic)
            if watchers is None:
                continue
            watchers.discard(agent)
            if not watchers:
                del self.watchers[topic]
                await self.backend.unsubscribe(topic)

    # -- bus ---------------------------------------------------------------
    def on_bus_message(self, topic: str, envelope: bytes) -> None:
        try:
            item = topics.unpack(envelope)
            kind = item[0]
            if kind == topics.PRESENCE:
                self._to_watchers(topic, item[2], item[3], item[4])
            elif kind == topics.EVENT:
                self._to_watchers(topic, item[2], None, item[3], item[4])
            else:
                self.delivery.on_inbox(kind, item)
        except Exception:
            log.exception("dropping bad bus message on %s", topic)

    def _to_watchers(
        self, topic: str, visitor: str, version: int | None, frame: bytes, dedupe: str | None = None
    ) -> int:
        watchers = self.watchers.get(topic)
        if not watchers:
            return 0
        # An agent watching the whole group gets the group topic's copy.
        skip_group_watchers = topic.startswith("v:")
        delivered = 0
        for agent in watchers:
            if skip_group_watchers and agent.watching_group:
                continue
            if dedupe is None:
                agent.deliver(visitor, version, frame)
            else:
                agent.deliver_event(frame, dedupe)
            delivered += 1
        return delivered
