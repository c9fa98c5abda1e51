"""Every limit that keeps one client from costing everyone else.

Each limit has a setting, a default and a defined answer (PROTOCOL.md §6).
The decisions live here; the edge carries out the answer:

=============================  =====================================  ==========================
setting                        checked by                             answer
=============================  =====================================  ==========================
``message_rate``/``_burst``    ``FrameRate`` (each frame)             ``rate_limited``, then 4003
``message_bytes_rate/_burst``  ``FrameRate`` (each frame's bytes)     ``rate_limited``, then 4003
``address_message_budget``     ``AddressRate`` (all its connections)  ``rate_limited``, then 4003
``connections_per_address``    ``ConnectionRate`` (each upgrade)      HTTP 429
``max_connections_per_address`` ``OpenConnections`` (each accept)     socket closed at once
``max_connections``            ``OpenConnections`` (each accept)      socket closed at once
``request_timeout``            aiohttp's keep-alive timer; ``read_json``  socket closed / HTTP 408
``max_connections_per_visitor`` ``presence_rules.join`` (atomic)      close 4004
``max_subscriptions_per_agent`` ``check_subscriptions``               ``limit_exceeded``
``max_presence_bytes/_fields`` ``check_presence``                     ``limit_exceeded``
``max_signal_bytes``           ``check_signal``                       ``limit_exceeded``
group ``presence_fields``      ``allowed_presence`` (hello, presence)  fields dropped (counted)
``max_session_frame_bytes``    ``session_frame_allowed`` (members'    close 1009 (others:
                               ``session_signal`` frames only)        ``max_frame_bytes``)
``visitor_signal_rate/_burst`` ``SignalBudgets`` (per agent, visitor) dropped for that agent
``code_lookups_per_*``         ``check_lookups``                      ``rate_limited`` / 429
``failed_credentials_per_``    ``check_failed_credentials``           ``rate_limited`` / 429
``address``                    (agent login, admin token)
``max_frame_bytes``            aiohttp's reader and the codec         close 1009
``max_queue(_bytes)``          ``queue_full`` (the writer)            close 4001
=============================  =====================================  ==========================
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any

import msgpack

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server import metrics
from herald_presence.server.config import Settings

WINDOW = 60.0
MAX_TRACKED_ADDRESSES = 50_000
FLOOD_DROPS = 200  # frames refused (net of those forgiven) before a flooding connection is closed
FLOOD_FORGIVEN = 4  # refused frames each allowed one forgives: only a client far over its budget floods


class LimitExceeded(ProtocolError):
    """A limit said no; ``setting`` names it (and labels its metric)."""

    def __init__(self, setting: str, message: str, code: ErrorCode = ErrorCode.LIMIT_EXCEEDED) -> None:
        super().__init__(code, message)
        self.setting = setting


class ConnectionLimit(LimitExceeded):
    """The visitor holds its maximum of connections: closed with 4004, and
    a later reconnect (once a tab is gone) may succeed."""

    def __init__(self, limit: int) -> None:
        super().__init__("max_connections_per_visitor", f"this visitor already has {limit} connections")


def count(error: ProtocolError) -> None:
    """Count a refusal in the metrics if a limit made it."""
    if isinstance(error, LimitExceeded):
        metrics.limit_hit(error.setting)


# -- per connection ----------------------------------------------------------------
class Verdict(Enum):
    ALLOWED = "allowed"
    REFUSED = "refused"  # dropped; the first of a streak is answered with rate_limited
    FIRST_REFUSED = "first_refused"  # by the frame rate
    FIRST_REFUSED_BYTES = "first_refused_bytes"  # by the byte budget
    FIRST_REFUSED_ADDRESS = "first_refused_address"  # by its address's budget (its other connections spent it)
    FLOODING = "flooding"  # FLOOD_DROPS refused, net of those forgiven: close the connection


def refilled(level: float, elapsed: float, rate: float, burst: float) -> float:
    """A token bucket's level after ``elapsed`` seconds of refilling at ``rate``, at most ``burst``."""
    return min(burst, level + elapsed * rate)


