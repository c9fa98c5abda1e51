"""Builds the aiohttp application: the backend, the instance, the routes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from herald_presence.protocol.errors import CloseCode
from herald_presence.server import logs
from herald_presence.server.backends.base import Backend
from herald_presence.server.backends.memory import MemoryBackend
from herald_presence.server.config import Settings
from herald_presence.server.core.hub import Hub
from herald_presence.server.core.wire import CLOSE_TIMEOUT
from herald_presence.server.web import (
    admin,
    agent_ws,
    auth,
    codes,
    control,
    crm,
    demo,
    events,
    health,
    keys,
    openapi,
    pages,
    visitor_ws,
)
from herald_presence.server.web.http_common import name_the_server

log = logging.getLogger(__name__)


def make_backend(settings: Settings) -> Backend:
    """Redis when a URL is configured, else the embedded memory backend."""
    if not settings.redis_url:
        return MemoryBackend()
    from herald_presence.server.backends.redis import RedisBackend

    return RedisBackend(
        settings.redis_url,
        prefix=settings.redis_prefix,
        grace_period=settings.grace_period,
        heartbeat=settings.instance_heartbeat,
        dead_after=settings.instance_dead_after,
        probe_timeout=max(3.0, settings.instance_heartbeat * 3),
        ca_file=settings.redis_ca_file,
    )


def make_app(settings: Settings, backend: Backend | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    keys.install(app, settings, Hub(settings, backend or make_backend(settings)))
    auth.setup_sessions(app, settings)
    app.router.add_post("/v1/agent/login", auth.login)
    app.router.add_post("/v1/agent/logout", auth.logout)
    for routes in (visitor_ws, agent_ws, codes, admin, crm, control, events, demo, pages, openapi):
        routes.add_routes(app)
    health.add_routes(app, metrics=not settings.metrics_port)  # else on the metrics listener only
    app.on_response_prepare.append(name_the_server)
    app.cleanup_ctx.append(_run_hub)
    app.on_shutdown.append(_close_connections)
    return app


async def _run_hub(app: web.Application) -> AsyncIterator[None]:
    hub = app[keys.HUB]
    logs.set_instance(hub.instance)
    await hub.start()  # the process says "ready" once it listens too (runner.py)
    yield
    await hub.close()


async def _close_connections(app: web.Application) -> None:
    """Tell every client to reconnect (elsewhere) before the process stops."""
    connections = app[keys.HUB].connections()
    for conn in connections:
        conn.close(CloseCode.GOING_AWAY, "server shutting down")
    for conn in connections:
        await conn.finish()
    # Each socket gone, its endpoint lets go of it (presence, watchers): before the hub closes.
    cleanups = [conn.serving for conn in connections if conn.serving is not None]
    if cleanups:
        await asyncio.wait(cleanups, timeout=CLOSE_TIMEOUT)
