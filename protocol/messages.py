"""The v1 message types, one dataclass each.

Each field carries its validator in its metadata, so the class is the single
source of truth for the codec, the SDK and PROTOCOL.md. Fields that default
to ``None`` are optional and left out of the encoded frame when unset.
Nested structures the server produces (visitor states) are plain dicts
described by ``TypedDict``s: they are built once per change and packed
as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypedDict, TypeVar

from . import checks
from .checks import Check

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)


class ConnectionState(TypedDict):
    connection: str
    data: dict[str, Any]
    visible: bool
    focused: bool
    since: float  # unix seconds when this connection joined


class VisitorState(TypedDict):
    visitor: str
    online: bool
    version: int  # grows with every presence change of this visitor
    connections: list[ConnectionState]


class ConnectionDelta(TypedDict, total=False):
    connection: str  # required; the rest only when they changed
    data: dict[str, Any]  # merged key by key into the connection's data (nil deletes); complete for a new one
    visible: bool
    since: float  # only for a connection that joined


class VisitorDelta(TypedDict):
    """What one change did to a visitor that stays online: apply it to the
    state of version ``base`` to get the state of version ``version``."""

    visitor: str
    version: int
    base: int
    changed: list[ConnectionDelta]  # connections that joined or changed
    removed: list[str]  # connections that left
    focused: str | None  # the focused connection after the change (all others are not)


class IceServer(TypedDict, total=False):
    """A STUN or TURN server for a session member, as WebRTC's ``RTCIceServer``."""

    urls: list[str]  # required
    username: str  # TURN: "<unix expiry>:<member>", made for this member (coturn's use-auth-secret)
    credential: str  # TURN: base64(HMAC-SHA1(the server's secret, username)), valid until the expiry


def wire(check: Check, default: Any = dataclasses.MISSING) -> Any:
    """Declare a message field and the check that validates it on decode."""
    return dataclasses.field(default=default, metadata={"check": check})


class Message:
    """Base of every message; ``TYPE`` is the frame's "type" value."""

    __slots__ = ()
    TYPE: ClassVar[str]
    SPEC: ClassVar[tuple[tuple[str, Check, bool], ...]]

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for name, _check, _required in self.SPEC:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


MESSAGE_TYPES: dict[str, type[Message]] = {}

M = TypeVar("M", bound=type[Message])


def message(type_name: str) -> Any:
    """Make a class a slotted dataclass, derive its decode spec, register it."""

    def register(cls: M) -> M:
        cls = dataclasses.dataclass(slots=True)(cls)
        cls.TYPE = type_name
        cls.SPEC = tuple(
            (f.name, f.metadata["check"], f.default is dataclasses.MISSING) for f in dataclasses.fields(cls)
        )
        MESSAGE_TYPES[type_name] = cls
        return cls

    return register


# --- both directions -------------------------------------------------------


@message("ping")
class Ping(Message):
    """Application-level liveness probe; the peer answers ``pong``."""


@message("pong")
class Pong(Message):
    pass


@message("signal")
class Signal(Message):
    """A named event with a flat map, relayed between agent and visitor.

    Agent -> server: ``visitor`` is the target, ``to`` picks the focused
    connection (default) or all of them, ``id`` asks for an ``ack``.
    Visitor -> server: ``agent`` addresses one agent instead of every agent
    watching. Server -> client: ``agent`` / ``visitor`` name the sender.
    ``sid`` names one logical signal: a sender that retries it keeps its
    ``sid``, the server relays it unchanged, and receivers drop a ``sid``
    they have seen, so a retried signal is acted on once.
    """

    event: str = wire(checks.event_name)
    data: dict[str, Any] | None = wire(checks.flat_map, None)
    id: int | None = wire(checks.request_id, None)
    visitor: str | None = wire(checks.identifier, None)
    agent: str | None = wire(checks.identifier, None)
    to: str | None = wire(checks.one_of("focused", "all"), None)
    connection: str | None = wire(checks.identifier, None)
    sid: str | None = wire(checks.identifier, None)


# --- client -> server --------------------------------------------------------


@message("hello")
class Hello(Message):
    """First frame on every connection. Visitors add group, visitor, token
    and may add their first presence; a consumer that redeemed a short code
    over REST sends group and ``session_token`` instead of visitor and
    token. Agents are identified by their session cookie and send versions
    only."""

    versions: list[int] = wire(checks.list_of(checks.non_negative_int, 16))
    group: str | None = wire(checks.identifier, None)
    visitor: str | None = wire(checks.identifier, None)
    token: str | None = wire(checks.token, None)
    session_token: str | None = wire(checks.token, None)  # consumer joining a REST-made session
    data: dict[str, Any] | None = wire(checks.flat_map, None)
    visible: bool | None = wire(checks.boolean, None)
    session: str | None = wire(checks.identifier, None)  # the support session a visitor believes it holds


