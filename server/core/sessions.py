"""Support sessions: where a visitor and agents meet after presence.

A session is keyed by the visitor's own ID (one-click: an agent waits for
that key, the visitor is never shown a code) or by a random short code the
visitor reads out. Its record lives in the backend, so the visitor, the
agents and the REST consumer may each be on a different instance.

A visitor has at most one live session: each start claims the visitor's
index (``names.session_by_visitor``) in one atomic step and ends the session
it displaced, so of starts that race (several tabs, several instances) one
stays live and the others end, their codes released.

Lifecycle events (``session_event``) go out on the key's topic (agents
waiting for it), the session's topic (agents in it), and the visitor's and
group's presence topics (agents watching; not for a consumer's session: a
consumer belongs to its session only). One event may reach an agent on
several topics; it carries a dedupe key so that the agent sees it once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.errors import CloseCode, ErrorCode, ProtocolError
from herald_presence.protocol.messages import GuestCount, IceServer, SessionConnected, SessionEvent, SessionJoined
from herald_presence.server.backends.base import (
    BackendUnavailable,
    Bus,
    Event,
    LogWrite,
    PresenceStore,
    RecordStore,
    Timer,
)
from herald_presence.server.config import Settings
from herald_presence.server.model import events as ev
from herald_presence.server.model import names
from herald_presence.server.model.ice import ice_servers_for
from herald_presence.server.model.limits import check_subscriptions
from herald_presence.server.model.presence_rules import CONSUMER_PREFIX, announced, is_consumer
from herald_presence.server.model.records import GroupSettings, SupportSession

from . import group_settings, short_codes
from .connection import AgentConnection, VisitorConnection
from .events import EventRecorder
from .inbox import Inbox
from .registry import Watchers
from .signals import SignalRouter

SESSION_ROLE = "session-visitor"  # role of the token a REST consumer presents on the websocket


class Sessions:
    def __init__(
        self,
        settings: Settings,
        records: RecordStore,
        bus: Bus,
        watchers: Watchers,
        signals: SignalRouter,
        instance: str,
        *,
        presence: PresenceStore,
        inbox: Inbox,
        events: EventRecorder | None = None,
    ) -> None:
        self.settings = settings
        self._records = records
        self._bus = bus
        self._watchers = watchers
        self._signals = signals
        self._instance = instance
        self._presence = presence  # where a consumer's connection is, to close it when its session ends
        self._inbox = inbox
        self._events = events  # the group's log: each change's events are stored with it, before agents hear

    # -- records -------------------------------------------------------------
    async def load(self, group: str, session: str) -> SupportSession | None:
        data = await self._records.kv_get(names.session_key(group, session))
        return SupportSession.unpack(data) if data else None

    async def _save(self, session: SupportSession, code_ttl: float, ttl: float | None = None) -> None:
        """Store a new session (living ``ttl``, default ``session_ttl``) and,
        in the same atomic step, its events: ``session.started`` and its
        code's ``code.created``, with the timers of its end by TTL and its
        code's expiry (``code_ttl`` from now). The digits are a capability:
        never in an event."""
        ttl = self.settings.session_ttl if ttl is None else ttl
        write = self._log_write(session.group)
        if write is not None:
            write.append.append(_event(ev.SESSION_STARTED, session, key_type=session.key_type))
            write.schedule.append(_expiry(session, ttl))
            if session.code is not None:
                expires = time.time() + code_ttl
                write.append.append(_event(ev.CODE_CREATED, session, expires=round(expires, 3)))
                write.schedule.append((_code_timer(session.id), expires, _event(ev.CODE_EXPIRED, session)))
        await self._records.kv_set(names.session_key(session.group, session.id), session.pack(), ttl, log=write)
        self._recorded(write)

    def _log_write(self, group: str) -> LogWrite | None:
        """What a change of the group's sessions writes to its log, in the change's step (None: no log)."""
        return LogWrite(group) if self._events is not None else None

    def _recorded(self, write: LogWrite | None) -> None:
        if write is not None and self._events is not None:
            self._events.written(write)

    async def _edit(
        self,
        group: str,
        session: str,
        edit: Callable[[SupportSession], None],
        keep_expiry: bool = False,
        logs: Callable[[SupportSession, SupportSession, LogWrite], None] | None = None,
    ) -> SupportSession | None:
        """Apply ``edit(session)`` atomically; None if the session is gone.
        The session then lives ``session_ttl`` more, unless ``keep_expiry``.
        ``logs(before, after, write)`` adds the edit's events to ``write``,
        stored in the same atomic step as the edit (with its timer of the
        session's end by TTL, moved)."""

        def update(data: bytes | None) -> bytes | None:
            if data is None:
                return None
            record = SupportSession.unpack(data)
            edit(record)
            return record.pack()

        ttl = None if keep_expiry else self.settings.session_ttl
        writes: list[LogWrite] = []  # one per attempt: the last is the one stored

        def changed(old: bytes | None, new: bytes | None) -> LogWrite | None:
            write = self._log_write(group)
            if write is None or old is None or new is None:
                return None
            after = SupportSession.unpack(new)
            if logs is not None:
                logs(SupportSession.unpack(old), after, write)
            if ttl is not None:
                write.schedule.append(_expiry(after, ttl))
            writes.append(write)
            return write

        data = await self._records.kv_update(names.session_key(group, session), update, ttl, log=changed)
        edited = SupportSession.unpack(data) if data else None
        if edited is not None and writes:
            self._recorded(writes[-1])
        return edited

    async def _new(
        self, group: str, key_type: str, visitor: str | None, rules: GroupSettings | None = None
    ) -> SupportSession:
        session_id = "s" + secrets.token_hex(8)
        if key_type == "random":
            rules = rules or await group_settings.load(self._records, self.settings, group)
            key = await short_codes.allocate(self._records, group, session_id, rules.code_length, rules.code_ttl)
            code: str | None = key
        else:
            assert visitor is not None
            key, code = visitor, None
        return SupportSession(session_id, group, key, key_type, visitor or CONSUMER_PREFIX + session_id, code=code)

    # -- visitors --------------------------------------------------------------
    async def start(self, conn: VisitorConnection, key_type: str, request_id: int | None) -> SessionConnected:
        """The visitor starts a session; a previous one of its own ends.

        The new session is stored first, then claims the visitor's index
        atomically, getting back what it displaced, which it ends. Starts
        that race each end the one they displaced: whatever their order, the
        last to claim is the only one live, and every other's code is
        released. A start that fails (no free code) leaves the live one be."""
        if is_consumer(conn.subject):
            raise ProtocolError(ErrorCode.INVALID, "a consumer is already in its session")
        rules = await group_settings.load(self._records, self.settings, conn.group)
        try:
            session = await self._new(conn.group, key_type, conn.subject, rules)
        except ProtocolError as exc:
            # Agents watching the visitor hear that its start failed, and why.
            failed = SupportSession("s" + secrets.token_hex(8), conn.group, conn.subject, key_type, conn.subject)
            await self._announce(failed, "error", str(exc.code))
            raise
        session.connection, session.instance = conn.id, self._instance
        await self._save(session, rules.code_ttl)  # stored before it is claimed: whoever displaces it can end it
        previous = await self._claim(conn.group, conn.subject, session.id)
        if previous is not None and previous != session.id:
            await self.end(conn.group, previous, "replaced")
        # A start racing this one may have displaced (and ended) it already.
        if await self._records.kv_get(names.session_key(conn.group, session.id)) is not None:
            await self._announce(session, "started")
        conn.session = session.id
        return _connected(session, request_id, ice_servers_for(rules.ice_servers, conn.id, time.time()))

    async def _claim(self, group: str, visitor: str, session_id: str) -> str | None:
        """Point the visitor's index at ``session_id`` and get back the session
        it pointed at, in one atomic step that never retries (however many
        starts race it, none fails for want of a turn)."""
        index = names.session_by_visitor(group, visitor)
        before = await self._records.kv_swap(index, session_id.encode(), self.settings.session_ttl)
        return before.decode() if before else None

    async def end_visitor_session(self, group: str, visitor: str, reason: str) -> bool:
        """End the visitor's live session, if it has one."""
        session_id = await self._records.kv_get(names.session_by_visitor(group, visitor))
        if session_id is None:
            return False
        if await self.end(group, session_id.decode(), reason):
            return True
        await self._release(names.session_by_visitor(group, visitor), session_id.decode())  # a stale index
        return False

    async def end(self, group: str, session_id: str, reason: str) -> bool:
        """End a session: release its code, forget it, release the visitor's
        index, tell the agents, and close a consumer's connection. Taking the
        record is atomic: of several enders (a start that displaced it, the
        visitor's end_session) one ends it. False if it had ended already."""
        record = await self.load(group, session_id)
        if record is None:
            return False
        code = names.code_key(group, record.code) if record.code is not None else None
        if code is not None:  # before: a retry after a failure further on still finds the record
            await self._release(code, session_id)
        write = self._log_write(group)
        if write is not None:  # logged by the one ender that takes the record, in that step
            write.cancel += [_end_timer(session_id), _code_timer(session_id)]  # an unused code is withdrawn
            write.append.append(_event(ev.SESSION_ENDED, record, reason=reason))
        taken = await self._records.kv_swap(names.session_key(group, session_id), None, log=write)
        if taken is None:
            return False
        self._recorded(write)
        session = SupportSession.unpack(taken)
        if code is not None:  # and after: an agent's join may have just claimed it (see ``join``)
            await self._release(code, session_id)
        await self._release(names.session_by_visitor(group, session.visitor), session_id)
        await self._announce(session, "ended", reason)
        if is_consumer(session.visitor):
            await self._close_consumer(session)
        return True

    async def _release(self, index: str, session_id: str) -> None:
        """Clear ``index`` unless it already points at another session."""
        await self._records.kv_delete_if(index, session_id.encode())

    async def _close_consumer(self, session: SupportSession) -> None:
        """A consumer's session ended: so does its connection (wherever it is),
        and its session token opens nothing any more (``consumer_session``)."""
        record = await self._presence.visitor_record(session.group, session.visitor)
        for held in record.connections.values() if record else ():
            code, reason = int(CloseCode.SESSION_ENDED), "the support session has ended"
            await self._inbox.send(held.instance, names.CLOSE, [held.connection], code, reason)

    # -- REST consumers ----------------------------------------------------------
    async def create_for_consumer(self, group: str) -> SupportSession:
        """A random-key session for a page that only has JavaScript. Until its
        consumer connects (or an agent joins) it lives as long as its code:
        a code created and abandoned costs nothing after ``code_ttl``."""
        rules = await group_settings.load(self._records, self.settings, group)
        session = await self._new(group, "random", None, rules)
        await self._save(session, rules.code_ttl, rules.code_ttl)
        await self._announce(session, "started")
        return session

    async def redeem(self, group: str, code: str) -> tuple[SupportSession, str] | None:
        """The consumer trades its code for the session's token, once."""
        session_id = await short_codes.resolve(self._records, group, code)
        if session_id is None:
            return None
        first_use = False

        def take(record: SupportSession) -> None:
            # Only sessions made for a consumer: a code a visitor's app shows
            # must never let a guesser in on the visitor's side.
            nonlocal first_use
            first_use = not record.redeemed and is_consumer(record.visitor)
            record.redeemed = True

        def logs(before: SupportSession, after: SupportSession, write: LogWrite) -> None:
            if not before.redeemed and is_consumer(before.visitor):
                write.claim.append(_code_use(after, "consumer"))

        # Still gone after code_ttl: its expiry stays.
        session = await self._edit(group, session_id, take, keep_expiry=True, logs=logs)
        if session is None or not first_use:
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

    async def consumer_session(self, group: str, session_token: str) -> str:
        """The session a consumer may connect to with this token: the token is
        good (``unauthorized``), its group still takes consumer codes
        (``unauthorized``), and the session is live, made for a consumer and
        redeemed (``session_not_found``: a token outlives nothing)."""
        session_id = self.verify_consumer(group, session_token)
        if not await group_settings.consumer_codes_allowed(self._records, self.settings, group):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "this group takes no short codes from consumer pages")
        record = await self.load(group, session_id)
        if record is None or record.visitor != CONSUMER_PREFIX + session_id or not record.redeemed:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "the session of this token has ended")
        return session_id

    async def live_session(self, conn: VisitorConnection) -> str | None:
        """The ID of the visitor's live session, as its index has it."""
        index = await self._records.kv_get(names.session_by_visitor(conn.group, conn.subject))
        return index.decode() if index is not None else None

    async def visitor_connected(self, conn: VisitorConnection, held: str | None, live: str | None) -> None:
        """A visitor's newest connection takes over its live session (a tab
        reconnecting within the grace period keeps it), and hears so.

        ``held`` is the session its hello says it holds: when that is not
        the one it takes over (``live``: ``live_session``'s answer; it ended
        while the visitor was away), the connection first hears that it
        ended (PROTOCOL.md §11.2)."""
        if held is not None and held != live:
            conn.send_message(await self._ended_for(conn, held))
        if live is None:
            return
        try:
            conn.send_message(await self.attach(conn, live))
        except ProtocolError:  # it ended meanwhile
            if held == live:
                conn.send_message(await self._ended_for(conn, held))

    async def _ended_for(self, conn: VisitorConnection, session_id: str) -> SessionEvent:
        """``session_event ended`` for a visitor whose hello named a session
        that is not live for it. Its reason is the one the group's log
        recorded when that session was this visitor's; for any other ID (a
        foreign session, live or not, an unknown one, or an end not in the
        log) it is ``ended``: the same answer, so nothing of another
        visitor's session is told, and nothing is done to it."""
        return SessionEvent(
            event="ended",
            session=session_id,
            visitor=conn.subject,
            reason=await self._recorded_end(conn.group, conn.subject, session_id) or "ended",
        )

    async def _recorded_end(self, group: str, visitor: str, session_id: str) -> str | None:
        """Why ``visitor``'s session ``session_id`` ended, as its group's log
        has it (``session.ended``), or None (not this visitor's, not recorded,
        past the log's retention, or the log out of reach)."""
        if self._events is None:
            return None
        try:
            timeline = await self._events.log.session_events(group, session_id)
        except BackendUnavailable:
            return None
        for _, event in reversed(timeline):
            if event.get("type") == ev.SESSION_ENDED and event.get("visitor") == visitor:
                reason = event.get("reason")
                return reason if isinstance(reason, str) else None
        return None

    async def attach(self, conn: VisitorConnection, session_id: str) -> SessionConnected:
        """Make ``conn`` the session's visitor connection (guest counts go there)."""

        def take_over(record: SupportSession) -> None:
            record.connection, record.instance = conn.id, self._instance

        session = await self._edit(conn.group, session_id, take_over)
        if session is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "the session has ended")
        # A consumer's index is made here; a visitor's already points at its
        # session, or at a newer one whose claim stands.
        index = names.session_by_visitor(conn.group, conn.subject)
        await self._records.kv_set(index, session.id.encode(), self.settings.session_ttl, only_if_absent=True)
        conn.session = session.id
        return _connected(session, None, await self.ice_servers(conn.group, conn.id))

    async def ice_servers(self, group: str, member: str) -> list[IceServer] | None:
        """The group's STUN/TURN servers for one member (its connection ID),
        TURN credentials made now (PROTOCOL.md §11.10)."""
        rules = await group_settings.load(self._records, self.settings, group)
        return ice_servers_for(rules.ice_servers, member, time.time())

    # -- agents ------------------------------------------------------------------
    async def wait(self, agent: AgentConnection, key: str) -> None:
        """Watch for a session with this key (confirmed before returning); keys
        count with watched visitors against ``max_subscriptions_per_agent``."""
        topic = names.key_topic(agent.group, key)
        if topic not in agent.topics:
            check_subscriptions(agent.watched(), 1, self.settings)
        await self._watchers.watch(agent, [topic])

    async def tell_if_live(self, agent: AgentConnection, key: str) -> None:
        """A waiting agent whose session already started hears of it now."""
        session = await self._by_key(agent.group, key)
        if session is not None:
            frame, dedupe = _event_frame(session, "started", None)
            agent.deliver_event(frame, dedupe)

    async def find(self, group: str, *, key: str | None, code: str | None, session: str | None) -> SupportSession:
        if sum(x is not None for x in (key, code, session)) != 1:
            raise ProtocolError(ErrorCode.INVALID, "name exactly one of key, code or session")
        if key is not None:
            record = await self._by_key(group, key)
        else:
            if code is not None:
                session = await short_codes.resolve(self._records, group, code)
            record = await self.load(group, session) if session else None
        if record is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "no live session has that key, code or ID")
        return record

    async def _by_key(self, group: str, key: str) -> SupportSession | None:
        """The live one-click session keyed by ``key``: the session of the
        visitor whose ID it is, if that is a one-click one."""
        session_id = await self._records.kv_get(names.session_by_visitor(group, key))
        record = await self.load(group, session_id.decode()) if session_id else None
        return record if record is not None and record.key_type == "visitor" and record.key == key else None

    async def join(
        self, agent: AgentConnection, request_id: int, *, key: str | None, code: str | None, session: str | None
    ) -> SessionJoined:
        if code is not None:  # a guess like any other: the agent's and the group's look-up budgets
            await short_codes.limit_agent_lookups(self._records, self.settings, agent.group, agent.subject)
        found = await self.find(agent.group, key=key, code=code, session=session)

        def add(record: SupportSession) -> None:
            if agent.id not in record.guests:
                record.guests.append(agent.id)

        def logs(before: SupportSession, after: SupportSession, write: LogWrite) -> None:
            if after.code is not None:  # its code is used: recorded at its first use only
                write.claim.append(_code_use(after, "agent", agent.subject))
            guests = len(after.guests)
            write.append.append(
                _event(ev.SESSION_JOINED, after, agent=agent.subject, connection=agent.id, guests=guests)
            )

        joined = await self._edit(agent.group, found.id, add, logs=logs)
        if joined is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "the session has ended")
        if joined.code is not None:  # claimed: the code now lives as long as the session
            code_key = names.code_key(joined.group, joined.code)
            await self._records.kv_set(code_key, joined.id.encode(), self.settings.session_ttl)
            if await self.load(agent.group, joined.id) is None:  # it ended meanwhile: its code goes too
                await self._release(code_key, joined.id)
                raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "the session has ended")
        agent.sessions[joined.id] = joined.visitor
        await self._watchers.watch(agent, [names.session_topic(agent.group, joined.id)])
        await self._tell_guests(joined)
        return SessionJoined(
            id=request_id,
            session=joined.id,
            key=joined.key,
            visitor=joined.visitor,
            guests=len(joined.guests),
            ice_servers=await self.ice_servers(agent.group, agent.id),
        )

    async def leave(self, agent: AgentConnection, session_id: str) -> None:
        def remove(record: SupportSession) -> None:
            if agent.id in record.guests:
                record.guests.remove(agent.id)

        def logs(before: SupportSession, after: SupportSession, write: LogWrite) -> None:
            guests = len(after.guests)
            write.append.append(_event(ev.SESSION_LEFT, after, agent=agent.subject, connection=agent.id, guests=guests))

        agent.sessions.pop(session_id, None)
        await self._watchers.unwatch(agent, [names.session_topic(agent.group, session_id)])
        left = await self._edit(agent.group, session_id, remove, logs=logs)
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
        topics = [names.key_topic(session.group, session.key), names.session_topic(session.group, session.id)]
        if announced(session.visitor):  # a consumer's sessions are for the agents in them (or waiting for them)
            topics += [names.visitor_topic(session.group, session.visitor), names.group_topic(session.group)]
        for topic in topics:
            await self._bus.publish(topic, envelope)


