"""What the HTTP API shares: JSON errors, CORS, client addresses, credentials.

Errors are the protocol's error values with an HTTP status: a client sees
the same ``code`` over REST as over the websocket.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server import metrics
from herald_presence.server.config import GroupConfig, Settings, trusted_networks
from herald_presence.server.model.limits import count

from .keys import SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

STATUS = {
    ErrorCode.INVALID: 400,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.TOKEN_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.REVOKED: 403,
    ErrorCode.SESSION_NOT_FOUND: 404,
    ErrorCode.VISITOR_OFFLINE: 404,
    ErrorCode.AGENT_OFFLINE: 404,
    ErrorCode.SIGNAL_EXPIRED: 410,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.BACKEND_UNAVAILABLE: 503,
    ErrorCode.CODE_SPACE_EXHAUSTED: 503,
    ErrorCode.DRAINING: 503,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.DELIVERY_FAILED: 504,
}


SERVER_HEADER = "herald"  # instead of aiohttp's "Python/3.11 aiohttp/3.x": no versions for scanners to match


async def name_the_server(_request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer says ``Server: herald``."""
    response.headers["Server"] = SERVER_HEADER


def error_response(status: int, code: ErrorCode | str, message: str) -> web.Response:
    metrics.error(str(code))
    return web.json_response({"error": {"code": str(code), "message": message}}, status=status)


def json_errors(handler: Handler) -> Handler:
    """Turn ``ProtocolError`` into its JSON error response."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProtocolError as exc:
            count(exc)
            response = error_response(STATUS.get(exc.code, 500), exc.code, exc.message)
            if exc.code == ErrorCode.RATE_LIMITED:
                response.headers["Retry-After"] = "60"
            return response

    return wrapped


async def read_body(request: web.Request) -> bytes:
    """The request's body, which must arrive within ``request_timeout`` of its
    headers: a client trickling it gets 408 and its connection closed (a body
    that never ends would hold the connection and this handler for good)."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].request_timeout):
            return await request.read()
    except TimeoutError:
        metrics.limit_hit("request_timeout")
        metrics.error(str(ErrorCode.INVALID))
        body = json.dumps({"error": {"code": str(ErrorCode.INVALID), "message": "the request body came too slowly"}})
        raise web.HTTPRequestTimeout(
            text=body, content_type="application/json", headers={"Connection": "close"}
        ) from None


async def read_json(request: web.Request) -> dict[str, Any]:
    await read_body(request)  # aiohttp keeps it: request.json() parses what was read
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        body = None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.INVALID, "expected a JSON object")
    return body


def bearer(request: web.Request) -> str:
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "an Authorization: Bearer credential is required")
    return credential.strip()


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def group_of(settings: Settings, group_id: str) -> GroupConfig:
    group = settings.groups.get(group_id)
    if group is None:
        raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "unknown group")
    return group


# -- CORS ----------------------------------------------------------------------


def allowed_origin(request: web.Request, origins: list[str]) -> str | None:
    """The request's Origin if the group allows it (or it is Herald's own)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if origin in origins or "*" in origins or origin == f"{request.scheme}://{request.host}":
        return origin
    return None


def with_cors(response: web.StreamResponse, origin: str | None, credentials: bool = False) -> web.StreamResponse:
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        if credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
    return response


def preflight(origin: str | None, methods: str) -> web.Response:
    response = web.Response(status=204 if origin else 403)
    if origin is not None:
        with_cors(response, origin, credentials=True)
        response.headers["Access-Control-Allow-Methods"] = methods
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Max-Age"] = "600"
    return response


# -- client addresses -----------------------------------------------------------


CLIENT_ADDRESS = web.RequestKey("client_address", str)  # worked out once per request
_warned_untrusted = False  # the first X-Forwarded-For from an untrusted peer is logged; all are counted


def client_address(request: web.Request) -> str:
    """The address per-address limits count: the TCP peer, or, when the peer
    is a trusted proxy, the nearest address in X-Forwarded-For that is not
    one (the hops further left were written by the client and prove nothing)."""
    found = request.get(CLIENT_ADDRESS)
    if found is None:
        found = request[CLIENT_ADDRESS] = _client_address(request)
    return found


def _client_address(request: web.Request) -> str:
    peer = request.remote or "unknown"
    trusted = trusted_networks(request.app[SETTINGS].trusted_proxies)
    if not trusted or not _within(peer, trusted):
        if "X-Forwarded-For" in request.headers:
            _untrusted_forwarded_for(peer)
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", []) for hop in value.split(",")]
    for hop in reversed([hop for hop in hops if hop]):
        if not _within(hop, trusted):
            return hop if _is_address(hop) else peer
    return peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _within(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _untrusted_forwarded_for(peer: str) -> None:
    """A proxy Herald was not told to trust is the usual reason for this
    header from an untrusted peer; then every client behind it shares its
    per-address limits. Said once, then counted (clients that reach Herald
    directly may send the header too)."""
    global _warned_untrusted
    metrics.UNTRUSTED_FORWARDED.inc()
    if not _warned_untrusted:
        _warned_untrusted = True
        log.warning(
            "a request from %s carries X-Forwarded-For, but %s is not in trusted_proxies: the header is ignored"
            " and per-address limits count %s itself. If it is your load balancer or ingress, add its address"
            " or network to trusted_proxies (HERALD_TRUSTED_PROXIES), or all its clients share one budget."
            " Further ones are only counted (herald_untrusted_forwarded_for_total)",
            peer,
            peer,
            peer,
        )
