"""``GET /v1/agent``: an agent's connection (needs a login session)."""

from __future__ import annotations

import contextlib
import logging
import time

from aiohttp import web

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import (
    Ack,
    JoinSession,
    LeaveSession,
    Lookup,
    Message,
    Refresh,
    SessionSignal,
    Signal,
    Subscribe,
    Unsubscribe,
    WaitSession,
)
from herald_presence.server import logs, metrics
from herald_presence.server.backends.base import BackendUnavailable
from herald_presence.server.core.connection import AgentConnection
from herald_presence.server.core.signals import SignalRouter

from . import auth
from .http_common import client_address, error_response
from .keys import CREDENTIALS, EXPIRY, HUB, PRESENCE, REVOCATIONS, SESSION_SIGNALS, SESSIONS, SETTINGS, SIGNALS
from .websocket import (
    FrameServer,
    answering_errors,
    open_websocket,
    read_hello,
    refuse,
    refused_before_upgrade,
    relay_session_signal,
)

log = logging.getLogger(__name__)
FRAMES = web.AppKey("agent_frames", FrameServer[AgentConnection])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/agent", agent_endpoint)
    app[FRAMES] = FrameServer(app, _handle, _gone)


async def agent_endpoint(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings, hub = app[SETTINGS], app[HUB]
    refused = refused_before_upgrade(request, hub)
    if refused is not None:
        return refused
    login = await auth.agent_login(request)
    if login is None:
        return error_response(401, ErrorCode.UNAUTHORIZED, "log in at /v1/agent/login first")
    group, agent_id = login.group, login.agent
    if not await auth.origin_allowed(request, group):
        return error_response(403, ErrorCode.FORBIDDEN, "origin not allowed for this group")
    wire = open_websocket(request, settings)
    try:
        _hello, version = await read_hello(wire, settings)
    except ProtocolError as exc:
        return refuse(wire, exc)
    agent = AgentConnection(wire, group.id, agent_id, settings.queue_limits, issued=login.issued)
    logs.CONNECTION.set(agent.id)  # this handler's log lines (and its tasks') name it
    return await app[FRAMES].serve_after(agent, client_address(request), _welcomed(app, agent, version, login.expires))


async def _welcomed(app: web.Application, agent: AgentConnection, version: int, expires: float) -> bool:
    """The rest of the handshake: watching its own topic, the welcome.
    False: its logins were revoked meanwhile (closed)."""
    await app[HUB].agent_joined(agent)
    if await _revoked_meanwhile(app, agent):
        return False
    app[FRAMES].greet(agent, version, expires, agent=agent.subject)
    return True


async def _gone(app: web.Application, agent: AgentConnection) -> None:
    """Once its socket is gone (or its handshake failed after it joined)."""
    await app[HUB].agent_left(agent)


async def _revoked_meanwhile(app: web.Application, agent: AgentConnection) -> bool:
    """A revocation published after the upgrade's check and before this
    connection watched its agent's topic missed it: checked once more, now
    that the topic is watched (closed if so)."""
    with contextlib.suppress(BackendUnavailable):
        if agent.issued < await app[REVOCATIONS].not_before(agent.group, agent.subject):
            refuse(agent.wire, ProtocolError(ErrorCode.REVOKED, "this agent's logins were revoked"))
            return True
    return False


async def _handle(app: web.Application, agent: AgentConnection, message: Message) -> None:
    if isinstance(message, Signal):
        if message.visitor is None:
            raise ProtocolError(ErrorCode.INVALID, "visitor: is required")
        # Delivery may wait for a reconnecting visitor: never block this loop.
        app[HUB].tasks.spawn(
            answering_errors(agent, message.id, _signal(app[SIGNALS], agent, message)),
            f"signal-{agent.id}-{message.id}",
        )
    elif isinstance(message, Subscribe | Unsubscribe):
        if not message.visitors and not message.group:
            raise ProtocolError(ErrorCode.INVALID, "name visitors, or set group")
        if isinstance(message, Subscribe):
            await app[PRESENCE].subscribe(agent, message.id, message.visitors or [], bool(message.group))
        else:
            await app[PRESENCE].unsubscribe(agent, message.visitors or [], bool(message.group))
            agent.send_message(Ack(id=message.id))
    elif isinstance(message, Lookup):
        await app[PRESENCE].lookup(agent, message.id, message.visitor)
    elif isinstance(message, WaitSession):
        await app[SESSIONS].wait(agent, message.key)
        agent.send_message(Ack(id=message.id))
        await app[SESSIONS].tell_if_live(agent, message.key)
    elif isinstance(message, JoinSession):
        join = app[SESSIONS].join(agent, message.id, key=message.key, code=message.code, session=message.session)
        agent.send_message(await join)
    elif isinstance(message, LeaveSession):
        await app[SESSIONS].leave(agent, message.session)
        agent.send_message(Ack(id=message.id))
    elif isinstance(message, SessionSignal):
        await relay_session_signal(agent, message, app[SESSION_SIGNALS], app[HUB].tasks)
    elif isinstance(message, Refresh):
        agent.send_message(await _refresh(app, agent, message))
    else:
        raise ProtocolError(ErrorCode.INVALID, f"{message.TYPE} is not an agent message")


async def _refresh(app: web.Application, agent: AgentConnection, message: Refresh) -> Ack:
    """A fresh login key of the same agent lets the connection live
    ``session_max_age`` more, as a new login would."""
    group = app[SETTINGS].groups[agent.group]
    await app[CREDENTIALS].verify(group, tokens.AGENT, agent.subject, message.token)
    with contextlib.suppress(BackendUnavailable):
        if agent.issued < await app[REVOCATIONS].not_before(agent.group, agent.subject):
            raise ProtocolError(ErrorCode.REVOKED, "this agent's logins were revoked")
    expires = time.time() + app[SETTINGS].session_max_age
    app[EXPIRY].watch(agent, expires)
    return Ack(id=message.id, expires=expires)


async def _signal(signals: SignalRouter, agent: AgentConnection, message: Signal) -> None:
    assert message.visitor is not None
    agent.note_signalled(message.visitor)  # the visitor may answer this agent by name
    started, outcome = time.perf_counter(), "error"
    try:
        delivered = await signals.to_visitor(agent.group, agent.subject, message)
        outcome = "delivered"
    finally:
        metrics.signal_answered(outcome, time.perf_counter() - started)
    if message.id is not None:
        agent.send_message(Ack(id=message.id, delivered=delivered))
