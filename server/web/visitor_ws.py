"""``GET /v1/visitor``: a visitor's presence connection."""

from __future__ import annotations

import logging
from functools import partial

from aiohttp import web

from herald_presence.protocol.errors import CloseCode, ErrorCode, ProtocolError
from herald_presence.protocol.messages import Ack, EndSession, Hello, Message, Presence, Signal, StartSession
from herald_presence.server import logs
from herald_presence.server.config import Settings
from herald_presence.server.core.connection import VisitorConnection
from herald_presence.server.core.presence import PresenceService
from herald_presence.server.core.sessions import CONSUMER_PREFIX, Sessions
from herald_presence.server.core.signals import SignalRouter
from herald_presence.server.model.presence_rules import is_consumer

from . import auth
from .keys import HUB, PRESENCE, SESSIONS, SETTINGS, SIGNALS
from .websocket import (
    open_websocket,
    read_hello,
    refuse,
    refused_before_upgrade,
    serve_frames,
    welcome,
)

log = logging.getLogger(__name__)


async def visitor_endpoint(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, hub, presence, sessions = app[SETTINGS], app[HUB], app[PRESENCE], app[SESSIONS]
    refused = refused_before_upgrade(request, hub)
    if refused is not None:
        return refused
    ws = await open_websocket(request, settings)
    try:
        hello, version = await read_hello(ws, settings)
        group, visitor, consumer_session = await _identify(settings, sessions, hello)
        await auth.require_origin(request, settings.groups[group])
    except ProtocolError as exc:
        log.info("visitor handshake refused: %s", exc.code)
        await refuse(ws, exc)
        return ws
    visible = True if hello.visible is None else hello.visible
    conn = VisitorConnection(ws, group, visitor, settings.max_queue, hub.instance, hello.data or {}, visible)
    logs.CONNECTION.set(conn.id)  # this handler's log lines (and its tasks') name it
    try:
        # Registered first, so that once a client has its welcome, agents can reach it.
        await presence.visitor_joined(conn)
    except ProtocolError as exc:
        await refuse(ws, exc)
        return ws
    try:
        conn.send_message(welcome(conn, version, settings, visitor=visitor, focused=True))
        log.debug("visitor %s/%s connected", group, visitor)
        if consumer_session is not None and not await _attach(sessions, conn, consumer_session):
            return ws  # closed: a consumer is nothing without its session
        await hub.release_held(conn)
        await serve_frames(conn, settings, partial(_handle, presence, sessions, app[SIGNALS], conn))
    finally:
        await presence.visitor_left(conn)
        await conn.finish()
        log.debug("visitor connection closed (%s)", ws.close_code)
    return ws


async def _identify(settings: Settings, sessions: Sessions, hello: Hello) -> tuple[str, str, str | None]:
    """(group, visitor ID, session) from a hello: a visitor's own token, or
    the session token of a consumer that redeemed a short code (its group
    takes consumer codes and its session is live)."""
    if hello.session_token is not None and hello.visitor is None and hello.token is None:
        if hello.group not in settings.groups:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "unknown group")
        session = await sessions.consumer_session(hello.group, hello.session_token)
        return hello.group, CONSUMER_PREFIX + session, session
    group, visitor = auth.verify_visitor(settings, hello)
    if is_consumer(visitor):
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"visitor IDs starting with {CONSUMER_PREFIX} are the server's")
    return group.id, visitor, None


async def _attach(sessions: Sessions, conn: VisitorConnection, session: str) -> bool:
    """The consumer's connection becomes its session's; if the session ended
    meanwhile (or cannot be reached), the consumer is told and closed."""
    try:
        conn.send_message(await sessions.attach(conn, session))
        return True
    except ProtocolError as exc:
        conn.send_error(exc.code, exc.message)
        ended = exc.code == ErrorCode.SESSION_NOT_FOUND
        conn.leave(CloseCode.SESSION_ENDED if ended else CloseCode.RECONNECT, exc.message)
        return False


async def _handle(
    presence: PresenceService, sessions: Sessions, signals: SignalRouter, conn: VisitorConnection, message: Message
) -> None:
    if isinstance(message, Presence):
        if message.data is None and message.visible is None:
            raise ProtocolError(ErrorCode.INVALID, "presence needs data or visible")
        await presence.visitor_updated(conn, message.data, message.visible)
    elif isinstance(message, Signal):
        reached = await signals.from_visitor(conn, message)
        if message.agent is not None and not reached:
            raise ProtocolError(ErrorCode.AGENT_OFFLINE, f"agent {message.agent} is not connected")
        if message.id is not None:
            conn.send_message(Ack(id=message.id))
    elif isinstance(message, StartSession):
        conn.send_message(await sessions.start(conn, message.key_type, message.id))
    elif isinstance(message, EndSession):
        if not await sessions.end_visitor_session(conn.group, conn.subject, "ended"):
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "this visitor has no live session")
        conn.send_message(Ack(id=message.id))
    else:
        raise ProtocolError(ErrorCode.INVALID, f"{message.TYPE} is not a visitor message")
