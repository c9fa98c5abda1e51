"""The agent SDK: watch visitors' presence and signal them.

An agent differs from a visitor in two ways that shape this client. It logs
in over HTTP first (the session cookie is what its websocket upgrade
carries), so every connect starts with a login and the key may be a factory
for fresh keys. And its subscriptions live on the connection, so after a
reconnect they are replayed and the local ``visitors`` view is rebuilt from
the new snapshots. The view is updated as frames are read, in wire order, so
a snapshot can never overwrite a newer change. Support sessions are
connection state too: keys still waited for are waited for again, so a
session that started while the agent was away is reported after all, and
sessions the agent had joined are joined again (a drain that moves the agent
to another instance keeps it in its sessions; one that ended meanwhile is
reported as ``SessionLost``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from herald_presence.protocol.checks import MAX_VISITORS_PER_REQUEST
from herald_presence.protocol.errors import ErrorCode, RequestFailed
from herald_presence.protocol.messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Hello,
    JoinSession,
    LeaveSession,
    Lookup,
    Message,
    PresenceChanged,
    SessionEvent,
    SessionJoined,
    Signal,
    Snapshot,
    Subscribe,
    Unsubscribe,
    VisitorDelta,
    VisitorInfo,
    VisitorState,
    WaitSession,
    Welcome,
)
from herald_presence.protocol.presence import apply_delta

from .base import (
    DISCONNECTED,
    WS,
    Credential,
    Event,
    HeraldClient,
    R,
    Refused,
    SessionLost,
    resolve_credential,
    signal_id,
)

LOGIN_PATH = "/v1/agent/login"
LOGOUT_PATH = "/v1/agent/logout"
SIGNAL_RETRIES = 2  # times a signal is sent again, same sid, after delivery_failed or a lost socket
_STALE_SESSION = (ErrorCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED)
# The visitor did not get the signal (or it is not known whether it did), and a
# repeat under its sid is shown once: worth one more try. Other errors are final.
_RETRIED = (ErrorCode.DELIVERY_FAILED, DISCONNECTED)
log = logging.getLogger(__name__)


class LoginRefused(Refused):
    """``POST /v1/agent/login`` refused the key; logging in again will not help."""


async def _http_error(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """The ``{"error": {"code", "message"}}`` body of an HTTP error answer."""
    try:
        error = (await response.json(content_type=None))["error"]
        return str(error["code"]), str(error["message"])
    except Exception:
        return f"http_{response.status}", response.reason or ""


class AgentClient(HeraldClient):
    """An agent connection. ``visitors`` maps each watched visitor to its latest
    state; ``waiting`` holds the session keys waited for and not yet started;
    ``login_expires`` is when the current login session ends (unix s). A
    visitor's signal whose ``sid`` was seen already is dropped (see
    ``HeraldClient``)."""

    PATH = "/v1/agent"

    def __init__(self, base_url: str, group: str, agent: str, key: Credential, **opts: Any) -> None:
        super().__init__(base_url, **opts)
        self.group, self.agent, self._key = group, agent, key
        self.visitors: dict[str, VisitorState] = {}
        self.login_expires: float | None = None
        self._watched: set[str] = set()
        self._watch_group = False
        self._waiting: set[str] = set()
        self._joined: set[str] = set()
        # visitor -> (change, newest version) of deltas that missed a change, while it is looked up
        self._missed: dict[str, tuple[str, int]] = {}
        self._lookups: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> frozenset[str]:
        """Keys ``wait_session`` will send again after a reconnect."""
        return frozenset(self._waiting)

    @property
    def joined(self) -> frozenset[str]:
        """Sessions this agent is in, joined again after a reconnect."""
        return frozenset(self._joined)

    async def subscribe(self, visitors: list[str]) -> Snapshot:
        """Watch these visitors (kept across reconnects); their states now."""
        return await self._subscribe(list(visitors), group=False)

    async def subscribe_group(self) -> Snapshot:
        """Watch every visitor of the group (kept across reconnects)."""
        return await self._subscribe([], group=True)

    async def unsubscribe(self, visitors: list[str] | None = None, group: bool = False) -> None:
        """Stop watching these visitors and/or the group; drops them from the view."""
        if not visitors and not group:
            raise ValueError("name the visitors to unsubscribe from, or pass group=True")
        self._watched.difference_update(visitors or ())
        self._watch_group = self._watch_group and not group
        for visitor in [v for v in self.visitors if not self._watching(v)]:
            del self.visitors[visitor]
        await self.request(Unsubscribe(id=0, visitors=visitors or None, group=group or None), Ack)

    async def lookup(self, visitor: str) -> VisitorState:
        """One visitor's state, without watching it."""
        return (await self.request(Lookup(id=0, visitor=visitor), VisitorInfo)).state

    async def signal(
        self,
        visitor: str,
        event: str,
        data: dict[str, Any] | None = None,
        to: str = "focused",
        *,
        sid: str | None = None,
        retries: int = SIGNAL_RETRIES,
    ) -> int:
        """Send ``event`` to the visitor's focused connection (or ``to="all"``) and
        return how many connections got it. If the visitor is reconnecting the
        server holds the signal; ``RequestFailed("signal_expired")`` if it never
        comes back, ``visitor_offline`` if it is gone.

        ``sid`` names this one logical signal (an identifier); by default a
        fresh random one. The visitor's SDK drops a ``sid`` it has already
        seen, so the signal is acted on once however often it is sent. When
        the answer is ``delivery_failed`` (the visitor's instance did not
        confirm in time: the visitor did not get it, short of a lost
        confirmation), or the socket went away before the answer
        (``disconnected``: the signal may have gone out), the call sends it
        again under the same ``sid``, up to ``retries``
        times (0: never) within ``request_timeout`` in all, and then raises
        the last error. Every other error (``visitor_offline``,
        ``signal_expired``, ``forbidden``, ``limit_exceeded``, ...) is raised
        at once. ``TimeoutError`` if ``request_timeout`` runs out first. To
        retry later yourself, pass the same ``sid`` again."""
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        message = Signal(event=event, data=data, visitor=visitor, to=to, sid=signal_id(sid))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        attempt = 0
        while True:
            try:
                ack = await self.request(message, Ack, timeout=max(0.0, deadline - loop.time()))
            except RequestFailed as exc:
                running = self._runner is not None and not (self._stopped or self._closed)
                if exc.code not in _RETRIED or attempt >= retries or loop.time() >= deadline or not running:
                    raise
                attempt += 1
                log.info("herald agent: %s to %s got %s; sent again as sid %s", event, visitor, exc.code, message.sid)
                continue
            return ack.delivered or 0

    async def wait_session(self, key: str) -> None:
        """Be told (``session_event`` "started") when a session keyed by this
        visitor ID starts, or at once if it is live. Kept across reconnects
        until it has started or this agent joined it."""
        added = {key} - self._waiting
        self._waiting |= added  # before sending: a "started" sent before the ack must find it
        await self._replayable(WaitSession(id=0, key=key), Ack, lambda: self._waiting.difference_update(added))

    async def join_session(
        self, *, key: str | None = None, code: str | None = None, session: str | None = None
    ) -> SessionJoined:
        """Join a session by its visitor-ID ``key``, the short ``code`` the
        visitor read out, or its ``session`` ID (exactly one). Several agents may
        join; the visitor sees the count. ``RequestFailed("session_not_found")``
        if no such session is live (or the code expired)."""
        if sum(value is not None for value in (key, code, session)) != 1:
            raise ValueError("join a session by exactly one of key, code or session")
        joined = await self.request(JoinSession(id=0, key=key, code=code, session=session), SessionJoined)
        self._waiting.discard(joined.key)  # in it now: its "started" is no news
        self._joined.add(joined.session)
        return joined

    async def leave_session(self, session: str) -> None:
        """Leave a session this agent joined; the visitor sees the count drop."""
        self._joined.discard(session)
        await self.request(LeaveSession(id=0, session=session), Ack)

    async def show_terms(self, visitor: str, *, sid: str | None = None, retries: int = SIGNAL_RETRIES) -> int:
        """Ask the visitor's page to show the co-browse terms dialog: ``signal``
        with the event ``showterms``, so it is shown once even when it had to
        be sent again (``sid`` and ``retries`` as there)."""
        return await self.signal(visitor, "showterms", sid=sid, retries=retries)

    async def logout(self) -> None:
        """End the login session on the server and close this client."""
        self.reconnect = False
        try:
            if self._session is not None and not self._session.closed:  # else never logged in
                async with self.http_session.post(self.base_url + LOGOUT_PATH) as response:
                    if response.status >= 400 and response.status != 401:
                        raise RequestFailed(*await _http_error(response))
        finally:
            await self.close()

    def _watching(self, visitor: str) -> bool:
        return self._watch_group or visitor in self._watched

    async def _subscribe(self, visitors: list[str], group: bool) -> Snapshot:
        # Recorded before sending so that changes right behind the snapshot count.
        added, had_group = set(visitors) - self._watched, self._watch_group
        self._watched |= added
        self._watch_group |= group

        def undo() -> None:
            self._watched.difference_update(added)
            self._watch_group = had_group

        return await self._replayable(
            Subscribe(id=0, visitors=None if group else visitors, group=group or None), Snapshot, undo
        )

    async def _replayable(self, message: Message, reply: type[R], undo: Callable[[], object]) -> R:
        """A request whose effect the caller recorded before sending it, for the
        reconnect to replay. A refusal means there is nothing to replay, so
        ``undo`` runs; a lost socket does not, because the reconnect sends it again."""
        try:
            return await self.request(message, reply)
        except RequestFailed as exc:
            if exc.code != DISCONNECTED:
                undo()
            raise

    def _update(self, state: VisitorState) -> None:
        """Keep ``state`` unless it is for someone unwatched or not newer than ours."""
        visitor = state.get("visitor") if isinstance(state, dict) else None
        if not isinstance(visitor, str) or not self._watching(visitor):
            return
        held = self.visitors.get(visitor)
        if held is None or state.get("version", 0) > held.get("version", 0):
            self.visitors[visitor] = state

    def _apply(self, change: str, delta: VisitorDelta) -> VisitorState | None:
        """Apply what changed to the state held, and return the new state. If
        a change was missed, None: the visitor is looked up (once at a time,
        again if more was missed meanwhile) and the change emitted then."""
        visitor = delta["visitor"]
        held = self.visitors.get(visitor)
        if not self._watching(visitor) or (held is not None and held["version"] >= delta["version"]):
            return None  # not ours, or older than what we hold
        state = apply_delta(held, delta)
        if state is not None:
            self.visitors[visitor] = state
            return state
        missed = self._missed.get(visitor)
        self._missed[visitor] = (change, max(missed[1] if missed else 0, delta["version"]))
        if missed is None:
            task = asyncio.create_task(self._look_up_missed(visitor), name=f"herald lookup {visitor}")
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)
        return None

    async def _look_up_missed(self, visitor: str) -> None:
        try:
            while self._watching(visitor):
                await self.lookup(visitor)  # its answer updates the view as it is read
                held = self.visitors.get(visitor)
                if held is not None and held["version"] >= self._missed[visitor][1]:
                    self._emit(PresenceChanged(change=self._missed[visitor][0], state=held))
                    break
        except RequestFailed as exc:
            log.debug("herald agent: looking %s up failed (%s); the next snapshot brings it", visitor, exc)
        finally:
            self._missed.pop(visitor, None)

    def _emit(self, event: Event) -> None:
        if isinstance(event, PresenceChanged) and event.state is None:
            return  # a delta we could not apply: emitted once the visitor is looked up
        super()._emit(event)

    def _fresh_credential(self) -> Credential | None:
        # A login key factory refreshes the connection before its login runs out (``refresh``).
        return self._key if callable(self._key) else None

    async def _hello(self) -> Hello:
        """Log in (a fresh session cookie for the upgrade), then a bare hello."""
        body = {"group": self.group, "agent": self.agent, "key": await resolve_credential(self._key)}
        async with self.http_session.post(self.base_url + LOGIN_PATH, json=body) as response:
            if response.status >= 300:
                code, message = await _http_error(response)
                if 400 <= response.status < 500 and response.status not in (408, 429):
                    raise LoginRefused(code, message)
                raise ConnectionError(f"login answered HTTP {response.status}: {code}: {message}")
            self.login_expires = (await response.json(content_type=None)).get("expires")
        return Hello(versions=list(SUPPORTED_VERSIONS))

    async def _open(self) -> tuple[WS, Welcome]:
        try:
            return await super()._open()
        except Refused as refusal:
            # A websocket refused as unauthorized may have raced a session that
            # just ended: log in again, once. A refused login stays refused.
            if isinstance(refusal, LoginRefused) or refusal.code not in _STALE_SESSION:
                raise
        return await super()._open()

    def _on_frame(self, frame: Message) -> None:
        if isinstance(frame, Welcome):
            self.visitors.clear()  # rebuilt from the snapshots _on_welcome asks for
        elif isinstance(frame, Snapshot):
            for state in frame.visitors:
                self._update(state)
        elif isinstance(frame, PresenceChanged) and frame.delta is not None:
            frame.state = self._apply(frame.change, frame.delta)  # emitted with the state it leads to
        elif isinstance(frame, PresenceChanged | VisitorInfo) and frame.state is not None:
            self._update(frame.state)
        elif isinstance(frame, SessionEvent) and frame.event == "started" and frame.key is not None:
            self._waiting.discard(frame.key)  # what the wait was for; not re-sent after a reconnect
        elif isinstance(frame, SessionEvent) and frame.event == "ended":
            self._joined.discard(frame.session)

    async def _on_welcome(self, welcome: Welcome) -> None:
        watched = sorted(self._watched)
        for start in range(0, len(watched), MAX_VISITORS_PER_REQUEST):
            await self.request(Subscribe(id=0, visitors=watched[start : start + MAX_VISITORS_PER_REQUEST]), Snapshot)
        if self._watch_group:
            await self.request(Subscribe(id=0, group=True), Snapshot)
        for key in sorted(self._waiting):
            if await self._refused_again(WaitSession(id=0, key=key), Ack):
                self._waiting.discard(key)
        for session in sorted(self._joined):
            if code := await self._refused_again(JoinSession(id=0, session=session), SessionJoined):
                self._joined.discard(session)
                self._emit(SessionLost(session, code))

    async def _refused_again(self, message: Message, reply: type[Message]) -> str | None:
        """Replay a request after a reconnect; the error code if it is refused
        now (retrying will not help), None if it went through."""
        try:
            await self.request(message, reply)
        except RequestFailed as exc:
            if exc.code == DISCONNECTED:
                raise
            log.warning("herald agent: %s was refused after the reconnect: %s", message.TYPE, exc)
            return exc.code
        return None
