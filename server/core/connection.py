"""One client connection: its identity and its single, bounded writer.

Fan-out never awaits a client. ``send`` writes the already-encoded frame to
the socket at once while nothing of the connection's waits to be written
(the common case: no task, no queue); otherwise it appends it to a bounded
queue and, if no writer is running, starts one; the writer exits when the
queue is empty, so an idle connection holds no task. A client that stops
reading lets its queue fill and is closed as a slow consumer; nobody else
waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from herald_presence.protocol import codec
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Message, Snapshot
from herald_presence.server import metrics
from herald_presence.server.config import Settings
from herald_presence.server.model.limits import FrameRate, RecentKeys, SignalBudgets, queue_full
from herald_presence.server.model.names import KEY_TOPIC, VISITOR_TOPIC, visitor_topic
from herald_presence.server.model.records import ConnectionRecord

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0
PING_FRAME = b"\x89\x00"  # a server's ping: FIN, opcode 9, unmasked, no payload (RFC 6455 5.5.2)
FLOOR_SECONDS = 10.0  # how long after a snapshot stale bus events may still arrive
SIGNALLED_REMEMBERED = 256  # visitors an agent connection signalled, who may answer it by name


def new_connection_id() -> str:
    return "c" + secrets.token_hex(8)


def error_frame(code: ErrorCode | str, message: str, request_id: int | None = None) -> bytes:
    """The one way an error frame is built (and counted)."""
    metrics.error(str(code))
    return codec.encode(Error(code=str(code), message=message, id=request_id))


async def _resume(sending: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Finish a coroutine that was started by hand and waits on ``waiting``."""
    try:
        while True:
            await asyncio.wait([waiting])
            waiting = sending.send(None)
    except StopIteration:
        return
    finally:
        sending.close()


