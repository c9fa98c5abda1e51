"""The agent SDK: watch visitors' presence and signal them.

An agent differs from a visitor in two ways that shape this client. It logs
in over HTTP first (the session cookie is what its websocket upgrade
carries), so every connect starts with a login and the key may be a factory
for fresh keys. And its subscriptions live on the connection, so after a
reconnect they are replayed and the local ``visitors`` view is rebuilt from
the new snapshots. The view is updated as frames are read, in wire order, so
a snapshot can never overwrite a newer change.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from .checks import MAX_VISITORS_PER_REQUEST
from .client import DISCONNECTED, WS, Credential, HeraldClient, Refused, resolve_credential
from .errors import ErrorCode, RequestFailed
from .messages import (
    SUPPORTED_VERSIONS,
    Ack,
    Hello,
    Lookup,
    Message,
    PresenceChanged,
    Signal,
    Snapshot,
    Subscribe,
    Unsubscribe,
    VisitorInfo,
    VisitorState,
    Welcome,
)

LOGIN_PATH = "/v1/agent/login"
LOGOUT_PATH = "/v1/agent/logout"
_STALE_SESSION = (ErrorCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED)


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
    state; ``login_expires`` is when the current login session ends (unix s)."""

    PATH = "/v1/agent"

    def __init__(self, base_url: str, group: str, agent: str, key: Credential, **opts: Any) -> None:
        super().__init__(base_url, **opts)
        self.group, self.agent, self._key = group, agent, key
        self.visitors: dict[str, VisitorState] = {}
        self.login_expires: float | None = None
        self._watched: set[str] = set()
        self._watch_group = False

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

    async def signal(self, visitor: str, event: str, data: dict[str, Any] | None = None, to: str = "focused") -> int:
        """Send ``event`` to the visitor's focused connection (or ``to="all"``) and
        return how many connections got it. If the visitor is reconnecting the
        server holds the signal; ``RequestFailed("signal_expired")`` if it never
        comes back, ``visitor_offline`` if it is gone."""
        ack = await self.request(Signal(event=event, data=data, visitor=visitor, to=to), Ack)
        return ack.delivered or 0

    async def show_terms(self, visitor: str) -> int:
        """Ask the visitor's page to show the co-browse terms dialog."""
        return await self.signal(visitor, "showterms")

    async def logout(self) -> None:
        """End the login session on the server and close this client."""
        self.reconnect = False
        try:
            if self._session is not None and not self._session.closed:  # else never logged in
                async with self.session.post(self.base_url + LOGOUT_PATH) as response:
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
        try:
            return await self.request(Subscribe(id=0, visitors=None if group else visitors, group=group or None),
                                      Snapshot)
        except RequestFailed as exc:
            if exc.code != DISCONNECTED:  # refused, not interrupted: we are not watching after all
                self._watched -= added
                self._watch_group = had_group
            raise

    def _update(self, state: VisitorState) -> None:
        """Keep ``state`` unless it is for someone unwatched or not newer than ours."""
        visitor = state.get("visitor") if isinstance(state, dict) else None
        if not isinstance(visitor, str) or not self._watching(visitor):
            return
        held = self.visitors.get(visitor)
        if held is None or state.get("version", 0) > held.get("version", 0):
            self.visitors[visitor] = state

    async def _hello(self) -> Hello:
        """Log in (a fresh session cookie for the upgrade), then a bare hello."""
        body = {"group": self.group, "agent": self.agent, "key": await resolve_credential(self._key)}
        async with self.session.post(self.base_url + LOGIN_PATH, json=body) as response:
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
        elif isinstance(frame, PresenceChanged | VisitorInfo):
            self._update(frame.state)

    async def _on_welcome(self, welcome: Welcome) -> None:
        watched = sorted(self._watched)
        for start in range(0, len(watched), MAX_VISITORS_PER_REQUEST):
            await self.request(Subscribe(id=0, visitors=watched[start : start + MAX_VISITORS_PER_REQUEST]), Snapshot)
        if self._watch_group:
            await self.request(Subscribe(id=0, group=True), Snapshot)
