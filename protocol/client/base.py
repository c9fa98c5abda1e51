"""Connection machinery shared by Herald's visitor and agent SDKs.

Both roles frame, correlate and reconnect the same way, and both must ride out
blips, dead peers and server drains without the application polling. Doing it
once here (jittered reconnects, a reply router, a liveness watchdog, a bounded
event queue) leaves each role client with its hello and what it restores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Self, TypeAlias, TypeVar

import aiohttp

from herald_presence.protocol import checks, codec
from herald_presence.protocol.errors import CloseCode, HeraldError, ProtocolError, RequestFailed, should_reconnect
from herald_presence.protocol.messages import (
    Ack,
    Error,
    Hello,
    Message,
    Ping,
    Pong,
    Refresh,
    SessionConnected,
    SessionJoined,
    SessionSignal,
    Signal,
    Snapshot,
    VisitorInfo,
    Welcome,
)

log = logging.getLogger(__name__)

DISCONNECTED = "disconnected"  # RequestFailed code: the socket went away before the reply
# Frames of these types that carry an ``id`` answer a request; without one they are
# events (an error about no request, a consumer's session_connected after its welcome).
_REPLIES = (Ack, Snapshot, VisitorInfo, SessionConnected, SessionJoined, Error)
_PING, _PONG = codec.encode(Ping()), codec.encode(Pong())
_CLOSE_NAMES = {code.value: code.name.lower() for code in CloseCode}
SIGNAL_MEMORY = 256  # signal IDs a client remembers, to drop a signal it was sent again
SESSION_SIGNAL_RETRIES = 2  # times a session signal is sent again, same sid, after a lost socket or delivery_failed
_SESSION_RETRIED = ("delivery_failed", DISCONNECTED)

Credential: TypeAlias = str | Callable[[], str | Awaitable[str]]
R = TypeVar("R", bound=Message)
WS: TypeAlias = aiohttp.ClientWebSocketResponse


async def resolve_credential(credential: Credential) -> str:
    """A token or key; a zero-argument callable (sync or async) is called for a fresh one."""
    value = credential() if callable(credential) else credential
    return await value if inspect.isawaitable(value) else value


def new_sid() -> str:
    """A fresh signal ID (``sid``, PROTOCOL.md §5.6): 16 hex characters from the
    CSPRNG, so two logical signals never share one."""
    return secrets.token_hex(8)


def signal_id(sid: str | None) -> str:
    """The ``sid`` a caller gave (checked: an identifier, else ``ProtocolError``
    invalid), or a fresh one."""
    return new_sid() if sid is None else checks.identifier(sid, "sid")


class RecentIds:
    """The last ``size`` distinct IDs seen, the oldest forgotten first, so that
    memory stays bounded however many arrive."""

    __slots__ = ("_ids", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("remember at least one ID")
        self.size = size
        self._ids: dict[str, None] = {}  # insertion-ordered: the first key is the oldest

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, value: object) -> bool:
        return value in self._ids

    def add(self, value: str) -> bool:
        """Remember ``value``; False if it was already remembered."""
        if value in self._ids:
            return False
        self._ids[value] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]
        return True


class ClientClosed(HeraldError):
    """The client has stopped (closed, or refused for good): no more events or replies."""


class Refused(RequestFailed):
    """A refusal retrying cannot fix; transient failures are retried ``ConnectionError``s."""

    def __init__(self, code: str, message: str, close_code: int | None = None) -> None:
        super().__init__(code, message)
        self.close_code = close_code


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Attempt n waits uniform(0, min(cap, initial * factor**n)): full jitter, so
    clients dropped together do not all come back together."""

    initial: float = 0.2
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap, self.initial * self.factor ** min(attempt, 64)))


@dataclasses.dataclass(frozen=True, slots=True)
class Connected:
    """SDK event: a connection (first or re-) is up and role state is restored."""

    welcome: Welcome


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnected:
    """SDK event: the socket closed with ``code`` (1006 when it just died)."""

    code: int | None
    reconnecting: bool


@dataclasses.dataclass(frozen=True, slots=True)
class SessionLost:
    """SDK event (agents): a session the agent had joined could not be joined
    again after a reconnect; ``code`` says why (``session_not_found``: it
    ended meanwhile)."""

    session: str
    code: str


