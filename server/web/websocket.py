"""What both websocket endpoints share: upgrade, hello, serving frames.

The upgrade is answered here and the socket then leaves aiohttp
(``take_socket``) for its own ``Wire`` (core/wire.py): after its handshake
a connection is served by callbacks, and only while it has messages to
answer does it have a task (``FrameServer``).

Bad frames are answered with an ``error`` frame and dropped; the connection
lives on. Only the handshake closes on failure, with a close code that tells
the client whether reconnecting can help.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

from aiohttp import hdrs, web

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
from herald_presence.server import __version__, logs, metrics
from herald_presence.server.config import Settings
from herald_presence.server.core.connection import Connection, FrameQueue, error_frame
from herald_presence.server.core.hub import Hub
from herald_presence.server.core.session_signals import SessionSignals
from herald_presence.server.core.wire import BINARY, MESSAGE_TOO_BIG, PING, PONG, Closed, Wire
from herald_presence.server.model.limits import ConnectionLimit, Verdict, count, session_frame_allowed
from herald_presence.server.tasks import TaskSupervisor

from .http_common import SERVER_HEADER, client_address, error_response
from .keys import EXPIRY, HUB, SETTINGS
from .listener import hand_over_budget

log = logging.getLogger(__name__)
C = TypeVar("C", bound=Connection)  # a role's connection

SERVER_NAME = f"herald/{__version__}"
HANDSHAKE_CONTROL_FRAMES = 4  # pings and pongs taken before the hello; more are refused as no hello
INBOX_MAX = 64  # a connection's messages waiting for their answer beyond which its socket is not read
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 4.2.2

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
    with ``Upgrade: websocket``), a 400 for an upgrade that is not RFC 6455's
    (``Connection: upgrade``, version 13, a 16-byte key), a 429 for an
    address opening connections too fast."""
    if hub.draining:
        response = error_response(503, ErrorCode.DRAINING, "this instance is shutting down; reconnect")
        response.headers["Retry-After"] = "1"
        return response
    headers = request.headers
    if request.method != hdrs.METH_GET or headers.get(hdrs.UPGRADE, "").lower() != "websocket":
        response = error_response(426, ErrorCode.INVALID, "this path takes a websocket upgrade only")
        response.headers["Upgrade"] = "websocket"
        return response
    problem = _upgrade_problem(request)
    if problem is not None:
        response = error_response(400, ErrorCode.INVALID, problem)
        response.headers[hdrs.SEC_WEBSOCKET_VERSION] = "13"
        return response
    if hub.connection_rate.allow(client_address(request)):
        return None
    return error_response(429, ErrorCode.RATE_LIMITED, "too many new connections from this address")


def _upgrade_problem(request: web.Request) -> str | None:
    headers = request.headers
    tokens = {token.strip().lower() for token in headers.get(hdrs.CONNECTION, "").split(",")}
    if "upgrade" not in tokens:
        return "a websocket upgrade needs Connection: upgrade"
    if headers.get(hdrs.SEC_WEBSOCKET_VERSION, "").strip() != "13":
        return "this server speaks websocket version 13"
    try:
        key_size = len(base64.b64decode(headers.get(hdrs.SEC_WEBSOCKET_KEY, ""), validate=True))
    except binascii.Error:
        key_size = 0
    if key_size != 16:
        return "Sec-WebSocket-Key must be 16 bytes in base64"
    if not getattr(request.protocol, "_upgraded", True):
        return "the request is no upgrade"  # aiohttp would read what follows it as HTTP
    return None


class Upgraded(web.StreamResponse):
    """What a websocket endpoint returns to aiohttp once the socket is the
    connection's own (``take_socket``): aiohttp writes nothing more, and
    logs the request as the 101 it was."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def open_websocket(request: web.Request, settings: Settings) -> Wire:
    """Answer a checked upgrade (``refused_before_upgrade``) with 101 and
    take the socket from aiohttp: from now on its bytes are the ``Wire``'s.

    No permessage-deflate, though every browser offers it: our frames are
    small msgpack maps that barely shrink, while each negotiated connection
    would hold zlib state (~100 KiB) and pay deflate CPU on every frame.
    Not inflating anything also leaves no decompression bomb to defuse.
    Pings and pongs come to ``FrameServer``, which counts them against the
    connection's frame rate and byte budget like any frame."""
    key = request.headers[hdrs.SEC_WEBSOCKET_KEY].strip().encode()
    accept = base64.b64encode(hashlib.sha1(key + _WEBSOCKET_GUID).digest())
    # The largest message accepted is a session member's session_signal;
    # ``FrameServer`` holds every other frame to max_frame_bytes.
    max_size = max(settings.max_frame_bytes, settings.max_session_frame_bytes)
    handler, transport = request.protocol, request.transport
    assert transport is not None, "the upgrade's socket is open"
    wire = Wire(transport, max_size, hand_over_budget(handler))
    transport.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\nServer: " + SERVER_HEADER.encode() + b"\r\n\r\n"
    )
    take_socket(handler, transport, wire)
    return wire


