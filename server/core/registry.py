"""What this instance holds: its visitor connections, and which of its
agents watch which bus topic (the bus subscriptions follow the watchers)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from herald_presence.protocol.messages import Focus
from herald_presence.server.backends.base import Bus
from herald_presence.server.config import Settings
from herald_presence.server.model.names import AGENT_TOPIC, VISITOR_TOPIC

from .connection import AgentConnection, VisitorConnection


class LocalVisitors:
    """Visitor connections held here, by connection ID."""

    def __init__(self) -> None:
        self._by_id: dict[str, VisitorConnection] = {}

    def add(self, conn: VisitorConnection) -> None:
        self._by_id[conn.id] = conn

    def remove(self, conn: VisitorConnection) -> None:
        self._by_id.pop(conn.id, None)

    def __contains__(self, connection: str) -> bool:
        return connection in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[VisitorConnection]:
        return list(self._by_id.values())

    def of_visitor(self, group: str, visitor: str) -> list[VisitorConnection]:
        return [c for c in self._by_id.values() if c.group == group and c.subject == visitor]

    def deliver(self, connections: list[str], frame: bytes) -> int:
        """Queue ``frame`` on those of ``connections`` held here and open."""
        delivered = 0
        for connection in connections:
            conn = self._by_id.get(connection)
            if conn is not None and not conn.closing:
                conn.send(frame)
                delivered += 1
        return delivered

    def tell_focus(self, connection: str, focused: bool) -> None:
        conn = self._by_id.get(connection)
        if conn is not None:
            conn.send_message(Focus(focused=focused))

    def close(self, connections: list[str], code: int, reason: str) -> None:
        """Close those of ``connections`` held here, once what they were sent
        (and the request in hand's answer) is written."""
        for connection in connections:
            conn = self._by_id.get(connection)
            if conn is not None:
                conn.leave(code, reason)


class Watchers:
    """Local agents by the bus topics they watch; the first watcher of a
    topic subscribes it, the last to leave unsubscribes it."""

    def __init__(self, bus: Bus, settings: Settings, on_unfollowed: Callable[[str], None] | None = None) -> None:
        self._bus = bus
        self._settings = settings
        self._by_topic: dict[str, set[AgentConnection]] = {}
        self._followed: set[str] = set()  # topics whose subscription the bus confirmed
        self._on_unfollowed = on_unfollowed  # told when a followed topic is given up

    def following(self, topic: str) -> bool:
        """Whether every message on ``topic`` reaches this instance now."""
        return topic in self._followed

    def agents(self) -> set[AgentConnection]:
        return {agent for watchers in self._by_topic.values() for agent in watchers}

    async def watch(self, agent: AgentConnection, names: Iterable[str]) -> None:
        for topic in names:
            if topic not in agent.topics:
                agent.topics.add(topic)
                self._by_topic.setdefault(topic, set()).add(agent)
            # Every watcher waits for the subscription to be confirmed, even
            # if another started it: its snapshot must not precede it.
            await self._bus.subscribe(topic)
            if topic in self._by_topic:
                self._followed.add(topic)

    async def unwatch(self, agent: AgentConnection, names: Iterable[str]) -> None:
        for topic in names:
            if topic not in agent.topics:
                continue
            agent.topics.discard(topic)
            watchers = self._by_topic.get(topic)
            if watchers is None:
                continue
            watchers.discard(agent)
            if not watchers:
                del self._by_topic[topic]
                if topic in self._followed:
                    self._followed.discard(topic)
                    if self._on_unfollowed is not None:
                        self._on_unfollowed(topic)
                await self._bus.unsubscribe(topic)

    def deliver_to_members(self, topic: str, to: str | None, sender: str, frame: bytes) -> int:
        """Queue a session signal on the agents in the session (``topic``, its
        topic): the connection ``to``, or all of them; never its sender. How many."""
        delivered = 0
        for agent in self._by_topic.get(topic, ()):
            if agent.id != sender and (to is None or agent.id == to) and not agent.closing:
                agent.send(frame)
                delivered += 1
        return delivered

    def deliver(self, topic: str, visitor: str, version: int | None, frame: bytes, dedupe: str | None = None) -> int:
        """Queue a bus event's frame on the agents watching ``topic``; how many.
        A visitor's signal (no version, no dedupe key) reaches an agent that
        may hear from that visitor, within its budget (model/limits.py)."""
        watchers = self._by_topic.get(topic)
        if not watchers:
            return 0
        # An agent watching the whole group gets the group topic's copy.
        skip_group_watchers = topic.startswith(VISITOR_TOPIC)
        visitor_signal = version is None and dedupe is None
        addressed = topic.startswith(AGENT_TOPIC)
        delivered = 0
        for agent in watchers:
            if skip_group_watchers and agent.watching_group:
                continue
            if visitor_signal and not (
                agent.may_hear_from(visitor, watching=not addressed)
                and agent.within_signal_budget(visitor, self._settings)
            ):
                continue
            if dedupe is None:
                agent.deliver(visitor, version, frame)
            else:
                agent.deliver_event(frame, dedupe)
            delivered += 1
        return delivered