class Connection:
    """A client's socket and identity; ``send`` writes at once or queues
    behind what waits, and one writer drains the queue."""

    __slots__ = (
        "_closer",
        "_closing",
        "_leaving",
        "_queue",
        "_transport",
        "_writer",
        "expires",
        "expiry_slice",
        "group",
        "heard",
        "id",
        "keepalive_slice",
        "max_queue",
        "pinged",
        "rate",
        "requests",
        "role",
        "subject",
        "ws",
    )

    def __init__(self, ws: web.WebSocketResponse, role: str, group: str, subject: str, max_queue: int) -> None:
        self.ws = ws
        # Its socket's write buffer says whether a frame can be written at
        # once (``send``); held here because aiohttp lets go of it while closing.
        self._transport = ws._req.transport if ws._req is not None else None
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
        self.rate = FrameRate()
        self.expires: float | None = None  # unix s when its credential runs out (core/expiry.py); None: never
        self.expiry_slice: int | None = None  # where core/expiry.py files it
        self.heard = time.monotonic()  # when the client's last frame came (any kind: pongs too)
        self.pinged: float | None = None  # when core/keepalive.py pinged it, if unanswered yet
        self.keepalive_slice: int | None = None  # where core/keepalive.py files it

    def __repr__(self) -> str:
        return f"<{self.role} {self.group}/{self.subject} {self.id}>"

    @property
    def closing(self) -> bool:
        return self._closing or self.ws.closed

    @property
    def session_member(self) -> bool:
        """In a support session (the roles say how): may send larger frames."""
        return False

    def send(self, frame: bytes) -> None:
        """Queue an encoded frame; never blocks, never raises."""
        if self.closing:
            return
        queue = self._queue
        if queue is None:
            if self._written_at_once(frame):
                return
            self._queue = deque((frame,))
            self._writer = asyncio.create_task(self._drain(), name=f"writer-{self.id}")
            return
        if queue_full(len(queue), self.max_queue):
            log.warning("closing slow consumer %r: %d frames queued", self, len(queue))
            metrics.SLOW_CONSUMERS.labels(role=self.role).inc()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        queue.append(frame)

    def send_message(self, message: Message) -> None:
        self.send(codec.encode(message))

    def send_error(self, code: ErrorCode | str, message: str, request_id: int | None = None) -> None:
        self.send(error_frame(code, message, request_id))

    def _written_at_once(self, frame: bytes) -> bool:
        """Write ``frame`` now, without a task, if the socket has nothing
        buffered: aiohttp's send of an uncompressed frame then completes
        without waiting (it only waits for a paused transport, and one with
        an empty buffer is not paused). False: queue it."""
        transport = self._transport
        if transport is None or transport.get_write_buffer_size():
            return False
        sending = self.ws.send_bytes(frame)
        try:
            waiting = sending.send(None)
        except StopIteration:
            pass
        except (ConnectionError, RuntimeError) as exc:
            log.debug("write to %r failed: %s", self, exc)  # the receive loop sees the close
            return True
        else:
            # It waited after all: a writer finishes it, and frames sent meanwhile queue behind it.
            self._queue = deque()
            self._writer = asyncio.create_task(self._drain(_resume(sending, waiting)), name=f"writer-{self.id}")
        metrics.sent(self.role, frame)
        return True

    async def _drain(self, in_flight: Coroutine[Any, Any, None] | None = None) -> None:
        queue = self._queue
        try:
            if in_flight is not None:
                await in_flight
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

    def close(self, code: int, reason: str, flush: bool = False) -> None:
        """Close from anywhere (fan-out, timers): queued frames are dropped
        (or, with ``flush``, written first for at most CLOSE_TIMEOUT: the
        error frame that explains the close), the close frame goes out, and
        a peer that does not take it within CLOSE_TIMEOUT is dropped."""
        if self._closing:
            return
        self._closing = True
        if flush:
            closing = self._flush_and_close(code, reason)
        else:
            self._queue = None
            if self._writer is not None:
                self._writer.cancel()
            closing = self._close(code, reason)
        # Awaited by finish(): the close ends the handler's receive loop,
        # and the handler waits for it before returning.
        self._closer = asyncio.get_running_loop().create_task(closing, name=f"close-{self.id}")

    def ping(self) -> None:
        """A keepalive ping, straight onto the socket: frames are written whole
        (one synchronous write each), so it cannot land inside one."""
        transport = self._transport
        if not self.closing and transport is not None and not transport.is_closing():
            transport.write(PING_FRAME)

    def drop(self) -> None:
        """Gone without a word (no answer to a ping): nothing more is
        written and the socket is aborted at once; the handler's receive
        loop ends as for any lost socket."""
        if self._closing:
            return
        self._closing = True
        self._queue = None
        if self._writer is not None:
            self._writer.cancel()
        if self._transport is not None:
            self._transport.abort()

    def leave(self, code: int, reason: str) -> None:
        """Close without losing anything: after the request in hand is
        answered and every queued frame is written (a drain moving clients
        to other instances). Frames sent meanwhile still go out."""
        if self._closing:
            return
        if self.requests:
            self._leaving = (code, reason)  # the last ``request_done`` closes
            return
        self.close(code, reason, flush=True)

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
        transport = self._transport
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

    __slots__ = ("presence", "presence_due", "session", "unsent")

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
        self.presence_due = 0.0  # monotonic time before which a presence change waits (presence_rate)
        self.unsent: UnsentPresence | None = None  # changes waiting for it, coalesced; set while they wait
        self.session: str | None = None  # the support session this connection took (its record says if it still has it)

    @property
    def session_member(self) -> bool:
        """Holds (or held) a support session: may send a session signal as
        large as ``max_session_frame_bytes`` (the session's record decides the rest)."""
        return self.session is not None


class UnsentPresence:
    """A visitor connection's presence changes that wait for their turn,
    merged as they come: the latest value of each field and of visibility."""

    __slots__ = ("data", "visible")

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.visible: bool | None = None

    def add(self, data: dict[str, Any] | None, visible: bool | None) -> None:
        self.data.update(data or {})
        if visible is not None:
            self.visible = visible

    def __bool__(self) -> bool:
        return bool(self.data) or self.visible is not None


