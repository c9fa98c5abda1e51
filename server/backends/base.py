"""The interfaces between an instance and everything shared.

Four small interfaces, each a concern a service may be given alone, and
``Backend``, what one implementation offers: all four plus its lifecycle,
and its ``EventLog`` (``backend.events``: webhooks and the audit trail).
Two implementations sit beside this file: ``memory`` (one process, the
default) and ``redis`` (many instances). The core above never knows which it
has. ``tests/backends`` runs one contract suite against both.

Common to all: an operation that cannot reach shared state raises
``BackendUnavailable``; it never half-happens silently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import VisitorState
from herald_presence.server.model.records import HeldSignal, PresenceChange, VisitorRecord


class BackendUnavailable(ProtocolError):
    """The shared backend cannot be reached; the operation did not happen."""

    def __init__(self, message: str = "the cluster backend is unreachable; try again shortly") -> None:
        super().__init__(ErrorCode.BACKEND_UNAVAILABLE, message)


@dataclass(slots=True)
class Arrival:
    """A new connection's registration (``PresenceStore.mutate``): refused
    (``Refused``) if the record ``refused_by`` exists; once registered, read
    in the same atomic step, the record ``session_key`` (``session``) and
    whether signals are held for the visitor (``held``). ``read`` says
    whether the store filled them in."""

    refused_by: str
    session_key: str
    session: bytes | None = None
    held: bool = False
    read: bool = False


class Refused(Exception):  # noqa: N818: an answer, not a failure
    """A registration whose ``Arrival.refused_by`` exists: nothing was
    stored or announced. ``value``: that record's value."""

    def __init__(self, value: bytes) -> None:
        super().__init__("refused: the change's guard key exists")
        self.value = value


Mutation = Callable[[VisitorRecord], PresenceChange | None]
Announce = Callable[[PresenceChange], list[tuple[str, bytes]]]
Event = dict[str, Any]
Timer = tuple[str, float, Event]  # key, due (unix s), the event it appends then


@dataclass(slots=True)
class LogWrite:
    """What a change does to its group's event log (``EventLog``) in the
    change's own atomic step: a record's write (``RecordStore``) or a
    publish (``Bus.publish_all``) and its events are stored together, or
    neither is. In this order:

    * the timers ``cancel`` are dropped;
    * each (timer, event) of ``claim`` drops its timer and appends its event
      only if the timer was waiting (a short code's first use is recorded
      once, and never after its expiry fired);
    * the events ``append`` are appended, indexed as ``EventLog.append``
      indexes them (a ``terms.requested`` asks, another ``terms.*`` is an
      answer);
    * the timers ``schedule`` are set (``EventLog.schedule``).

    Every key of it is in ``group``'s slot, as the record's must be. Once
    the step is done, the store fills in ``appended``: the types of the
    events it appended (a claim whose timer was gone appends nothing)."""

    group: str
    append: list[Event] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)
    claim: list[tuple[str, Event]] = field(default_factory=list)
    schedule: list[Timer] = field(default_factory=list)
    appended: list[str] = field(default_factory=list)

    def done(self, claimed: list[bool]) -> None:
        """Record what the step appended, given which claims found their timer."""
        won = [event["type"] for (_key, event), took in zip(self.claim, claimed, strict=True) if took]
        self.appended = won + [event["type"] for event in self.append]