def _end_timer(session: str) -> str:
    return f"end:{session}"


def _code_timer(session: str) -> str:
    return f"code:{session}"


def _event(event_type: str, session: SupportSession, **fields: object) -> Event:
    """A session's event (``model.events``): its session and visitor, and ``fields``."""
    return ev.new_event(event_type, session.group, session=session.id, visitor=session.visitor, **fields)


def _expiry(session: SupportSession, ttl: float) -> Timer:
    """A session that is never ended lives ``ttl`` from now: then its log
    gets ``session.ended`` (reason ``expired``), unless it ends or lives
    longer first."""
    return _end_timer(session.id), time.time() + ttl, _event(ev.SESSION_ENDED, session, reason="expired")


def _code_use(session: SupportSession, by: str, agent: str | None = None) -> tuple[str, Event]:
    """Its code redeemed (by the consumer) or claimed (by an agent joining):
    ``code.redeemed``, a claim of its expiry's timer, so that it is recorded
    once, and only if the code had not expired or been used."""
    return _code_timer(session.id), _event(ev.CODE_REDEEMED, session, by=by, agent=agent)


def _connected(
    session: SupportSession, request_id: int | None, ice_servers: list[IceServer] | None
) -> SessionConnected:
    return SessionConnected(
        id=request_id,
        ice_servers=ice_servers,
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
