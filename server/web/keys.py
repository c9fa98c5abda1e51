"""Typed keys for what the application holds: the settings, the instance,
and each service a handler may use (handlers take what they need, by name)."""

from __future__ import annotations

from aiohttp import web

from herald_presence.server.backends.base import EventLog, RecordStore
from herald_presence.server.config import Settings
from herald_presence.server.core.expiry import Expiry
from herald_presence.server.core.hub import Hub
from herald_presence.server.core.presence import PresenceService
from herald_presence.server.core.revocation import Revocations
from herald_presence.server.core.session_signals import SessionSignals
from herald_presence.server.core.sessions import Sessions
from herald_presence.server.core.signals import SignalRouter
from herald_presence.server.core.webhooks import Webhooks

from .credentials import Credentials

SETTINGS = web.AppKey("settings", Settings)
HUB = web.AppKey("hub", Hub)  # the instance: lifecycle, readiness, admission
PRESENCE = web.AppKey("presence", PresenceService)
SIGNALS = web.AppKey("signals", SignalRouter)
SESSIONS = web.AppKey("sessions", Sessions)
SESSION_SIGNALS = web.AppKey("session_signals", SessionSignals)
RECORDS = web.AppKey("records", RecordStore)
REVOCATIONS = web.AppKey("revocations", Revocations)
EXPIRY = web.AppKey("expiry", Expiry)
CREDENTIALS = web.AppKey("credentials", Credentials)  # v1 tokens and JWTs, with each group's public keys
EVENT_LOG = web.AppKey("event_log", EventLog)  # each group's events: the audit trail (webhooks deliver them)
WEBHOOKS = web.AppKey("webhooks", Webhooks)


def install(app: web.Application, settings: Settings, hub: Hub) -> None:
    app[SETTINGS] = settings
    app[HUB] = hub
    app[PRESENCE] = hub.presence
    app[SIGNALS] = hub.signals
    app[SESSIONS] = hub.sessions
    app[SESSION_SIGNALS] = hub.session_signals
    app[RECORDS] = hub.backend
    app[REVOCATIONS] = hub.revocations
    app[EXPIRY] = hub.expiry
    app[CREDENTIALS] = Credentials(settings)
    app[EVENT_LOG] = hub.backend.events
    app[WEBHOOKS] = hub.webhooks
