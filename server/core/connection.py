"""One client connection: its identity and its single, bounded writer.

Fan-out never awaits a client. ``send`` writes the already-encoded frame to
the socket at once (the transport buffers what the kernel does not take
yet); only while the transport's buffer is over its high-water mark (the
client reads slower than it is written to) do frames wait in a bounded
queue, written as soon as the transport takes writes again. No task, no
lock: an idle connection holds neither. A client that stops reading lets
its queue fill and is closed as a slow consumer; nobody else waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from typing import Any

from herald_presence.protocol import codec
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Message, Snapshot
from herald_presence.server import metrics
from herald_presence.server.config import Settings
from herald_presence.server.model.limits import FrameRate, RecentKeys, SignalBudgets, queue_full
from herald_presence.server.model.names import KEY_TOPIC, VISITOR_TOPIC, visitor_topic
from herald_presence.server.model.records import ConnectionRecord

from .wire import CLOSE_TIMEOUT, PING, PONG, Wire

log = logging.getLogger(__name__)

FLOOR_SECONDS = 10.0  # how long after a snapshot stale bus events may still arrive
SIGNALLED_REMEMBERED = 256  # visitors an agent connection signalled, who may answer it by name


def new_connection_id() -> str:
    return "c" + secrets.token_hex(8)


def error_frame(code: ErrorCode | str, message: str, request_id: int | None = None) -> bytes:
    """The one way an error frame is built (and counted)."""
    metrics.error(str(code))
    return codec.encode(Error(code=str(code), message=message, id=request_id))


class Connection:
    """A client's socket (its ``Wire``) and identity; ``send`` writes at
    once, or queues while the socket's buffer is full."""

    __slots__ = (
        "_closing",
        "_leaving",
        "_pong",
        "_queue",
        "_then_close",
        "expires",
        "expiry_slice",
        "group",
        "heard",
        "id",
        "inbox",
        "keepalive_slice",
        "max_queue",
        "max_queue_bytes",
        "pinged",
        "rate",
        "requests",
        "role",
        "serving",
        "subject",
        "wire",
    )

    def __init__(self, wire: Wire, role: str, group: str, subject: str, queue_limits: tuple[int, int]) -> None:
        self.wire = wire
        self.id = new_connection_id()
        self.role = role
        self.group = group
        self.subject = subject  # the visitor ID or agent ID
        self.max_queue, self.max_queue_bytes = queue_limits  # frames, and their bytes (Settings.queue_limits)
        # Only while frames wait: an idle connection keeps no deque (760 bytes).
        self._queue: FrameQueue | None = None
        self._pong: bytes | None = None  # the latest ping's answer, waiting with the queue
        self._closing = False
        self._then_close: tuple[int, str] | None = None  # a close waiting for the queue to be written
        self._leaving: tuple[int, str] | None = None  # a close waiting for the request in hand
        self.requests = 0  # requests of this client being answered now
        self.rate = FrameRate()
        self.expires: float | None = None  # unix s when its credential runs out (core/expiry.py); None: never
        self.expiry_slice: int | None = None  # where core/expiry.py files it
        self.heard = time.monotonic()  # when the client's last frame came (any kind: pongs too)
        self.pinged: float | None = None  # when core/keepalive.py pinged it, if unanswered yet
        self.keepalive_slice: int | None = None  # where core/keepalive.py files it
        # Its messages waiting for their turn, and the task answering them
        # in order: both only while there are any (web/websocket.py).
        self.inbox: FrameQueue | None = None
        self.serving: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<{self.role} {self.group}/{self.subject} {self.id}>"

    @property
    def closing(self) -> bool:
        return self._closing or self.wire.closed

    @property
    def session_member(self) -> bool:
        """In a support session (the roles say how): may send larger frames."""
        return False

    def send(self, frame: bytes) -> None:
        """Write an encoded frame, or queue it; never blocks, never raises."""
        if self.closing:
            return
        queue = self._queue
        if queue is None:
            if not self.wire.writing_paused:
                self.wire.send(frame)
                metrics.sent(self.role, frame)
                return
            queue = self._started_queue()
        elif queue_full(len(queue), queue.size + len(frame), self.max_queue, self.max_queue_bytes):
            log.warning("closing slow consumer %r: %d frames (%d bytes) queued", self, len(queue), queue.size)
            metrics.SLOW_CONSUMERS.labels(role=self.role).inc()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        queue.append(frame)
        queue.size += len(frame)

    def send_message(self, message: Message) -> None:
        self.send(codec.encode(message))

    def send_error(self, code: ErrorCode | str, message: str, request_id: int | None = None) -> None:
        self.send(error_frame(code, message, request_id))

    def pong(self, payload: bytes) -> None:
        """Answer a client's ping. While the transport takes no writes (the
        client does not read), only its latest ping is answered, once it
        does, as RFC 6455 (5.5.3) allows: a client that pings and never reads
        holds one pong here, not one per ping in the transport's buffer."""
        if self.closing:
            return
        if self._queue is None and not self.wire.writing_paused:
            self.wire.send(payload, PONG)
            return
        self._pong = payload
        if self._queue is None:
            self._started_queue()

    def _started_queue(self) -> FrameQueue:
        """What is sent while the transport takes no writes waits here, until it does."""
        queue = self._queue = FrameQueue()
        self.wire.on_resume(self._write_queued)
        return queue

    def _write_queued(self) -> None:
        """The transport takes writes again: what waits goes out (a pong
        first), until it is full again or all is written (then a close
        waiting for it follows)."""
        queue, wire, pong = self._queue, self.wire, self._pong
        if pong is not None and not wire.writing_paused:
            self._pong = None
            wire.send(pong, PONG)
        while queue and not wire.writing_paused:
            frame = queue.popleft()
            queue.size -= len(frame)
            if wire.send(frame):
                metrics.sent(self.role, frame)
        if not queue and self._pong is None:
            self._queue = None
            wire.on_resume(None)
            self._close_flushed()

    def close(self, code: int, reason: str, flush: bool = False) -> None:
        """Close from anywhere (fan-out, timers): queued frames are dropped
        (or, with ``flush``, written first for at most CLOSE_TIMEOUT: the
        error frame that explains the close), the close frame goes out, and
        a peer that does not answer it within CLOSE_TIMEOUT is dropped."""
        if self._closing:
            return
        self._closing = True
        self._then_close = (code, reason)
        if flush and self._queue:  # once the queue is written, or CLOSE_TIMEOUT at most
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._close_flushed)
        else:
            self._close_flushed()

    def _close_flushed(self) -> None:
        """The close waiting for the queue: now (what is still queued is dropped)."""
        if self._then_close is not None:
            code, reason = self._then_close
            self._then_close, self._queue, self._pong = None, None, None
            self.wire.on_resume(None)
            self.wire.close(code, reason)

    def ping(self) -> None:
        """A keepalive ping, straight onto the socket: frames are written whole
        (one synchronous write each), so it cannot land inside one."""
        if not self.closing:
            self.wire.send(b"", PING)

    def drop(self) -> None:
        """Gone without a word (no answer to a ping): nothing more is
        written and the socket is aborted at once; its endpoint hears of
        it as of any lost socket."""
        if self._closing:
            return
        self._closing = True
        self._queue = self._pong = None
        self.wire.abort()

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

    async def finish(self) -> None:
        """Until the socket is gone: a close started anywhere completes
        (the peer answers, or is dropped after CLOSE_TIMEOUT), bounded."""
        await self.wire.wait_closed(3 * CLOSE_TIMEOUT)


class FrameQueue(deque[Any]):
    """Frames and how many bytes they hold (kept by whoever adds and takes
    them): a connection's outbound queue, and its inbox (web/websocket.py)."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


class VisitorConnection(Connection):
    """A visitor's connection and its own copy of what it registered, so the
    instance can register it again if the backend loses it."""

    __slots__ = ("presence", "presence_due", "session", "unsent")

    def __init__(
        self,
        wire: Wire,
        group: str,
        visitor: str,
        queue_limits: tuple[int, int],
        instance: str,
        data: dict[str, Any],
        visible: bool,
    ) -> None:
        super().__init__(wire, "visitor", group, visitor, queue_limits)
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

    def __init__(self, wire: Wire, group: str, agent: str, queue_limits: tuple[int, int], issued: float = 0.0) -> None:
        super().__init__(wire, "agent", group, agent, queue_limits)
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
