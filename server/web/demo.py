"""Credentials for Herald's demo pages, in demo mode only.

A real deployment's back end mints visitor tokens and agent keys with the
group's secret; Herald never does. But a first-time user who runs ``herald
serve`` with no configuration has no back end yet, and the console and
visitor demo pages should just work. So while the server runs its demo
group (made because no group was configured, ``GroupConfig.demo``), this
route mints short-lived credentials for that group, and only for clients
on this machine: a zero-config server started with ``--host 0.0.0.0``
hands nothing to the network. For any configured group the route does not
exist (404, the same answer as an unknown path), whatever is asked.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

from herald_presence.protocol import checks, tokens
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.config import GroupConfig

from .http_common import allowed_origin, client_address, json_errors, read_json
from .keys import SETTINGS

VISITOR_TTL = 3600  # seconds; the demo visitor page reconnects with a fresh one anyway
AGENT_KEY_TTL = 300  # a login key is traded for the session cookie at once


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _demo_group(request: web.Request) -> GroupConfig:
    """The demo group, for a client on this machine asking this machine by a
    loopback name; 404 otherwise. The client is the one per-address limits
    count (behind a trusted proxy: the client it names, not the proxy), and
    the Host must be a loopback name too: a page of ``evil.example`` whose
    name resolves to 127.0.0.1 (DNS rebinding) is its own origin and would
    otherwise pass as Herald's own page."""
    demo = next((group for group in request.app[SETTINGS].groups.values() if group.demo), None)
    host = request.host or ""
    host = host[: host.find("]") + 1] if host.startswith("[") else host.rsplit(":", 1)[0]
    if demo is None or not _is_loopback(client_address(request)) or host not in LOOPBACK_NAMES:
        raise web.HTTPNotFound()
    return demo


async def demo_info(request: web.Request) -> web.StreamResponse:
    """``GET /demo/credentials`` -> ``{"group"}``: the pages ask whether to offer demo credentials."""
    return web.json_response({"group": _demo_group(request).id})


@json_errors
async def demo_credentials(request: web.Request) -> web.StreamResponse:
    """``POST /demo/credentials`` with ``{"role": "visitor"|"agent", "id"}`` ->
    ``{"group", "role", "id", "token"}``, signed with the demo group's secret."""
    demo = _demo_group(request)
    if "Origin" in request.headers and allowed_origin(request, []) is None:
        raise ProtocolError(ErrorCode.FORBIDDEN, "only Herald's own pages may ask for demo credentials")
    body = await read_json(request)
    role, subject = body.get("role"), checks.identifier(body.get("id"), "id")
    if role == tokens.VISITOR:
        token = tokens.visitor_token(demo.secrets[0], demo.id, subject, VISITOR_TTL)
    elif role == tokens.AGENT:
        token = tokens.agent_key(demo.secrets[0], demo.id, subject, AGENT_KEY_TTL)
    else:
        raise ProtocolError(ErrorCode.INVALID, "role: must be visitor or agent")
    return web.json_response({"group": demo.id, "role": role, "id": subject, "token": token})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/demo/credentials", demo_info)
    app.router.add_post("/demo/credentials", demo_credentials)
