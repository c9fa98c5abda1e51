"""The visitor SDK: one browser tab's presence, reachable by agents.

A visitor's presence data and visibility belong to its connection on the
server and vanish with it, so this client keeps the merged copy and sends it
again in the Hello of every reconnect; its token may expire while it is away,
so the token can be a factory called on every (re)connect. Reconnecting,
requests and events come from ``HeraldClient``.

A visitor may run one support session at a time. A consumer (a page that
redeemed a short code over REST and so has no visitor ID or token of its own)
connects with the ``session_token`` it got instead; the server makes it the
session's visitor and tells it so with a ``session_connected`` after the
welcome, which is why ``session`` is fed from every such frame, asked for or not.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Self

from herald_presence.protocol import checks
from herald_presence.protocol.messages import (
    KEY_TYPES,
    SUPPORTED_VERSIONS,
    Ack,
    EndSession,
    Focus,
    GuestCount,
    Hello,
    Message,
    Presence,
    SessionConnected,
    SessionEvent,
    Signal,
    StartSession,
    Welcome,
)

from .base import Credential, HeraldClient, resolve_credential, signal_id

TERMS_STATUSES = ("displayed", "accepted", "declined")


class VisitorClient(HeraldClient):
    """A visitor connection. ``data`` (the merged presence data), ``visible`` and
    ``focused`` (whether agents' signals come to this connection) are read-only.
    An agent's signal whose ``sid`` this connection has seen already (an
    agent's retry) is dropped, so it is acted on once (see ``HeraldClient``).

    Give ``visitor`` and ``token``, or (a consumer, see ``for_session``) only a
    ``session_token``; a consumer's ``visitor`` is the one its welcome names."""

    PATH = "/v1/visitor"

    def __init__(
        self,
        base_url: str,
        group: str,
        visitor: str | None = None,
        token: Credential | None = None,
        data: dict[str, Any] | None = None,
        visible: bool = True,
        *,
        session_token: Credential | None = None,
        **opts: Any,
    ) -> None:
        credential: Credential
        if session_token is None and visitor is not None and token is not None:
            credential = token
        elif session_token is not None and visitor is None and token is None:
            credential = session_token
        else:
            raise ValueError("pass visitor and token, or (a consumer) only a session_token")
        super().__init__(base_url, **opts)
        self.group, self.visitor, self._credential = group, visitor, credential
        self.consumer = session_token is not None  # the Hello carries session_token, not visitor and token
        self._support: SessionConnected | None = None
        self.data = checks.flat_map({k: v for k, v in (data or {}).items() if v is not None}, "data")
        self.visible = visible
        self.focused = False
        self._sent: tuple[dict[str, Any], bool] = ({}, visible)  # what the last Hello carried

    @classmethod
    def for_session(cls, base_url: str, group: str, session_token: Credential, **opts: Any) -> Self:
        """A consumer: a page that redeemed a short code over REST and connects
        with the ``session_token`` it got (a callable fetches a fresh one per
        connect). It becomes the session's visitor; ``session`` fills in right
        after the welcome."""
        return cls(base_url, group, session_token=session_token, **opts)

    @property
    def session(self) -> SessionConnected | None:
        """The live support session as the server last described it (``guests``
        kept current by ``guest_count``); None before one starts, after
        ``end_session``, and once the server says it ended (``session_event
        ended``). Every hello names it, so a session that ended while this
        client was away (ended by the group's back end, replaced from another
        connection, expired, or gone with the visitor offline) is reported
        right after the welcome of the reconnect, and dropped here. While
        connected, a start from another connection of the visitor is not
        reported to this one until its next reconnect."""
        return self._support

    @property
    def session_id(self) -> str | None:
        """The live support session's ID (``session.session``), or None."""
        return self._support.session if self._support else None

    async def start_session(self, key_type: str = "visitor") -> SessionConnected:
        """Start a support session, ending this visitor's previous one. With
        ``"visitor"`` the key is the visitor ID (an agent waiting for it is told,
        nothing to show); with ``"random"`` it is a short code to show the visitor
        (``show_key``) so that they can read it out to an agent."""
        if key_type not in KEY_TYPES:
            raise ValueError(f"key_type must be one of {', '.join(KEY_TYPES)}, not {key_type!r}")
        return await self.request(StartSession(id=0, key_type=key_type), SessionConnected)

    async def end_session(self) -> None:
        """End this visitor's session; the agents in it are told."""
        ending = self._support.session if self._support else None
        await self.request(EndSession(id=0), Ack)
        if self._support is None or self._support.session == ending:  # not one a concurrent start made
            self._support = None

    async def publish(self, **fields: Any) -> None:
        """``set_presence`` with keyword arguments: ``publish(page="/cart")``."""
        await self.set_presence(fields)

    async def set_presence(self, data: dict[str, Any]) -> None:
        """Merge ``data`` into this visitor's presence data; a None value removes a
        field. Raises ``ProtocolError`` (invalid) if the result breaks the limits.
        While disconnected the change waits for the next Hello."""
        checks.flat_map(data, "data")
        merged = {k: v for k, v in {**self.data, **data}.items() if v is not None}
        self.data = checks.flat_map(merged, "data")
        await self.send(Presence(data=dict(data)))

    async def set_visible(self, visible: bool) -> None:
        """Whether agents see this connection (a hidden one still gets signals)."""
        self.visible = visible
        await self.send(Presence(visible=visible))

    async def signal_agent(
        self, event: str, data: dict[str, Any] | None = None, agent: str | None = None, *, sid: str | None = None
    ) -> None:
        """Send ``event`` to the agents watching this visitor (or just ``agent``)
        and wait for the server's ack; ``RequestFailed`` if it refuses.

        ``sid`` names this one logical signal (an identifier); by default a
        fresh random one. The agents' SDKs drop a ``sid`` they have already
        seen: to send it again after a lost socket (``RequestFailed``
        ``disconnected``), pass the same ``sid`` (``base.new_sid()`` makes one)."""
        await self.request(Signal(event=event, data=data, agent=agent, sid=signal_id(sid)), Ack)

    async def terms(self, status: str, *, sid: str | None = None) -> None:
        """Report the co-browse terms dialog: displayed, accepted or declined
        (``sid`` as in ``signal_agent``)."""
        if status not in TERMS_STATUSES:
            raise ValueError(f"terms status must be one of {', '.join(TERMS_STATUSES)}, not {status!r}")
        await self.signal_agent("terms", {"status": status}, sid=sid)

    def _fresh_credential(self) -> Credential | None:
        # A visitor token factory refreshes the connection before its token runs out (a consumer's lasts its session).
        return self._credential if callable(self._credential) and not self.consumer else None

    async def _hello(self) -> Hello:
        credential = await resolve_credential(self._credential)
        self._sent = (dict(self.data), self.visible)
        consumer = self.consumer
        return Hello(
            versions=list(SUPPORTED_VERSIONS),
            group=self.group,
            visitor=None if consumer else self.visitor,
            token=None if consumer else credential,
            session_token=credential if consumer else None,
            data=dict(self.data) or None,
            visible=self.visible,
            session=None if consumer else self.session_id,  # told right after the welcome if it ended meanwhile
        )

    def _on_frame(self, frame: Message) -> None:
        if isinstance(frame, Welcome | Focus):
            self.focused = bool(frame.focused)
        if isinstance(frame, Welcome) and self.consumer:
            self.visitor = frame.visitor  # a consumer's ID is the server's to give
        elif isinstance(frame, SessionConnected):
            self._support = frame
        elif isinstance(frame, GuestCount) and self._support is not None and frame.session == self._support.session:
            self._support = dataclasses.replace(self._support, guests=frame.guests)
        elif isinstance(frame, SessionEvent) and frame.event == "ended" and frame.session == self.session_id:
            self._support = None  # its group's back end ended it, or it ended while this client was away

    async def _on_welcome(self, welcome: Welcome) -> None:
        # Changes made while the Hello was in flight missed both it and the socket.
        sent, visible = self._sent
        delta = {k: None for k in sent if k not in self.data}
        delta.update({k: v for k, v in self.data.items() if k not in sent or sent[k] != v})
        if delta or visible != self.visible:
            await self.send(Presence(data=delta or None, visible=None if visible == self.visible else self.visible))
