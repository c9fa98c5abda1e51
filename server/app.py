"""Builds the aiohttp application: routes, sessions, hub and backend."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from protocol.errors import CloseCode

from . import __version__, auth, http_admin, http_codes, http_crm, http_demo, logs, metrics, pages
from .backend import Backend
from .backend_memory import MemoryBackend
from .config import Settings
from .hub import Hub
from .keys import HUB, SETTINGS
from .ws_agent import agent_endpoint
from .ws_visitor import visitor_endpoint

log = logging.getLogger(__name__)


def make_backend(settings: Settings) -> Backend:
    """Redis when a URL is configured, else the embedded memory backend."""
    if not settings.redis_url:
        return MemoryBackend()
    from .backend_redis import RedisBackend

    return RedisBackend(
        settings.redis_url,
        prefix=settings.redis_prefix,
        grace_period=settings.grace_period,
        heartbeat=settings.instance_heartbeat,
        dead_after=settings.instance_dead_after,
        probe_timeout=max(3.0, settings.instance_heartbeat * 3),
    )


def make_app(settings: Settings, backend: Backend | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[HUB] = Hub(settings, backend or make_backend(settings))
    auth.setup_sessions(app, settings)
    app.router.add_get("/v1/visitor", visitor_endpoint)
    app.router.add_get("/v1/agent", agent_endpoint)
    app.router.add_post("/v1/agent/login", auth.login)
    app.router.add_post("/v1/agent/logout", auth.logout)
    http_codes.add_routes(app)
    http_admin.add_routes(app)
    http_crm.add_routes(app)
    http_demo.add_routes(app)
    pages.add_routes(app)
    app.router.add_get("/metrics", metrics.serve)
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", ready)
    app.cleanup_ctx.append(_run_hub)
    app.on_shutdown.append(_close_connections)
    return app


async def _run_hub(app: web.Application) -> AsyncIterator[None]:
    hub = app[HUB]
    logs.set_instance(hub.instance)
    await hub.start()
    log.info("herald %s instance %s ready", __version__, hub.instance)
    yield
    await hub.close()


async def _close_connections(app: web.Application) -> None:
    """Tell every client to reconnect (elsewhere) before the process stops."""
    hub = app[HUB]
    connections = [*hub.visitors.values(), *hub.agents()]
    for conn in connections:
        conn.close(CloseCode.GOING_AWAY, "server shutting down")
    for conn in connections:
        await conn.finish()


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    """Ready when the backend is reachable and its bus subscription proven,
    and not draining (load balancers stop sending clients at once)."""
    hub = request.app[HUB]
    ready = hub.backend.healthy and not hub.draining
    body = {"ready": ready, "instance": hub.instance, "backend": hub.backend.healthy, "draining": hub.draining}
    return web.json_response(body, status=200 if ready else 503)