Changed = Callable[[bytes | None, bytes | None], LogWrite | None]  # a record's (old, new): what it logs


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
    async def mutate(
        self, group: str, visitor: str, mutation: Mutation, announce: Announce, arrival: Arrival | None = None
    ) -> PresenceChange | None:
        """Apply ``mutation`` to the visitor's record atomically and publish
        ``announce(change)`` with it; None (and nothing stored) if it changed
        nothing. With ``arrival`` (a connection joining; its keys are of the
        visitor's group), ``Refused`` instead if its ``refused_by`` exists,
        and its reads filled in: all in the same atomic step."""

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
    arrive through the listener given to ``Backend.start``, each as it was
    published (an implementation may carry several of one topic together,
    as the Redis bus does under load, but hands them over one by one). A
    message never starts with the byte 0xc1, which msgpack never uses (the
    Redis bus marks its batches with it). ``subscribe`` returns once the
    subscription is in effect: a message published after it returns is
    delivered.
    """

    @abstractmethod
    async def subscribe(self, topic: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, topic: str) -> None: ...

    @abstractmethod
    async def publish(self, topic: str, message: bytes) -> int: ...

    @abstractmethod
    async def publish_all(self, messages: list[tuple[str, bytes]], log: LogWrite) -> list[int]:
        """Publish each (topic, message), in order, and write ``log``, all in
        one atomic step (every topic in ``log.group``'s slot); how many
        instances each publish reached."""


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
    async def kv_set(
        self,
        key: str,
        value: bytes,
        ttl: float | None = None,
        only_if_absent: bool = False,
        log: LogWrite | None = None,
    ) -> bool:
        """Store ``value`` (``ttl`` None: no expiry); with ``only_if_absent``,
        only if the key has none (atomic: of two instances racing, exactly
        one wins). ``log`` is written in the same atomic step when the value
        is stored. True if stored."""

    @abstractmethod
    async def kv_delete(self, key: str) -> bool:
        """True if there was a record to delete."""

    @abstractmethod
    async def kv_update(
        self,
        key: str,
        update: Callable[[bytes | None], bytes | None],
        ttl: float | None = None,
        log: Changed | None = None,
    ) -> bytes | None:
        """Atomically replace the value with ``update(old)`` (None deletes);
        returns the new value. ``update`` may run more than once. ``ttl``
        None keeps the record's expiry (none for a new record). ``log(old,
        new)``, called after each ``update``, is what that change writes to
        the event log, in the same atomic step as the change that is stored
        (None: nothing)."""

    @abstractmethod
    async def kv_swap(
        self, key: str, value: bytes | None, ttl: float | None = None, log: LogWrite | None = None
    ) -> bytes | None:
        """Store ``value`` (None deletes the record; ``ttl`` None: no expiry)
        and return the live value it replaced, in one atomic step that never
        retries against other writers, however many race it. ``log`` is
        written in that step if there was a live value to replace."""

    @abstractmethod
    async def kv_delete_if(self, key: str, value: bytes) -> bool:
        """Delete the record only if it holds ``value`` (atomically, without
        retries); True if it did."""

    @abstractmethod
    async def kv_count(self, key: str, window: float) -> int:
        """Count one more hit in a window that starts at the first hit and
        lasts ``window`` seconds; the hits so far in it."""


class EventLog(ABC):
    """Each group's log of events (``model.events``): what webhooks deliver
    and the audit trail returns.

    ``append`` gives an event its ID, ``<ms>-<seq>``, rising in the order
    events are appended to the group's log (``model.events.parse_id``
    orders them). A presence change's event is appended by
    ``PresenceStore.mutate`` itself, in the change's atomic step, when the
    announcement names ``names.event_log_topic(group)``; the events of a
    record's change (a session's, a code's) and of a publish (a visitor's
    terms answer) are a ``LogWrite`` of that step. Events are kept
    ``retention(group)`` seconds and ``max_len`` per group at most
    (``configure``; older ones go at the next append or ``trim``).

    The log indexes each session's events: an event naming a ``session`` is
    listed under it; a ``terms.*`` event of a visitor without one waits, in
    the visitor's pending terms (``TERMS_WINDOW``), for the next event that
    names a session of that visitor (its ``session.started``, or a terms
    answer in it), which takes them into its session's list first. So
    ``session_events`` is the session's whole timeline: who asked for the
    terms, what the visitor answered, who joined and left, how it ended.

    Delivery is a consumer group: each event is taken (``take``) by one
    consumer and stays pending until ``ack``; the pending events of a
    consumer that stopped renewing them (``keep``: it died) are taken over
    (``reclaim``) by another after ``idle`` seconds. Timers append an event
    when due unless cancelled first.
    """

    retention: Callable[[str], float] = staticmethod(lambda group: 7 * 86400.0)
    max_len: int = 100_000
    # Whether the log outlives this process, with what it has not delivered (Redis: another
    # instance takes it over); the memory backend's does not.
    durable: bool = True
    # Whether an append is stored before any publish that was started after it (both ride one
    # ordered connection: memory, one Redis, Sentinel); not on a Redis Cluster, where the log's
    # master and a publish's may differ.
    ordered_with_publishes: bool = True

    def configure(self, retention: Callable[[str], float], max_len: int) -> None:
        self.retention, self.max_len = retention, max_len

    @abstractmethod
    async def append(self, group: str, event: Event, *, asks: bool = False, answer: bool = False) -> str:
        """Append ``event``; its ID. ``asks``: its ``agent`` is now the one who
        asked its ``visitor`` for the terms; ``answer``: an event without an
        ``agent`` gets the one who asked its visitor last (within
        ``TERMS_WINDOW``), if any."""

    @abstractmethod
    async def read(self, group: str, after: str | None, count: int) -> list[tuple[str, Event]]:
        """Up to ``count`` events after the ID ``after`` (None: from the
        oldest kept), oldest first."""

    @abstractmethod
    async def session_events(self, group: str, session: str) -> list[tuple[str, Event]]:
        """The session's timeline (see above), oldest first."""

    @abstractmethod
    async def take(self, group: str, consumer: str, count: int) -> list[tuple[str, Event]]:
        """Up to ``count`` events no consumer has taken yet, now pending for ``consumer``."""

    @abstractmethod
    async def skip(self, group: str) -> None:
        """Count every event appended so far as taken, without taking it (a
        group with no endpoint: nothing to read)."""

    @abstractmethod
    async def reclaim(self, group: str, consumer: str, idle: float, count: int) -> list[tuple[str, Event]]:
        """Pending events nobody kept for ``idle`` seconds, now ``consumer``'s
        (those the log no longer holds are acknowledged and left out)."""

    @abstractmethod
    async def keep(self, group: str, consumer: str, ids: list[str]) -> None:
        """``consumer`` still works on these: their idle time starts again."""

    @abstractmethod
    async def ack(self, group: str, ids: list[str]) -> None:
        """Done with these: no longer pending."""

    @abstractmethod
    async def schedule(self, group: str, key: str, due: float, event: Event) -> None:
        """Append ``event`` at ``due`` (unix s) unless ``cancel(key)`` comes first."""

    @abstractmethod
    async def cancel(self, group: str, key: str) -> bool:
        """Drop the timer ``key``; True if it was waiting (so it never fires)."""

    @abstractmethod
    async def fire_due(self, group: str) -> int:
        """Append the events of the group's timers that are due, each once
        whichever instances call this; how many."""

    @abstractmethod
    async def dead_letter(self, group: str, record: Event) -> None:
        """Keep a record of an event an endpoint never took (bounded)."""

    @abstractmethod
    async def dead_letters(self, group: str, count: int) -> list[Event]:
        """The newest dead-letter records, newest first."""

    @abstractmethod
    async def trim(self, group: str) -> None:
        """Apply the retention and ``max_len`` now."""


class Backend(PresenceStore, Bus, HeldSignalStore, RecordStore):
    """One implementation of all four, with its lifecycle and its event log."""

    instance_id: str
    events: EventLog

    @property
    def healthy(self) -> bool:
        """Reachable, and the bus subscription proven alive."""
        return True

    @abstractmethod
    async def start(self, listener: BackendListener) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...
