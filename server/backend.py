"""The one interface between an instance and everything shared.

Two implementations sit beside this file: ``backend_memory`` (one process,
the default) and, for clusters, a Redis one. The hub above never knows which
it has. Contracts:

* **Presence** changes go through ``mutate``: the backend loads the
  visitor's record (an empty, offline one with its last version if it has
  none), applies a rule from ``presence``, stores the result and publishes
  the announcement built from it, all as one atomic step per visitor. So
  versions rise by one change at a time and announcements of one visitor
  reach each topic in version order, whichever instances made them. A
  visitor that is neither connected nor away is removed, leaving its last
  version behind for a while so that versions never go back.
* **Bus**: ``publish`` reaches every instance subscribed to the topic, in
  publish order per publisher, and returns how many instances that was.
  Delivery happens through the listener given to ``start``.
* **Failure**: an operation that cannot reach shared state raises
  ``BackendUnavailable``; it never half-happens silently.
* **Held signals** are stored per visitor and taken exactly once: either by
  ``take_held`` (the visitor came back) or by ``drop_held`` (the hold ran
  out) — never both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import ConnectionState, VisitorState


class BackendUnavailable(ProtocolError):
    """The shared backend cannot be reached; the operation did not happen."""

    def __init__(self, message: str = "the cluster backend is unreachable; try again shortly") -> None:
        super().__init__(ErrorCode.BACKEND_UNAVAILABLE, message)


@dataclass(slots=True)
class ConnectionRecord:
    connection: str
    instance: str
    data: dict[str, Any]
    visible: bool
    since: float
    active: int = 0  # set by the backend: the visitor's version when last active


@dataclass(slots=True)
class VisitorRecord:
    group: str
    visitor: str
    version: int
    connections: dict[str, ConnectionRecord] = field(default_factory=dict)
    away_since: int | None = None  # version at which the last connection left

    @property
    def online(self) -> bool:
        return bool(self.connections) or self.away_since is not None

    def focused(self) -> ConnectionRecord | None:
        return max(self.connections.values(), key=lambda c: c.active, default=None)

    def state(self) -> VisitorState:
        focused = self.focused()
        connections: list[ConnectionState] = [
            {
                "connection": c.connection,
                "data": c.data,
                "visible": c.visible,
                "focused": c is focused,
                "since": c.since,
            }
            for c in self.connections.values()
        ]
        return {"visitor": self.visitor, "online": self.online, "version": self.version, "connections": connections}


def offline_state(visitor: str, version: int = 0) -> VisitorState:
    return {"visitor": visitor, "online": False, "version": version, "connections": []}


@dataclass(slots=True)
class PresenceChange:
    """What one presence operation did.

    ``change`` is the word agents get (online, offline, data, visibility,
    connections) or None when agents need not hear of it. The focus pair
    lets the hub tell connections that gained or lost focus.
    """

    record: VisitorRecord | None
    change: str | None
    version: int
    focus_before: ConnectionRecord | None = None
    focus_after: ConnectionRecord | None = None

    @property
    def focus_moved(self) -> bool:
        before = self.focus_before.connection if self.focus_before else None
        after = self.focus_after.connection if self.focus_after else None
        return before != after


@dataclass(slots=True)
class HeldSignal:
    key: str  # unique; the reply to the agent's instance names it
    reply_to: str  # instance ID of the agent's instance
    frame: bytes  # the encoded Signal the visitor will get
    to_all: bool


Mutation = Callable[[VisitorRecord], PresenceChange | None]
Announce = Callable[[PresenceChange], list[tuple[str, bytes]]]


class BackendListener(Protocol):
    """What a backend calls back into (the hub). It never holds clients."""

    def on_bus_message(self, topic: str, message: bytes) -> None:
        """A message on a subscribed topic, in publish order."""

    def announcement(self, change: PresenceChange) -> list[tuple[str, bytes]]:
        """The bus messages that tell agents of ``change``."""

    def presence_changed(self, change: PresenceChange) -> None:
        """A change the backend made on its own (reaping a dead instance)."""

    async def backend_restored(self) -> None:
        """The backend was lost and is back: messages may have been missed,
        and what this instance registered may be gone."""


class Backend(ABC):
    instance_id: str

    @property
    def healthy(self) -> bool:
        """Reachable, and the bus subscription proven alive."""
        return True

    @abstractmethod
    async def start(self, listener: BackendListener) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    # -- presence --------------------------------------------------------
    @abstractmethod
    async def mutate(self, group: str, visitor: str, mutation: Mutation, announce: Announce) -> PresenceChange | None:
        """Apply ``mutation`` to the visitor's record atomically and publish
        ``announce(change)`` with it; None (and nothing stored) if it changed
        nothing."""

    @abstractmethod
    async def visitor(self, group: str, visitor: str) -> VisitorState:
        """The visitor's state; offline visitors come with their last version."""

    @abstractmethod
    async def visitor_record(self, group: str, visitor: str) -> VisitorRecord | None: ...

    @abstractmethod
    async def group_visitors(self, group: str) -> list[VisitorState]:
        """Every online visitor of the group."""

    @abstractmethod
    async def registered_connections(self) -> list[tuple[str, str, str]]:
        """(group, visitor, connection) of every connection this instance
        registered, as the backend has them."""

    # -- bus -------------------------------------------------------------
    @abstractmethod
    async def subscribe(self, topic: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, topic: str) -> None: ...

    @abstractmethod
    async def publish(self, topic: str, message: bytes) -> int: ...

    # -- held signals ----------------------------------------------------
    @abstractmethod
    async def hold(self, group: str, visitor: str, signal: HeldSignal, ttl: float) -> None: ...

    @abstractmethod
    async def take_held(self, group: str, visitor: str) -> list[HeldSignal]: ...

    @abstractmethod
    async def drop_held(self, group: str, visitor: str, key: str) -> bool: ...

    # -- records: sessions, short codes, group settings, rate limits -------
    # Keys name their group in braces ("{acme}:code:123456") so that a Redis
    # Cluster keeps a group together. A ttl of None means no expiry.
    @abstractmethod
    async def kv_get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def kv_set(self, key: str, value: bytes, ttl: float | None = None, only_if_absent: bool = False) -> bool:
        """Store ``value``; with ``only_if_absent``, only if the key has none
        (atomic: of two instances racing, exactly one wins). True if stored."""

    @abstractmethod
    async def kv_delete(self, key: str) -> bool: ...

    @abstractmethod
    async def kv_update(
        self, key: str, update: Callable[[bytes | None], bytes | None], ttl: float | None = None
    ) -> bytes | None:
        """Atomically replace the value with ``update(old)`` (None deletes);
        returns the new value. ``update`` may run more than once."""

    @abstractmethod
    async def kv_count(self, key: str, window: float) -> int:
        """Count one more hit in a window that starts at the first hit and
        lasts ``window`` seconds; the hits so far in it."""
