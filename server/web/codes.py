"""Short codes over HTTP, for pages that only have JavaScript.

The consumer's page creates a code, redeems it at once for its session
token (once only: a code that was redeemed cannot be redeemed again, so a
guessed code is worth nothing after the few milliseconds between the two
calls), shows the code, and connects to ``/v1/visitor`` with the token.
The agent types the code and joins the same session.

Two route families: the native ``/v1/groups/{group}/codes...`` and the
shape existing Live Assist consumer pages call
(``/assistserver/shortcode/...``).

Consumer codes are a feature a group opts into (``allow_consumer_codes``):
for any other group the create and redeem routes answer 403 ``forbidden``
before anything is counted or made, since whoever holds a code becomes the
visitor of its session. The agents' look-up routes serve every group.
"""

from __future__ import annotations

from aiohttp import web

from herald_presence.protocol import checks
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.config import GroupConfig
from herald_presence.server.core.group_settings import consumer_codes_allowed
from herald_presence.server.core.short_codes import limit_lookups
from herald_presence.server.model.records import SupportSession

from . import auth
from .http_common import allowed_origin, client_address, group_of, json_errors, preflight, with_cors
from .keys import RECORDS, SESSIONS, SETTINGS


async def _origin(request: web.Request, group: GroupConfig) -> str | None:
    return allowed_origin(request, await auth.allowed_origins(request, group))


async def _consumer_origin(request: web.Request, group: GroupConfig) -> str | None:
    """The consumer page's origin; a browser page of a foreign origin is
    refused, and so is everyone for a group that takes no consumer codes."""
    origin = await _origin(request, group)
    if "Origin" in request.headers and origin is None:
        raise ProtocolError(ErrorCode.FORBIDDEN, "origin not allowed for this group")
    if not await consumer_codes_allowed(request.app[RECORDS], request.app[SETTINGS], group.id):
        raise ProtocolError(ErrorCode.FORBIDDEN, "this group takes no short codes from consumer pages")
    return origin


async def _create(request: web.Request, group: GroupConfig) -> tuple[SupportSession, str | None]:
    """A new random-key session for a consumer."""
    origin = await _consumer_origin(request, group)
    await _count_lookup(request, group.id)
    return await request.app[SESSIONS].create_for_consumer(group.id), origin


async def _redeem(request: web.Request, group: GroupConfig, code: str) -> tuple[SupportSession, str, str | None]:
    origin = await _consumer_origin(request, group)
    await _count_lookup(request, group.id)
    redeemed = await request.app[SESSIONS].redeem(group.id, code)
    if redeemed is None:
        raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "unknown, expired or already used code")
    return *redeemed, origin


async def _agent_lookup(request: web.Request, code: str, group_id: str | None) -> SupportSession:
    """The session behind a code, for a logged-in agent of its group."""
    identity = await auth.agent_identity(request)
    if identity is None:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "log in at /v1/agent/login first")
    group, _agent = identity
    if group_id is not None and group_id != group.id:
        raise ProtocolError(ErrorCode.FORBIDDEN, "this agent belongs to another group")
    await auth.require_origin(request, group)
    await _count_lookup(request, group.id)
    return await request.app[SESSIONS].find(group.id, key=None, code=code, session=None)


async def _count_lookup(request: web.Request, group: str) -> None:
    await limit_lookups(request.app[RECORDS], request.app[SETTINGS], group, client_address(request))


def _code(value: str | None) -> str:
    if not value or not value.isdigit() or len(value) > 12:
        raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "unknown, expired or already used code")
    return value


# -- native --------------------------------------------------------------------


@json_errors
async def create_code(request: web.Request) -> web.StreamResponse:
    """``POST /v1/groups/{group}/codes`` -> 201 ``{"code", "session"}``."""
    group = group_of(request.app[SETTINGS], request.match_info["group"])
    session, origin = await _create(request, group)
    return with_cors(web.json_response({"code": session.code, "session": session.id}, status=201), origin)


