"""Support sessions: where a visitor and agents meet after presence.

A session is keyed by the visitor's own ID (one-click: an agent waits for
that key, the visitor is never shown a code) or by a random short code the
visitor reads out. Its record lives in the backend, so the visitor, the
agents and the REST consumer may each be on a different instance.

Lifecycle events (``session_event``) go out on the key's topic (agents
waiting for it), the session's topic (agents in it), and the visitor's and
group's presence topics (agents watching). One event may reach an agent on
several topics; it carries a dedupe key so that the agent sees it once.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import GuestCount, SessionConnected, SessionEvent, SessionJoined
from herald_presence.server.backends.base import Bus, RecordStore
from herald_presence.server.config import Settings
from herald_presence.server.model import names
from herald_presence.server.model.records import SupportSession

from . import group_settings, short_codes
from .connection import AgentConnection, VisitorConnection
from .registry import Watchers
from .signals import SignalRouter

SESSION_ROLE = "session-visitor"  # role of the token a REST consumer presents on the websocket
CONSUMER_PREFIX = "consumer."  # visitor ID of a consumer: consumer.<session>


class Sessions:
    def __init__(
        self,
        settings: Settings,
        records: RecordStore,
        bus: Bus,
        watchers: Watchers,
        signals: SignalRouter,
        instance: str,
    ) -> None:
        self.settings = settings
        self._records = records
        self._bus = bus
        self._watchers = watchers
        self._signals = signals
        self._instance = instance

    # -- records -------------------------------------------------------------
    async def load(self, group: str, session: str) -> SupportSession | None:
        data = await self._records.kv_get(names.session_key(group, session))
        return SupportSession.unpack(data) if data else None

    async def _save(self, session: SupportSession) -> None:
        await self._records.kv_set(
            names.session_key(session.group, session.id), session.pack(), self.settings.session_ttl
        )

    async def _edit(self, group: str, session: str, edit: Callable[[SupportSession], None]) -> SupportSession | None:
        """Apply ``edit(session)`` atomically; None if the session is gone."""

        def update(data: bytes | None) -> bytes | None:
            if data is None:
                return None
            record = SupportSession.unpack(data)
            edit(record)
            return record.pack()

        data = await self._records.kv_update(names.session_key(group, session), update, self.settings.session_ttl)
        return SupportSession.unpack(data) if data else None

    async def _new(self, group: str, key_type: str, visitor: str | None) -> SupportSession:
        session_id = "s" + secrets.token_hex(8)
        if key_type == "random":
            rules = await group_settings.load(self._records, self.settings, group)
            key = await short_codes.allocate(self._records, group, session_id, rules.code_length, rules.code_ttl)
            code: str | None = key
        else:
            assert visitor is not None
            key, code = visitor, None
        return SupportSession(session_id, group, key, key_type, visitor or CONSUMER_PREFIX + session_id, code=code)

    # -- visitors --------------------------------------------------------------
    async def start(self, conn: VisitorConnection, key_type: str, request_id: int | None) -> SessionConnected:
        """The visitor starts a session; a previous one of its own ends."""
        if conn.subject.startswith(CONSUMER_PREFIX):
            raise ProtocolError(ErrorCode.INVALID, "a consumer is already in its session")
        await self.end_visitor_session(conn.group, conn.subject, "replaced")
        try:
            session = await self._new(conn.group, key_type, conn.subject)
        except ProtocolError as exc:
            # Agents watching the visitor hear that its start failed, and why.
            failed = SupportSession("s" + secrets.token_hex(8), conn.group, conn.subject, key_type, conn.subject)
            await self._announce(failed, "error", str(exc.code))
            raise
        session.connection, session.instance = conn.id, self._instance
        await self._save(session)
        ttl = self.settings.session_ttl
        if key_type == "visitor":
            await self._records.kv_set(names.session_by_key(conn.group, session.key), session.id.encode(), ttl)
        await self._records.kv_set(names.session_by_visitor(conn.group, conn.subject), session.id.encode(), ttl)
        await self._announce(session, "started")
        return _connected(session, request_id)

    async def end_visitor_session(self, group: str, visitor: str, reason: str) -> bool:
        """End the visitor's live session, if it has one."""
        session_id = await self._records.kv_get(names.session_by_visitor(group, visitor))
        session = await self.load(group, session_id.decode()) if session_id else None
        if session is None:
            return False
        await self.end(session, reason)
        return True

    async def end(self, session: SupportSession, reason: str) -> None:
        """Forget the session and release its key and code; tell the agents."""
        own = session.id.encode()

        def release(value: bytes | None) -> bytes | None:
            return None if value == own else value  # unless it already points at a newer session

        await self._records.kv_delete(names.session_key(session.group, session.id))
        indexes = [
            names.session_by_key(session.group, session.key),
            names.session_by_visitor(session.group, session.visitor),
        ]
        if session.code is not None:
            indexes.append(names.code_key(session.group, session.code))
        for index in indexes:
            await self._records.kv_update(index, release)
        await self._announce(session, "ended", reason)

    # -- REST consumers ----------------------------------------------------------
    async def create_for_consumer(self, group: str) -> SupportSession:
        """A random-key session for a page that only has JavaScript."""
        session = await self._new(group, "random", None)
        await self._save(session)
        await self._announce(session, "started")
        return session

    async def redeem(self, group: str, code: str) -> tuple[SupportSession, str] | None:
        """The consumer trades its code for the session's token, once."""
        session_id = await short_codes.resolve(self._records, group, code)
        if session_id is None:
            return None
        taken: list[bool] = []

        def take(record: SupportSession) -> None:
            # Only sessions made for a consumer: a code a visitor's app shows
            # must never let a guesser in on the visitor's side.
            taken.append(record.redeemed or not record.visitor.startswith(CONSUMER_PREFIX))
            record.redeemed = True

        session = await self._edit(group, session_id, take)
        if session is None or taken != [False]:
            return None
        secret = self.settings.groups[group].secrets[0]
        signed = tokens.make_token(secret, SESSION_ROLE, group, session.id, ttl=self.settings.session_ttl)
        return session, f"{session.id}.{signed}"

    def verify_consumer(self, group: str, session_token: str) -> str:
        """The session a consumer's token opens (``<session>.<expires>.<mac>``,
        bound to group, session and role), or ``unauthorized``."""
        session_id, _, signed = session_token.partition(".")
        tokens.verify_token(self.settings.groups[group].secrets, SESSION_ROLE, group, session_id, signed)
        return session_id

    async def visitor_connected(self, conn: VisitorConnection) -> None:
        """A visitor's newest connection takes over its live session (a tab
        reconnecting within the grace period keeps it), and hears so."""
        session_id = await self._records.kv_get(names.session_by_visitor(conn.group, conn.subject))
        if session_id is not None:
            with contextlib.suppress(ProtocolError):  # it ended meanwhile
                conn.send_message(await self.attach(conn, session_id.decode()))

    async def attach(self, conn: VisitorConnection, session_id: str) -> SessionConnected:
        """Make ``conn`` the session's visitor connection (guest counts go there)."""

        def take_over(record: SupportSession) -> None:
            record.connection, record.instance = conn.id, self._instance

        session = await self._edit(conn.group, session_id, take_over)
        if session is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "the session has ended")
        await self._records.kv_set(
            names.session_by_visitor(conn.group, conn.subject), session.id.encode(), self.settings.session_ttl
        )
        return _connected(session, None)

    # -- agents ------------------------------------------------------------------
    async def wait(self, agent: AgentConnection, key: str) -> None:
        """Watch for a session with this key (confirmed before returning)."""
        await self._watchers.watch(agent, [names.key_topic(agent.group, key)])

    async def tell_if_live(self, agent: AgentConnection, key: str) -> None:
        """A waiting agent whose session already started hears of it now."""
        session_id = await self._records.kv_get(names.session_by_key(agent.group, key))
        session = await self.load(agent.group, session_id.decode()) if session_id else None
        if session is not None:
            frame, dedupe = _event_frame(session, "started", None)
            agent.deliver_event(frame, dedupe)

    async def find(self, group: str, *, key: str | None, code: str | None, session: str | None) -> SupportSession:
        if sum(x is not None for x in (key, code, session)) != 1:
            raise ProtocolError(ErrorCode.INVALID, "name exactly one of key, code or session")
        if key is not None:
            found = await self._records.kv_get(names.session_by_key(group, key))
            session = found.decode() if found else None
        elif code is not None:
            session = await short_codes.resolve(self._records, group, code)
        record = await self.load(group, session) if session else None
        if record is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "no live session has that key, code or ID")
        return record

    async def join(
        self, agent: AgentConnection, request_id: int, *, key: str | None, code: str | None, session: str | None
    ) -> SessionJoined:
        found = await self.find(agent.group, key=key, code=code, session=session)

        def add(record: SupportSession) -> None:
            if agent.id not in record.guests:
                record.guests.append(agent.id)

        joined = await self._edit(agent.group, found.id, add)
        if joined is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "the session has ended")
        if joined.code is not None:  # claimed: the code now lives as long as the session
            code_key = names.code_key(joined.group, joined.code)
            await self._records.kv_set(code_key, joined.id.encode(), self.settings.session_ttl)
        agent.sessions.add(joined.id)
        await self._watchers.watch(agent, [names.session_topic(agent.group, joined.id)])
        await self._tell_guests(joined)
        return SessionJoined(
            id=request_id, session=joined.id, key=joined.key, visitor=joined.visitor, guests=len(joined.guests)
        )

    async def leave(self, agent: AgentConnection, session_id: str) -> None:
        def remove(record: SupportSession) -> None:
            if agent.id in record.guests:
                record.guests.remove(agent.id)

        agent.sessions.discard(session_id)
        await self._watchers.unwatch(agent, [names.session_topic(agent.group, session_id)])
        left = await self._edit(agent.group, session_id, remove)
        if left is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "the session has ended")
        await self._tell_guests(left)

    # -- telling -------------------------------------------------------------------
    async def _tell_guests(self, session: SupportSession) -> None:
        if session.connection is not None and session.instance is not None:
            frame = codec.encode(GuestCount(session=session.id, guests=len(session.guests)))
            await self._signals.push(session.instance, [session.connection], frame)

    async def _announce(self, session: SupportSession, event: str, reason: str | None = None) -> None:
        frame, dedupe = _event_frame(session, event, reason)
        envelope = names.envelope(names.EVENT, session.group, session.visitor, frame, dedupe)
        for topic in (
            names.key_topic(session.group, session.key),
            names.session_topic(session.group, session.id),
            names.visitor_topic(session.group, session.visitor),
            names.group_topic(session.group),
        ):
            await self._bus.publish(topic, envelope)


def _connected(session: SupportSession, request_id: int | None) -> SessionConnected:
    return SessionConnected(
        id=request_id,
        session=session.id,
        key=session.key,
        key_type=session.key_type,
        show_key=session.key_type == "random",
        guests=len(session.guests),
    )


def _event_frame(session: SupportSession, event: str, reason: str | None) -> tuple[bytes, str]:
    frame = codec.encode(
        SessionEvent(
            event=event,
            session=session.id,
            key=session.key,
            visitor=session.visitor,
            key_type=session.key_type,
            reason=reason,
        )
    )
    return frame, f"{session.id}:{event}"
