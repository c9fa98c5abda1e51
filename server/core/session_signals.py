"""Session signals: what the members of a support session send each other.

The members are the session's visitor connection (the one its record names:
the newest of the visitor's, or its consumer) and the agent connections that
joined it (its record's guests). Only they may send, only they receive; the
session's record, read for every signal, is what decides, never what a
client claims. A signal is sized for WebRTC (``payload``: an SDP offer of up
to 64 KiB, PROTOCOL.md §11.9) and goes

* to the visitor: straight to its connection (``SignalRouter.deliver_later``:
  at once when it is held here, else a ``DELIVER`` on its instance's inbox,
  which replies with its count);
* to the agents: one ``SESSION_SIGNAL`` envelope on the session's topic, which
  exactly the instances holding its agents subscribe (they joined it); each
  queues it on its agents in the session (all, or the one ``to`` names, never
  the sender) and replies with its count.

Each is routed while the sender's frame is handled, before the next one is
read, and always by the same path for the same receiver, so what one member
sends reaches each other member in order, on any instance. The answer (how
many members got it) is awaited after that, off the frame loop.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from typing import Any

from herald_presence.protocol import codec
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import SessionSignal
from herald_presence.server.backends.base import Bus
from herald_presence.server.config import Settings
from herald_presence.server.model import names
from herald_presence.server.model.limits import check_signal
from herald_presence.server.model.records import SupportSession
from herald_presence.server.tasks import TaskSupervisor

from .connection import Connection
from .inbox import Inbox
from .registry import Watchers
from .sessions import Sessions
from .signals import REPLY_MARGIN, SignalRouter

VISITOR = "visitor"  # ``to``: the session's visitor connection, whichever it is now
Outcome = tuple[int, bool]  # (members reached, every instance asked answered in time)


def is_member(session: SupportSession, conn: Connection) -> bool:
    """The session's visitor connection, or an agent connection in it."""
    if conn.role == "agent":
        return conn.id in session.guests
    return conn.subject == session.visitor and conn.id == session.connection


class SessionSignals:
    def __init__(
        self,
        settings: Settings,
        sessions: Sessions,
        bus: Bus,
        signals: SignalRouter,
        watchers: Watchers,
        inbox: Inbox,
        tasks: TaskSupervisor,
    ) -> None:
        self.settings = settings
        self._sessions = sessions
        self._bus = bus
        self._signals = signals
        self._watchers = watchers
        self._inbox = inbox
        self._tasks = tasks
        self._instance = inbox.instance

    async def send(self, sender: Connection, message: SessionSignal) -> Coroutine[Any, Any, int]:
        """Route a member's session signal now; the coroutine returned (to be
        awaited) answers how many members got it, or, for a signal to one
        member, why it got none. ``session_not_found`` for anyone but a
        member, whether or not the session exists."""
        check_signal(message.data, self.settings)
        session = await self._sessions.load(sender.group, message.session)
        if session is None or not is_member(session, sender):
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "no live session of yours has that ID")
        to, visitor = message.to, session.connection if session.instance is not None else None
        if to == VISITOR:
            to = visitor
            if to is None:
                raise ProtocolError(ErrorCode.MEMBER_OFFLINE, "the session's visitor is not connected")
        if to == sender.id:
            raise ProtocolError(ErrorCode.INVALID, "to: a member does not signal itself")
        to_visitor = sender.role == "agent" and visitor is not None and to in (None, visitor)
        agents = [guest for guest in session.guests if guest != sender.id and to in (None, guest)]
        if to is not None and not to_visitor and not agents:
            raise ProtocolError(ErrorCode.MEMBER_OFFLINE, f"{to} is no connection in this session")
        frame = codec.encode(
            SessionSignal(
                session=session.id,
                event=message.event,
                payload=message.payload,
                data=message.data,
                sid=message.sid,
                connection=sender.id,
                agent=sender.subject if sender.role == "agent" else None,
                visitor=sender.subject if sender.role == "visitor" else None,
            )
        )
        legs: list[Coroutine[Any, Any, Outcome]] = []
        try:
            if to_visitor:
                assert session.instance is not None and visitor is not None
                legs.append(_confirmed(await self._signals.deliver_later(session.instance, [visitor], frame)))
            if agents:  # ``to`` is then one of them, or None: all
                legs.append(await self._to_agents(session, to, sender, frame))
        except BaseException:
            for leg in legs:  # what went out still waits for its answer (and forgets it after)
                self._tasks.spawn(leg, f"session-signal-{sender.id}")
            raise
        return self._answer(legs, targeted=to is not None)

    async def _to_agents(
        self, session: SupportSession, to: str | None, sender: Connection, frame: bytes
    ) -> Coroutine[Any, Any, Outcome]:
        key, tally = self._signals.expect_replies()
        answer_by = time.time() + self.settings.delivery_timeout * (1 - REPLY_MARGIN)
        envelope = names.envelope(
            names.SESSION_SIGNAL, session.group, session.id, key, self._instance, answer_by, to, sender.id, frame
        )
        try:
            reached = await self._bus.publish(names.session_topic(session.group, session.id), envelope)
        except BaseException:
            self._signals.forget_replies(key)
            raise
        tally.expect(reached)
        return self._signals.await_replies(key, tally, self.settings.delivery_timeout)

    @staticmethod
    async def _answer(legs: list[Coroutine[Any, Any, Outcome]], targeted: bool) -> int:
        delivered, complete = 0, True
        for leg in legs:
            count, answered = await leg
            delivered, complete = delivered + count, complete and answered
        if targeted and not delivered:
            if not complete:
                raise ProtocolError(ErrorCode.DELIVERY_FAILED, "the member's instance did not confirm delivery")
            raise ProtocolError(ErrorCode.MEMBER_OFFLINE, "the member is not connected")
        return delivered

    def on_signal(
        self,
        group: str,
        session: str,
        key: str,
        reply_to: str,
        answer_by: float,
        to: str | None,
        sender: str,
        frame: bytes,
    ) -> None:
        """A session signal on the session's topic: queue it on the agents in
        the session held here, and reply with how many."""
        if time.time() > answer_by:  # its sender has answered without us: delivering now would contradict it
            return
        delivered = self._watchers.deliver_to_members(names.session_topic(group, session), to, sender, frame)
        self._tasks.spawn(self._inbox.send(reply_to, names.REPLY, key, delivered), f"reply-{key}")


async def _confirmed(delivery: Coroutine[Any, Any, int]) -> Outcome:
    try:
        return await delivery, True
    except ProtocolError as exc:
        if exc.code != ErrorCode.DELIVERY_FAILED:
            raise
        return 0, False
