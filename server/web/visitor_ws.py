"""``GET /v1/visitor``: a visitor's presence connection."""

from __future__ import annotations

import logging

from aiohttp import web

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import CloseCode, ErrorCode, ProtocolError
from herald_presence.protocol.messages import (
    Ack,
    EndSession,
    Hello,
    Message,
    Presence,
    Refresh,
    SessionSignal,
    Signal,
    StartSession,
)
from herald_presence.server import logs
from herald_presence.server.backends.base import Arrival, Refused
from herald_presence.server.core.connection import VisitorConnection
from herald_presence.server.core.revocation import Revocations
from herald_presence.server.core.sessions import CONSUMER_PREFIX, Sessions
from herald_presence.server.model.presence_rules import is_consumer

from . import auth
from .http_common import client_address
from .keys import CREDENTIALS, EXPIRY, HUB, PRESENCE, SESSION_SIGNALS, SESSIONS, SETTINGS, SIGNALS
from .websocket import (
    FrameServer,
    open_websocket,
    read_hello,
    refuse,
    refused_before_upgrade,
    relay_session_signal,
)

log = logging.getLogger(__name__)
FRAMES = web.AppKey("visitor_frames", FrameServer[VisitorConnection])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/visitor", visitor_endpoint)
    app[FRAMES] = FrameServer(app, _handle, _gone)


async def visitor_endpoint(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, hub, presence, sessions = app[SETTINGS], app[HUB], app[PRESENCE], app[SESSIONS]
    refused = refused_before_upgrade(request, hub)
    if refused is not None:
        return refused
    wire = open_websocket(request, settings)
    try:
        hello, version = await read_hello(wire, settings)
        group, visitor, consumer_session, expires = await _identify(request, sessions, hello)
        await auth.require_origin(request, settings.groups[group])
    except ProtocolError as exc:
        log.info("visitor handshake refused: %s", exc.code)
        return refuse(wire, exc)
    visible = True if hello.visible is None else hello.visible
    conn = VisitorConnection(wire, group, visitor, settings.queue_limits, hub.instance, hello.data or {}, visible)
    logs.CONNECTION.set(conn.id)  # this handler's log lines (and its tasks') name it
    try:
        # Registered first, so that once a client has its welcome, agents can reach it.
        # Refused (by the group's back end: PROTOCOL.md §12.4) in the same step, unchecked while Redis is away.
        arrival = hub.arrival(group, visitor)
        focused = await presence.visitor_joined(conn, arrival)
    except Refused as refusal:
        log.info("visitor handshake refused: %s", ErrorCode.REVOKED)
        return refuse(wire, Revocations.refused(refusal.value))
    except ProtocolError as exc:
        return refuse(wire, exc)
    rest = _welcomed(app, conn, version, expires, focused, consumer_session, hello.session, arrival)
    return await app[FRAMES].serve_after(conn, client_address(request), rest)


async def _welcomed(
    app: web.Application,
    conn: VisitorConnection,
    version: int,
    expires: float | None,
    focused: bool,
    consumer_session: str | None,
    held_session: str | None,
    arrival: Arrival,
) -> bool:
    """The rest of the handshake: the welcome, a consumer's session, the
    signals held for this visitor. False: the connection was closed."""
    app[FRAMES].greet(conn, version, expires, visitor=conn.subject, focused=focused)
    if consumer_session is not None and not await _attach(app[SESSIONS], conn, consumer_session):
        return False  # closed: a consumer is nothing without its session
    await app[HUB].release_held(conn, held_session, arrival)
    return True


async def _gone(app: web.Application, conn: VisitorConnection) -> None:
    """Once its socket is gone (or its handshake failed after it registered)."""
    await app[PRESENCE].visitor_left(conn)


async def _identify(request: web.Request, sessions: Sessions, hello: Hello) -> tuple[str, str, str | None, int | None]:
    """(group, visitor ID, session, expiry) from a hello: a visitor's own
    token (v1 or JWT), or the session token of a consumer that redeemed a
    short code (its group takes consumer codes and its session is live; it
    lasts as long as its session, which closes it)."""
    settings = request.app[SETTINGS]
    if hello.session_token is not None and hello.visitor is None and hello.token is None:
        if hello.group not in settings.groups:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "unknown group")
        session = await sessions.consumer_session(hello.group, hello.session_token)
        return hello.group, CONSUMER_PREFIX + session, session, None
    group, visitor, expires = await auth.verify_visitor(request, hello)
    if is_consumer(visitor):
        raise ProtocolError(ErrorCode.UNAUTHORIZED, f"visitor IDs starting with {CONSUMER_PREFIX} are the server's")
    return group.id, visitor, None, expires


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


async def _handle(app: web.Application, conn: VisitorConnection, message: Message) -> None:
    if isinstance(message, Presence):
        if message.data is None and message.visible is None:
            raise ProtocolError(ErrorCode.INVALID, "presence needs data or visible")
        await app[PRESENCE].visitor_updated(conn, message.data, message.visible)
    elif isinstance(message, Signal):
        reached = await app[SIGNALS].from_visitor(conn, message)
        if message.agent is not None and not reached:
            raise ProtocolError(ErrorCode.AGENT_OFFLINE, f"agent {message.agent} is not connected")
        if message.id is not None:
            conn.send_message(Ack(id=message.id))
    elif isinstance(message, StartSession):
        conn.send_message(await app[SESSIONS].start(conn, message.key_type, message.id))
    elif isinstance(message, EndSession):
        if not await app[SESSIONS].end_visitor_session(conn.group, conn.subject, "ended"):
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "this visitor has no live session")
        conn.session = None
        conn.send_message(Ack(id=message.id))
    elif isinstance(message, SessionSignal):
        await relay_session_signal(conn, message, app[SESSION_SIGNALS], app[HUB].tasks)
    elif isinstance(message, Refresh):
        conn.send_message(await _refresh(app, conn, message))
    else:
        raise ProtocolError(ErrorCode.INVALID, f"{message.TYPE} is not a visitor message")


async def _refresh(app: web.Application, conn: VisitorConnection, message: Refresh) -> Ack:
    """A fresh visitor token for this connection's own visitor ID: the
    connection now lasts until it expires."""
    if conn.expires is None:  # anonymous and consumer connections hold no expiring token
        raise ProtocolError(ErrorCode.INVALID, "this connection has no token to refresh")
    group = app[SETTINGS].groups[conn.group]
    expires = await app[CREDENTIALS].verify(group, tokens.VISITOR, conn.subject, message.token)
    app[EXPIRY].watch(conn, expires)
    return Ack(id=message.id, expires=expires)