@message("refresh")
class Refresh(Message):
    """Client -> server, both roles: a fresh credential for this connection
    before its current one expires (a group that enforces expiry closes a
    connection whose credential ran out). A visitor sends a new visitor
    token for its own ID; an agent a new login key. Answered by ``ack``
    with ``expires``, when the connection's credential now runs out."""

    id: int = wire(checks.request_id)
    token: str = wire(checks.token)


@message("presence")
class Presence(Message):
    """Visitor -> server: merge ``data`` into this connection's presence data
    (a nil value removes a field) and/or set its visibility."""

    data: dict[str, Any] | None = wire(checks.flat_map, None)
    visible: bool | None = wire(checks.boolean, None)


@message("subscribe")
class Subscribe(Message):
    """Agent -> server: watch visitors of the agent's group by ID, or the
    whole group. Answered by a ``snapshot`` with the same ``id``."""

    id: int = wire(checks.request_id)
    visitors: list[str] | None = wire(checks.list_of(checks.identifier), None)
    group: bool | None = wire(checks.boolean, None)


@message("unsubscribe")
class Unsubscribe(Message):
    id: int = wire(checks.request_id)
    visitors: list[str] | None = wire(checks.list_of(checks.identifier), None)
    group: bool | None = wire(checks.boolean, None)


@message("lookup")
class Lookup(Message):
    """Agent -> server: one visitor's state, without subscribing."""

    id: int = wire(checks.request_id)
    visitor: str = wire(checks.identifier)


# --- server -> client --------------------------------------------------------


@message("welcome")
class Welcome(Message):
    protocol: int = wire(checks.non_negative_int)
    connection: str = wire(checks.identifier)
    role: str = wire(checks.one_of("visitor", "agent"))
    group: str = wire(checks.identifier)
    keepalive: float = wire(checks.number)  # seconds between server pings
    visitor: str | None = wire(checks.identifier, None)
    agent: str | None = wire(checks.identifier, None)
    focused: bool | None = wire(checks.boolean, None)
    server: str | None = wire(checks.text, None)
    expires: float | None = wire(checks.number, None)  # unix s when this connection's credential runs out


@message("ack")
class Ack(Message):
    """A request succeeded. For an agent's signal, ``delivered`` counts the
    visitor connections that received it; for a ``refresh``, ``expires``
    is when the connection's new credential runs out."""

    id: int = wire(checks.request_id)
    delivered: int | None = wire(checks.non_negative_int, None)
    expires: float | None = wire(checks.number, None)  # answering a refresh: when the new credential runs out


@message("error")
class Error(Message):
    code: str = wire(checks.text)
    message: str = wire(checks.text)
    id: int | None = wire(checks.request_id, None)


@message("snapshot")
class Snapshot(Message):
    """The state of the visitors just subscribed to; changes follow."""

    id: int = wire(checks.request_id)
    visitors: list[VisitorState] = wire(checks.list_of(checks.visitor_state, 1_000_000))
    group: bool | None = wire(checks.boolean, None)


@message("visitor")
class VisitorInfo(Message):
    """Answer to ``lookup``."""

    id: int = wire(checks.request_id)
    state: VisitorState = wire(checks.visitor_state)


PRESENCE_CHANGES = ("online", "offline", "data", "visibility", "connections", "focus")


@message("presence_changed")
class PresenceChanged(Message):
    """Server -> agent: one visitor changed. ``change`` says what; either
    ``state``, the visitor's whole state after it (online, offline), or
    ``delta``, what changed since the version the agent holds (a visitor
    that stays online: data, visibility, connections). Versions grow with
    every change."""

    change: str = wire(checks.one_of(*PRESENCE_CHANGES))
    state: VisitorState | None = wire(checks.visitor_state, None)
    delta: VisitorDelta | None = wire(checks.visitor_delta, None)

    def __post_init__(self) -> None:
        if (self.state is None) == (self.delta is None):
            raise checks.invalid("state", "exactly one of state and delta is required")


@message("focus")
class Focus(Message):
    """Server -> visitor: this connection gained or lost focus (agents'
    signals go to the focused connection of a visitor)."""

    focused: bool = wire(checks.boolean)


# --- support sessions --------------------------------------------------------

KEY_TYPES = ("visitor", "random")