def take_socket(handler: web.RequestHandler, transport: asyncio.Transport, wire: Wire) -> None:
    """aiohttp lets go of an upgraded socket; ``wire`` reads it from here on.

    aiohttp keeps bytes that follow an upgrade request unread (the client's
    first frames, if it did not wait for the 101): they go to the wire
    first. Its request handler is then told the connection is lost, with
    its transport taken away first, so that it neither writes nor closes
    anything: that ends its keep-alive timer and its place in aiohttp's
    list of connections, and the handler's task ends once the endpoint
    returns ``Upgraded``."""
    # aiohttp has no public way to hand a socket over: these are its own names.
    tail: bytes = handler._message_tail
    handler._message_tail = b""
    handler.transport = None
    handler.connection_lost(None)
    transport.set_protocol(wire)
    if not transport.is_reading():  # aiohttp paused it for a long tail
        transport.resume_reading()
    if tail:
        wire.data_received(tail)


async def read_hello(wire: Wire, settings: Settings) -> tuple[Hello, int]:
    """The client's hello and the protocol version both speak."""
    try:
        async with asyncio.timeout(settings.handshake_timeout):
            opcode, payload = await wire.receive()
            # A few control frames may come first (a pong, a client's own
            # keepalive ping): a ping is answered; more are no hello.
            for _ in range(HANDSHAKE_CONTROL_FRAMES):
                if opcode == PING:
                    wire.send(payload, PONG)  # type: ignore[arg-type]
                elif opcode != PONG:
                    break
                opcode, payload = await wire.receive()
    except TimeoutError:
        raise HandshakeTimeout() from None
    except Closed:
        raise ProtocolError(ErrorCode.BAD_FRAME, "closed before its hello") from None
    if len(payload) > settings.max_frame_bytes:
        raise FrameTooBig(len(payload), settings.max_frame_bytes)
    if opcode != BINARY:
        raise ProtocolError(ErrorCode.BAD_FRAME, "the first frame must be a binary hello")
    hello = codec.decode(payload, settings.max_frame_bytes)  # type: ignore[arg-type]
    if not isinstance(hello, Hello):
        raise ProtocolError(ErrorCode.HANDSHAKE_REQUIRED, "the first frame must be a hello")
    common = set(hello.versions) & set(SUPPORTED_VERSIONS)
    if not common:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"this server speaks protocol {list(SUPPORTED_VERSIONS)}")
    return hello, max(common)


def refuse(wire: Wire, error: ProtocolError) -> Upgraded:
    """Answer a failed handshake with an error frame, then close; what the
    endpoint returns to aiohttp."""
    count(error)
    if isinstance(error, FrameTooBig):
        metrics.limit_hit("max_frame_bytes")
        wire.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
        return Upgraded()
    frame = error_frame(error.code, error.message)
    if isinstance(error, HandshakeTimeout):
        code = CloseCode.HANDSHAKE_TIMEOUT
    elif isinstance(error, ConnectionLimit):
        code = CloseCode.TOO_MANY_CONNECTIONS
    else:
        code = _HANDSHAKE_CLOSE.get(error.code, CloseCode.HANDSHAKE_FAILED)
    wire.send(frame)
    wire.close(code, error.message)
    return Upgraded()


END = object()  # the last item of a connection's inbox: its socket is gone


