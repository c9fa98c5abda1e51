"""What both websocket endpoints share: upgrade, hello, the frame loop.

Bad frames are answered with an ``error`` frame and dropped; the connection
lives on. Only the handshake closes on failure, with a close code that tells
the client whether reconnecting can help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import WSMsgType, hdrs, web

from herald_presence.protocol import codec
from herald_presence.protocol.errors import CloseCode, ErrorCode, ProtocolError
from herald_presence.protocol.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Hello,
    Message,
    Ping,
    Pong,
    SessionSignal,
    Welcome,
)
from herald_presence.server import __version__, metrics
from herald_presence.server.config import Settings
from herald_presence.server.core.connection import CLOSE_TIMEOUT, Connection, error_frame
from herald_presence.server.core.hub import Hub
from herald_presence.server.core.session_signals import SessionSignals
from herald_presence.server.model.limits import ConnectionLimit, Verdict, count, session_frame_allowed
from herald_presence.server.tasks import TaskSupervisor

from .http_common import client_address, error_response
from .keys import SETTINGS

log = logging.getLogger(__name__)
C = TypeVar("C", bound=Connection)  # a role's connection

SERVER_NAME = f"herald/{__version__}"
HANDSHAKE_CONTROL_FRAMES = 4  # pings and pongs taken before the hello; more are refused as no hello
_COUNTED = frozenset((WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.PING, WSMsgType.PONG))

_HANDSHAKE_CLOSE = {
    ErrorCode.UNAUTHORIZED: CloseCode.UNAUTHORIZED,
    ErrorCode.TOKEN_EXPIRED: CloseCode.UNAUTHORIZED,
    ErrorCode.FORBIDDEN: CloseCode.FORBIDDEN,
    ErrorCode.UNSUPPORTED_VERSION: CloseCode.UNSUPPORTED_VERSION,
    ErrorCode.SESSION_NOT_FOUND: CloseCode.SESSION_ENDED,  # a consumer's session ended: its token is spent
    ErrorCode.REVOKED: CloseCode.REVOKED,  # its group's back end refuses this visitor for a while
    ErrorCode.BACKEND_UNAVAILABLE: CloseCode.RECONNECT,  # a consumer's session could not be checked: try again
}


class FrameTooBig(ProtocolError):
    """A first frame above ``max_frame_bytes``: closed with 1009, no error frame."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(ErrorCode.TOO_LARGE, f"frame is {size} bytes; the limit is {limit}")


class HandshakeTimeout(ProtocolError):
    """No hello in time: maybe a slow network, so the client may retry."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.HANDSHAKE_REQUIRED, "no hello within the handshake timeout")


def refused_before_upgrade(request: web.Request, hub: Hub) -> web.Response | None:
    """A 503 while draining (the client retries, elsewhere: readiness is
    already false), a 426 for a request that is no websocket upgrade (a GET
    with ``Upgrade: websocket``; the rest of the handshake is checked by
    the upgrade itself, which answers 400), a 429 for an address opening
    connections too fast."""
    if hub.draining:
        response = error_response(503, ErrorCode.DRAINING, "this instance is shutting down; reconnect")
        response.headers["Retry-After"] = "1"
        return response
    if request.method != hdrs.METH_GET or request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        response = error_response(426, ErrorCode.INVALID, "this path takes a websocket upgrade only")
        response.headers["Upgrade"] = "websocket"
        return response
    if hub.connection_rate.allow(client_address(request)):
        return None
    return error_response(429, ErrorCode.RATE_LIMITED, "too many new connections from this address")


async def open_websocket(request: web.Request, settings: Settings) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(
        # No heartbeat: core/keepalive.py pings silent connections, and
        # pings and pongs come to our loop (``serve_frames``), which counts
        # them against the connection's frame rate and byte budget like any
        # frame and answers pings within them: aiohttp's autoping answered
        # every ping, unseen and unlimited.
        autoping=False,
        # aiohttp refuses a frame of max_msg_size bytes or more; ours is the largest accepted
        # (a session member's session_signal); ``serve_frames`` holds every other frame to max_frame_bytes.
        max_msg_size=max(settings.max_frame_bytes, settings.max_session_frame_bytes) + 1,  # bigger: 1009
        timeout=CLOSE_TIMEOUT,
        # No permessage-deflate, though every browser offers it: our frames are
        # small msgpack maps that barely shrink, while each negotiated
        # connection holds zlib state (~100 KiB more RSS per connection,
        # measured) and pays deflate CPU on every frame. Not inflating
        # anything also leaves no decompression bomb to defuse.
        compress=False,
    )
    await ws.prepare(request)
    return ws


async def read_hello(ws: web.WebSocketResponse, settings: Settings) -> tuple[Hello, int]:
    """The client's hello and the protocol version both speak."""
    try:
        async with asyncio.timeout(settings.handshake_timeout):
            msg = await ws.receive()
            # A few control frames may come first (a pong, a client's own
            # keepalive ping): answered as aiohttp would; more are no hello.
            for _ in range(HANDSHAKE_CONTROL_FRAMES):
                if msg.type is WSMsgType.PING:
                    await _pong(ws, msg.data)
                elif msg.type is not WSMsgType.PONG:
                    break
                msg = await ws.receive()
    except TimeoutError:
        raise HandshakeTimeout() from None
    if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT) and len(msg.data) > settings.max_frame_bytes:
        raise FrameTooBig(len(msg.data), settings.max_frame_bytes)
    if msg.type is not WSMsgType.BINARY:
        raise ProtocolError(ErrorCode.BAD_FRAME, "the first frame must be a binary hello")
    hello = codec.decode(msg.data, settings.max_frame_bytes)
    if not isinstance(hello, Hello):
        raise ProtocolError(ErrorCode.HANDSHAKE_REQUIRED, "the first frame must be a hello")
    common = set(hello.versions) & set(SUPPORTED_VERSIONS)
    if not common:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"this server speaks protocol {list(SUPPORTED_VERSIONS)}")
    return hello, max(common)


