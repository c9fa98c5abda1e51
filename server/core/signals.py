"""Signal routing, both directions, and the accounting of every signal.

Visitor -> agents: a visitor's signal is encoded once and published on its
visitor's and group's topics (agents watching) or on one agent's topic.

Agent -> visitor: the signal always ends in exactly one answer, an ``ack``
with the number of visitor connections that got it, or an error. Live
connections on other instances get it through their instance's inbox, which
replies with its count. When the visitor is between connections (its grace
period), the signal is held in the backend; whichever instance the visitor
comes back to takes it, delivers it and replies to the agent's instance. If
nobody takes it within ``signal_hold``, the agent's instance drops it and
says it expired. The store guarantees take and drop are exclusive, so a
signal is never both delivered and reported expired.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from herald_presence.protocol import codec
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import Signal
from herald_presence.server import metrics
from herald_presence.server.backends.base import BackendUnavailable, Bus, HeldSignalStore, LogWrite, PresenceStore
from herald_presence.server.config import Settings
from herald_presence.server.model import events as ev
from herald_presence.server.model import names
from herald_presence.server.model.limits import check_signal
from herald_presence.server.model.presence_rules import CONSUMER_PREFIX, is_consumer
from herald_presence.server.model.records import ConnectionRecord, HeldSignal, VisitorRecord
from herald_presence.server.tasks import TaskSupervisor

from .connection import Connection, VisitorConnection
from .events import EventRecorder
from .inbox import Inbox
from .load import Load
from .registry import LocalVisitors, Watchers
from .routes import VisitorRoutes

log = logging.getLogger(__name__)

RETRY_PAUSE = 0.05  # seconds between looks at a visitor whose connections are closing
# A receiving instance must deliver by the sender's timeout less this share of
# it, so that its reply still arrives in time: a delivery the sender will count
# as failed is never made.
REPLY_MARGIN = 0.25


def _too_late(answer_by: float, key: str) -> bool:
    """Past ``answer_by`` the sender has answered ``delivery_failed`` or
    ``signal_expired``: delivering now (after this instance was frozen, or
    its bus backlog was late) would contradict that answer."""
    late = time.time() - answer_by
    if late > 0:
        log.warning("dropping signal %s: %.1fs past the time its sender answered without it", key, late)
    return late > 0


class Tally:
    """The replies to one publish that several instances answer (a session
    signal to the agents in a session): their counts, summed, complete once
    as many replied as the publish reached (``expect``)."""

    __slots__ = ("count", "done", "expected", "replies")

    def __init__(self) -> None:
        self.count = self.replies = 0
        self.expected: int | None = None  # known once the publish returns; replies may come before
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, delivered: int) -> None:
        self.count += delivered
        self.replies += 1
        self._check()

    def expect(self, instances: int) -> None:
        self.expected = instances
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.replies >= self.expected and not self.done.done():
            self.done.set_result(None)


def _unconfirmed(reply: asyncio.Future[int]) -> None:
    if not reply.done():
        reply.set_exception(ProtocolError(ErrorCode.DELIVERY_FAILED, "the visitor's instance did not confirm delivery"))


async def _counted(delivered: int) -> int:
    return delivered


def _targets(record: VisitorRecord, to_all: bool) -> list[ConnectionRecord]:
    focused = record.focused()
    return list(record.connections.values()) if to_all else [focused] if focused else []


class SignalRouter:
    def __init__(
        self,
        settings: Settings,
        store: PresenceStore,
        held: HeldSignalStore,
        bus: Bus,
        inbox: Inbox,
        visitors: LocalVisitors,
        watchers: Watchers,
        routes: VisitorRoutes,
        load: Load,
        tasks: TaskSupervisor,
        *,
        events: EventRecorder | None = None,
    ) -> None:
        self.settings = settings
        self._events = events  # the terms asked and answered, for the group's log
        self._store = store
        self._held = held
        self._bus = bus
        self._inbox = inbox
        self._visitors = visitors
        self._watchers = watchers
        self._routes = routes
        self._load = load
        self._tasks = tasks
        self._instance = inbox.instance
        self._replies: dict[str, asyncio.Future[int]] = {}
        self._tallies: dict[str, Tally] = {}
        # Keys of replies and held signals: unique across instances (a random
        # prefix per process) without a system call for randomness per signal.
        self._key_prefix = secrets.token_hex(6)
        self._keys = itertools.count()

    # -- visitor -> agents ---------------------------------------------------
    async def from_visitor(self, conn: Connection, message: Signal) -> int:
        """Relay a visitor's signal; returns how many instances it reached."""
        frame = codec.encode(
            Signal(
                event=message.event, data=message.data or {}, visitor=conn.subject, connection=conn.id, sid=message.sid
            )
        )
        check_signal(message.data, self.settings, frame)
        envelope = names.envelope(names.EVENT, conn.group, conn.subject, frame, None)
        if message.agent is not None:
            topics = [names.agent_topic(conn.group, message.agent)]
        elif is_consumer(conn.subject):  # scoped to its session: only the agents in it hear it
            topics = [names.session_topic(conn.group, conn.subject.removeprefix(CONSUMER_PREFIX))]
        else:
            topics = [names.visitor_topic(conn.group, conn.subject), names.group_topic(conn.group)]
        # Both topics at once: the backend sends them in one write. Each topic
        # keeps this visitor's order, since the next frame waits for these.
        answer = ev.terms_answer((message.data or {}).get("status")) if message.event == ev.TERMS_SIGNAL else None
        if answer is not None and self._events is not None:
            counts = await self._publish_answer(self._events, conn, message, answer, topics, envelope, frame)
        else:
            counts = await asyncio.gather(*(self._publish_event(t, conn.subject, envelope, frame) for t in topics))
        if message.agent is not None and counts[0] is None:
            raise BackendUnavailable()
        return sum(count or 0 for count in counts)

    async def _publish_answer(
        self,
        events: EventRecorder,
        conn: Connection,
        message: Signal,
        answer: str,
        topics: list[str],
        envelope: bytes,
        frame: bytes,
    ) -> list[int | None]:
        """A visitor's terms answer, published with its event in one atomic
        step (``Bus.publish_all``), awaited before its ack. With the backend
        away, this instance's own agents on the topics still hear it
        (``_publish_event``), and so does the log once it is back
        (``EventRecorder.record`` retries)."""
        session = conn.subject.removeprefix(CONSUMER_PREFIX) if is_consumer(conn.subject) else None
        fields = {
            "visitor": conn.subject,
            "connection": conn.id,
            "agent": message.agent,
            "session": session or getattr(conn, "session", None),
            "sid": message.sid,
        }
        write = LogWrite(conn.group, append=[ev.new_event(answer, conn.group, **fields)])
        try:
            counts: list[int | None] = list(await self._bus.publish_all([(t, envelope) for t in topics], write))
        except BackendUnavailable:
            await events.record(answer, conn.group, answer=True, **fields)
            return [1 if self._watchers.deliver(t, conn.subject, None, frame) else None for t in topics]
        events.written(write)
        return counts

    async def _publish_event(self, topic: str, visitor: str, envelope: bytes, frame: bytes) -> int | None:
        """Subscribers reached, or, when the cluster is unreachable, 1 if this
        instance's own agents on the topic still heard it (None if none did)."""
        try:
            return await self._bus.publish(topic, envelope)
        except BackendUnavailable:
            return 1 if self._watchers.deliver(topic, visitor, None, frame) else None

    # -- agent -> visitor ----------------------------------------------------
    async def to_visitor(self, group: str, agent: str, message: Signal) -> int:
        """Deliver an agent's signal; the delivered count, or ProtocolError."""
        assert message.visitor is not None
        if self._load.refuse():  # refused at once: what is accepted is still answered in time
            metrics.limit_hit("overloaded")
            raise ProtocolError(ErrorCode.OVERLOADED, "this instance is overloaded; send it again in a moment")
        visitor, to_all = message.visitor, message.to == "all"
        frame = codec.encode(Signal(event=message.event, data=message.data or {}, agent=agent, sid=message.sid))
        check_signal(message.data, self.settings, frame)
        try:  # where its connections are: known here when this instance follows the visitor
            record = await self._routes.record(group, visitor, self._store.visitor_record)
        except BackendUnavailable:
            return self._deliver_without_backend(group, visitor, frame, to_all)
        if record is None:
            raise ProtocolError(ErrorCode.VISITOR_OFFLINE, f"visitor {visitor} is offline")
        asked = None
        if message.event == ev.TERMS_REQUEST_SIGNAL and self._events is not None:
            # Who asked, in the group's log, stored before the visitor can see the signal: its
            # append is queued on the backend's connection ahead of a delivery through another
            # instance's inbox; awaited first when a connection of the visitor is here (delivered
            # at once) or the log and the inbox are on different Redis masters (a Redis Cluster).
            asked = asyncio.create_task(
                self._events.record(ev.TERMS_REQUESTED, group, asks=True, visitor=visitor, agent=agent, sid=message.sid)
            )
            here = any(c.instance == self._instance for c in record.connections.values())
            if self._events.log.ordered_with_publishes and not here:
                await asyncio.sleep(0)
            else:
                await asked
        try:
            return await self._deliver_or_hold(group, visitor, frame, to_all, record)
        finally:
            if asked is not None:
                await asked

    async def _deliver_or_hold(
        self, group: str, visitor: str, frame: bytes, to_all: bool, record: VisitorRecord | None
    ) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.signal_hold
        while True:
            if record is not None and record.connections:
                delivered = await self._deliver(_targets(record, to_all), frame)
                if delivered:
                    return delivered
                # Its connections are closing (their leave is on its way): look again shortly.
                await asyncio.sleep(RETRY_PAUSE)
            else:  # away, between connections: hold until it is back
                delivered = await self._hold(group, visitor, frame, to_all, deadline)
                if delivered:
                    return delivered
            if loop.time() >= deadline:
                raise ProtocolError(ErrorCode.SIGNAL_EXPIRED, f"visitor {visitor} did not come back in time")
            record = await self._store.visitor_record(group, visitor)

    async def _deliver(self, targets: list[ConnectionRecord], frame: bytes) -> int:
        by_instance: dict[str, list[str]] = {}
        for record in targets:
            by_instance.setdefault(record.instance, []).append(record.connection)
        delivered = self._visitors.deliver(by_instance.pop(self._instance, []), frame)
        waits = []
        answer_by = time.time() + self.settings.delivery_timeout * (1 - REPLY_MARGIN)
        published = time.monotonic()
        for instance, connections in by_instance.items():
            key, reply = self._expect_reply()
            envelope = names.envelope(names.DELIVER, key, self._instance, answer_by, connections, frame)
            if await self._bus.publish(names.inbox_topic(instance), envelope):
                waits.append(self._await_reply(key, reply, self.settings.delivery_timeout))
            else:
                self._replies.pop(key, None)
        if not waits:
            return delivered
        self._load.in_flight += len(waits)
        try:  # one instance, as a rule: awaited as it is, with no task around it
            for count in [await waits[0]] if len(waits) == 1 else await asyncio.gather(*waits):
                delivered += count
        finally:
            self._load.in_flight -= len(waits)
        self._load.delivery_took(time.monotonic() - published)
        return delivered

    async def deliver_later(self, instance: str, connections: list[str], frame: bytes) -> Coroutine[Any, Any, int]:
        """Queue ``frame`` on visitor connections of ``instance`` now (this
        instance's at once, another's through its inbox), so that frames sent
        one after another arrive in that order; the coroutine returned (to be
        awaited) gives how many got it, ``delivery_failed`` if that instance
        does not confirm in time."""
        if instance == self._instance:
            return _counted(self._visitors.deliver(connections, frame))
        key, reply = self._expect_reply()
        answer_by = time.time() + self.settings.delivery_timeout * (1 - REPLY_MARGIN)
        envelope = names.envelope(names.DELIVER, key, self._instance, answer_by, connections, frame)
        try:
            reached = await self._bus.publish(names.inbox_topic(instance), envelope)
        except BaseException:
            self._replies.pop(key, None)
            raise
        if not reached:
            self._replies.pop(key, None)
            return _counted(0)
        return self._await_reply(key, reply, self.settings.delivery_timeout)

    def expect_replies(self) -> tuple[str, Tally]:
        """A key for a publish that every instance it reaches answers with a ``REPLY``."""
        key = self._new_key()
        self._tallies[key] = tally = Tally()
        return key, tally

    async def await_replies(self, key: str, tally: Tally, seconds: float) -> tuple[int, bool]:
        """The summed count of the replies, and whether every instance replied in time."""
        try:
            await asyncio.wait_for(asyncio.shield(tally.done), seconds)
            return tally.count, True
        except TimeoutError:
            return tally.count, False
        finally:
            self._tallies.pop(key, None)

    def forget_replies(self, key: str) -> None:
        self._tallies.pop(key, None)

    def _deliver_without_backend(self, group: str, visitor: str, frame: bytes, to_all: bool) -> int:
        """The cluster is unreachable: a visitor connected here still gets the
        signal (its newest connection stands in for the focused one);
        anyone else is a clear error, never silence."""
        local = self._visitors.of_visitor(group, visitor)
        if not local:
            raise BackendUnavailable()
        targets = local if to_all else local[-1:]
        return self._visitors.deliver([c.id for c in targets], frame)

    # -- held signals ----------------------------------------------------------
    async def _hold(self, group: str, visitor: str, frame: bytes, to_all: bool, deadline: float) -> int:
        """Wait until the visitor's instance delivers the signal (its count),
        or 0 if the visitor turned out to be back already: deliver directly."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        key, reply = self._expect_reply()
        # The hold, then the delivery_timeout a taker's reply has to come back:
        answer_by = time.time() + remaining + self.settings.delivery_timeout * (1 - REPLY_MARGIN)
        held = HeldSignal(key, self._instance, frame, to_all, answer_by)
        metrics.HELD_SIGNALS.inc()
        try:
            delivered = await self._await_held(group, visitor, held, reply, remaining)
        except ProtocolError as exc:
            if exc.code == ErrorCode.SIGNAL_EXPIRED:
                metrics.HELD_OUTCOMES.labels(outcome="expired").inc()
            raise
        finally:
            metrics.HELD_SIGNALS.dec()
        if delivered:
            metrics.HELD_OUTCOMES.labels(outcome="delivered").inc()
        return delivered

    async def _await_held(
        self, group: str, visitor: str, held: HeldSignal, reply: asyncio.Future[int], remaining: float
    ) -> int:
        key = held.key
        await self._held.hold(group, visitor, held, remaining + self.settings.delivery_timeout)
        # The visitor may have come back between our look and the hold.
        record = await self._store.visitor_record(group, visitor)
        if record is not None and record.connections and await self._held.drop_held(group, visitor, key):
            self._replies.pop(key, None)
            return 0
        try:
            return await asyncio.wait_for(asyncio.shield(reply), remaining)
        except TimeoutError:
            pass
        if await self._held.drop_held(group, visitor, key):
            self._replies.pop(key, None)
            raise ProtocolError(ErrorCode.SIGNAL_EXPIRED, f"visitor {visitor} did not come back in time")
        # Taken just now by the visitor's instance: its reply is on the way.
        return await self._await_reply(key, reply, self.settings.delivery_timeout)

    async def take_held(self, conn: VisitorConnection) -> list[tuple[HeldSignal, bool]]:
        """What waited for this visitor (``release_held`` delivers it)."""
        return await self._held.take_held(conn.group, conn.subject)

    async def release_held(self, conn: VisitorConnection, taken: list[tuple[HeldSignal, bool]]) -> None:
        """A visitor connection joined: deliver what waited for it. The first
        connection back answers the sender (delivered to 1); a ``to: all``
        signal also reaches each connection that comes back after it while
        it is held, without a second answer."""
        for held, first in taken:
            if _too_late(held.answer_by, held.key):
                continue
            conn.send(held.frame)
            if first:
                await self._inbox.send(held.reply_to, names.REPLY, held.key, 1)

    # -- replies ---------------------------------------------------------------
    def _new_key(self) -> str:
        return f"{self._key_prefix}{next(self._keys):x}"

    def _expect_reply(self) -> tuple[str, asyncio.Future[int]]:
        key = self._new_key()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        return key, future

    async def _await_reply(self, key: str, future: asyncio.Future[int], seconds: float) -> int:
        """The reply's count; ``delivery_failed`` once ``seconds`` passed without it
        (a timer on the future itself: cheaper than ``wait_for``, on every signal)."""
        timer = asyncio.get_running_loop().call_later(seconds, _unconfirmed, future)
        try:
            return await future
        finally:
            timer.cancel()
            self._replies.pop(key, None)

    def on_reply(self, key: str, delivered: int) -> None:
        """An instance answered a delivery (or a held signal was taken)."""
        future = self._replies.get(key)
        if future is not None and not future.done():
            future.set_result(delivered)
        elif (tally := self._tallies.get(key)) is not None:
            tally.add(delivered)

    def on_deliver(self, key: str, reply_to: str, answer_by: float, connections: list[str], frame: bytes) -> None:
        """Another instance asks for a frame on connections held here; answer with the count."""
        if _too_late(answer_by, key):
            return
        delivered = self._visitors.deliver(connections, frame)
        self._tasks.spawn(self._inbox.send(reply_to, names.REPLY, key, delivered), f"reply-{key}")

    # -- pushes ------------------------------------------------------------------
    async def push(self, instance: str, connections: list[str], frame: bytes) -> None:
        """Queue a frame on visitor connections wherever they are held, no reply."""
        await self._inbox.send(instance, names.PUSH, connections, frame)