class FrameServer(Generic[C]):
    """Serves one endpoint's connections after their handshake (one object
    per endpoint, shared by its connections): each frame as it is read,
    the role's own messages through ``handle(app, conn, message)`` in the
    order they came, and ``gone(app, conn)`` once the socket is gone, after
    the messages before it.

    Frames wait in the connection's inbox and are taken in the order they
    came by a task that exists only while the inbox does (an idle
    connection holds neither); a connection with INBOX_MAX frames, or its
    byte burst, waiting is not read until it catches up. Every frame counts
    against the rate and the byte budget before anything else is done with
    it: data frames, pings and pongs alike."""

    __slots__ = ("_app", "_gone", "_handle", "_hub", "_settings")

    def __init__(
        self,
        app: web.Application,
        handle: Callable[[web.Application, C, Message], Awaitable[None]],
        gone: Callable[[web.Application, C], Awaitable[None]],
    ) -> None:
        self._app, self._settings, self._hub = app, app[SETTINGS], app[HUB]
        self._handle, self._gone = handle, gone

    def greet(self, conn: C, version: int, expires: float | None, **role_fields: Any) -> None:
        """The welcome, once the connection can be reached; from now on its
        credential's expiry and its silences are watched."""
        self._app[EXPIRY].watch(conn, expires)
        conn.send_message(
            Welcome(
                protocol=version,
                connection=conn.id,
                role=conn.role,
                group=conn.group,
                keepalive=self._settings.keepalive,
                server=SERVER_NAME,
                expires=expires,
                **role_fields,
            )
        )
        self._hub.keepalive.watch(conn)
        log.debug("%s %s/%s connected", conn.role, conn.group, conn.subject)

    async def serve_after(self, conn: C, address: str, rest_of_handshake: Awaitable[bool]) -> Upgraded:
        """Serve ``conn`` (from client ``address``, whose budget its frames
        share) once the rest of its handshake is done (False: it closed the
        connection). A handshake that ends otherwise (refused, failed, its
        socket lost) closes the socket (1011 if nothing closed it yet: an
        error of ours) and lets go of the connection at once."""
        self._hub.address_rates.join(conn.rate, address)
        served = False
        try:
            if await rest_of_handshake:
                conn.wire.serve(self, conn)
                served = True
        except Exception:
            log.exception("the handshake of %r failed", conn)
        finally:
            if not served:
                if not conn.closing:
                    conn.close(CloseCode.INTERNAL_ERROR, "internal error")
                await conn.finish()
                await self._let_go(conn)
        return Upgraded()

    async def _let_go(self, conn: C) -> None:
        """Its socket gone (or its handshake ended): the role's own ``gone``."""
        self._app[EXPIRY].forget(conn)
        self._hub.keepalive.forget(conn)
        self._hub.address_rates.leave(conn.rate)
        await self._gone(self._app, conn)

    def frame(self, conn: C, opcode: int, payload: bytes | str) -> None:  # type: ignore[override]
        conn.heard = time.monotonic()  # alive, whatever it sent (core/keepalive.py)
        self._queue(conn, (opcode, payload), len(payload))

    def lost(self, conn: C) -> None:  # type: ignore[override]
        if conn.wire.close_code == MESSAGE_TOO_BIG:
            metrics.limit_hit("max_frame_bytes")
        log.debug("%r closed (%s)", conn, conn.wire.close_code)
        self._queue(conn, END)

    def _queue(self, conn: C, item: object, size: int = 0) -> None:
        inbox = conn.inbox
        if inbox is None:
            inbox = conn.inbox = FrameQueue()
            conn.serving = self._hub.tasks.spawn(self._answer_inbox(conn), f"frames-{conn.id}")
        inbox.append(item)
        inbox.size += size
        if self._full(inbox):
            conn.wire.pause_reading()

    def _full(self, inbox: FrameQueue) -> bool:
        """INBOX_MAX frames, or the connection's byte burst, wait: read no more."""
        return len(inbox) >= INBOX_MAX or inbox.size >= self._settings.message_bytes_burst

    async def _answer_inbox(self, conn: C) -> None:
        logs.CONNECTION.set(conn.id)  # its log lines (and its tasks') name it
        inbox = conn.inbox
        assert inbox is not None
        try:
            while inbox:
                item = inbox.popleft()
                if item is END:
                    inbox.clear()
                    await self._let_go(conn)
                    return
                opcode, payload = item
                inbox.size -= len(payload)
                if not self._full(inbox):
                    conn.wire.resume_reading()
                await self._take(conn, opcode, payload)
        finally:
            conn.inbox, conn.serving = None, None

    async def _take(self, conn: C, opcode: int, payload: bytes | str) -> None:
        settings = self._settings
        if conn.closing or not _within_rate(conn, settings, len(payload)):
            return  # over a limit, or after we started closing: dropped unread
        if opcode == PING:
            conn.pong(payload)  # type: ignore[arg-type]
            return
        if opcode == PONG:
            return  # the answer to a keepalive ping: heard when it came
        message = _decoded(conn, payload, settings)
        if message is None or conn.closing:
            return  # a bad frame (answered), or it came after our close: unanswered, so not done
        metrics.received(conn.role, message.TYPE)
        if isinstance(message, Ping):
            conn.send_message(Pong())
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, Hello):
            conn.send_error(ErrorCode.INVALID, "hello was already received")
        else:
            await answering_errors(conn, getattr(message, "id", None), self._handle(self._app, conn, message))


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
    elif verdict is Verdict.FIRST_REFUSED_ADDRESS:
        conn.send_error(
            ErrorCode.RATE_LIMITED, "over what this address's connections may send together; frames dropped"
        )
    elif verdict is Verdict.FLOODING:
        log.warning("closing %r: flooding", conn)
        conn.close(CloseCode.FLOODING, "flooding", flush=True)  # the streak's rate_limited goes first
    return False


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
