"""One instance: its services wired together, and what the backend calls.

The hub owns the instance's lifecycle and is the backend's listener: every
message from the bus is dispatched here, by kind, to the service that owns
it (presence and events to the watching agents, inbox messages through the
inbox's table). Services get the narrow collaborators they use, never the
hub: connections' registry, watchers, the inbox, the task supervisor, and
the backend's interfaces one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

from herald_presence.protocol.errors import CloseCode, ProtocolError
from herald_presence.server import metrics
from herald_presence.server.backends.base import Arrival, Backend, BackendUnavailable
from herald_presence.server.config import Settings
from herald_presence.server.model import names
from herald_presence.server.model.limits import AddressRates, ConnectionRate
from herald_presence.server.model.records import HeldSignal, PresenceChange
from herald_presence.server.tasks import TaskSupervisor

from .connection import AgentConnection, Connection, VisitorConnection
from .events import EventRecorder
from .expiry import Expiry
from .inbox import Inbox
from .keepalive import Keepalive
from .load import Load
from .presence import PresenceService
from .registry import LocalVisitors, Watchers
from .revocation import Revocations
from .routes import VisitorRoutes
from .session_signals import SessionSignals
from .sessions import CONSUMER_PREFIX, Sessions
from .signals import SignalRouter
from .webhooks import Webhooks

log = logging.getLogger(__name__)
T = TypeVar("T")


class Hub:
    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.instance = backend.instance_id
        self.tasks = TaskSupervisor()
        self.visitors = LocalVisitors()
        self.routes = VisitorRoutes(self._following)
        self.watchers = Watchers(backend, settings, on_unfollowed=self.routes.forget)
        self.inbox = Inbox(backend, self.instance)
        self.load = Load(settings)
        self.address_rates = AddressRates()  # what each client address's connections may send together
        # Events for the customer's back end: recorded by the services, delivered by webhooks.
        self.events = EventRecorder(settings, backend.events, self.tasks)
        self.webhooks = Webhooks(settings, backend.events, backend, self.tasks, self.instance)
        self.signals = SignalRouter(
            settings,
            backend,
            backend,
            backend,
            self.inbox,
            self.visitors,
            self.watchers,
            self.routes,
            self.load,
            self.tasks,
            events=self.events,
        )
        self.sessions = Sessions(
            settings,
            backend,
            backend,
            self.watchers,
            self.signals,
            self.instance,
            presence=backend,
            inbox=self.inbox,
            events=self.events,
        )
        self.presence = PresenceService(
            settings, backend, self.visitors, self.watchers, self.inbox, self.tasks, self._visitor_offline
        )
        # What arrives on this instance's inbox, by kind (model/names.py):
        self.inbox.on(names.DELIVER, self.signals.on_deliver)
        self.inbox.on(names.REPLY, self.signals.on_reply)
        self.inbox.on(names.PUSH, self.visitors.deliver)
        self.inbox.on(names.FOCUS, self.visitors.tell_focus)
        self.inbox.on(names.CLOSE, self.visitors.close)
        self.session_signals = SessionSignals(
            settings, self.sessions, backend, self.signals, self.watchers, self.inbox, self.tasks
        )
        self.inbox.on(names.SESSION_SIGNAL, self.session_signals.on_signal)  # arrives on a session's topic
        # A group's back end cutting visitors and agents off, and credentials running out:
        self.revocations = Revocations(settings, backend, backend, backend, self.inbox, self.watchers)
        self.inbox.on(names.REVOKE, self.revocations.on_revoke)  # arrives on an agent's topic
        self.expiry = Expiry(settings, backend, self.tasks)
        self.keepalive = Keepalive(settings.keepalive)
        self.connection_rate = ConnectionRate(settings.connections_per_address)
        self.draining = False  # SIGTERM came: not ready, no new connections

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self.tasks.spawn(self.load.measure(), "load")
        await self.backend.start(self)
        self.tasks.spawn(self.webhooks.run(), "webhooks")
        # Without the backend yet, the subscription is still recorded and
        # made when it comes back: the instance starts degraded, not dead.
        with contextlib.suppress(BackendUnavailable):
            await self.backend.subscribe(names.inbox_topic(self.instance))

    async def close(self) -> None:
        self.expiry.close()
        self.keepalive.close()
        await self.tasks.close()
        await self.backend.close()

    @property
    def ready(self) -> bool:
        """The backend reachable (its bus subscription proven), and not draining."""
        return self.backend.healthy and not self.draining

    def connections(self) -> list[Connection]:
        return [*self.visitors.all(), *self.watchers.agents()]

    # -- connections -------------------------------------------------------------
    def arrival(self, group: str, visitor: str) -> Arrival:
        """What a visitor connection's registration checks and reads in its
        own atomic step: the back end's refusal of the visitor, its live
        session's index, whether signals wait for it (``release_held``)."""
        return Arrival(Revocations.refusal_key(group, visitor), names.session_by_visitor(group, visitor))

    async def release_held(
        self, conn: VisitorConnection, held_session: str | None = None, arrival: Arrival | None = None
    ) -> None:
        """After the welcome: the visitor's live session follows this
        connection (or, if the session its hello named ended meanwhile, it
        hears so), and signals held while it was away are delivered. What
        the registration read (``arrival``) saves the round trip, else both
        are read now, in one batch."""
        consumer = conn.subject.startswith(CONSUMER_PREFIX)  # a consumer attaches with its token
        live: str | BaseException | None
        taken: list[tuple[HeldSignal, bool]] | BaseException
        if arrival is not None and arrival.read:
            live = arrival.session.decode() if arrival.session is not None else None
            taken = await _outcome(self.signals.take_held(conn)) if arrival.held else []
        else:
            live, taken = await asyncio.gather(
                _nothing() if consumer else self.sessions.live_session(conn),
                self.signals.take_held(conn),
                return_exceptions=True,
            )
        for outcome in (live, taken):
            if isinstance(outcome, BaseException) and not isinstance(outcome, BackendUnavailable):
                raise outcome
        if not consumer and not isinstance(live, BaseException):
            with contextlib.suppress(BackendUnavailable):
                await self.sessions.visitor_connected(conn, held_session, live)
        # Not taken (the backend away): they stay held, and their senders hear of it.
        if not isinstance(taken, BaseException):
            with contextlib.suppress(BackendUnavailable):  # a sender's reply lost: it hears delivery_failed
                await self.signals.release_held(conn, taken)

    async def agent_joined(self, agent: AgentConnection) -> None:
        metrics.connection_opened(agent.role)
        with contextlib.suppress(BackendUnavailable):  # recorded; made when the backend is back
            await self.watchers.watch(agent, [names.agent_topic(agent.group, agent.subject)])

    async def agent_left(self, agent: AgentConnection) -> None:
        metrics.CONNECTIONS.labels(role=agent.role).dec()
        for session in list(agent.sessions):  # its guest seats go with it
            with contextlib.suppress(ProtocolError):
                await self.sessions.leave(agent, session)
        await self.watchers.unwatch(agent, list(agent.topics))

    def _following(self, topic: str) -> bool:
        return self.watchers.following(topic)

    async def _visitor_offline(self, group: str, visitor: str) -> None:
        await self.sessions.end_visitor_session(group, visitor, "visitor_offline")

    # -- the backend's listener ------------------------------------------------------
    def on_bus_message(self, topic: str, message: bytes) -> None:
        try:
            item = names.unpack(message)  # indexed, not re-packed: this runs for every bus message
            kind = item[0]
            if kind == names.PRESENCE:  # [kind, group, visitor, version, frame or nil, route or nil]
                self.routes.heard(item[1], item[2], item[3], item[5])
                if item[4] is not None:
                    self.watchers.deliver(topic, item[2], item[3], item[4])
            elif kind == names.EVENT:  # [kind, group, visitor, frame, dedupe]
                self.watchers.deliver(topic, item[2], None, item[3], item[4])
            else:
                self.inbox.dispatch(item)
        except Exception:
            log.exception("dropping bad bus message on %s", topic)

    def announcement(self, change: PresenceChange) -> list[tuple[str, bytes]]:
        return self.presence.announcement(change)

    def presence_changed(self, change: PresenceChange) -> None:
        self.presence.changed(change)

    async def registrations_lost(self) -> None:
        await self.presence.restore()

    async def backend_restored(self) -> None:
        """The cluster backend is back after an outage: what we registered may
        be gone or stale, and agents may have missed changes."""
        metrics.BACKEND_RECONNECTS.inc()
        self.routes.clear()  # the bus was down: changes may have been missed
        await self.presence.restore()
        # Changes published while the bus was down never reached the agents
        # that watch something: they reconnect and start again from a fresh
        # snapshot, once the requests they have in hand are answered. An agent
        # that only has its own topic missed nothing it could act on (its
        # revocation cannot be made while the backend is away) and stays.
        for agent in self.watchers.agents():
            if agent.topics - {names.agent_topic(agent.group, agent.subject)}:  # visitors, the group, sessions
                agent.leave(CloseCode.RECONNECT, "resync after a cluster backend outage")


async def _nothing() -> None:
    return None


async def _outcome(work: Awaitable[T]) -> T | BaseException:
    """``work``'s result, or the exception it raised (as ``gather`` with ``return_exceptions``)."""
    try:
        return await work
    except Exception as exc:
        return exc
