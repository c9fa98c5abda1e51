"""The records an instance keeps in the backend, as plain dataclasses.

A visitor's presence is one ``VisitorRecord`` holding a ``ConnectionRecord``
per live connection; ``PresenceChange`` is what one rule did to it. Held
signals, support sessions and group settings are the other shared records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from herald_presence.protocol.messages import ConnectionDelta, ConnectionState, VisitorDelta, VisitorState

from .names import pack, unpack


@dataclass(slots=True)
class ConnectionRecord:
    connection: str
    instance: str
    data: dict[str, Any]
    visible: bool
    since: float
    active: int = 0  # set by the backend: the visitor's version when last active


@dataclass(slots=True)
class VisitorRecord:
    group: str
    visitor: str
    version: int
    connections: dict[str, ConnectionRecord] = field(default_factory=dict)
    away_since: int | None = None  # version at which the last connection left

    @property
    def online(self) -> bool:
        return bool(self.connections) or self.away_since is not None

    def focused(self) -> ConnectionRecord | None:
        """The most recently active visible connection; a hidden one only
        when none is visible (PROTOCOL.md §5.5)."""
        return max(self.connections.values(), key=lambda c: (c.visible, c.active), default=None)

    def state(self) -> VisitorState:
        focused = self.focused()
        connections: list[ConnectionState] = [
            {
                "connection": c.connection,
                "data": c.data,
                "visible": c.visible,
                "focused": c is focused,
                "since": c.since,
            }
            for c in self.connections.values()
        ]
        return {"visitor": self.visitor, "online": self.online, "version": self.version, "connections": connections}


def offline_state(visitor: str, version: int = 0) -> VisitorState:
    return {"visitor": visitor, "online": False, "version": version, "connections": []}


@dataclass(slots=True)
class PresenceChange:
    """What one presence operation did.

    ``change`` is the word agents get (online, offline, data, visibility,
    connections, focus) or None when agents need not hear of it. The focus
    pair lets the instance tell connections that gained or lost focus.

    A visitor that stays online is announced as a delta from ``base``, the
    version agents heard of last: the connections that joined or changed
    (``delta_changed``, only what changed) and those that left. Without a
    delta (online, offline, back from the grace period) agents get the
    whole state.
    """

    record: VisitorRecord | None
    change: str | None
    version: int
    focus_before: ConnectionRecord | None = None
    focus_after: ConnectionRecord | None = None
    base: int = 0
    delta_changed: list[ConnectionDelta] | None = None
    delta_removed: list[str] = field(default_factory=list)

    def delta(self) -> VisitorDelta | None:
        """What agents are told when the visitor stays online; None: its whole state."""
        if self.delta_changed is None or self.record is None:
            return None
        focused = self.record.focused()
        return {
            "visitor": self.record.visitor,
            "version": self.version,
            "base": self.base,
            "changed": self.delta_changed,
            "removed": self.delta_removed,
            "focused": focused.connection if focused else None,
        }

    @property
    def focus_moved(self) -> bool:
        before = self.focus_before.connection if self.focus_before else None
        after = self.focus_after.connection if self.focus_after else None
        return before != after


@dataclass(slots=True)
class HeldSignal:
    key: str  # unique; the reply to the agent's instance names it
    reply_to: str  # instance ID of the agent's instance
    frame: bytes  # the encoded Signal the visitor will get
    to_all: bool  # every connection of the visitor, not only the focused one
    answer_by: float  # unix time after which its sender has answered without it: never deliver it then


@dataclass(slots=True)
class SupportSession:
    """Where a visitor and agents meet; keyed by the visitor's ID or a code."""

    id: str
    group: str
    key: str
    key_type: str  # "visitor" or "random"
    visitor: str
    connection: str | None = None  # the visitor connection in the session, and its instance
    instance: str | None = None
    guests: list[str] = field(default_factory=list)  # agent connection IDs
    code: str | None = None
    redeemed: bool = False  # a consumer took its session token (once)

    def pack(self) -> bytes:
        return pack(dataclasses.asdict(self))

    @classmethod
    def unpack(cls, data: bytes) -> SupportSession:
        return cls(**unpack(data))


@dataclass(slots=True)
class GroupSettings:
    """A group's settings that operators change at run time (admin API)."""

    code_length: int  # digits in a short code (Live Assist's "Short CID Length")
    code_ttl: float  # seconds an unclaimed short code lives
    allowed_origins: list[str] = field(default_factory=list)  # added to the configured ones
    allow_consumer_codes: bool = False  # short codes over REST for pages without a back end (overrides TOML)
    enforce_expiry: bool = False  # close connections whose credential expired without a refresh (overrides TOML)
    ice_servers: list[dict[str, Any]] = field(default_factory=list)  # STUN/TURN for session members (overrides TOML)

    def to_json(self) -> dict[str, Any]:
        """For the admin API: a TURN server's secret is never shown, only that it has one."""
        shown = dataclasses.asdict(self)
        shown["ice_servers"] = [
            {key: value for key, value in server.items() if key != "secret"} | {"has_secret": "secret" in server}
            for server in self.ice_servers
        ]
        return shown