class Budget:
    """Two token buckets refilled together: ``message_burst`` frames
    refilled at ``message_rate`` per second and ``message_bytes_burst``
    bytes at ``message_bytes_rate`` per second, each times ``share``."""

    __slots__ = ("bytes", "refilled", "tokens")

    def __init__(self) -> None:
        self.tokens = -1.0  # filled on first use
        self.bytes = 0.0
        self.refilled = 0.0

    def refill(self, now: float, settings: Settings, share: int = 1) -> None:
        burst, byte_burst = float(settings.message_burst * share), float(settings.message_bytes_burst * share)
        if self.tokens < 0:
            self.tokens, self.bytes, self.refilled = burst, byte_burst, now
        elapsed, self.refilled = now - self.refilled, now
        self.tokens = refilled(self.tokens, elapsed, settings.message_rate * share, burst)
        self.bytes = refilled(self.bytes, elapsed, settings.message_bytes_rate * share, byte_burst)

    def allows(self, size: int) -> bool:
        return self.tokens >= 1 and self.bytes >= size

    def spend(self, size: int) -> None:
        self.tokens -= 1
        self.bytes -= size


class FrameRate(Budget):
    """What a connection may send: its ``Budget``, and its address's
    (``AddressRate``). Every frame the client sends after its hello counts,
    websocket pings and pongs too: the frame rate bounds the work per
    frame, the byte budget what a frame's size costs (reading and decoding
    it). A frame is taken from every bucket or refused (and then takes
    nothing).

    Refused frames are dropped; the first of each streak is answered. A
    connection is flooding once ``FLOOD_DROPS`` frames were refused net of
    ``FLOOD_FORGIVEN`` per frame allowed: at once after 200 in a row, and
    within seconds for a client that keeps sending more than five times
    what its budgets let through, however it paces itself (45 costly
    frames a second, under the frame rate, let through one a second by
    the byte budget, refuse ~44). A client at twice its budget is slowed
    down, never closed."""

    __slots__ = ("dropped", "refusing", "shared")

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0  # refused frames, net of those forgiven
        self.refusing = False  # the last frame was refused: a streak is on
        self.shared: AddressRate | None = None  # what its address's connections may send together

    def take(self, size: int, settings: Settings) -> Verdict:
        """One frame of ``size`` payload bytes."""
        now = time.monotonic()
        self.refill(now, settings)
        own, shared = self.allows(size), self.shared
        if own and shared is not None:
            shared.refill(now, settings, settings.address_message_budget)
        if own and (shared is None or shared.allows(size)):
            self.spend(size)
            if shared is not None:
                shared.spend(size)
            self.dropped = max(0, self.dropped - FLOOD_FORGIVEN)
            self.refusing = False
            return Verdict.ALLOWED
        self.dropped += 1
        first, self.refusing = not self.refusing, True
        if first:
            metrics.limit_hit(
                "address_message_budget" if own else "message_rate" if self.tokens < 1 else "message_bytes_rate"
            )
        if self.dropped >= FLOOD_DROPS:
            return Verdict.FLOODING
        if not first:
            return Verdict.REFUSED
        if own:
            return Verdict.FIRST_REFUSED_ADDRESS
        return Verdict.FIRST_REFUSED if self.tokens < 1 else Verdict.FIRST_REFUSED_BYTES


class AddressRate(Budget):
    """What one client address's connections may send together, on this
    instance: a ``Budget`` of ``address_message_budget`` connections' worth.
    Without it an address holding its 256 connections could send 256
    budgets' worth of valid frames, most of an instance's CPU; with it, as
    many as a few busy clients, however many connections it spreads them
    over."""

    __slots__ = ("address", "users")

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.users = 0  # its connections (the entry goes with the last)


class AddressRates:
    """The ``AddressRate`` of each address with connections here."""

    __slots__ = ("_by_address",)

    def __init__(self) -> None:
        self._by_address: dict[str, AddressRate] = {}

    def join(self, rate: FrameRate, address: str) -> None:
        """``rate`` (a connection's) shares its address's budget from now on."""
        shared = self._by_address.get(address)
        if shared is None:
            shared = self._by_address[address] = AddressRate(address)
        shared.users += 1
        rate.shared = shared

    def leave(self, rate: FrameRate) -> None:
        """Its connection is gone (once; again does nothing)."""
        shared, rate.shared = rate.shared, None
        if shared is not None:
            shared.users -= 1
            if not shared.users:
                del self._by_address[shared.address]

    def __len__(self) -> int:
        return len(self._by_address)


