"""Presence rules as pure functions on a ``VisitorRecord``.

Both backends load a record, apply one of these, and store the result
atomically (with the announcement that goes with it), so the rules live in
exactly one place. Each function returns the ``PresenceChange`` it made, or
None when nothing changed.
"""

from __future__ import annotations

import time
from typing import Any

from herald_presence.protocol.messages import ConnectionDelta

from .limits import ConnectionLimit
from .records import ConnectionRecord, PresenceChange, VisitorRecord

# A consumer (a page that redeemed a short code over REST) is the visitor of
# its support session only: its ID is consumer.<session>, it holds this many
# connections at once, and agents are never told of its presence.
CONSUMER_PREFIX = "consumer."
CONSUMER_CONNECTIONS = 1


def is_consumer(visitor: str) -> bool:
    return visitor.startswith(CONSUMER_PREFIX)


def connection_limit(visitor: str, per_visitor: int) -> int:
    """Connections the visitor may hold at once: ``per_visitor``, one for a consumer."""
    return CONSUMER_CONNECTIONS if is_consumer(visitor) else per_visitor


def announced(visitor: str) -> bool:
    """Whether agents hear of the visitor's presence (a consumer's is its session's business)."""
    return not is_consumer(visitor)


def next_version(previous: int) -> int:
    """Microseconds since the epoch, or one more than before if that is
    larger: versions keep increasing across offline periods (and restarts)
    without remembering every visitor forever."""
    return max(previous + 1, time.time_ns() // 1000)


def _bump(record: VisitorRecord) -> int:
    record.version = next_version(record.version)
    return record.version


def _joined(connection: ConnectionRecord) -> ConnectionDelta:
    return {
        "connection": connection.connection,
        "data": connection.data,
        "visible": connection.visible,
        "since": connection.since,
    }


def join(record: VisitorRecord, connection: ConnectionRecord, limit: int | None = None) -> PresenceChange:
    """A connection arrives; it is active, so it takes focus, unless it is
    hidden and another is visible (a background tab does not take signals
    from the tab the visitor looks at). A visitor that was away (in its
    grace period) comes back without agents seeing it leave (they get its
    whole state: they never heard of the versions it had while away). ``limit``
    caps the visitor's connections (checked atomically with the join)."""
    if limit is not None and len(record.connections) >= limit:
        raise ConnectionLimit(limit)
    change = "connections" if record.online else "online"
    before, base = record.focused(), record.version
    delta = [_joined(connection)] if record.connections else None
    record.away_since = None
    connection.active = _bump(record)
    record.connections[connection.connection] = connection
    return PresenceChange(record, change, record.version, before, record.focused(), base, delta)


def rejoin(record: VisitorRecord, connection: ConnectionRecord) -> PresenceChange | None:
    """Register a live connection again after a backend outage: add it if
    the backend lost it, bring its data up to date if it changed meanwhile."""
    current = record.connections.get(connection.connection)
    if current is None:
        return join(record, connection)
    if (current.data, current.visible) == (connection.data, connection.visible):
        return None
    before, base = record.focused(), record.version
    changed: ConnectionDelta = {"connection": current.connection, "visible": connection.visible}
    changed["data"] = {**dict.fromkeys(current.data), **connection.data}  # what it lost: nil
    current.data, current.visible = connection.data, connection.visible
    return PresenceChange(record, "data", _bump(record), before, record.focused(), base, [changed])


def update(
    record: VisitorRecord, connection: str, data: dict[str, Any] | None, visible: bool | None
) -> PresenceChange | None:
    """Merge presence data (None deletes a field) and/or set visibility.
    Publishing data or becoming visible is activity: it takes focus, unless
    the connection is hidden while another is visible (agents hear ``focus``
    when that is all that changed). A frame that changes nothing changes no
    version."""
    conn = record.connections.get(connection)
    if conn is None:
        return None
    before, base = record.focused(), record.version
    changed: ConnectionDelta = {"connection": connection}
    different = {key: value for key, value in (data or {}).items() if conn.data.get(key) != value}
    if different:
        merged = {**conn.data, **different}
        conn.data = {key: value for key, value in merged.items() if value is not None}
        changed["data"] = different
    if visible is not None and visible != conn.visible:
        conn.visible = changed["visible"] = visible
    active = bool(data or visible)
    if len(changed) == 1 and not (active and before is not conn and _may_take_focus(record, conn)):
        return None  # the same data, the same visibility, the focus where it was
    version = _bump(record)
    if active:
        conn.active = version
    change = "data" if different else "visibility" if "visible" in changed else "focus"
    return PresenceChange(record, change, version, before, record.focused(), base, [changed])


def _may_take_focus(record: VisitorRecord, conn: ConnectionRecord) -> bool:
    """Whether activity gives ``conn`` focus: it is visible, or none is."""
    return conn.visible or not any(c.visible for c in record.connections.values())


def leave(record: VisitorRecord, connection: str) -> PresenceChange | None:
    """A connection ends. The last one leaves the visitor away, not offline:
    agents hear nothing until ``expire_away`` (or its return)."""
    if connection not in record.connections:
        return None
    before, base = record.focused(), record.version
    del record.connections[connection]
    version = _bump(record)
    if record.connections:
        return PresenceChange(record, "connections", version, before, record.focused(), base, [], [connection])
    record.away_since = version
    return PresenceChange(record, None, version)


def expire_away(record: VisitorRecord, away_since: int | None) -> PresenceChange | None:
    """The grace period is over: offline, unless the visitor came back (or
    left again later, which started a new grace period). ``away_since=None``
    expires whatever grace period is running."""
    if record.away_since is None or record.connections:
        return None
    if away_since is not None and record.away_since != away_since:
        return None
    record.away_since = None
    return PresenceChange(record, "offline", _bump(record))


def drop(record: VisitorRecord, connection: str) -> PresenceChange | None:
    """A connection is gone without a goodbye (its instance died, or it left
    while the backend was away): no grace period, it has been over already."""
    change = leave(record, connection)
    if change is None or record.connections:
        return change
    return expire_away(record, None)
