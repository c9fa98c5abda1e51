"""Agent -> visitor signals: deliver, hold while the visitor is away, account.

An agent's signal always ends in exactly one answer: an ``ack`` with the
number of visitor connections that got it, or an error. When the visitor is
between connections (its grace period), the signal is held in the backend;
whichever instance the visitor comes back to takes it, delivers it and
replies to the agent's instance through its inbox. If nobody takes it
within ``signal_hold``, the agent's instance drops it and says it expired.
The backend guarantees take and drop are exclusive, so a signal is never
both delivered and reported expired.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Any

from protocol import codec
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Signal

from . import metrics, topics
from .backend import BackendUnavailable, ConnectionRecord, HeldSignal, VisitorRecord
from .limits import check_size

if TYPE_CHECKING:
    from .connection import Connection
    from .hub import Hub


RETRY_PAUSE = 0.05  # seconds between looks at a visitor whose connections are closing


def _targets(record: VisitorRecord, to_all: bool) -> list[ConnectionRecord]:
    focused = record.focused()
    return list(record.connections.values()) if to_all else [focused] if focused else []


class Delivery:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.backend = hub.backend
        self.settings = hub.settings
        self._replies: dict[str, asyncio.Future[int]] = {}

    async def signal_visitor(self, group: str, agent: str, message: Signal) -> int:
        """Deliver an agent's signal; the delivered count, or ProtocolError."""
        assert message.visitor is not None
        check_size(message.data, self.settings.max_signal_bytes, "max_signal_bytes", "signal data")
        visitor, to_all = message.visitor, message.to == "all"
        frame = codec.encode(Signal(event=message.event, data=message.data or {}, agent=agent))
        try:
            record = await self.backend.visitor_record(group, visitor)
        except BackendUnavailable:
            return self._deliver_without_backend(group, visitor, frame, to_all)
        if record is None:
            raise ProtocolError(ErrorCode.VISITOR_OFFLINE, f"visitor {visitor} is offline")
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
            record = await self.backend.visitor_record(group, visitor)

    async def _deliver(self, targets: list[ConnectionRecord], frame: bytes) -> int:
        by_instance: dict[str, list[str]] = {}
        for record in targets:
            by_instance.setdefault(record.instance, []).append(record.connection)
        delivered = self.deliver_local(by_instance.pop(self.hub.instance, []), frame)
        waits = []
        for instance, connections in by_instance.items():
            key, reply = self._expect_reply()
            envelope = topics.pack(topics.DELIVER, key, self.hub.instance, connections, frame)
            if await self.backend.publish(topics.inbox_topic(instance), envelope):
                waits.append(self._await_reply(key, reply, self.settings.delivery_timeout))
            else:
                self._replies.pop(key, None)
        for count in await asyncio.gather(*waits):
            delivered += count
        return delivered

    def _deliver_without_backend(self, group: str, visitor: str, frame: bytes, to_all: bool) -> int:
        """The cluster is unreachable: a visitor connected here still gets the
        signal (its newest connection stands in for the focused one);
        anyone else is a clear error, never silence."""
        local = [c for c in self.hub.visitors.values() if c.group == group and c.subject == visitor]
        if not local:
            raise BackendUnavailable()
        targets = local if to_all else local[-1:]
        return self.deliver_local([c.id for c in targets], frame)

    def deliver_local(self, connections: list[str], frame: bytes) -> int:
        delivered = 0
        for connection in connections:
            conn = self.hub.visitors.get(connection)
            if conn is not None and not conn.closing:
                conn.send(frame)
                delivered += 1
        return delivered

    async def _hold(self, group: str, visitor: str, frame: bytes, to_all: bool, deadline: float) -> int:
        """Wait until the visitor's instance delivers the signal (its count),
        or 0 if the visitor turned out to be back already: deliver directly."""
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        key, reply = self._expect_reply()
        held = HeldSignal(key, self.hub.instance, frame, to_all)
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
        await self.backend.hold(group, visitor, held, remaining + self.settings.delivery_timeout)
        # The visitor may have come back between our look and the hold.
        record = await self.backend.visitor_record(group, visitor)
        if record is not None and record.connections and await self.backend.drop_held(group, visitor, key):
            self._replies.pop(key, None)
            return 0
        try:
            return await asyncio.wait_for(asyncio.shield(reply), remaining)
        except TimeoutError:
            pass
        if await self.backend.drop_held(group, visitor, key):
            self._replies.pop(key, None)
            raise ProtocolError(ErrorCode.SIGNAL_EXPIRED, f"visitor {visitor} did not come back in time")
        # Taken just now by the visitor's instance: its reply is on the way.
        return await self._await_reply(key, reply, self.settings.delivery_timeout)

    async def release_held(self, conn: Connection) -> None:
        """A visitor connection joined: deliver what waited for it."""
        for held in await self.backend.take_held(conn.group, conn.subject):
            conn.send(held.frame)
            await self.reply(held.reply_to, held.key, 1)

    # -- replies -----------------------------------------------------------
    def _expect_reply(self) -> tuple[str, asyncio.Future[int]]:
        key = secrets.token_hex(8)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        return key, future

    async def _await_reply(self, key: str, future: asyncio.Future[int], seconds: float) -> int:
        try:
            return await asyncio.wait_for(future, seconds)
        except TimeoutError:
            raise ProtocolError(ErrorCode.DELIVERY_FAILED, "the visitor's instance did not confirm delivery") from None
        finally:
            self._replies.pop(key, None)

    async def reply(self, instance: str, key: str, delivered: int) -> None:
        if instance == self.hub.instance:
            self._resolve(key, delivered)
        else:
            await self.backend.publish(topics.inbox_topic(instance), topics.pack(topics.REPLY, key, delivered))

    def _resolve(self, key: str, delivered: int) -> None:
        future = self._replies.get(key)
        if future is not None and not future.done():
            future.set_result(delivered)

    def on_inbox(self, kind: str, item: list[Any]) -> None:
        if kind == topics.DELIVER:
            _, key, reply_to, connections, frame = item
            delivered = self.deliver_local(connections, frame)
            self.hub.spawn(self.reply(reply_to, key, delivered), f"reply-{key}")
        elif kind == topics.REPLY:
            self._resolve(item[1], item[2])
        elif kind == topics.FOCUS:
            self.hub.focus_local(item[1], item[2])
        elif kind == topics.PUSH:
            self.deliver_local(item[1], item[2])
