"""Graceful drain: move every client to another instance, then stop.

On SIGTERM an instance stops being ready (load balancers and Kubernetes
take it out of rotation), stops listening (a new client's connect fails
over to another instance at once), and asks each connection to reconnect
at a random moment within ``drain_spread`` so that the rest of the cluster
is not hit by all of them at once. A connection leaves only after the
requests in hand are answered and its queued frames are written, so
nothing it was promised is lost. A visitor that moves keeps its presence:
its grace period covers the gap, and agents see no offline. Whatever is
still open at ``drain_timeout`` is closed at once. In memory mode the
webhooks' events live in the process: they get the rest of the drain to be
delivered, and what is still undelivered then is logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from aiohttp import web

from herald_presence.protocol.errors import CloseCode
from herald_presence.server.core.hub import Hub
from herald_presence.server.web.keys import HUB

log = logging.getLogger(__name__)

POLL = 0.05  # seconds between looks at what is still connected
CLOSE_MARGIN = 2.5  # seconds kept back from the deadline for the final closes and cleanup


async def drain(app: web.Application, sites: list[web.BaseSite]) -> float:
    """Drain ``app`` served on ``sites``; returns the seconds it took. The
    caller then cleans the runner up (that closes what is left with 1001)."""
    hub: Hub = app[HUB]
    settings = hub.settings
    started = time.monotonic()
    hub.draining = True
    for site in sites:
        await site.stop()
    budget = max(0.0, settings.drain_timeout - CLOSE_MARGIN)
    # Half the budget at most, so that the last to be asked still have time to go.
    spread = min(settings.drain_spread, budget / 2)
    connections = hub.connections()
    log.info("draining: moving %d connections over %.1fs", len(connections), spread)
    loop = asyncio.get_running_loop()
    handles = [
        loop.call_later(random.uniform(0, spread), conn.leave, CloseCode.RECONNECT, "server draining")
        for conn in connections
    ]
    asked = {conn.id for conn in connections}
    while remaining := hub.connections():
        if time.monotonic() - started >= budget:
            log.warning("drain deadline: closing %d connections now", len(remaining))
            break
        for conn in remaining:
            if conn.id not in asked:  # its handshake was under way when the listener closed
                asked.add(conn.id)
                conn.leave(CloseCode.RECONNECT, "server draining")
        await asyncio.sleep(POLL)
    for handle in handles:
        handle.cancel()
    if not hub.backend.events.durable:  # memory mode: what webhooks have not delivered dies with us
        await hub.webhooks.flush(started + budget)
    took = time.monotonic() - started
    log.info("drained in %.2fs", took)
    return took
