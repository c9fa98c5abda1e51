"""The visitor SDK: one browser tab's presence, reachable by agents.

A visitor's presence data and visibility belong to its connection on the
server and vanish with it, so this client keeps the merged copy and sends it
again in the Hello of every reconnect; its token may expire while it is away,
so the token can be a factory called on every (re)connect. Reconnecting,
requests and events come from ``HeraldClient``.
"""

from __future__ import annotations

from typing import Any

from . import checks
from .client import Credential, HeraldClient, resolve_credential
from .messages import SUPPORTED_VERSIONS, Ack, Focus, Hello, Message, Presence, Signal, Welcome

TERMS_STATUSES = ("displayed", "accepted", "declined")


class VisitorClient(HeraldClient):
    """A visitor connection. ``data`` (the merged presence data), ``visible`` and
    ``focused`` (whether agents' signals come to this connection) are read-only."""

    PATH = "/v1/visitor"

    def __init__(
        self, base_url: str, group: str, visitor: str, token: Credential,
        data: dict[str, Any] | None = None, visible: bool = True, **opts: Any,
    ) -> None:
        super().__init__(base_url, **opts)
        self.group, self.visitor, self._token = group, visitor, token
        self.data = checks.flat_map({k: v for k, v in (data or {}).items() if v is not None}, "data")
        self.visible = visible
        self.focused = False
        self._sent: tuple[dict[str, Any], bool] = ({}, visible)  # what the last Hello carried

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

    async def signal_agent(self, event: str, data: dict[str, Any] | None = None, agent: str | None = None) -> None:
        """Send ``event`` to the agents watching this visitor (or just ``agent``)
        and wait for the server's ack; ``RequestFailed`` if it refuses."""
        await self.request(Signal(event=event, data=data, agent=agent), Ack)

    async def terms(self, status: str) -> None:
        """Report the co-browse terms dialog: displayed, accepted or declined."""
        if status not in TERMS_STATUSES:
            raise ValueError(f"terms status must be one of {', '.join(TERMS_STATUSES)}, not {status!r}")
        await self.signal_agent("terms", {"status": status})

    async def _hello(self) -> Hello:
        token = await resolve_credential(self._token)
        self._sent = (dict(self.data), self.visible)
        return Hello(versions=list(SUPPORTED_VERSIONS), group=self.group, visitor=self.visitor, token=token,
                     data=dict(self.data) or None, visible=self.visible)

    def _on_frame(self, frame: Message) -> None:
        if isinstance(frame, Welcome | Focus):
            self.focused = bool(frame.focused)

    async def _on_welcome(self, welcome: Welcome) -> None:
        # Changes made while the Hello was in flight missed both it and the socket.
        sent, visible = self._sent
        delta = {k: None for k in sent if k not in self.data}
        delta.update({k: v for k, v in self.data.items() if k not in sent or sent[k] != v})
        if delta or visible != self.visible:
            await self.send(Presence(data=delta or None, visible=None if visible == self.visible else self.visible))