async def refuse(ws: web.WebSocketResponse, error: ProtocolError) -> None:
    """Answer a failed handshake with an error frame, then close."""
    count(error)
    if isinstance(error, FrameTooBig):
        metrics.limit_hit("max_frame_bytes")
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close(code=CloseCode.MESSAGE_TOO_BIG, message=b"message too big")
        return
    frame = error_frame(error.code, error.message)
    if ws.closed:
        return
    if isinstance(error, HandshakeTimeout):
        code = CloseCode.HANDSHAKE_TIMEOUT
    elif isinstance(error, ConnectionLimit):
        code = CloseCode.TOO_MANY_CONNECTIONS
    else:
        code = _HANDSHAKE_CLOSE.get(error.code, CloseCode.HANDSHAKE_FAILED)
    try:
        await ws.send_bytes(frame)
        await ws.close(code=code, message=error.message.encode()[:120])
    except (ConnectionError, RuntimeError):
        pass


def welcome(conn: Connection, version: int, settings: Settings, **role_fields: Any) -> Welcome:
    return Welcome(
        protocol=version,
        connection=conn.id,
        role=conn.role,
        group=conn.group,
        keepalive=settings.keepalive,
        server=SERVER_NAME,
        **role_fields,
    )


async def serve_frames(
    conn: C, request: web.Request, handle: Callable[[web.Application, C, Message], Awaitable[None]]
) -> None:
    """Answer every frame until the connection ends: the frames both roles
    share here, the role's own through ``handle(app, conn, message)`` (a
    module function: nothing is made per connection for it), errors as
    error frames. One loop reads the socket (no iterator or generator
    between it and aiohttp: each would be held by every idle connection).

    Every frame counts against the rate and the byte budget before anything
    else is done with it: data frames, and the control frames (pings,
    pongs) that aiohttp hands us since it no longer answers them."""
    _forget_handshake(request)
    app = request.app
    settings = app[SETTINGS]
    ws = conn.ws
    while True:
        msg = await ws.receive()
        conn.heard = time.monotonic()  # alive, whatever it sent (core/keepalive.py)
        kind = msg.type
        if kind in _COUNTED:
            if conn.closing or not _within_rate(conn, settings, len(msg.data)):
                continue  # over a limit, or after we started closing: dropped unread
            if kind is WSMsgType.PING:
                await _pong(ws, msg.data)
                continue
            if kind is WSMsgType.PONG:
                continue  # the answer to a keepalive ping: heard above
            message = _decoded(conn, msg.data, settings)
            if message is None:
                continue
        else:
            if kind is WSMsgType.ERROR:
                error = ws.exception()
                if getattr(error, "code", None) == CloseCode.MESSAGE_TOO_BIG:
                    metrics.limit_hit("max_frame_bytes")
                log.debug("%r ended with %s", conn, error)
            return  # closed
        if conn.closing:
            continue  # it arrived after our close: unanswered, so the client counts it as not done
        metrics.received(conn.role, message.TYPE)
        if isinstance(message, Ping):
            conn.send_message(Pong())
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, Hello):
            conn.send_error(ErrorCode.INVALID, "hello was already received")
        else:
            await answering_errors(conn, getattr(message, "id", None), handle(app, conn, message))


