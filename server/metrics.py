"""Prometheus metrics, served at ``/metrics``.

One registry for the process (instances of a cluster are processes; tests
that run several apps in one process read deltas). For now it counts what
the limits refuse, labelled with the setting that did it, so an operator
sees abuse (or a limit set too low) without reading logs.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

REGISTRY = CollectorRegistry()

LIMIT_HITS = Counter(
    "herald_limit_hits",
    "Frames, requests and connections refused or closed by a limit, by the setting that set it",
    ["limit"],
    registry=REGISTRY,
)


def limit_hit(limit: str) -> None:
    LIMIT_HITS.labels(limit=limit).inc()


async def serve(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