@message("start_session")
class StartSession(Message):
    """Visitor -> server: start a support session keyed by this visitor's ID
    (one-click: an agent waits for it, no code is shown) or by a random
    short code the visitor reads out. Answered by ``session_connected``."""

    id: int = wire(checks.request_id)
    key_type: str = wire(checks.one_of(*KEY_TYPES))


@message("session_connected")
class SessionConnected(Message):
    """Server -> visitor: the session is live. ``show_key`` says whether the
    app should display ``key`` (a random code) to the visitor."""

    session: str = wire(checks.identifier)
    key: str = wire(checks.identifier)
    key_type: str = wire(checks.one_of(*KEY_TYPES))
    show_key: bool = wire(checks.boolean)
    guests: int = wire(checks.non_negative_int)
    id: int | None = wire(checks.request_id, None)
    ice_servers: list[IceServer] | None = wire(checks.ice_servers, None)  # the group's, TURN credentials made now


@message("end_session")
class EndSession(Message):
    """Visitor -> server: end the visitor's session (answered by ``ack``)."""

    id: int = wire(checks.request_id)


@message("wait_session")
class WaitSession(Message):
    """Agent -> server: tell me when a session with this key (a visitor ID of
    the agent's group) starts. Answered by ``ack``; a ``session_event``
    "started" follows when it starts (at once if it is already live)."""

    id: int = wire(checks.request_id)
    key: str = wire(checks.identifier)


@message("join_session")
class JoinSession(Message):
    """Agent -> server: join by visitor-ID ``key``, by short ``code``, or by
    ``session`` ID (exactly one). Answered by ``session_joined``."""

    id: int = wire(checks.request_id)
    key: str | None = wire(checks.identifier, None)
    code: str | None = wire(checks.identifier, None)
    session: str | None = wire(checks.identifier, None)


@message("session_joined")
class SessionJoined(Message):
    id: int = wire(checks.request_id)
    session: str = wire(checks.identifier)
    key: str = wire(checks.identifier)
    visitor: str = wire(checks.identifier)
    guests: int = wire(checks.non_negative_int)
    ice_servers: list[IceServer] | None = wire(checks.ice_servers, None)  # the group's, TURN credentials made now


@message("leave_session")
class LeaveSession(Message):
    """Agent -> server: leave a session it joined (answered by ``ack``)."""

    id: int = wire(checks.request_id)
    session: str = wire(checks.identifier)


@message("guest_count")
class GuestCount(Message):
    """Server -> visitor: the number of agents in its session changed."""

    session: str = wire(checks.identifier)
    guests: int = wire(checks.non_negative_int)


SESSION_EVENTS = ("started", "ended", "error")


@message("session_event")
class SessionEvent(Message):
    """Server -> agents: a session's lifecycle. Agents waiting for its key,
    agents in it, and agents watching its visitor get these. ``reason``
    says why it ended (ended, visitor_offline, replaced, terminated).

    Server -> visitor: ``ended``, for the session its connection holds (its
    group's back end ended it), or for the one its hello named when that is
    no longer live for it (a reconnect, PROTOCOL.md §11.2). That one has no
    ``key`` or ``key_type``: the visitor knows them, and Herald may not any
    more; every other session_event has both."""

    event: str = wire(checks.one_of(*SESSION_EVENTS))
    session: str = wire(checks.identifier)
    visitor: str = wire(checks.identifier)
    key: str | None = wire(checks.identifier, None)
    key_type: str | None = wire(checks.one_of(*KEY_TYPES), None)
    reason: str | None = wire(checks.text, None)


@message("session_signal")
class SessionSignal(Message):
    """Between the members of a support session only (its visitor's
    connection and the agent connections that joined it): WebRTC's offers,
    answers and ICE candidates, or anything else the session needs.

    Client -> server: ``to`` names one member by its connection ID (or
    ``"visitor"``: the session's visitor connection, whichever it is now);
    without it every other member gets it. ``id`` asks for an ``ack`` whose
    ``delivered`` counts the members reached. ``payload`` (up to 64 KiB, an
    SDP) and ``data`` (a flat map) are relayed as they are. Server -> client:
    ``connection`` is the sender's connection (the ``to`` of an answer), and
    ``agent`` or ``visitor`` who sent it. ``sid`` works as a signal's."""

    session: str = wire(checks.identifier)
    event: str = wire(checks.event_name)
    payload: str | None = wire(checks.payload, None)
    data: dict[str, Any] | None = wire(checks.flat_map, None)
    id: int | None = wire(checks.request_id, None)
    to: str | None = wire(checks.identifier, None)
    sid: str | None = wire(checks.identifier, None)
    connection: str | None = wire(checks.identifier, None)
    agent: str | None = wire(checks.identifier, None)
    visitor: str | None = wire(checks.identifier, None)