def queue_full(frames: int, size: int, max_queue: int, max_queue_bytes: int) -> bool:
    """A connection's outbound queue of ``frames`` holding ``size`` bytes (the
    next frame's included) is past ``max_queue`` or ``max_queue_bytes``: a
    slow consumer. An empty queue takes any one frame."""
    if frames < max_queue and (size <= max_queue_bytes or not frames):
        return False
    metrics.limit_hit("max_queue" if frames >= max_queue else "max_queue_bytes")
    return True


# -- per address ---------------------------------------------------------------------
class ConnectionRate:
    """New connections per client address per minute, on this instance.

    Counted locally on purpose: it must cost nothing when Redis is slow or
    away, and a flood hits one instance's accept loop, not the cluster's."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._windows: dict[str, tuple[float, int]] = {}

    def allow(self, address: str) -> bool:
        now = time.monotonic()
        started, count = self._windows.get(address, (now, 0))
        if now - started >= WINDOW:
            started, count = now, 0
        self._windows[address] = (started, count + 1)
        if len(self._windows) > MAX_TRACKED_ADDRESSES:
            self._windows = {a: w for a, w in self._windows.items() if now - w[0] < WINDOW}
        if count < self.per_minute:
            return True
        metrics.limit_hit("connections_per_address")
        return False


class OpenConnections:
    """Client TCP connections open on this instance right now, whatever they
    carry (a websocket, keep-alive HTTP, nothing yet): at most ``per_address``
    from one untrusted address and ``total`` in all. Decided when a socket is
    accepted, before a byte is read, so that sockets which never send a
    request are bounded too. A trusted proxy's connections (``address`` None)
    count toward ``total`` only: its clients are counted at the upgrade."""

    __slots__ = ("by_address", "open", "per_address", "total")

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address, self.total = per_address, total
        self.open = 0
        self.by_address: dict[str, int] = {}  # only addresses holding a connection: at most ``total`` keys

    def admit(self, address: str | None) -> str | None:
        """Count a new connection from ``address``; or the setting that refuses it (counted as a limit hit)."""
        if self.open >= self.total:
            metrics.limit_hit("max_connections")
            return "max_connections"
        if address is not None:
            held = self.by_address.get(address, 0)
            if held >= self.per_address:
                metrics.limit_hit("max_connections_per_address")
                return "max_connections_per_address"
            self.by_address[address] = held + 1
        self.open += 1
        metrics.TCP_CONNECTIONS.inc()
        return None

    def release(self, address: str | None) -> None:
        """An admitted connection from ``address`` closed."""
        self.open -= 1
        metrics.TCP_CONNECTIONS.dec()
        if address is not None:
            held = self.by_address.pop(address, 1) - 1
            if held > 0:
                self.by_address[address] = held


def check_lookups(per_address: int, per_group: int | None, settings: Settings) -> None:
    """Short-code look-ups counted this minute, by address (or by agent, for
    an agent's ``join_session {code}``) and by group: a budget for each, so
    that guessing a live code stays impractical even from many addresses.
    ``per_group`` None checks the address's budget alone: a look-up over it
    is refused before it counts against the group's, so that one address
    cannot spend its group's budget."""
    over_address = per_address > settings.code_lookups_per_address
    if over_address or (per_group is not None and per_group > settings.code_lookups_per_group):
        setting = "code_lookups_per_address" if over_address else "code_lookups_per_group"
        raise LimitExceeded(setting, "too many short-code look-ups; try again in a minute", ErrorCode.RATE_LIMITED)


def check_failed_credentials(failed: int, settings: Settings) -> None:
    """A client address whose credentials were refused ``failed`` times this
    minute: over ``failed_credentials_per_address``, no more are even tried."""
    if failed >= settings.failed_credentials_per_address:
        why = "too many refused credentials; try again in a minute"
        raise LimitExceeded("failed_credentials_per_address", why, ErrorCode.RATE_LIMITED)


# -- sizes and counts ------------------------------------------------------------------
def _check_size(data: dict[str, Any] | None, limit: int, setting: str, what: str) -> None:
    if data and len(msgpack.packb(data)) > limit:
        raise LimitExceeded(setting, f"{what} is over {limit} bytes")


def check_presence(data: dict[str, Any], settings: Settings) -> None:
    """A connection's whole presence data (after a merge) within its limits."""
    if len(data) > settings.max_presence_fields:
        raise LimitExceeded("max_presence_fields", f"presence data has more than {settings.max_presence_fields} fields")
    _check_size(data, settings.max_presence_bytes, "max_presence_bytes", "presence data")


def allowed_presence(data: dict[str, Any], allowed: list[str] | None) -> dict[str, Any]:
    """Presence data with only the fields the group lets agents see (its
    ``presence_fields``; None: every field). The others are dropped, not
    refused: a page publishing more than its group allows stays connected,
    and agents never see the rest. Each frame with a dropped field counts."""
    if allowed is None or all(key in allowed for key in data):
        return data
    metrics.limit_hit("presence_fields")
    return {key: value for key, value in data.items() if key in allowed}


def session_frame_allowed(size: int, member: bool, settings: Settings) -> bool:
    """A frame over ``max_frame_bytes`` is read only from a support session's
    member (and must then be a ``session_signal``), up to ``max_session_frame_bytes``."""
    return member and size <= settings.max_session_frame_bytes


def check_signal(data: dict[str, Any] | None, settings: Settings, frame: bytes | None = None) -> None:
    """Signal data within ``max_signal_bytes``. ``frame``: an encoded frame
    that holds the data; when it is within the limit, so is the data, which
    is then not packed once more to be measured (every signal's case)."""
    if frame is not None and len(frame) <= settings.max_signal_bytes:
        return
    _check_size(data, settings.max_signal_bytes, "max_signal_bytes", "signal data")


def check_subscriptions(watched: int, adding: int, settings: Settings) -> None:
    """An agent connection that watches ``watched`` visitors and session keys asks for ``adding`` more."""
    limit = settings.max_subscriptions_per_agent
    if watched + adding > limit:
        raise LimitExceeded(
            "max_subscriptions_per_agent", f"an agent connection may watch {limit} visitors and session keys"
        )


# -- per recipient -----------------------------------------------------------------------
MAX_SENDERS_TRACKED = 1024  # visitors whose budget toward one agent connection is remembered


class RecentKeys:
    """The last ``size`` distinct keys added, the oldest forgotten first."""

    __slots__ = ("_keys", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._keys: dict[str, None] = {}  # insertion-ordered: the first key is the oldest

    def add(self, key: str) -> None:
        self._keys.pop(key, None)
        self._keys[key] = None
        if len(self._keys) > self.size:
            del self._keys[next(iter(self._keys))]

    def __contains__(self, key: object) -> bool:
        return key in self._keys


class SignalBudgets:
    """What each visitor may send one agent connection: ``visitor_signal_rate``
    signals per second with a burst of ``visitor_signal_burst``. Over it the
    signal is dropped for that agent (counted), so no visitor can fill an
    agent's queue until it is closed as a slow consumer."""

    __slots__ = ("_buckets", "burst", "rate")

    def __init__(self, settings: Settings) -> None:
        self.rate, self.burst = settings.visitor_signal_rate, float(settings.visitor_signal_burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # visitor -> (tokens, refilled at)

    def take(self, visitor: str) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.pop(visitor, (self.burst, now))
        tokens = refilled(tokens, now - last, self.rate, self.burst)
        allowed = tokens >= 1
        self._buckets[visitor] = (tokens - 1 if allowed else tokens, now)  # re-inserted: the newest
        if len(self._buckets) > MAX_SENDERS_TRACKED:
            del self._buckets[next(iter(self._buckets))]
        if not allowed:
            metrics.limit_hit("visitor_signal_rate")
        return allowed
