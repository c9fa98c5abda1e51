"""The interfaces between an instance and everything shared.

Four small interfaces, each a concern a service may be given alone, and
``Backend``, what one implementation offers: all four plus its lifecycle.
Two implementations sit beside this file: ``memory`` (one process, the
default) and ``redis`` (many instances). The core above never knows which it
has. ``tests/backends`` runs one contract suite against both.

Common to all: an operation that cannot reach shared state raises
``BackendUnavailable``; it never half-happens silently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import VisitorState
from herald_presence.server.model.records import HeldSignal, PresenceChange, VisitorRecord


class BackendUnavailable(ProtocolError):
    """The shared backend cannot be reached; the operation did not happen."""

    def __init__(self, message: str = "the cluster backend is unreachable; try again shortly") -> None:
        super().__init__(ErrorCode.BACKEND_UNAVAILABLE, message)


Mutation = Callable[[VisitorRecord], PresenceChange | None]
Announce = Callable[[PresenceChange], list[tuple[str, bytes]]]


class BackendListener(Protocol):
    """What a backend calls back into (the instance). It never holds clients."""

    def on_bus_message(self, topic: str, message: bytes) -> None:
        """A message on a subscribed topic, in publish order."""

    def announcement(self, change: PresenceChange) -> list[tuple[str, bytes]]:
        """The bus messages that tell agents of ``change``."""

    def presence_changed(self, change: PresenceChange) -> None:
        """A change the backend made on its own (reaping a dead instance)."""

    async def backend_restored(self) -> None:
        """The backend was lost and is back: messages may have been missed,
        and what this instance registered may be gone. Called again until it
        returns without raising."""

    async def registrations_lost(self) -> None:
        """This instance was taken for dead (cut off, frozen) and its
        connections removed: register again those that live here. Called
        again until it returns without raising."""


class PresenceStore(ABC):
    """Visitors' presence records.

    A change goes through ``mutate``: the store loads the visitor's record
    (an empty, offline one with its last version if it has none), applies a
    rule from ``model.presence_rules``, stores the result and publishes the
    announcement built from it, all as one atomic step per visitor. So
    versions rise by one change at a time and announcements of one visitor
    reach each topic in version order, whichever instances made them. A
    visitor that is neither connected nor away is removed, leaving its last
    version behind for a while so that versions never go back.
    """

    @abstractmethod
    async def mutate(self, group: str, visitor: str, mutation: Mutation, announce: Announce) -> PresenceChange | None:
        """Apply ``mutation`` to the visitor's record atomically and publish
        ``announce(change)`` with it; None (and nothing stored) if it changed
        nothing."""

    @abstractmethod
    async def visitor(self, group: str, visitor: str) -> VisitorState:
        """The visitor's state; offline visitors come with their last version."""

    @abstractmethod
    async def visitor_record(self, group: str, visitor: str) -> VisitorRecord | None:
        """The online visitor's record; None when it is offline."""

    @abstractmethod
    async def group_visitors(self, group: str) -> list[VisitorState]:
        """Every online visitor of the group."""

    @abstractmethod
    async def registered_connections(self) -> list[tuple[str, str, str]]:
        """(group, visitor, connection) of every connection this instance
        registered, as the store has them."""


class Bus(ABC):
    """Topics between instances.

    ``publish`` reaches every instance subscribed to the topic, in publish
    order per publisher, and returns how many instances that was. Messages
    arrive through the listener given to ``Backend.start``. ``subscribe``
    returns once the subscription is in effect: a message published after
    it returns is delivered.
    """

    @abstractmethod
    async def subscribe(self, topic: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, topic: str) -> None: ...

    @abstractmethod
    async def publish(self, topic: str, message: bytes) -> int: ...


class HeldSignalStore(ABC):
    """Signals waiting for a visitor between connections.

    Stored per visitor. Each is claimed exactly once: either by a
    ``take_held`` (the visitor came back; that taker answers the sender) or
    by ``drop_held`` (the hold ran out), never both. A signal for the focused
    connection is removed when taken. A signal for every connection
    (``to_all``) stays after its claim: each connection that comes back
    while it is held takes it too (not as the first), so every tab that
    returns gets it once. A held signal expires by itself after its ``ttl``.
    """

    @abstractmethod
    async def hold(self, group: str, visitor: str, signal: HeldSignal, ttl: float) -> None: ...

    @abstractmethod
    async def take_held(self, group: str, visitor: str) -> list[tuple[HeldSignal, bool]]:
        """Every live signal held for the visitor, as (signal, first): the
        first taker of a signal answers its sender; atomic per visitor."""

    @abstractmethod
    async def drop_held(self, group: str, visitor: str, key: str) -> bool:
        """Remove one held signal; True if it was there, unexpired, and
        nobody had claimed it yet."""


class RecordStore(ABC):
    """Small records by key: sessions, short codes, group settings, counters.

    Keys name their group in braces (``{acme}:code:123456``, see
    ``model.names``) so that a Redis Cluster keeps a group together. A
    ``ttl`` is in seconds (any positive amount, however small, stores a
    record that expires); an expired record is never returned, updated or
    deleted.
    """

    @abstractmethod
    async def kv_get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def kv_set(self, key: str, value: bytes, ttl: float | None = None, only_if_absent: bool = False) -> bool:
        """Store ``value`` (``ttl`` None: no expiry); with ``only_if_absent``,
        only if the key has none (atomic: of two instances racing, exactly
        one wins). True if stored."""

    @abstractmethod
    async def kv_delete(self, key: str) -> bool:
        """True if there was a record to delete."""

    @abstractmethod
    async def kv_update(
        self, key: str, update: Callable[[bytes | None], bytes | None], ttl: float | None = None
    ) -> bytes | None:
        """Atomically replace the value with ``update(old)`` (None deletes);
        returns the new value. ``update`` may run more than once. ``ttl``
        None keeps the record's expiry (none for a new record)."""

    @abstractmethod
    async def kv_swap(self, key: str, value: bytes | None, ttl: float | None = None) -> bytes | None:
        """Store ``value`` (None deletes the record; ``ttl`` None: no expiry)
        and return the live value it replaced, in one atomic step that never
        retries against other writers, however many race it."""

    @abstractmethod
    async def kv_delete_if(self, key: str, value: bytes) -> bool:
        """Delete the record only if it holds ``value`` (atomically, without
        retries); True if it did."""

    @abstractmethod
    async def kv_count(self, key: str, window: float) -> int:
        """Count one more hit in a window that starts at the first hit and
        lasts ``window`` seconds; the hits so far in it."""


class Backend(PresenceStore, Bus, HeldSignalStore, RecordStore):
    """One implementation of all four, with its lifecycle."""

    instance_id: str

    @property
    def healthy(self) -> bool:
        """Reachable, and the bus subscription proven alive."""
        return True

    @abstractmethod
    async def start(self, listener: BackendListener) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...
