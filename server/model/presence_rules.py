"""Presence rules as pure functions on a ``VisitorRecord``.

Both backends load a record, apply one of these, and store the result
atomically (with the announcement that goes with it), so the rules live in
exactly one place. Each function returns the ``PresenceChange`` it made, or
None when nothing changed.
"""

from __future__ import annotations

import time
from typing import Any

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


def join(record: VisitorRecord, connection: ConnectionRecord, limit: int | None = None) -> PresenceChange:
    """A connection arrives; it takes focus. A visitor that was away (in its
    grace period) comes back without agents seeing it leave. ``limit`` caps
    the visitor's connections (checked atomically with the join)."""
    if limit is not None and len(record.connections) >= limit:
        raise ConnectionLimit(limit)
    change = "connections" if record.online else "online"
    before = record.focused()
    record.away_since = None
    connection.active = _bump(record)
    record.connections[connection.connection] = connection
    return PresenceChange(record, change, record.version, before, connection)


def rejoin(record: VisitorRecord, connection: ConnectionRecord) -> PresenceChange | None:
    """Register a live connection again after a backend outage: add it if
    the backend lost it, bring its data up to date if it changed meanwhile."""
    current = record.connections.get(connection.connection)
    if current is None:
        return join(record, connection)
    if (current.data, current.visible) == (connection.data, connection.visible):
        return None
    before = record.focused()
    current.data, current.visible = connection.data, connection.visible
    return PresenceChange(record, "data", _bump(record), before, record.focused())


def update(
    record: VisitorRecord, connection: str, data: dict[str, Any] | None, visible: bool | None
) -> PresenceChange | None:
    """Merge presence data (None deletes a field) and/or set visibility.
    Publishing data or becoming visible is activity: it takes focus."""
    conn = record.connections.get(connection)
    if conn is None:
        return None
    before = record.focused()
    change = None
    if data:
        merged = {**conn.data, **data}
        conn.data = {key: value for key, value in merged.items() if value is not None}
        change = "data"
    if visible is not None and visible != conn.visible:
        conn.visible = visible
        change = change or "visibility"
    version = _bump(record)
    if data or visible:
        conn.active = version
    return PresenceChange(record, change, version, before, record.focused())


def leave(record: VisitorRecord, connection: str) -> PresenceChange | None:
    """A connection ends. The last one leaves the visitor away, not offline:
    agents hear nothing until ``expire_away``."""
    if connection not in record.connections:
        return None
    before = record.focused()
    del record.connections[connection]
    version = _bump(record)
    if record.connections:
        return PresenceChange(record, "connections", version, before, record.focused())
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
