"""One client connection: its identity and its single, bounded writer.

Fan-out never awaits a client. ``send`` appends the already-encoded frame
to a bounded queue and, if no writer is running, starts one; the writer
exits when the queue is empty, so an idle connection holds no task. A client
that stops reading lets its queue fill and is closed as a slow consumer;
nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any

from aiohttp import web

from protocol import codec
from protocol.errors import CloseCode, ErrorCode
from protocol.messages import Error, Message

from . import metrics
from .backend import ConnectionRecord

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0


def new_connection_id() -> str:
    return "c" + secrets.token_hex(8)


class Connection:
    """A client's socket and identity; ``send`` queues, one writer drains."""

    __slots__ = (
        "_closer",
        "_closing",
        "_leaving",
        "_queue",
        "_refilled",
        "_tokens",
        "_writer",
        "dropped",
        "group",
        "id",
        "max_queue",
        "requests",
        "role",
        "subject",
        "ws",
    )

    def __init__(self, ws: web.WebSocketResponse, role: str, group: str, subject: str, max_queue: int) -> None:
        self.ws = ws
        self.id = new_connection_id()
        self.role = role
        self.group = group
        self.subject = subject  # the visitor ID or agent ID
        self.max_queue = max_queue
        # Only while frames wait: an idle connection keeps no deque (760 bytes).
        self._queue: deque[bytes] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False
        self._leaving: tuple[int, str] | None = None  # a close waiting for the request in hand
        self.requests = 0  # requests of this client being answered now
        self._tokens = -1.0  # message-rate bucket, filled on first use
        self._refilled = 0.0
        self.dropped = 0  # frames refused in a row for going over the rate

    def take_token(self, rate: float, burst: int) -> bool:
        """Token bucket: ``burst`` frames at once, ``rate`` per second after."""
        now = time.monotonic()
        if self._tokens < 0:
            self._tokens, self._refilled = float(burst), now
        self._tokens = min(float(burst), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def __repr__(self) -> str:
        return f"<{self.role} {self.group}/{self.subject} {self.id}>"

    @property
    def closing(self) -> bool:
        return self._closing or self.ws.closed

    def send(self, frame: bytes) -> None:
        """Queue an encoded frame; never blocks, never raises."""
        if self.closing:
            return
        queue = self._queue
        if queue is None:
            self._queue = deque((frame,))
            self._writer = asyncio.create_task(self._drain(), name=f"writer-{self.id}")
            return
        if len(queue) >= self.max_queue:
            log.warning("closing slow consumer %r: %d frames queued", self, len(queue))
            metrics.limit_hit("max_queue")
            metrics.SLOW_CONSUMERS.labels(role=self.role).inc()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        queue.append(frame)

    def send_message(self, message: Message) -> None:
        self.send(codec.encode(message))

    def send_error(self, code: ErrorCode | str, message: str, request_id: int | None = None) -> None:
        metrics.error(str(code))
        self.send(codec.encode(Error(code=str(code), message=message, id=request_id)))

    async def _drain(self) -> None:
        queue = self._queue
        try:
            while queue and not self.ws.closed:
                frame = queue.popleft()
                await self.ws.send_bytes(frame)
                metrics.sent(self.role, frame)
        except (ConnectionError, RuntimeError) as exc:
            # The peer went away mid-write; the receive loop sees the close.
            log.debug("write to %r failed: %s", self, exc)
        finally:
            # Empty (or given up on): the next send starts a new queue and writer.
            self._queue, self._writer = None, None

    def close(self, code: int, reason: str) -> None:
        """Close from anywhere (fan-out, timers): queued frames are dropped,
        the close frame goes out at once, and a peer that does not take it
        within CLOSE_TIMEOUT is dropped."""
        if self._closing:
            return
        self._closing = True
        self._queue = None
        if self._writer is not None:
            self._writer.cancel()
        # Awaited by finish(): the close ends the handler's receive loop,
        # and the handler waits for it before returning.
        self._closer = asyncio.get_running_loop().create_task(self._close(code, reason), name=f"close-{self.id}")

    def leave(self, code: int, reason: str) -> None:
        """Close without losing anything: after the request in hand is
        answered and every queued frame is written (a drain moving clients
        to other instances). Frames sent meanwhile still go out."""
        if self._closing:
            return
        if self.requests:
            self._leaving = (code, reason)  # the last ``request_done`` closes
            return
        self._closing = True
        self._closer = asyncio.get_running_loop().create_task(self._flush_and_close(code, reason))

    def request_started(self) -> None:
        self.requests += 1

    def request_done(self) -> None:
        self.requests -= 1
        if self._leaving is not None and not self.requests:
            code, reason = self._leaving
            self._leaving = None
            self.leave(code, reason)

    async def _flush_and_close(self, code: int, reason: str) -> None:
        writer = self._writer
        if writer is not None:
            await asyncio.wait([writer], timeout=CLOSE_TIMEOUT)
            writer.cancel()  # a peer that does not read is not waited for longer
        await self._close(code, reason)

    async def _close(self, code: int, reason: str) -> None:
        # Grab the transport first: aiohttp lets go of it while closing.
        transport = self.ws._req.transport if self.ws._req is not None else None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=reason.encode()[:120])
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        except asyncio.CancelledError:
            # Cancelling the stuck writer can cancel the close with it; only
            # our own cancellation (shutdown) goes on up.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        finally:
            # A peer that does not read would keep a half-closed socket
            # waiting to flush forever: drop it now (a no-op once closed).
            if transport is not None:
                transport.abort()

    async def finish(self) -> None:
        """Before a handler returns: let queued frames go out and a close
        started elsewhere complete (both bounded)."""
        tasks = [task for task in (self._writer, self._closer) if task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)


class VisitorConnection(Connection):
    """A visitor's connection and its own copy of what it registered, so the
    instance can register it again if the backend loses it."""

    __slots__ = ("presence",)

    def __init__(
        self,
        ws: web.WebSocketResponse,
        group: str,
        visitor: str,
        max_queue: int,
        instance: str,
        data: dict[str, Any],
        visible: bool,
    ) -> None:
        super().__init__(ws, "visitor", group, visitor, max_queue)
        data = {key: value for key, value in data.items() if value is not None}
        self.presence = ConnectionRecord(self.id, instance, data, visible, round(time.time(), 3))
