"""The admin API: group settings at run time, behind the admin token.

Settings are stored in the backend, so every instance reads the change.
"""

from __future__ import annotations

from aiohttp import web

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.core import attempts, group_settings

from . import auth
from .http_common import bearer, client_address, group_of, json_errors, read_json, same_secret
from .keys import RECORDS, SETTINGS


async def _authorize(request: web.Request) -> str:
    settings = request.app[SETTINGS]
    if not settings.admin_token:
        raise ProtocolError(ErrorCode.FORBIDDEN, "the admin API is disabled (set admin_token)")
    records, address = request.app[RECORDS], client_address(request)
    await attempts.refuse_if_over(records, settings, "admin", address)
    if not same_secret(bearer(request), settings.admin_token):
        await attempts.count_refusal(records, "admin", address)
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "wrong admin token")
    group = group_of(settings, request.match_info["group"])
    await auth.require_origin(request, group)
    return group.id


@json_errors
async def get_settings(request: web.Request) -> web.StreamResponse:
    """``GET /v1/admin/groups/{group}/settings``."""
    group = await _authorize(request)
    stored = await group_settings.load(request.app[RECORDS], request.app[SETTINGS], group)
    return web.json_response(stored.to_json())


@json_errors
async def change_settings(request: web.Request) -> web.StreamResponse:
    """``PUT /v1/admin/groups/{group}/settings`` with the fields to change."""
    group = await _authorize(request)
    changes = await read_json(request)
    changed = await group_settings.change(request.app[RECORDS], request.app[SETTINGS], group, changes)
    return web.json_response(changed.to_json())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/groups/{group}/settings", get_settings)
    app.router.add_put("/v1/admin/groups/{group}/settings", change_settings)