@json_errors
async def redeem_code(request: web.Request) -> web.StreamResponse:
    """``GET /v1/groups/{group}/codes/{code}`` -> ``{"session", "session_token"}``."""
    group = group_of(request.app[SETTINGS], request.match_info["group"])
    session, token, origin = await _redeem(request, group, _code(request.match_info["code"]))
    return with_cors(web.json_response({"session": session.id, "session_token": token}), origin)


@json_errors
async def agent_code(request: web.Request) -> web.StreamResponse:
    """``GET /v1/groups/{group}/codes/{code}/agent`` -> ``{"session", "key", "visitor"}``."""
    session = await _agent_lookup(request, _code(request.match_info["code"]), request.match_info["group"])
    return web.json_response({"session": session.id, "key": session.key, "visitor": session.visitor})


# -- Live Assist compatible ------------------------------------------------------


def _compat_group(request: web.Request) -> GroupConfig:
    """``?group=`` names the group; with one group configured it may be left out."""
    settings = request.app[SETTINGS]
    group_id = request.query.get("group")
    if group_id is None:
        if len(settings.groups) != 1:
            raise ProtocolError(ErrorCode.INVALID, "name the group: ?group=<id>")
        group_id = next(iter(settings.groups))
    checks.identifier(group_id, "group")
    return group_of(settings, group_id)


@json_errors
async def compat_create(request: web.Request) -> web.StreamResponse:
    """``PUT /assistserver/shortcode/create`` -> ``{"shortCode": "…"}``."""
    session, origin = await _create(request, _compat_group(request))
    return with_cors(web.json_response({"shortCode": session.code}), origin)


@json_errors
async def compat_consumer(request: web.Request) -> web.StreamResponse:
    """``GET /assistserver/shortcode/consumer?appkey=CODE`` -> ``{"session-token", "cid"}``.

    Live Assist's consumer SDKs take **403** as "this code opens nothing"
    (the browser's ``ShortCodeAssist`` calls its failure callback only on
    403; the iOS SDK reads any other body as a success without a ``cid``),
    so an unknown, expired or spent code answers 403 here, where the native
    route answers 404. ``auditName``, ``username`` and ``displayName``, which
    those SDKs may add, are accepted and ignored."""
    group = _compat_group(request)
    try:
        session, token, origin = await _redeem(request, group, _code(request.query.get("appkey")))
    except ProtocolError as exc:
        if exc.code != ErrorCode.SESSION_NOT_FOUND:
            raise
        raise ProtocolError(ErrorCode.FORBIDDEN, exc.message) from None
    return with_cors(web.json_response({"session-token": token, "cid": session.id}), origin)


@json_errors
async def compat_agent(request: web.Request) -> web.StreamResponse:
    """``GET /assistserver/shortcode/agent?appkey=CODE`` (agent) -> ``{"cid": "…"}``."""
    session = await _agent_lookup(request, _code(request.query.get("appkey")), request.query.get("group"))
    return web.json_response({"cid": session.id})


async def cors_preflight(request: web.Request) -> web.StreamResponse:
    """OPTIONS on the consumer routes: allowed origins of the named group."""
    settings = request.app[SETTINGS]
    group_id = request.match_info.get("group") or request.query.get("group")
    if group_id is None and len(settings.groups) == 1:
        group_id = next(iter(settings.groups))
    group = settings.groups.get(group_id or "")
    origin = await _origin(request, group) if group is not None else None
    return preflight(origin, "GET, POST, PUT, OPTIONS")


def add_routes(app: web.Application) -> None:
    routes = [
        ("POST", "/v1/groups/{group}/codes", create_code),
        ("GET", "/v1/groups/{group}/codes/{code}", redeem_code),
        ("GET", "/v1/groups/{group}/codes/{code}/agent", agent_code),
        ("PUT", "/assistserver/shortcode/create", compat_create),
        ("GET", "/assistserver/shortcode/consumer", compat_consumer),
        ("GET", "/assistserver/shortcode/agent", compat_agent),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        app.router.add_route("OPTIONS", path, cors_preflight)
