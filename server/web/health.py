"""Liveness, readiness and metrics: what load balancers, Kubernetes and
Prometheus ask an instance. With ``metrics_port`` they are also served on a
listener of their own, for operators only, and ``/metrics`` leaves the
public port."""

from __future__ import annotations

from aiohttp import web

from herald_presence.server import __version__, metrics

from .http_common import name_the_server
from .keys import HUB


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    """Ready when the backend is reachable and its bus subscription proven,
    and not draining (load balancers stop sending clients at once)."""
    hub = request.app[HUB]
    ready = hub.ready
    body = {"ready": ready, "instance": hub.instance, "backend": hub.backend.healthy, "draining": hub.draining}
    return web.json_response(body, status=200 if ready else 503)


async def serve_metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    body, content_type = metrics.exposition(hub.backend.healthy, hub.draining)
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def add_routes(app: web.Application, metrics: bool = True) -> None:
    """Health on every listener; ``/metrics`` only where asked (not on the
    public port when a ``metrics_port`` listener serves it)."""
    if metrics:
        app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", health)
    app.router.add_get("/readyz", ready)


def metrics_app(served: web.Application) -> web.Application:
    """The application of the ``metrics_port`` listener: ``/metrics``,
    ``/healthz`` and ``/readyz`` of the instance that ``served`` runs (which
    starts and stops it; this one only reads it)."""
    app = web.Application(client_max_size=1024)
    app[HUB] = served[HUB]
    app.on_response_prepare.append(name_the_server)
    add_routes(app)
    return app
