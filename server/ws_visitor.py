"""``GET /v1/visitor``: a visitor's presence connection."""

from __future__ import annotations

import logging
from functools import partial

from aiohttp import web

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Ack, Message, Presence, Signal

from . import auth
from .connection import VisitorConnection
from .hub import Hub
from .keys import HUB, SETTINGS
from .websocket import open_websocket, read_hello, refuse, serve_frames, welcome

log = logging.getLogger(__name__)


async def visitor_endpoint(request: web.Request) -> web.StreamResponse:
    settings, hub = request.app[SETTINGS], request.app[HUB]
    ws = await open_websocket(request, settings)
    try:
        hello, version = await read_hello(ws, settings)
        group = auth.verify_visitor(settings, hello)
    except ProtocolError as exc:
        log.info("visitor handshake refused: %s", exc.code)
        await refuse(ws, exc)
        return ws
    assert hello.visitor is not None
    visible = True if hello.visible is None else hello.visible
    conn = VisitorConnection(ws, group.id, hello.visitor, settings.max_queue, hub.instance, hello.data or {}, visible)
    try:
        # Registered first, so that once a client has its welcome, agents can reach it.
        await hub.visitor_joined(conn)
        conn.send_message(welcome(conn, version, settings, visitor=hello.visitor, focused=True))
        await hub.release_held(conn)
        await serve_frames(conn, settings, partial(_handle, hub, conn))
    finally:
        await hub.visitor_left(conn)
        await conn.finish()
    return ws


async def _handle(hub: Hub, conn: VisitorConnection, message: Message) -> None:
    if isinstance(message, Presence):
        if message.data is None and message.visible is None:
            raise ProtocolError(ErrorCode.INVALID, "presence needs data or visible")
        await hub.visitor_updated(conn, message.data, message.visible)
    elif isinstance(message, Signal):
        reached = await hub.visitor_signal(conn, message)
        if message.agent is not None and not reached:
            raise ProtocolError(ErrorCode.AGENT_OFFLINE, f"agent {message.agent} is not connected")
        if message.id is not None:
            conn.send_message(Ack(id=message.id))
    else:
        raise ProtocolError(ErrorCode.INVALID, f"{message.TYPE} is not a visitor message")