class AgentConnection(Connection):
    """An agent's connection and what it watches.

    While a subscribe is in flight, events are parked in ``pending`` so that
    the snapshot goes out first. ``floors`` holds the snapshot's version per
    visitor for a short while: bus events published before the snapshot was
    read can still arrive after it and must not be shown twice. Each floor
    expires on its own, so repeated subscribes cannot make them pile up.

    Who may address this agent: a visitor it watches (one visitor or the
    whole group), one it signalled, or the visitor of a session it joined;
    ``signal_budgets`` bounds what each such visitor may send it.
    """

    __slots__ = (
        "floors",
        "issued",
        "pending",
        "recent_events",
        "sessions",
        "signal_budgets",
        "signalled",
        "topics",
        "watching_group",
    )

    def __init__(self, ws: web.WebSocketResponse, group: str, agent: str, max_queue: int, issued: float = 0.0) -> None:
        super().__init__(ws, "agent", group, agent, max_queue)
        self.issued = issued  # unix s when its login session was made: a revocation after it closes this
        self.topics: set[str] = set()
        self.watching_group = False
        self.sessions: dict[str, str] = {}  # support sessions joined through this connection -> their visitor
        self.recent_events: deque[str] | None = None  # dedupe keys of session events seen lately
        self.pending: list[tuple[str, int | None, bytes]] | None = None
        self.floors: dict[str, tuple[int, float]] | None = None  # visitor -> (version, until)
        self.signalled: RecentKeys | None = None  # visitors this agent signalled lately
        self.signal_budgets: SignalBudgets | None = None

    def deliver(self, visitor: str, version: int | None, frame: bytes) -> None:
        if self.pending is not None:
            self.pending.append((visitor, version, frame))
            return
        if self.floors is not None and version is not None:
            floor = self.floors.pop(visitor, None)
            if floor is not None and version <= floor[0] and time.monotonic() < floor[1]:
                self.floors[visitor] = floor
                return
            if not self.floors:
                self.floors = None
        self.send(frame)

    def may_hear_from(self, visitor: str, watching: bool) -> bool:
        """Whether a visitor's signal addressed to this agent reaches it:
        ``watching`` (the caller knows the topic it came on), or this agent
        signalled that visitor lately, or is in its session."""
        if watching or self.watching_group or visitor_topic(self.group, visitor) in self.topics:
            return True
        return (self.signalled is not None and visitor in self.signalled) or visitor in self.sessions.values()

    @property
    def session_member(self) -> bool:
        """Joined a support session: may send a session signal as large as
        ``max_session_frame_bytes`` (the session's record decides the rest)."""
        return bool(self.sessions)

    def watched(self) -> int:
        """Visitor IDs and session keys this connection watches (one limit for both)."""
        return sum(topic.startswith((VISITOR_TOPIC, KEY_TOPIC)) for topic in self.topics)

    def note_signalled(self, visitor: str) -> None:
        if self.signalled is None:
            self.signalled = RecentKeys(SIGNALLED_REMEMBERED)
        self.signalled.add(visitor)

    def within_signal_budget(self, visitor: str, settings: Settings) -> bool:
        if self.signal_budgets is None:
            self.signal_budgets = SignalBudgets(settings)
        return self.signal_budgets.take(visitor)

    def forget_floors(self, visitors: list[str]) -> None:
        if self.floors is not None:
            for visitor in visitors:
                self.floors.pop(visitor, None)

    def deliver_event(self, frame: bytes, dedupe: str | None) -> None:
        """A frame that may reach this agent on several topics: once only."""
        if dedupe is not None:
            if self.recent_events is None:
                self.recent_events = deque(maxlen=32)
            elif dedupe in self.recent_events:
                return
            self.recent_events.append(dedupe)
        self.send(frame)

    def start_snapshot(self) -> None:
        self.pending = []

    def finish_snapshot(self, snapshot: Snapshot | None) -> None:
        """Send the snapshot (None: the subscribe failed), then what was parked."""
        if snapshot is not None:
            now = time.monotonic()
            floors = {v: floor for v, floor in (self.floors or {}).items() if floor[1] > now}  # the expired go
            until = now + FLOOR_SECONDS
            floors.update((state["visitor"], (state["version"], until)) for state in snapshot.visitors)
            self.floors = floors or None
            self.send_message(snapshot)
        parked, self.pending = self.pending or [], None
        for visitor, version, frame in parked:
            self.deliver(visitor, version, frame)
