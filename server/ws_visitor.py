"""``GET /v1/visitor``: a visitor's presence connection."""

from __future__ import annotations

import logging

from aiohttp import web

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Ack, Hello, Message, Ping, Pong, Presence, Signal, Welcome

from . import auth
from .connection import VisitorConnection
from .hub import Hub
from .keys import HUB, SETTINGS
from .websocket import SERVER_NAME, answering_errors, messages, open_websocket, read_hello, refuse

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
        conn.send_message(
            Welcome(
                protocol=version,
                connection=conn.id,
                role="visitor",
                group=group.id,
                keepalive=settings.keepalive,
                visitor=hello.visitor,
                focused=True,
                server=SERVER_NAME,
            )
        )
        await hub.release_held(conn)
        async for message in messages(conn, settings.max_frame_bytes):
            await answering_errors(conn, getattr(message, "id", None), _handle(hub, conn, message))
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
    elif isinstance(message, Ping):
        conn.send_message(Pong())
    elif isinstance(message, Pong):
        pass
    elif isinstance(message, Hello):
        raise ProtocolError(ErrorCode.INVALID, "hello was already received")
    else:
        raise ProtocolError(ErrorCode.INVALID, f"{message.TYPE} is not a visitor message")
