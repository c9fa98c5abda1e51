"""REST for CRM back ends: look up a visitor, signal it, without a socket.

The caller holds its group's API key (``protocol.tokens.api_key``) as a
bearer credential. Answers and errors are those of the websocket path: a
signal is delivered (with the count), held for a reconnecting visitor, or
refused with a code.
"""

from __future__ import annotations

from aiohttp import web

from herald_presence.protocol import checks, tokens
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import Signal

from . import auth, credentials
from .http_common import bearer, group_of, json_errors, read_json
from .keys import CREDENTIALS, PRESENCE, SETTINGS, SIGNALS


async def authorize_api_key(request: web.Request) -> str:
    """The URL's group, if the bearer key is a valid API key of that group:
    Herald's ``<expires>.<signature>.<group>`` or a JWT with role ``api``."""
    settings = request.app[SETTINGS]
    key = bearer(request)
    if credentials.is_jwt(key):
        claimed_id = credentials.unverified_claims(key).get("group")
        claimed_id = claimed_id if isinstance(claimed_id, str) else ""
        claimed = auth.group_or_stand_in(settings, claimed_id)
        await request.app[CREDENTIALS].verify(claimed, tokens.API, claimed.id, key)
    else:
        claimed_id = tokens.api_key_group(key)
        claimed = auth.group_or_stand_in(settings, claimed_id)  # an unknown group: refused like a bad key
        signed = ".".join(key.split(".", 2)[:2])  # <expires>.<signature>; the group may hold dots
        tokens.verify_token(claimed.secrets, tokens.API, claimed_id, claimed_id, signed)
    group = group_of(settings, request.match_info["group"])
    if group.id != claimed.id:
        raise ProtocolError(ErrorCode.FORBIDDEN, "this API key belongs to another group")
    await auth.require_origin(request, group)
    return group.id


@json_errors
async def lookup_visitor(request: web.Request) -> web.StreamResponse:
    """``GET /v1/groups/{group}/visitors/{visitor}`` -> the visitor's state."""
    group = await authorize_api_key(request)
    visitor = checks.identifier(request.match_info["visitor"], "visitor")
    return web.json_response(await request.app[PRESENCE].visitor(group, visitor))


@json_errors
async def signal_visitor(request: web.Request) -> web.StreamResponse:
    """``POST /v1/groups/{group}/visitors/{visitor}/signals`` with
    ``{"event", "data"?, "to"?, "agent"?, "sid"?}`` -> ``{"delivered": n}``;
    a back end that retries a signal sends the same ``sid``."""
    group = await authorize_api_key(request)
    visitor = checks.identifier(request.match_info["visitor"], "visitor")
    body = await read_json(request)
    message = Signal(
        event=checks.event_name(body.get("event"), "event"),
        data=checks.flat_map(body.get("data") or {}, "data"),
        visitor=visitor,
        to=checks.one_of("focused", "all")(body.get("to", "focused"), "to"),
        sid=checks.identifier(body["sid"], "sid") if body.get("sid") is not None else None,
    )
    sender = checks.identifier(body.get("agent", "crm"), "agent")
    delivered = await request.app[SIGNALS].to_visitor(group, sender, message)
    return web.json_response({"delivered": delivered})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/groups/{group}/visitors/{visitor}", lookup_visitor)
    app.router.add_post("/v1/groups/{group}/visitors/{visitor}/signals", signal_visitor)