def _forget_handshake(request: web.Request) -> None:
    """aiohttp keeps what a request's properties computed (its URL, headers
    view, peer address...) for the request's life, which for a websocket is
    the connection's: ~1.9 KB per idle connection (tracemalloc), let go of
    once the handshake is done. Computed again if read again (the access
    log does, at the close)."""
    cached = getattr(request, "_cache", None)
    if isinstance(cached, dict):
        cached.clear()


def _decoded(conn: Connection, frame: bytes | str, settings: Settings) -> Message | None:
    """A data frame's message; None when there is none to answer (a bad
    frame answered with an error frame, or an oversized one that closed)."""
    if len(frame) > settings.max_frame_bytes:
        return _session_sized(conn, frame, settings)
    if isinstance(frame, str):
        conn.send_error(ErrorCode.BAD_FRAME, "frames must be binary msgpack")
        return None
    try:
        return codec.decode(frame, settings.max_frame_bytes)
    except ProtocolError as exc:
        conn.send_error(exc.code, exc.message, exc.request_id)
        return None


def _within_rate(conn: Connection, settings: Settings, size: int) -> bool:
    """Frames over the frame rate or the byte budget are refused (one error
    frame per streak), and a connection that keeps going is closed as flooding."""
    verdict = conn.rate.take(size, settings)
    if verdict is Verdict.ALLOWED:
        return True
    if verdict is Verdict.FIRST_REFUSED:
        conn.send_error(ErrorCode.RATE_LIMITED, f"over {settings.message_rate:g} frames per second; frames dropped")
    elif verdict is Verdict.FIRST_REFUSED_BYTES:
        conn.send_error(ErrorCode.RATE_LIMITED, f"over {settings.message_bytes_rate} bytes per second; frames dropped")
    elif verdict is Verdict.FLOODING:
        log.warning("closing %r: flooding", conn)
        conn.close(CloseCode.FLOODING, "flooding", flush=True)  # the streak's rate_limited goes first
    return False


async def _pong(ws: web.WebSocketResponse, payload: bytes) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):  # closing: the receive loop ends on its own
        await ws.pong(payload)


def _session_sized(conn: Connection, frame: bytes | str, settings: Settings) -> Message | None:
    """A frame over ``max_frame_bytes``: a session member's ``session_signal``
    up to ``max_session_frame_bytes`` (its fields checked as any frame's:
    ``invalid`` answered), else the connection closes with 1009 as if the
    websocket layer had refused it."""
    if isinstance(frame, bytes) and session_frame_allowed(len(frame), conn.session_member, settings):
        try:
            raw = codec.unpack(frame, settings.max_session_frame_bytes)
        except ProtocolError:
            raw = None
        if raw is not None and raw.get("type") == SessionSignal.TYPE:
            try:
                return codec.from_map(raw)
            except ProtocolError as exc:
                conn.send_error(exc.code, exc.message, exc.request_id)
                return None
    metrics.limit_hit("max_frame_bytes")
    conn.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
    return None


async def relay_session_signal(
    conn: Connection, message: SessionSignal, session_signals: SessionSignals, tasks: TaskSupervisor
) -> None:
    """Both roles' ``session_signal``: routed now, in the order the frames
    came (a refusal answered at once), its ``ack`` sent once the members'
    instances have answered, off this loop."""
    answer = await session_signals.send(conn, message)

    async def acknowledge() -> None:
        delivered = await answer
        if message.id is not None:
            conn.send_message(Ack(id=message.id, delivered=delivered))

    tasks.spawn(answering_errors(conn, message.id, acknowledge()), f"session-signal-{conn.id}-{message.id}")


def answering_errors(conn: Connection, request_id: int | None, work: Awaitable[None]) -> Coroutine[Any, Any, None]:
    """Run one request; whatever goes wrong reaches the client as an error
    frame with the request's ID, never as silence. The request counts as
    started at once (even if spawned to run later): a drain closes the
    connection only once its requests are answered."""
    conn.request_started()
    return _answer(conn, request_id, work)


async def _answer(conn: Connection, request_id: int | None, work: Awaitable[None]) -> None:
    try:
        await work
    except ProtocolError as exc:
        count(exc)
        conn.send_error(exc.code, exc.message, request_id)
    except Exception:
        log.exception("request from %r failed", conn)
        conn.send_error(ErrorCode.INTERNAL, "internal error", request_id)
    finally:
        conn.request_done()
