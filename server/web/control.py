"""REST for a group's back end to cut someone off, with the group's API key
(as the CRM routes, ``crm.authorize_api_key``):

* ``POST /v1/groups/{group}/visitors/{visitor}/disconnect``: every
  connection of the visitor, on every instance, gets ``error revoked`` and
  close 4505; with ``refuse_for`` its hellos are refused that long.
* ``POST /v1/groups/{group}/sessions/{session}/end``: the session ends with
  reason ``terminated``; its agents get ``session_event ended``, and so does
  its visitor (a consumer is closed with 4504, as for any end).
* ``POST /v1/groups/{group}/agents/{agent}/revoke``: every login cookie of
  the agent issued until now stops working on every instance, and its
  connections are closed (``error revoked``, 4505).
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from herald_presence.protocol import checks, codec
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import SessionEvent
from herald_presence.server.core.revocation import MAX_REFUSAL
from herald_presence.server.model.presence_rules import is_consumer

from .crm import authorize_api_key
from .http_common import json_errors, read_body
from .keys import REVOCATIONS, SESSIONS, SIGNALS

VISITOR_REASON = "disconnected by the group's back end"
AGENT_REASON = "this agent's logins were revoked by the group's back end"
TERMINATED = "terminated"


async def _optional_json(request: web.Request) -> dict[str, Any]:
    """The JSON object body, or {} when there is none."""
    body = await read_body(request)
    if not body.strip():
        return {}
    try:
        value = await request.json()
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.INVALID, "expected a JSON object (or no body)")
    return value


def _reason(body: dict[str, Any], default: str) -> str:
    reason = body.get("reason")
    return default if reason is None else checks.text(reason, "reason")[:120]


@json_errors
async def disconnect_visitor(request: web.Request) -> web.StreamResponse:
    """``{"refuse_for"?: seconds (0-86400), "reason"?}`` -> ``{"closed", "refused_until"}``."""
    group = await authorize_api_key(request)
    visitor = checks.identifier(request.match_info["visitor"], "visitor")
    body = await _optional_json(request)
    refuse_for = body.get("refuse_for", 0)
    if type(refuse_for) not in (int, float) or not 0 <= refuse_for <= MAX_REFUSAL or not math.isfinite(refuse_for):
        raise ProtocolError(ErrorCode.INVALID, f"refuse_for: must be 0-{MAX_REFUSAL:.0f} seconds")
    reason = _reason(body, VISITOR_REASON)
    closed, until = await request.app[REVOCATIONS].disconnect_visitor(group, visitor, float(refuse_for), reason)
    return web.json_response({"closed": closed, "refused_until": until or None})


@json_errors
async def end_session(request: web.Request) -> web.StreamResponse:
    """-> ``{"session", "ended": true}``; 404 ``session_not_found`` if it is not live."""
    group = await authorize_api_key(request)
    session_id = checks.identifier(request.match_info["session"], "session")
    await _optional_json(request)
    sessions = request.app[SESSIONS]
    record = await sessions.load(group, session_id)
    if record is None or not await sessions.end(group, session_id, TERMINATED):
        raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "no live session has that ID")
    if record.connection is not None and record.instance is not None and not is_consumer(record.visitor):
        # Its visitor hears it too (a consumer is closed by the end itself).
        event = SessionEvent(
            event="ended",
            session=record.id,
            key=record.key,
            visitor=record.visitor,
            key_type=record.key_type,
            reason=TERMINATED,
        )
        await request.app[SIGNALS].push(record.instance, [record.connection], codec.encode(event))
    return web.json_response({"session": session_id, "ended": True})


@json_errors
async def revoke_agent(request: web.Request) -> web.StreamResponse:
    """``{"reason"?}`` -> ``{"agent", "not_before"}``."""
    group = await authorize_api_key(request)
    agent = checks.identifier(request.match_info["agent"], "agent")
    body = await _optional_json(request)
    not_before = await request.app[REVOCATIONS].revoke_agent(group, agent, _reason(body, AGENT_REASON))
    return web.json_response({"agent": agent, "not_before": not_before})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/groups/{group}/visitors/{visitor}/disconnect", disconnect_visitor)
    app.router.add_post("/v1/groups/{group}/sessions/{session}/end", end_session)
    app.router.add_post("/v1/groups/{group}/agents/{agent}/revoke", revoke_agent)
