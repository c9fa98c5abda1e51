"""Where visitors' connections are, learnt from the bus: an agent's signal
goes out without reading the visitor's record first.

Every presence change of a visitor is published on its topics with its
route (each connection and its instance, the focused one first), the
changes agents never hear of (a last connection leaving) included. While
this instance is subscribed to a visitor's topic (an agent here watches the
visitor), it hears every one of them, in order, so the route it keeps is the one the store
holds, as fresh as a read would be. A route is learnt on the first signal
(one read) and forgotten when the subscription ends, when the visitor goes
offline, or when the bus was lost (changes may have been missed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from herald_presence.server.model import names
from herald_presence.server.model.presence_rules import announced
from herald_presence.server.model.records import ConnectionRecord, VisitorRecord

Route = list[list[str]]  # [[connection, instance], ...], the focused one first; [] while away
Entry = tuple[int, Route]  # the version it is of
Read = Callable[[str, str], Awaitable[VisitorRecord | None]]
Subscribed = Callable[[str], bool]


class _Learning:
    """A route being read; the newest the bus brought meanwhile."""

    __slots__ = ("heard",)

    def __init__(self) -> None:
        self.heard: tuple[int, Route | None] | None = None


class VisitorRoutes:
    def __init__(self, subscribed: Subscribed) -> None:
        self._subscribed = subscribed
        self._groups: dict[str, dict[str, Entry | _Learning]] = {}  # group -> visitor -> route or a read

    def _followed(self, group: str, visitor: str) -> bool:
        return self._subscribed(names.visitor_topic(group, visitor))

    async def record(self, group: str, visitor: str, read: Read) -> VisitorRecord | None:
        """The visitor's connections (their instances and which is focused),
        None if it is offline: from the route kept here when this instance
        follows the visitor, else from ``read`` (and kept from then on)."""
        routes = self._groups.get(group)
        known = routes.get(visitor) if routes is not None else None
        followed = announced(visitor) and self._followed(group, visitor)
        if isinstance(known, tuple) and followed:
            return _record(group, visitor, *known)
        if not followed:
            return await read(group, visitor)
        learning = known if isinstance(known, _Learning) else _Learning()
        self._groups.setdefault(group, {})[visitor] = learning
        try:
            record = await read(group, visitor)
        finally:
            if self._get(group, visitor) is learning:
                self._drop(group, visitor)
        # The bus may have told of a newer change while the read was out.
        heard = learning.heard
        if heard is not None and heard[0] > (record.version if record is not None else -1):
            self._keep(group, visitor, *heard)
            return None if heard[1] is None else _record(group, visitor, heard[0], heard[1])
        if record is not None and self._followed(group, visitor):
            self._keep(group, visitor, record.version, route_of(record))
        return record

    def heard(self, group: str, visitor: str, version: int, route: Route | None) -> None:
        """A presence change on the bus, with its route (None: offline)."""
        known = self._get(group, visitor)
        if isinstance(known, _Learning):
            if known.heard is None or version > known.heard[0]:
                known.heard = (version, route)
        elif known is not None and version > known[0]:
            self._keep(group, visitor, version, route)

    def forget(self, topic: str) -> None:
        """This instance no longer hears ``topic``: the route it kept fresh goes."""
        group, visitor = names.presence_topic_subject(topic)
        if group is not None and visitor is not None:
            self._drop(group, visitor)

    def clear(self) -> None:
        """The bus was lost: changes may have been missed."""
        self._groups.clear()

    def _get(self, group: str, visitor: str) -> Entry | _Learning | None:
        routes = self._groups.get(group)
        return routes.get(visitor) if routes is not None else None

    def _keep(self, group: str, visitor: str, version: int, route: Route | None) -> None:
        if route is None:
            self._drop(group, visitor)  # offline: nothing to route to
        else:
            self._groups.setdefault(group, {})[visitor] = (version, route)

    def _drop(self, group: str, visitor: str) -> None:
        routes = self._groups.get(group)
        if routes is not None:
            routes.pop(visitor, None)
            if not routes:
                del self._groups[group]


def route_of(record: VisitorRecord) -> Route:
    """[[connection, instance], ...], the focused connection first."""
    focused = record.focused()
    route = [[c.connection, c.instance] for c in record.connections.values() if c is not focused]
    if focused is not None:
        route.insert(0, [focused.connection, focused.instance])
    return route


def _record(group: str, visitor: str, version: int, route: Route) -> VisitorRecord:
    """A record with what routing needs: the connections, the first focused."""
    connections = {
        connection: ConnectionRecord(connection, instance, {}, True, 0.0, 1 if n == 0 else 0)
        for n, (connection, instance) in enumerate(route)
    }
    return VisitorRecord(group, visitor, version, connections, away_since=None if route else version)
