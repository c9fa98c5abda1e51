"""The OpenAPI 3.1 document of every HTTP route, served at ``/v1/openapi.json``.

Written by hand beside the handlers and kept true by ``tests/test_openapi.py``,
which runs schemathesis against a live server (every answer must be one
the document lists, with its content type and schema; none may be a 500)
and checks that every route of the application is here. The websocket
protocol itself is PROTOCOL.md's; here its two endpoints appear only as
the HTTP requests they start with.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from herald_presence.protocol import checks
from herald_presence.protocol.errors import ErrorCode
from herald_presence.server import __version__
from herald_presence.server.config import EVENT_TYPES, MAX_WEBHOOK_CONCURRENCY, MAX_WEBHOOKS

PATH = "/v1/openapi.json"

ID_PATTERN = r"^[A-Za-z0-9._:@+\-]{1,128}$"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], properties: dict[str, Schema], extra: bool = True) -> Schema:
    schema: Schema = {"type": "object", "required": required, "properties": properties}
    if not extra:
        schema["additionalProperties"] = False
    return schema


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(description: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{description}"}


def _param(name: str, where: str = "path", required: bool = True, schema: Schema | None = None, text: str = "") -> Any:
    return {
        "name": name,
        "in": where,
        "required": required,
        "schema": schema or {"type": "string", "pattern": ID_PATTERN},
        "description": text,
    }


GROUP = _param("group", text="the group's ID")
VISITOR = _param("visitor", text="a visitor ID of the group")
CODE = _param("code", schema={"type": "string"}, text="a short code (digits)")
ERRORS = {status: _error(name) for status, name in [
    ("400", "Invalid"),
    ("401", "Unauthorized"),
    ("403", "Forbidden"),
    ("404", "NotFound"),
    ("408", "TooSlow"),
    ("413", "TooLarge"),
    ("429", "RateLimited"),
    ("503", "Unavailable"),
]}  # fmt: skip


def _errors(*statuses: str) -> dict[str, Any]:
    return {status: ERRORS[status] for status in statuses}


BODY_ERRORS = ("400", "408", "413")  # a JSON body: malformed, too slow, too large


def _body(schema: Schema, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, responses: dict[str, Any], tag: str, **more: Any) -> dict[str, Any]:
    return {"summary": summary, "tags": [tag], "responses": responses, **more}


API_KEY = [{"apiKey": []}]
ADMIN = [{"adminToken": []}]
AGENT_COOKIE = [{"agentSession": []}]
NO_AUTH: list[Any] = [{}]


def _admin(summary: str, schema: str, answer: str, body: str | None = None) -> dict[str, Any]:
    """An admin API operation on one group: its JSON answer, and a JSON body when it changes something."""
    errors = (
        _errors(*BODY_ERRORS, "401", "403", "404", "429", "503") if body else _errors("401", "403", "404", "429", "503")
    )
    more = {"requestBody": _body(_ref(body))} if body else {}
    return _op(
        summary, {"200": _json(_ref(schema), answer), **errors}, "admin", security=ADMIN, parameters=[GROUP], **more
    )


PREFLIGHT = _op(
    "CORS preflight: 204 for an origin the group allows, else 403",
    {"204": {"description": "allowed"}, "403": {"description": "origin not allowed"}},
    "short codes",
    security=NO_AUTH,
    parameters=[
        _param("group", "query", False),
        _param("Origin", "header", False, {"type": "string"}),
        _param("Access-Control-Request-Method", "header", False, {"type": "string"}),
    ],
)


def _preflight(*path_params: Any) -> dict[str, Any]:
    operation = dict(PREFLIGHT)
    operation["parameters"] = [*path_params, *PREFLIGHT["parameters"]]
    return operation


SCHEMAS: dict[str, Schema] = {
    "Error": _obj(
        ["error"],
        {
            "error": _obj(
                ["code", "message"],
                {"code": {"type": "string", "enum": [code.value for code in ErrorCode]}, "message": {"type": "string"}},
            )
        },
    ),
    "ConnectionState": _obj(
        ["connection", "data", "visible", "focused", "since"],
        {
            "connection": {"type": "string"},
            "data": {"type": "object"},
            "visible": {"type": "boolean"},
            "focused": {"type": "boolean"},
            "since": {"type": "number"},
        },
    ),
    "VisitorState": _obj(
        ["visitor", "online", "version", "connections"],
        {
            "visitor": {"type": "string"},
            "online": {"type": "boolean"},
            "version": {"type": "integer", "minimum": 0},
            "connections": {"type": "array", "items": _ref("ConnectionState")},
        },
    ),
    "GroupSettings": _obj(
        ["code_length", "code_ttl", "allowed_origins", "allow_consumer_codes", "enforce_expiry"],
        {
            "code_length": {"type": "integer", "minimum": 4, "maximum": 12},
            "code_ttl": {"type": "number", "minimum": 10, "maximum": 86400},
            "allowed_origins": {"type": "array", "items": {"type": "string"}},
            "allow_consumer_codes": {"type": "boolean"},
            "enforce_expiry": {"type": "boolean"},
            "ice_servers": {
                "type": "array",
                "description": "STUN/TURN servers (PROTOCOL.md §11.10); a TURN server's secret is never shown",
                "items": _obj(
                    ["urls", "has_secret"],
                    {
                        "urls": {"type": "array", "items": {"type": "string"}},
                        "ttl": {"type": "integer"},
                        "has_secret": {"type": "boolean"},
                    },
                ),
            },
        },
    ),
    "GroupSettingsChange": {
        "type": "object",
        "minProperties": 1,
        "description": "the settings to change (PROTOCOL.md §12.3); others are refused",
        "properties": {
            "code_length": {"type": "integer", "minimum": 4, "maximum": 12},
            "code_ttl": {"type": "number", "minimum": 10, "maximum": 86400},
            "allowed_origins": {"type": "array", "maxItems": 100, "items": {"type": "string", "minLength": 1}},
            "allow_consumer_codes": {"type": "boolean"},
            "enforce_expiry": {"type": "boolean"},
        },
    },
}

EVENT_TYPE = {"type": "string", "enum": list(EVENT_TYPES)}
EVENT_ID = {"type": "string", "pattern": r"^[0-9]{1,20}-[0-9]{1,20}$", "description": "<ms>-<seq>, rising"}
EVENT_PATTERN = {"type": "string", "pattern": r"^(\*|[a-z]+\.(\*|[a-z]+))$", "description": "a type, family.* or *"}
SCHEMAS |= {
    "Event": _obj(
        ["id", "type", "group", "time"],
        {
            "id": EVENT_ID,
            "type": EVENT_TYPE,
            "group": {"type": "string"},
            "time": {"type": "number", "description": "unix seconds, when it was recorded"},
            "visitor": {"type": "string"},
            "session": {"type": "string"},
            "agent": {"type": "string"},
            "connection": {"type": "string"},
            "reason": {"type": "string"},
            "version": {"type": "integer"},
            "key_type": {"enum": ["visitor", "random"]},
            "guests": {"type": "integer", "minimum": 0},
            "by": {"enum": ["consumer", "agent"]},
            "expires": {"type": "number"},
            "sid": {"type": "string"},
        },
    ),
    "EventPage": _obj(
        ["events", "cursor", "more"],
        {
            "events": {"type": "array", "items": _ref("Event")},
            "cursor": {"type": ["string", "null"], "description": "pass as since for the next page"},
            "more": {"type": "boolean"},
        },
    ),
    "WebhookEndpoint": _obj(
        ["id", "url", "events", "source", "has_secret"],
        {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "events": {"type": "array", "items": {"type": "string"}},
            "concurrency": {"type": ["integer", "null"]},
            "source": {"enum": ["config", "admin"]},
            "has_secret": {"type": "boolean"},
        },
    ),
    "WebhookEndpoints": _obj(["endpoints"], {"endpoints": {"type": "array", "items": _ref("WebhookEndpoint")}}),
    "WebhookEndpointsChange": _obj(
        ["endpoints"],
        {
            "endpoints": {
                "type": "array",
                "maxItems": MAX_WEBHOOKS,
                "items": _obj(
                    ["url", "secret"],
                    {
                        "id": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$"},
                        "url": {"type": "string", "format": "uri", "maxLength": 2048},
                        "events": {"type": "array", "minItems": 1, "maxItems": 32, "items": EVENT_PATTERN},
                        "secret": {"type": "string", "minLength": 16, "maxLength": 256},
                        "concurrency": {"type": "integer", "minimum": 1, "maximum": MAX_WEBHOOK_CONCURRENCY},
                    },
                    extra=False,
                ),
            }
        },
        extra=False,
    ),
    "DeadLetters": _obj(
        ["dead_letters"],
        {
            "dead_letters": {
                "type": "array",
                "items": _obj(
                    ["id", "type", "endpoint", "error", "attempts", "dead_at", "event"],
                    {
                        "id": EVENT_ID,
                        "type": EVENT_TYPE,
                        "endpoint": {"type": "string"},
                        "error": {"type": "string"},
                        "attempts": {"type": "integer"},
                        "dead_at": {"type": "number"},
                        "event": _ref("Event"),
                    },
                ),
            }
        },
    ),
}

RESPONSES: dict[str, Any] = {
    "Invalid": _json(_ref("Error"), "invalid: a malformed body, query or path value"),
    "Unauthorized": _json(_ref("Error"), "unauthorized or token_expired: a missing, bad or expired credential"),
    "Forbidden": _json(_ref("Error"), "forbidden: a foreign Origin, another group's key, a feature the group is off"),
    "NotFound": _json(_ref("Error"), "session_not_found (unknown group, code or session) or visitor_offline"),
    "TooSlow": _json(_ref("Error"), "invalid: the body did not arrive within request_timeout", {"Connection": {}}),
    "TooLarge": {
        "description": "the body is over 64 KiB",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    "RateLimited": _json(
        _ref("Error"),
        "rate_limited",
        {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
    ),
    "Unavailable": _json(
        _ref("Error"), "backend_unavailable, code_space_exhausted, draining or overloaded: retry later"
    ),
}

WEBSOCKET = {
    "101": {"description": "switching to the websocket protocol (PROTOCOL.md §2, §3)"},
    "426": _json(_ref("Error"), "invalid: this path only takes a websocket upgrade"),
    "429": ERRORS["429"],
    "503": ERRORS["503"],
}

PAGE_TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css"}


def _page(path: str, content_type: str) -> dict[str, Any]:
    return {
        "get": _op(
            "a file of Herald's pages or its browser client",
            {"200": {"description": "the file", "content": {content_type: {"schema": {"type": "string"}}}}},
            "pages",
            security=NO_AUTH,
        )
    }


def _paths(page_files: dict[str, str]) -> dict[str, Any]:
    code_session = _obj(
        ["session", "session_token"], {"session": {"type": "string"}, "session_token": {"type": "string"}}
    )
    paths: dict[str, Any] = {
        "/v1/visitor": {
            "get": _op(
                "a visitor's websocket; its hello authenticates it",
                WEBSOCKET,
                "websockets",
                security=NO_AUTH,
            )
        },
        "/v1/agent": {
            "get": _op(
                "an agent's websocket, with its login cookie",
                {**WEBSOCKET, **_errors("401", "403")},
                "websockets",
                security=AGENT_COOKIE,
            )
        },
        "/v1/agent/login": {
            "post": _op(
                "trade an agent login key (v1 or JWT) for the HERALD_SESSION cookie",
                {
                    "200": _json(
                        _obj(
                            ["group", "agent", "expires"],
                            {"group": {"type": "string"}, "agent": {"type": "string"}, "expires": {"type": "integer"}},
                        ),
                        "logged in; Set-Cookie: HERALD_SESSION",
                        {"Set-Cookie": {"schema": {"type": "string"}}},
                    ),
                    **_errors(*BODY_ERRORS, "401", "403", "429", "503"),
                },
                "agents",
                security=NO_AUTH,
                requestBody=_body(
                    _obj(
                        ["group", "agent", "key"],
                        {
                            "group": {"type": "string", "pattern": ID_PATTERN},
                            "agent": {"type": "string", "pattern": ID_PATTERN},
                            "key": {"type": "string", "minLength": 1, "maxLength": checks.MAX_TOKEN_CHARS},
                        },
                    )
                ),
            )
        },
        "/v1/agent/logout": {
            "post": _op(
                "end this login everywhere (the session ID is revoked in the backend)",
                {"200": _json(_obj(["ok"], {"ok": {"const": True}}), "logged out"), **_errors("403", "503")},
                "agents",
                security=AGENT_COOKIE,
            )
        },
        "/healthz": {
            "get": _op(
                "liveness",
                {
                    "200": _json(
                        _obj(["status", "version"], {"status": {"const": "ok"}, "version": {"type": "string"}}), "alive"
                    )
                },
                "operations",
                security=NO_AUTH,
            )
        },
        "/readyz": {
            "get": _op(
                "readiness: the backend reachable and not draining",
                {
                    status: _json(
                        _obj(
                            ["ready", "instance", "backend", "draining"],
                            {
                                "ready": {"type": "boolean"},
                                "instance": {"type": "string"},
                                "backend": {"type": "boolean"},
                                "draining": {"type": "boolean"},
                            },
                        ),
                        text,
                    )
                    for status, text in (("200", "ready"), ("503", "not ready"))
                },
                "operations",
                security=NO_AUTH,
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics (only on the metrics_port listener when one is set)",
                {"200": {"description": "text format", "content": {"text/plain": {"schema": {"type": "string"}}}}},
                "operations",
                security=NO_AUTH,
            )
        },
        PATH: {
            "get": _op(
                "this document",
                {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                "operations",
                security=NO_AUTH,
            )
        },
        "/demo/credentials": {
            "get": _op(
                "demo mode only, from this machine: the demo group (else 404)",
                {
                    "200": _json(_obj(["group"], {"group": {"type": "string"}}), "the demo group"),
                    "404": {
                        "description": "not in demo mode",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                },
                "pages",
                security=NO_AUTH,
            ),
            "post": _op(
                "demo mode only, from this machine: a visitor token or agent key of the demo group",
                {
                    "200": _json(
                        _obj(
                            ["group", "role", "id", "token"],
                            {
                                "group": {"type": "string"},
                                "role": {"enum": ["visitor", "agent"]},
                                "id": {"type": "string"},
                                "token": {"type": "string"},
                            },
                        ),
                        "the credential",
                    ),
                    "404": {
                        "description": "not in demo mode",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(*BODY_ERRORS, "403"),
                },
                "pages",
                security=NO_AUTH,
                requestBody=_body(
                    _obj(["role", "id"], {"role": {"enum": ["visitor", "agent"]}, "id": {"type": "string"}})
                ),
            ),
        },
        # -- short codes: native
        "/v1/groups/{group}/codes": {
            "post": _op(
                "a consumer page makes a short code (groups with allow_consumer_codes)",
                {
                    "201": _json(
                        _obj(["code", "session"], {"code": {"type": "string"}, "session": {"type": "string"}}),
                        "made",
                    ),
                    **_errors("403", "404", "429", "503"),
                },
                "short codes",
                security=NO_AUTH,
                parameters=[GROUP],
            ),
            "options": _preflight(GROUP),
        },
        "/v1/groups/{group}/codes/{code}": {
            "get": _op(
                "a consumer page redeems its code (once) for the session token",
                {"200": _json(code_session, "redeemed"), **_errors("403", "404", "429", "503")},
                "short codes",
                security=NO_AUTH,
                parameters=[GROUP, CODE],
            ),
            "options": _preflight(GROUP, CODE),
        },
        "/v1/groups/{group}/codes/{code}/agent": {
            "get": _op(
                "a logged-in agent looks a code up",
                {
                    "200": _json(
                        _obj(
                            ["session", "key", "visitor"],
                            {"session": {"type": "string"}, "key": {"type": "string"}, "visitor": {"type": "string"}},
                        ),
                        "the session",
                    ),
                    **_errors("401", "403", "404", "429", "503"),
                },
                "short codes",
                security=AGENT_COOKIE,
                parameters=[GROUP, CODE],
            ),
            "options": _preflight(GROUP, CODE),
        },
        # -- short codes: Live Assist shapes
        "/assistserver/shortcode/create": {
            "put": _op(
                "Live Assist: a consumer page makes a short code",
                {
                    "200": _json(_obj(["shortCode"], {"shortCode": {"type": "string"}}), "made"),
                    **_errors("400", "403", "404", "429", "503"),
                },
                "Live Assist",
                security=NO_AUTH,
                parameters=[
                    _param("group", "query", False, text="may be left out when the server has one group"),
                    _param("auditName", "query", False, {"type": "string"}, "accepted and ignored"),
                ],
            ),
            "options": _preflight(),
        },
        "/assistserver/shortcode/consumer": {
            "get": _op(
                "Live Assist: a consumer page redeems its code (once); 403 for a code that opens nothing",
                {
                    "200": _json(
                        _obj(
                            ["session-token", "cid"], {"session-token": {"type": "string"}, "cid": {"type": "string"}}
                        ),
                        "redeemed",
                    ),
                    **_errors("400", "403", "404", "429", "503"),
                },
                "Live Assist",
                security=NO_AUTH,
                parameters=[
                    _param("appkey", "query", True, {"type": "string"}, "the short code"),
                    _param("group", "query", False),
                    *(
                        _param(name, "query", False, {"type": "string"}, "accepted and ignored")
                        for name in ("auditName", "username", "displayName")
                    ),
                ],
            ),
            "options": _preflight(),
        },
        "/assistserver/shortcode/agent": {
            "get": _op(
                "Live Assist: a logged-in agent looks a code up",
                {
                    "200": _json(_obj(["cid"], {"cid": {"type": "string"}}), "the session"),
                    **_errors("401", "403", "404", "429", "503"),
                },
                "Live Assist",
                security=AGENT_COOKIE,
                parameters=[_param("appkey", "query", True, {"type": "string"}), _param("group", "query", False)],
            ),
            "options": _preflight(),
        },
        # -- CRM
        "/v1/groups/{group}/visitors/{visitor}": {
            "get": _op(
                "a visitor's presence, online or not",
                {"200": _json(_ref("VisitorState"), "its state"), **_errors("400", "401", "403", "404", "503")},
                "CRM",
                security=API_KEY,
                parameters=[GROUP, VISITOR],
            )
        },
        "/v1/groups/{group}/visitors/{visitor}/signals": {
            "post": _op(
                "signal a visitor as an agent would",
                {
                    "200": _json(_obj(["delivered"], {"delivered": {"type": "integer", "minimum": 1}}), "delivered"),
                    "410": _json(_ref("Error"), "signal_expired: held for a visitor that did not come back"),
                    "504": _json(_ref("Error"), "delivery_failed: the visitor's instance did not confirm"),
                    **_errors(*BODY_ERRORS, "401", "403", "404", "429", "503"),
                },
                "CRM",
                security=API_KEY,
                parameters=[GROUP, VISITOR],
                requestBody=_body(
                    _obj(
                        ["event"],
                        {
                            "event": {"type": "string", "pattern": r"^[A-Za-z0-9._:\-]{1,64}$"},
                            "data": {"type": "object"},
                            "to": {"enum": ["focused", "all"]},
                            "agent": {"type": "string", "pattern": ID_PATTERN},
                            "sid": {"type": "string", "pattern": ID_PATTERN},
                        },
                    )
                ),
            )
        },
        # -- the audit trail
        "/v1/groups/{group}/events": {
            "get": _op(
                "the group's events (PROTOCOL.md §13), oldest first, with stable IDs and a cursor",
                {"200": _json(_ref("EventPage"), "a page of events"), **_errors("400", "401", "403", "404", "503")},
                "events",
                security=API_KEY,
                parameters=[
                    GROUP,
                    _param(
                        "since",
                        "query",
                        False,
                        {"type": "string", "pattern": r"^([0-9]{1,15}-[0-9]{1,15}|[0-9]{1,12}(\.[0-9]{1,6})?)?$"},
                        "an event ID (a cursor: after it) or a unix time in seconds (from it)",
                    ),
                    _param("visitor", "query", False, text="only this visitor's events"),
                    _param("session", "query", False, text="the session's timeline, with the terms that led to it"),
                    _param(
                        "type",
                        "query",
                        False,
                        {"type": "string", "pattern": r"^(\*|[a-z]+\.(\*|[a-z]+))(,(\*|[a-z]+\.(\*|[a-z]+)))*$"},
                        "event types, family.* or *, comma-separated",
                    ),
                    _param("limit", "query", False, {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
            )
        },
        # -- disconnect and revoke
        "/v1/groups/{group}/visitors/{visitor}/disconnect": {
            "post": _op(
                "close every connection of a visitor (4505), optionally refusing it a while",
                {
                    "200": _json(
                        _obj(
                            ["closed", "refused_until"],
                            {
                                "closed": {"type": "integer", "minimum": 0},
                                "refused_until": {"type": ["number", "null"]},
                            },
                        ),
                        "its connections were told to close",
                    ),
                    **_errors(*BODY_ERRORS, "401", "403", "404", "503"),
                },
                "disconnect and revoke",
                security=API_KEY,
                parameters=[GROUP, VISITOR],
                requestBody=_body(
                    _obj(
                        [],
                        {
                            "refuse_for": {"type": "number", "minimum": 0, "maximum": 86400},
                            "reason": {"type": "string", "maxLength": checks.MAX_VALUE_CHARS},
                        },
                    ),
                    required=False,
                ),
            )
        },
        "/v1/groups/{group}/sessions/{session}/end": {
            "post": _op(
                "end a support session (reason terminated); its members are told",
                {
                    "200": _json(
                        _obj(["session", "ended"], {"session": {"type": "string"}, "ended": {"const": True}}), "ended"
                    ),
                    **_errors(*BODY_ERRORS, "401", "403", "404", "503"),
                },
                "disconnect and revoke",
                security=API_KEY,
                parameters=[GROUP, _param("session", text="a session ID")],
            )
        },
        "/v1/groups/{group}/agents/{agent}/revoke": {
            "post": _op(
                "revoke every login of an agent until now and close its connections, on every instance",
                {
                    "200": _json(
                        _obj(["agent", "not_before"], {"agent": {"type": "string"}, "not_before": {"type": "number"}}),
                        "revoked",
                    ),
                    **_errors(*BODY_ERRORS, "401", "403", "404", "503"),
                },
                "disconnect and revoke",
                security=API_KEY,
                parameters=[GROUP, _param("agent", text="an agent ID of the group")],
                requestBody=_body(
                    _obj([], {"reason": {"type": "string", "maxLength": checks.MAX_VALUE_CHARS}}), required=False
                ),
            )
        },
        # -- admin
        "/v1/admin/groups/{group}/settings": {
            "get": _admin("a group's run-time settings", "GroupSettings", "the settings"),
            "put": _admin(
                "change a group's run-time settings",
                "GroupSettings",
                "the settings after the change",
                "GroupSettingsChange",
            ),
        },
        "/v1/admin/groups/{group}/webhooks": {
            "get": _admin(
                "a group's webhook endpoints, configured and set at run time (secrets never shown)",
                "WebhookEndpoints",
                "the endpoints",
            ),
            "put": _admin(
                "replace a group's run-time webhook endpoints (the configured ones stay)",
                "WebhookEndpoints",
                "the endpoints after the change",
                "WebhookEndpointsChange",
            ),
        },
        "/v1/admin/groups/{group}/webhooks/dead-letters": {
            "get": _admin(
                "the newest events an endpoint never took within webhook_retry_for", "DeadLetters", "newest first"
            ),
        },
    }
    for path, content_type in page_files.items():
        paths[path] = _page(path, content_type)
    return paths


def document(page_files: dict[str, str]) -> dict[str, Any]:
    """The whole document; ``page_files`` maps each page's path to its content type."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Herald",
            "version": __version__,
            "description": "Herald's HTTP API. The websocket protocol is specified in PROTOCOL.md; every error "
            'is {"error": {"code", "message"}} with the code the websocket would send (PROTOCOL.md §6, §12).',
        },
        "paths": _paths(page_files),
        "components": {
            "schemas": SCHEMAS,
            "responses": RESPONSES,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the group's API key: <expires>.<signature>.<group>, or a JWT with role api",
                },
                "adminToken": {"type": "http", "scheme": "bearer", "description": "the admin_token setting"},
                "agentSession": {"type": "apiKey", "in": "cookie", "name": "HERALD_SESSION"},
            },
        },
    }


def add_routes(app: web.Application) -> None:
    from .pages import FILES  # the pages' own list, so that a new page cannot be missed here

    body = json.dumps(document({path: content_type for path, (_file, content_type) in FILES.items()}))

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    app.router.add_get(PATH, serve)
