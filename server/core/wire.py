"""The websocket wire (RFC 6455, server side) of one client socket, once
the HTTP upgrade is done: frames in, frames out, the closing handshake.

aiohttp serves a websocket as one long request: its request handler, the
parsed upgrade request, a response object, a reader, a queue and two tasks
stay with every connection for its whole life, and every frame received
goes through that queue and wakes a task (the benchmark: 16.5 KiB of RSS
per idle visitor with all that, 3.7 KiB without). Here the socket is
handed over after the upgrade (``web/websocket.py``, ``take_socket``) to
one small protocol object that parses frames as they arrive and calls its
``FrameSink``: an idle connection is this object, its ``Connection`` and
the kernel's socket, with no task and no timer.

What is refused, as the RFC asks: an unmasked client frame, reserved bits
(no extension is ever negotiated, so no compression), unknown opcodes, a
fragmented or oversized control frame, a continuation out of place (all
closed with 1002), text that is not UTF-8 (1007) and a message over
``max_size`` (1009, refused from its header, before its payload is read).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (TEXT, BINARY)

CLOSE_TIMEOUT = 2.0  # seconds a peer gets to answer our close frame before its socket is dropped
NO_STATUS = 1005  # a close frame without a code (RFC 6455 7.1.5), never sent
PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1002, 1007, 1009
EARLY_FRAMES_MAX = 16  # frames read before ``serve`` (during the handshake) beyond which reading pauses
EARLY_BYTES_MAX = 64 * 1024  # ... or their bytes (a handshake waiting for Redis holds no more of a client's)
_REASON_MAX = 123  # bytes of a close reason (a control frame's payload is at most 125)
_SHORT, _MEDIUM = struct.Struct("!BB"), struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


class FrameSink(Protocol):
    """Who a wire hands its frames to once the connection is served: one
    object per endpoint, shared by its connections (``Wire.serve``)."""

    def frame(self, conn: object, opcode: int, payload: bytes | str) -> None: ...

    def lost(self, conn: object) -> None: ...


class Closed(ConnectionError):
    """The socket closed (or the peer closed) before the frame asked for came."""


def frame_header(opcode: int, size: int) -> bytes:
    """A server frame's header: FIN set, unmasked."""
    if size < 126:
        return _SHORT.pack(0x80 | opcode, size)
    if size < 1 << 16:
        return _MEDIUM.pack(0x80 | opcode, 126, size)
    return _LONG.pack(0x80 | opcode, 127, size)


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask repeated: one big-integer operation, not a
    Python loop over the bytes."""
    size = len(payload)
    if not size:
        return b""
    key = (mask * ((size + 3) // 4))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def _valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4): the defined ones that are not
    reserved for local use, and the registered and private ranges."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or 3000 <= code <= 4999


def _early_full(early: deque[tuple[int, bytes | str]]) -> bool:
    return len(early) >= EARLY_FRAMES_MAX or sum(len(payload) for _opcode, payload in early) >= EARLY_BYTES_MAX


class Wire(asyncio.Protocol):
    """One socket's frames. Until ``serve`` (the handshake), frames wait in
    a short queue for ``receive``; from then on each goes to the sink as it
    is parsed. ``send`` writes a whole frame in one synchronous write, so
    frames from anywhere never interleave; ``writing_paused`` is the
    transport's own flow control (its buffer over the high-water mark)."""

    __slots__ = (
        "_buffer",
        "_close_timer",
        "_early",
        "_fragment_opcode",
        "_fragments",
        "_held",
        "_lost_waiter",
        "_need",
        "_on_lost",
        "_paused",
        "_resume",
        "_waiter",
        "close_code",
        "close_sent",
        "conn",
        "lost",
        "max_size",
        "sink",
        "transport",
        "writing_paused",
    )

    def __init__(self, transport: asyncio.Transport, max_size: int, on_lost: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.max_size = max_size  # the largest message taken; larger closes with 1009
        self._on_lost = on_lost  # called once the socket is gone (its place in the connection budget)
        self._buffer: bytearray | None = None  # the start of a frame not yet whole
        self._need = 0  # bytes _buffer must hold before it is parsed again
        self._paused = False  # reading paused by the sink: frames already read wait in _buffer
        self._held = False  # ... or by the handshake, its early frames' queue full
        self._fragments: bytearray | None = None  # a fragmented message so far
        self._fragment_opcode = 0
        self._early: deque[tuple[int, bytes | str]] | None = deque()  # frames before ``serve``
        self._waiter: asyncio.Future[None] | None = None  # ``receive`` waiting
        self._lost_waiter: asyncio.Future[None] | None = None  # ``wait_closed`` waiting
        self._close_timer: asyncio.TimerHandle | None = None
        self._resume: Callable[[], None] | None = None  # told when the transport takes writes again
        self.sink: FrameSink | None = None
        self.conn: object = None
        self.close_code: int | None = None  # the code of the peer's close frame, or of our own refusal
        self.close_sent = False
        self.lost = False
        self.writing_paused = False

    # -- the handshake: frames asked for one at a time --------------------

    async def receive(self) -> tuple[int, bytes | str]:
        """The next frame (opcode, payload) before ``serve``; ``Closed`` if
        the socket closes first."""
        early = self._early
        assert early is not None, "receive() is for the handshake, before serve()"
        while not early:
            if self.closed or self.transport.is_closing():
                raise Closed()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame = early.popleft()
        if self._held and not _early_full(early):
            self._hold(False)  # what waited in the buffer joins the queue, behind this frame
        return frame

    def serve(self, sink: FrameSink, conn: object) -> None:
        """From now on every frame goes to ``sink.frame(conn, ...)`` as it
        comes, and ``sink.lost(conn)`` once the socket is gone (at once if
        it already is); frames read during the handshake go first."""
        early, self._early = self._early, None
        self.sink, self.conn = sink, conn
        for opcode, payload in early or ():
            sink.frame(conn, opcode, payload)
        self._hold(False)  # then what waited in the buffer, in the order it came
        if self.lost:
            sink.lost(conn)

    # -- writing ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Nothing more is written: our close frame went out, or the socket is gone."""
        return self.close_sent or self.lost

    def send(self, payload: bytes, opcode: int = BINARY) -> bool:
        """Write one frame now (the transport buffers what the socket does
        not take yet). False once the socket is closing."""
        if self.closed:
            return False
        self.transport.write(frame_header(opcode, len(payload)) + payload)
        return True

    def close(self, code: int, reason: str = "") -> None:
        """Send our close frame; the peer answers with its own (then the
        socket is closed) or is dropped after CLOSE_TIMEOUT."""
        if self.closed:
            return
        self._write_close(code, reason)
        self._drop_later()

    def abort(self) -> None:
        """Drop the socket now, unflushed (a peer that stopped answering)."""
        if not self.lost:
            self.transport.abort()

    async def wait_closed(self, within: float) -> None:
        """Until the socket is gone, ``within`` seconds at most."""
        if self.lost:
            return
        if self._lost_waiter is None:
            self._lost_waiter = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._lost_waiter], timeout=within)

    def on_resume(self, callback: Callable[[], None] | None) -> None:
        """``callback`` is called when the transport takes writes again."""
        self._resume = callback

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._resume is not None:
            self._resume()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost()
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        self._wake()
        if self.sink is not None:
            self.sink.lost(self.conn)

    def eof_received(self) -> bool:
        return False  # the peer's half-close ends the connection (the transport closes)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is not None:  # the start of a frame came before: wait until it is whole
            buffer += data
            if len(buffer) < self._need:
                return  # a client trickling a frame a byte at a time costs an append per byte, no more
            data, self._buffer = bytes(buffer), None
        at = self._parse(data)
        if at < len(data) and not self.transport.is_closing():
            self._buffer = bytearray(memoryview(data)[at:])

    def _parse(self, data: bytes) -> int:
        """Hand over every whole frame in ``data``; where the rest starts
        (``_need``: how many bytes from there make the next step possible)."""
        end = len(data)
        at = 0
        closing = self.transport.is_closing
        while not closing():
            if self._paused or self._held:
                self._need = 0  # read on once resumed
                break
            if end - at < 2:
                self._need = 2
                break
            first, second = data[at], data[at + 1]
            opcode, size, start = first & 0x0F, second & 0x7F, at + 2
            if first & 0x70:
                self._fail(PROTOCOL_ERROR, "reserved bits set: no extension was negotiated")
                break
            if not second & 0x80:
                self._fail(PROTOCOL_ERROR, "client frames must be masked")
                break
            if size >= 126:
                width = 2 if size == 126 else 8
                if end - start < width:
                    self._need = 2 + width
                    break
                size, start = int.from_bytes(data[start : start + width], "big"), start + width
            if opcode >= CLOSE:
                if not first & 0x80 or size > 125:
                    self._fail(PROTOCOL_ERROR, "control frames are whole and at most 125 bytes")
                    break
            elif size + (len(self._fragments) if self._fragments is not None else 0) > self.max_size:
                self._fail(MESSAGE_TOO_BIG, "message too big")
                break
            stop = start + 4 + size
            if end < stop:
                self._need = stop - at
                break
            payload = unmask(data[start + 4 : stop], data[start : start + 4])
            at = stop
            self._frame(bool(first & 0x80), opcode, payload)
        return at

    # -- frames -------------------------------------------------------------

    def _frame(self, final: bool, opcode: int, payload: bytes) -> None:
        if self.close_sent and opcode != CLOSE:
            return  # after our close frame only the peer's answer matters
        if opcode in _DATA:
            if self._fragments is not None:
                self._fail(PROTOCOL_ERROR, "a new message inside a fragmented one")
            elif final:
                self._message(opcode, payload)
            else:
                self._fragments, self._fragment_opcode = bytearray(payload), opcode
        elif opcode == CONTINUATION:
            if self._fragments is None:
                self._fail(PROTOCOL_ERROR, "a continuation frame with no message to continue")
                return
            self._fragments += payload  # one buffer, not an object per fragment
            if final:
                whole, self._fragments = bytes(self._fragments), None
                self._message(self._fragment_opcode, whole)
        elif opcode == CLOSE:
            self._peer_closed(payload)
        elif opcode in (PING, PONG):
            self._deliver(opcode, payload)
        else:
            self._fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == TEXT:
            try:
                self._deliver(TEXT, payload.decode("utf-8"))
            except UnicodeDecodeError:
                self._fail(INVALID_DATA, "text frames must be UTF-8")
            return
        self._deliver(opcode, payload)

    def _deliver(self, opcode: int, payload: bytes | str) -> None:
        if self.sink is not None:
            self.sink.frame(self.conn, opcode, payload)
            return
        early = self._early
        assert early is not None
        early.append((opcode, payload))
        if _early_full(early):
            self._hold(True)  # the handshake reads on; a client that does not wait for it, waits
        self._wake()

    def _peer_closed(self, payload: bytes) -> None:
        if len(payload) == 1:
            self._fail(PROTOCOL_ERROR, "a close frame's code is two bytes")
            return
        code = int.from_bytes(payload[:2], "big") if payload else NO_STATUS
        if payload and not _valid_close_code(code):
            self._fail(PROTOCOL_ERROR, f"close code {code} may not be sent")
            return
        try:
            payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(INVALID_DATA, "a close reason must be UTF-8")
            return
        self._end(code, 1000 if code == NO_STATUS else code, "")  # the peer closed first: our answer echoes its code

    def _fail(self, code: int, reason: str) -> None:
        """Refuse the peer's bytes: our close frame with ``code``, the socket
        closed once it is written; nothing more is read."""
        log.debug("websocket closed with %d: %s", code, reason)
        self._buffer, self._fragments = None, None
        self._end(code, code, reason)

    def _end(self, code: int, answer: int, reason: str) -> None:
        """The peer's close (``code``), or our refusal of its bytes: our close
        frame (``answer``) unless it went out already, then the socket closes
        (the server closes the TCP connection first, RFC 6455 7.1.1) once what
        is written has gone out; a peer that does not read it is dropped after
        CLOSE_TIMEOUT (a closing transport waits to drain for as long as it takes)."""
        if self.close_code is None:
            self.close_code = code
        if not self.close_sent:
            self._write_close(answer, reason)
        self.transport.close()
        self._drop_later()

    def _drop_later(self) -> None:
        if self._close_timer is None and not self.lost:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def _write_close(self, code: int, reason: str) -> None:
        self.close_sent = True
        payload = code.to_bytes(2, "big") + reason.encode()[:_REASON_MAX].decode(errors="ignore").encode()
        self.transport.write(frame_header(CLOSE, len(payload)) + payload)
        self._wake()

    def pause_reading(self) -> None:
        """The sink's: take no more frames (those of the last read wait) and
        read nothing more from the socket until ``resume_reading``."""
        if not self._paused:
            self._paused = True
            self._update_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._update_reading()

    def _hold(self, held: bool) -> None:
        """The handshake's own pause (its queue of early frames is full),
        apart from the sink's: lifting one leaves the other."""
        if self._held != held:
            self._held = held
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if not (self._paused or self._held) and self._buffer is not None and len(self._buffer) >= self._need:
            self.data_received(b"")  # the frames that waited (which may pause again)
        reading = not (self._paused or self._held)
        if reading != transport.is_reading():
            (transport.resume_reading if reading else transport.pause_reading)()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
