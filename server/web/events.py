"""The audit trail: ``GET /v1/groups/{group}/events`` with the group's API key
(as the CRM routes, ``crm.authorize_api_key``; another group's key is 403).

The same events webhooks deliver (PROTOCOL.md §13), oldest first, with
their stable IDs, for as long as the group's retention keeps them. Filters:
``since`` (an event ID, exclusive: the ``cursor`` of a previous answer; or
a unix time in seconds, inclusive), ``visitor``, ``session`` (the session's
whole timeline, with the terms answers that led to it), ``type`` (comma-
separated types, ``family.*`` or ``*``) and ``limit`` (1-1000, default 100).
Without ``session`` the log is scanned from ``since``, at most ``SCAN_MAX``
events per request: ``more`` says whether to ask again from ``cursor``.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from herald_presence.protocol import checks
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.config import valid_event_pattern
from herald_presence.server.model import events as ev

from .crm import authorize_api_key
from .http_common import json_errors
from .keys import EVENT_LOG

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
SCAN_MAX = 10_000  # events looked at per request without a session
PAGE = 1000
_TIME = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")
LAST_SEQ = 10**15 - 1


def _since(value: str | None) -> tuple[str | None, tuple[int, int] | None]:
    """The ID to read after, and its key: an event ID, or the last possible ID before a unix time."""
    if value is None or value == "":
        return None, None
    key = ev.parse_id(value)
    if key is not None:
        return value, key
    if _TIME.match(value):
        ms = int(float(value) * 1000)
        return (f"{ms - 1}-{LAST_SEQ}", (ms - 1, LAST_SEQ)) if ms > 0 else (None, None)
    raise ProtocolError(ErrorCode.INVALID, "since must be an event ID (a cursor) or a unix time in seconds")


def _types(value: str | None) -> list[str] | None:
    if value is None or value == "":
        return None
    types = value.split(",")
    if len(types) > 32 or not all(map(valid_event_pattern, types)):
        raise ProtocolError(ErrorCode.INVALID, "type must list event types, 'family.*' or '*', comma-separated")
    return types


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise ProtocolError(ErrorCode.INVALID, f"limit must be 1-{MAX_LIMIT}")
    return int(value)


def _identifier(value: str | None, name: str) -> str | None:
    return None if value is None else checks.identifier(value, name)


@json_errors
async def list_events(request: web.Request) -> web.StreamResponse:
    group = await authorize_api_key(request)
    query = request.query
    after, floor = _since(query.get("since"))
    visitor = _identifier(query.get("visitor"), "visitor")
    session = _identifier(query.get("session"), "session")
    types, limit = _types(query.get("type")), _limit(query.get("limit"))
    log = request.app[EVENT_LOG]
    found: list[dict[str, Any]] = []
    cursor, more = after, False
    if session is not None:
        timeline = [
            (event_id, event)
            for event_id, event in await log.session_events(group, session)
            if (floor is None or (ev.parse_id(event_id) or (0, 0)) > floor) and ev.matches(event, visitor, None, types)
        ]
        found = [ev.with_id(event_id, event) for event_id, event in timeline[:limit]]
        more = len(timeline) > limit
        cursor = found[-1]["id"] if found else after
    else:
        scanned, exhausted = 0, False
        while True:
            want = min(PAGE, SCAN_MAX - scanned)
            page = await log.read(group, cursor, want)
            consumed = 0
            for event_id, event in page:
                cursor, scanned, consumed = event_id, scanned + 1, consumed + 1
                if ev.matches(event, visitor, None, types):
                    found.append(ev.with_id(event_id, event))
                    if len(found) >= limit:
                        break
            if consumed == len(page) and len(page) < want:
                exhausted = True  # the newest event was looked at
                break
            if len(found) >= limit or scanned >= SCAN_MAX:
                break
        more = not exhausted
    return web.json_response({"events": found, "cursor": cursor, "more": more})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/groups/{group}/events", list_events)