Event: TypeAlias = Message | Connected | Disconnected | SessionLost


class HeraldClient:
    """One websocket kept alive, requests and events; base of the role clients.
    ``welcome``, ``connected`` and ``failure`` (why it stopped by itself) are
    read-only. ``request_timeout`` is long: the server may hold an agent's
    signal for a reconnecting visitor before answering.

    A received ``signal`` whose ``sid`` is among the last ``signal_memory``
    sids this client got (across reconnects) is a repeat of one already
    emitted (a sender's retry, PROTOCOL.md §5.6): it is dropped and counted
    in ``duplicate_signals``. Signals without a ``sid`` are never dropped."""

    PATH: ClassVar[str] = ""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        reconnect: bool = True,
        backoff: Backoff | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        max_events: int = 10_000,
        max_frame_bytes: int = 4 * 1024 * 1024,
        signal_memory: int = SIGNAL_MEMORY,
    ) -> None:
        self.base_url, self.reconnect, self.backoff = base_url.rstrip("/"), reconnect, backoff or Backoff()
        self.request_timeout, self.connect_timeout, self.close_timeout = request_timeout, connect_timeout, close_timeout
        self.max_frame_bytes, self.dropped_events = max_frame_bytes, 0
        self.duplicate_signals = 0  # received signals dropped as repeats of a sid already seen
        self._seen_sids = RecentIds(signal_memory)
        self.welcome: Welcome | None = None
        self.connected = self._stopped = self._closed = False
        self.failure: Exception | None = None
        self._session, self._owns_session = session, session is None
        self._runner: asyncio.Task[None] | None = None
        self._ws: WS | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._events: deque[Event] = deque(maxlen=max_events)
        self._changed = asyncio.Event()  # replaced on every state change; see _notify
        self._last_rx = 0.0
        self._last_error: Error | None = None  # the latest unsolicited error: why we were refused
        self._session_sending = asyncio.Lock()  # session signals go one at a time, in call order

    @property
    def connection_id(self) -> str | None:
        return self.welcome.connection if self.welcome else None

    @property
    def http_session(self) -> aiohttp.ClientSession:
        """The aiohttp session for the websocket (and the agent's login cookie);
        not named ``session``, which in Herald means a support session."""
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        return self._session

    def _notify(self) -> None:
        """Wake whoever waits for a socket, a connection, an event or the stop."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def connect(self) -> Welcome:
        """Start; return the Welcome once connected. A refusal raises ``Refused`` (a
        ``RequestFailed``), as does any failure with ``reconnect=False``; transient
        failures are retried, so bound it with ``asyncio.timeout`` (which stops it)."""
        if self._closed:
            raise ClientClosed("the client was closed")
        started = self._runner is None or self._runner.done()
        if started:
            self._stopped, self.failure = False, None
            self._runner = asyncio.create_task(self._run(), name=f"herald {self.PATH}")
        try:
            while not self.connected:
                if self._stopped:
                    raise self.failure or ClientClosed("the client stopped")
                await self._changed.wait()
        except BaseException:
            if started:
                await self._cancel_runner()
            raise
        assert self.welcome is not None
        return self.welcome

    async def close(self) -> None:
        """Close cleanly (1000), stop, fail pending requests, close an own session."""
        if self._closed:
            return
        self._closed = True
        self._notify()
        if (ws := self._ws) is not None and self._runner is not None:
            await self._shut(ws, self.close_timeout)
            await asyncio.wait([self._runner], timeout=self.close_timeout)  # it reports Disconnected
        await self._cancel_runner()
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def next_event(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109
        """The oldest event (a server frame that is no reply, ``Connected`` or
        ``Disconnected``); ``ClientClosed`` once stopped with nothing queued."""
        async with asyncio.timeout(timeout):
            while not self._events:
                if self._stopped or self._closed:
                    raise ClientClosed("the client has stopped")
                await self._changed.wait()
        return self._events.popleft()

    async def events(self) -> AsyncIterator[Event]:
        """Every event, until the client stops and the queue is drained."""
        with contextlib.suppress(ClientClosed):
            while True:
                yield await self.next_event()

    async def wait_for(self, match: type | Callable[[Event], bool], timeout: float | None = 10.0) -> Any:  # noqa: ASYNC109
        """The first event that is a ``match`` instance or makes ``match(event)`` true,
        within ``timeout`` s (10 by default); events before it are consumed and dropped."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next_event()
                if isinstance(event, match) if isinstance(match, type) else match(event):
                    return event

    def _emit(self, event: Event) -> None:
        if len(self._events) == self._events.maxlen:  # the deque drops the oldest
            self.dropped_events += 1
            if self.dropped_events % 1000 == 1:
                log.warning("herald event queue full; %d oldest events dropped so far", self.dropped_events)
        self._events.append(event)
        self._notify()

    async def request(
        self,
        message: Message,
        reply: type[R] = Message,  # type: ignore[assignment]
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> R:
        """Send ``message`` under a fresh ``id``; return the reply, an instance of
        ``reply``. Waits for a socket while one is being (re)established. Raises
        ``RequestFailed`` on an error reply or (``disconnected``) a lost socket."""
        async with asyncio.timeout(self.request_timeout if timeout is None else timeout):
            while (ws := self._ws) is None:
                if self._runner is None or self._stopped or self._closed:
                    raise RequestFailed(DISCONNECTED, "the client is not running; call connect()")
                await self._changed.wait()
            request_id = next(self._ids)
            future = self._pending[request_id] = asyncio.get_running_loop().create_future()
            try:
                if not await self._write(ws, codec.encode(dataclasses.replace(message, id=request_id))):  # type: ignore[type-var]
                    raise RequestFailed(DISCONNECTED, "the socket closed before the request was sent")
                answer = await future
            finally:
                self._pending.pop(request_id, None)
        if isinstance(answer, Error):
            raise RequestFailed(answer.code, answer.message)
        if not isinstance(answer, reply):
            raise RequestFailed("invalid", f"expected a {reply.__name__} reply, got {answer.TYPE}")
        return answer

    async def session_signal(
        self,
        session: str,
        event: str,
        payload: str | None = None,
        data: dict[str, Any] | None = None,
        *,
        to: str | None = None,
        sid: str | None = None,
        retries: int = SESSION_SIGNAL_RETRIES,
    ) -> int:
        """Send a session signal (PROTOCOL.md §11.9) to the other members of
        ``session`` (a visitor's own, or one an agent joined), or to the one
        member ``to`` names (its connection ID, from the ``connection`` of a
        session signal it sent; ``"visitor"``: the session's visitor), and
        return how many members got it. ``payload`` is a string of up to 64
        KiB (an SDP offer or answer, an ICE candidate as JSON), ``data`` a
        flat map.

        Session signals go one at a time, each once the one before was
        acknowledged, so they reach every member in the order of the calls.
        A socket lost before the ack, or ``delivery_failed``, sends it again
        under the same ``sid`` (receivers drop a sid they have seen) once
        the connection is back and its session restored, up to ``retries``
        times within ``request_timeout``; other errors (``session_not_found``:
        not a member; ``member_offline``: ``to`` is not connected) are raised
        at once."""
        checks.identifier(session, "session")
        checks.event_name(event, "event")
        if payload is not None:
            checks.payload(payload, "payload")
        if data is not None:
            checks.flat_map(data, "data")
        if to is not None:
            checks.identifier(to, "to")
        message = SessionSignal(session=session, event=event, payload=payload, data=data, to=to, sid=signal_id(sid))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        async with asyncio.timeout_at(deadline), self._session_sending:
            for attempt in itertools.count():
                await self._until_connected()
                try:
                    return (await self.request(message, Ack, timeout=max(0.0, deadline - loop.time()))).delivered or 0
                except RequestFailed as exc:
                    running = self._runner is not None and not (self._stopped or self._closed)
                    if exc.code not in _SESSION_RETRIED or attempt >= retries or not running:
                        raise
                    log.info(
                        "herald %s: session signal %s got %s; sent again as sid %s",
                        self.PATH,
                        event,
                        exc.code,
                        message.sid,
                    )
        raise AssertionError("unreachable")

    async def _until_connected(self) -> None:
        """Wait until a connection is up and its role state restored (an
        agent's sessions joined again); ``RequestFailed`` if none will come."""
        while not self.connected:
            if self._runner is None or self._stopped or self._closed:
                raise RequestFailed(DISCONNECTED, "the client is not running; call connect()")
            await self._changed.wait()

    async def send(self, message: Message) -> bool:
        """Send a frame that gets no reply; False if no socket could take it."""
        return self._ws is not None and await self._write(self._ws, codec.encode(message))

    @staticmethod
    async def _write(ws: WS, frame: bytes) -> bool:
        try:
            await ws.send_bytes(frame)
        except (ConnectionError, aiohttp.ClientError):
            return False
        return True

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(RequestFailed(DISCONNECTED, why))

    # --- hooks for the role clients

    async def _hello(self) -> Hello:
        """Runs before every websocket connect, so it fetches fresh credentials."""
        raise NotImplementedError

    def _on_frame(self, frame: Message) -> None:
        """Sees every server frame (Welcome too) in wire order, before routing."""

    async def _on_welcome(self, welcome: Welcome) -> None:
        """Restores role state on a new connection; ``Connected`` follows."""

    async def _run(self) -> None:
        attempt, code = 0, None
        try:
            while not self._closed:
                if attempt:
                    await asyncio.sleep(self.backoff.delay(attempt - 1))
                try:
                    ws, welcome = await self._open()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    if not self.reconnect:
                        raise
                    attempt += 1
                    log.info("herald %s connect attempt %d failed: %r", self.PATH, attempt, exc)
                    continue
                code = await self._live(ws, welcome)
                if not should_reconnect(code) and not self._closed:
                    raise self._refusal(code)
                if self._closed or not self.reconnect:
                    return
                self._emit(Disconnected(code, True))
                attempt = 1  # reset by the welcome, but even the first retry waits a jittered moment
                log.info("herald %s disconnected (%s); reconnecting", self.PATH, code)
        except Exception as exc:
            self.failure, code = exc, getattr(exc, "close_code", code)
            log.warning("herald %s stopped: %r", self.PATH, exc, exc_info=not isinstance(exc, HeraldError | OSError))
        finally:
            self._stopped, self.connected, self._ws = True, False, None
            self._fail_pending("the client stopped")
            if self.welcome is not None:  # it was up once: say it is down for good
                self._emit(Disconnected(code, False))
            self._notify()

    async def _open(self) -> tuple[WS, Welcome]:
        """One attempt: hello (and credentials), websocket upgrade, wait for welcome."""
        async with asyncio.timeout(self.connect_timeout):
            hello = await self._hello()
            ws = await self.http_session.ws_connect(
                self.base_url + self.PATH,
                max_msg_size=self.max_frame_bytes,
                timeout=aiohttp.ClientWSTimeout(ws_close=self.close_timeout),
            )
            try:
                self._last_error = None
                await ws.send_bytes(codec.encode(hello))
                if (welcome := await self._read(ws)) is not None:
                    return ws, welcome
            except BaseException:
                await self._shut(ws, 0)
                raise
        if should_reconnect(ws.close_code):
            raise ConnectionError(f"handshake closed with code {ws.close_code} ({self._last_error})")
        raise self._refusal(ws.close_code)

    def _refusal(self, code: int | None) -> Refused:
        error = self._last_error or Error(code=_CLOSE_NAMES.get(code or 0, "closed"), message=f"closed with {code}")
        return Refused(error.code, error.message, code)

    async def _live(self, ws: WS, welcome: Welcome) -> int | None:
        """Serve one established connection until it ends; return its close code."""
        self._ws, self.welcome = ws, welcome
        self._last_rx = asyncio.get_running_loop().time()
        self._on_frame(welcome)
        self._notify()
        tasks = {asyncio.create_task(self._read(ws))}
        if welcome.keepalive > 0:
            tasks.add(asyncio.create_task(self._watch(ws, float(welcome.keepalive))))
        ready = asyncio.create_task(self._ready(ws, welcome))
        refresher = asyncio.create_task(self._keep_fresh(welcome.expires))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._ws, self.connected = None, False
            for task in (*tasks, ready, refresher):
                task.cancel()
            await asyncio.gather(*tasks, ready, refresher, return_exceptions=True)
            self._fail_pending("connection lost")
            await self._shut(ws, 0)
        return CloseCode.NORMAL if self._closed else ws.close_code or 1006  # 1006: died without a close

    def _fresh_credential(self) -> Credential | None:
        """The credential factory for ``refresh`` (a callable), or None: a
        fixed token cannot be refreshed."""
        return None

    async def _keep_fresh(self, expires: float | None) -> None:
        """Before the connection's credential runs out (``welcome.expires``),
        send a fresh one from the credential factory (``refresh``): a group
        that enforces expiry closes a connection whose credential ran out.
        Sent when about a tenth of its life (between 5 and 60 s) is left; a
        refresh that fails is tried again every few seconds until then."""
        factory = self._fresh_credential()
        while expires is not None and factory is not None:
            left = expires - time.time()
            await asyncio.sleep(max(0.0, left - min(60.0, max(5.0, left / 10))))
            try:
                token = await resolve_credential(factory)
                answer = await self.request(Refresh(id=0, token=token), Ack, timeout=10.0)
                expires = answer.expires if answer.expires is not None else expires
                continue
            except (RequestFailed, TimeoutError) as exc:
                log.warning("herald %s: refreshing the credential failed: %r", self.PATH, exc)
            except Exception as exc:  # the application's credential factory
                log.warning("herald %s: the credential factory failed: %r", self.PATH, exc)
            if time.time() >= expires:
                return  # too late: a group that enforces expiry closes the connection (4500)
            await asyncio.sleep(min(5.0, max(0.5, (expires - time.time()) / 2)))

    async def _ready(self, ws: WS, welcome: Welcome) -> None:
        try:
            await self._on_welcome(welcome)
        except Exception as exc:
            if ws.closed:
                return  # dropped mid-restore; the next connection restores again
            log.warning("herald %s: restoring state after connect failed: %r", self.PATH, exc)
        self.connected = True
        self._emit(Connected(welcome))

    async def _read(self, ws: WS) -> Welcome | None:
        """Route frames until the socket ends, or return the handshake's Welcome."""
        loop = asyncio.get_running_loop()
        while (msg := await ws.receive()).type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
            self._last_rx = loop.time()
            if msg.type is aiohttp.WSMsgType.TEXT:
                continue  # the protocol is binary; text frames are ignored
            try:
                frame = codec.decode(msg.data, self.max_frame_bytes, from_server=True)
                if isinstance(frame, Welcome):
                    return frame
                if (
                    isinstance(frame, Signal | SessionSignal)
                    and frame.sid is not None
                    and not self._seen_sids.add(frame.sid)
                ):
                    self.duplicate_signals += 1  # a retry of a signal already emitted: acted on once
                    log.debug("herald %s: dropped a repeated signal %s (sid %s)", self.PATH, frame.event, frame.sid)
                    continue
                self._on_frame(frame)
                if isinstance(frame, Ping):
                    await self._write(ws, _PONG)
                elif isinstance(frame, _REPLIES) and frame.id is not None:
                    future = self._pending.pop(frame.id, None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                elif not isinstance(frame, Pong):  # a pong only had to arrive
                    self._last_error = frame if isinstance(frame, Error) else self._last_error
                    self._emit(frame)
            except Exception as exc:  # a bad frame, or a bug in a hook: drop the frame, keep the socket
                log.warning("herald %s: dropped a frame: %r", self.PATH, exc, exc_info=type(exc) is not ProtocolError)
        return None

    async def _watch(self, ws: WS, keepalive: float) -> None:
        """Ping every ``keepalive`` s; return (ending the socket) after 2.5x silence."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + keepalive
        while (now := loop.time()) < (deadline := self._last_rx + 2.5 * keepalive):
            if now >= next_ping:
                await self._write(ws, _PING)
                next_ping = now + keepalive
            await asyncio.sleep(min(next_ping, deadline) - now)
        log.warning("herald %s: server silent for %.1fs; reconnecting", self.PATH, now - self._last_rx)

    @staticmethod
    async def _shut(ws: WS, grace: float) -> None:
        """Close with 1000; after ``grace`` seconds without a reply, drop it."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(grace):
                await ws.close(code=CloseCode.NORMAL)

    async def _cancel_runner(self) -> None:
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
