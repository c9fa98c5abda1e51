"""A group's back end cutting someone off: visitors disconnected (and maybe
refused a while), agents' logins revoked, on every instance.

* A visitor: each of its connections, wherever it is, gets an ``error
  revoked`` and close 4505 through its instance's inbox (``PUSH`` then
  ``CLOSE``, in that order on one topic). A refusal is a record with a TTL
  (``names.refused_visitor``) that the hello checks; it is written before
  the connections are looked up, so a connection either is found or checks
  the refusal after it was written (a second look-up catches one that joined
  while the first ran).
* An agent: a "not before" moment (``names.agent_not_before``) that every
  login cookie issued earlier fails against at the upgrade, kept as long
  as a cookie lives; and a ``REVOKE`` on the agent's topic, which every
  instance holding a connection of that agent subscribes to, closing those
  whose login is older.
"""

from __future__ import annotations

import logging
import math
import time

from herald_presence.protocol.errors import CloseCode, ErrorCode, ProtocolError
from herald_presence.server.backends.base import Bus, PresenceStore, RecordStore
from herald_presence.server.config import Settings
from herald_presence.server.model import names

from .connection import error_frame
from .inbox import Inbox
from .registry import Watchers

log = logging.getLogger(__name__)

MAX_REFUSAL = 86400.0  # a visitor is refused at most a day per call


class Revocations:
    def __init__(
        self,
        settings: Settings,
        records: RecordStore,
        bus: Bus,
        presence: PresenceStore,
        inbox: Inbox,
        watchers: Watchers,
    ) -> None:
        self._settings = settings
        self._records = records
        self._bus = bus
        self._presence = presence
        self._inbox = inbox
        self._watchers = watchers

    # -- visitors --------------------------------------------------------------
    @staticmethod
    def refusal_key(group: str, visitor: str) -> str:
        """The record that refuses this visitor while it exists: checked in
        the same atomic step that registers its connection
        (``PresenceService.visitor_joined``)."""
        return names.refused_visitor(group, visitor)

    @staticmethod
    def refused(until: bytes) -> ProtocolError:
        """What a refused visitor's hello is answered (``until``: the refusal record's value)."""
        left = max(1, math.ceil(float(until) - time.time()))
        return ProtocolError(ErrorCode.REVOKED, f"this visitor is refused for {left} more seconds")

    async def disconnect_visitor(self, group: str, visitor: str, refuse_for: float, reason: str) -> tuple[int, float]:
        """Close every connection of the visitor; with ``refuse_for`` > 0 its
        hellos are refused that long (replacing an earlier refusal). Returns
        (connections told to close, refused until or 0)."""
        until = 0.0
        if refuse_for > 0:
            until = time.time() + refuse_for
            key = names.refused_visitor(group, visitor)
            await self._records.kv_set(key, repr(until).encode(), ttl=refuse_for)
        frame = error_frame(ErrorCode.REVOKED, reason)
        closed: set[str] = set()
        for _ in range(2):  # the second look-up catches a connection that joined during the first
            record = await self._presence.visitor_record(group, visitor)
            by_instance: dict[str, list[str]] = {}
            for held in record.connections.values() if record else ():
                if held.connection not in closed:
                    by_instance.setdefault(held.instance, []).append(held.connection)
            for instance, connections in by_instance.items():
                await self._inbox.send(instance, names.PUSH, connections, frame)
                await self._inbox.send(instance, names.CLOSE, connections, int(CloseCode.REVOKED), reason[:120])
                closed.update(connections)
        log.info("visitor %s/%s disconnected by its back end: %d connections", group, visitor, len(closed))
        return len(closed), until

    # -- agents ------------------------------------------------------------------
    async def not_before(self, group: str, agent: str) -> float:
        """Logins of this agent made before this moment (unix s) are revoked; 0: none is."""
        stored = await self._records.kv_get(names.agent_not_before(group, agent))
        return float(stored) if stored else 0.0

    async def revoke_agent(self, group: str, agent: str, reason: str) -> float:
        """Revoke every login of the agent made until now and close their
        connections on every instance. Returns the "not before" moment."""
        not_before = time.time()
        key = names.agent_not_before(group, agent)
        # As long as a cookie lives (and a little more for instances whose clocks are behind).
        await self._records.kv_set(key, repr(not_before).encode(), ttl=self._settings.session_max_age + 60)
        envelope = names.envelope(names.REVOKE, group, agent, not_before, reason[:120])
        await self._bus.publish(names.agent_topic(group, agent), envelope)
        log.info("agent %s/%s: every login until now revoked by its back end", group, agent)
        return not_before

    def on_revoke(self, group: str, agent: str, not_before: float, reason: str) -> None:
        """``REVOKE`` from the bus: close this instance's connections of the
        agent whose login was made before ``not_before``."""
        frame: bytes | None = None
        for conn in self._watchers.agents():
            if conn.group == group and conn.subject == agent and conn.issued < not_before and not conn.closing:
                frame = frame or error_frame(ErrorCode.REVOKED, reason)
                conn.send(frame)
                conn.close(CloseCode.REVOKED, reason, flush=True)
