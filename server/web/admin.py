"""The admin API: group settings and webhook endpoints at run time, behind
the admin token.

Both are stored in the backend, so every instance reads the change.
Webhook endpoints' secrets are never shown (``has_secret``).
"""

from __future__ import annotations

from aiohttp import web

from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.core import attempts, group_settings, webhooks

from . import auth
from .http_common import bearer, client_address, group_of, json_errors, read_json, same_secret
from .keys import EVENT_LOG, RECORDS, SETTINGS, WEBHOOKS

MAX_DEAD_LETTERS = 100


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


@json_errors
async def get_webhooks(request: web.Request) -> web.StreamResponse:
    """``GET /v1/admin/groups/{group}/webhooks``: configured and run-time endpoints."""
    group = await _authorize(request)
    found = await webhooks.endpoints(request.app[RECORDS], request.app[SETTINGS], group)
    return web.json_response({"endpoints": [webhooks.shown(e) for e in found]})


@json_errors
async def change_webhooks(request: web.Request) -> web.StreamResponse:
    """``PUT /v1/admin/groups/{group}/webhooks`` with ``{"endpoints": [...]}``:
    the run-time endpoints replaced (the configured ones stay)."""
    group = await _authorize(request)
    body = await read_json(request)
    found = await webhooks.change_endpoints(request.app[RECORDS], request.app[SETTINGS], group, body)
    request.app[WEBHOOKS].forget(group)
    return web.json_response({"endpoints": [webhooks.shown(e) for e in found]})


@json_errors
async def dead_letters(request: web.Request) -> web.StreamResponse:
    """``GET /v1/admin/groups/{group}/webhooks/dead-letters``: the newest events endpoints never took."""
    group = await _authorize(request)
    return web.json_response({"dead_letters": await request.app[EVENT_LOG].dead_letters(group, MAX_DEAD_LETTERS)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/groups/{group}/settings", get_settings)
    app.router.add_put("/v1/admin/groups/{group}/settings", change_settings)
    app.router.add_get("/v1/admin/groups/{group}/webhooks", get_webhooks)
    app.router.add_put("/v1/admin/groups/{group}/webhooks", change_webhooks)
    app.router.add_get("/v1/admin/groups/{group}/webhooks/dead-letters", dead_letters)
