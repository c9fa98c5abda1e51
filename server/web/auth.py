"""Who may connect: visitor tokens, agent login sessions, Origin checks.

Visitors prove their ID with a token their company's back end signed with
the group's secret (see ``protocol.tokens``). Agents trade a signed login key
for an encrypted, HttpOnly session cookie; the agent websocket needs it.
A browser's Origin must be Herald's own or one its group allows on every
upgrade, login and REST call, against cross-site websocket hijacking;
clients without an Origin (not browsers) prove themselves by credential.
Logout revokes the session ID in the backend, since a copy of the cookie
would otherwise outlive it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp_session.cookie_storage import EncryptedCookieStorage

from herald_presence.protocol import checks, tokens
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.protocol.messages import Hello
from herald_presence.server.backends.base import BackendUnavailable
from herald_presence.server.config import GroupConfig, Settings, session_key
from herald_presence.server.core import attempts, group_settings
from herald_presence.server.model.limits import LimitExceeded, count
from herald_presence.server.model.names import revoked_login_key

from .http_common import STATUS, allowed_origin, client_address, error_response, read_body
from .keys import CREDENTIALS, RECORDS, REVOCATIONS, SETTINGS

log = logging.getLogger(__name__)

COOKIE_NAME = "HERALD_SESSION"
# The agent's login session, in an encrypted cookie: read by the requests that
# need it and written by login and logout, through aiohttp-session's storage
# alone. Its middleware is not installed: it would wrap every request, and a
# websocket's request lasts as long as the connection, holding that
# middleware's frame (~0.9 KiB per idle connection, measured).
COOKIES = web.AppKey("login_cookies", EncryptedCookieStorage)


def setup_sessions(app: web.Application, settings: Settings) -> None:
    # Without a session_secret, sessions live as long as this process and only on this instance.
    key = session_key(settings.session_secret) if settings.session_secret else secrets.token_bytes(32)
    app[COOKIES] = EncryptedCookieStorage(
        key,
        cookie_name=COOKIE_NAME,
        max_age=settings.session_max_age,
        httponly=True,
        secure=settings.cookie_secure,
        samesite=settings.cookie_samesite,
    )


async def allowed_origins(request: web.Request, group: GroupConfig) -> list[str]:
    """The group's configured origins plus those set at run time (admin API)."""
    runtime = await group_settings.load(request.app[RECORDS], request.app[SETTINGS], group.id)
    return [*group.allowed_origins, *runtime.allowed_origins]


async def origin_allowed(request: web.Request, group: GroupConfig) -> bool:
    """No Origin (not a browser: it proves itself with a credential), Herald's
    own pages, or an origin the group allows. Anything else is a foreign
    page trying to borrow a visitor's or agent's credentials."""
    if "Origin" not in request.headers:
        return True
    return allowed_origin(request, await allowed_origins(request, group)) is not None


async def require_origin(request: web.Request, group: GroupConfig) -> None:
    if not await origin_allowed(request, group):
        raise ProtocolError(ErrorCode.FORBIDDEN, "origin not allowed for this group")


ANONYMOUS_PREFIX = "anon."


# Checks a credential for a group that does not exist: no token can match it,
# so an unknown group is refused exactly like a bad credential of a real one
# (same code, same message), and nobody learns which groups exist.
_NO_GROUP = GroupConfig("-", [secrets.token_urlsafe(32)])


def group_or_stand_in(settings: Settings, group_id: str | None) -> GroupConfig:
    """The group, or a stand-in whose credentials are all refused as bad."""
    return settings.groups.get(group_id or "") or _NO_GROUP


async def verify_visitor(request: web.Request, hello: Hello) -> tuple[GroupConfig, str, int | None]:
    """The group and visitor ID a hello proves, and when its token expires.
    Without visitor and token, a group that allows anonymous visitors gives
    a fresh ``anon.`` ID: an anonymous visitor can never choose (or claim)
    an ID. The token is Herald's v1 format or a JWT (``credentials``)."""
    group = group_or_stand_in(request.app[SETTINGS], hello.group)
    if hello.visitor is None and hello.token is None and group.allow_anonymous:
        return group, ANONYMOUS_PREFIX + secrets.token_hex(8), None
    if hello.visitor is None or hello.token is None:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "a visitor hello needs group, visitor and token")
    expires = await request.app[CREDENTIALS].verify(group, tokens.VISITOR, hello.visitor, hello.token)
    return group, hello.visitor, expires


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /v1/agent/login`` with ``{"group", "agent", "key"}``."""
    settings = request.app[SETTINGS]
    await read_body(request)  # within request_timeout, or 408
    try:
        body: Any = await request.json()
        if not isinstance(body, dict):
            raise ValueError
        group_id = checks.identifier(body.get("group"), "group")
        agent = checks.identifier(body.get("agent"), "agent")
        key = checks.token(body.get("key"), "key")
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
        return error_response(400, ErrorCode.INVALID, "expected a JSON object with group, agent and key")
    except ProtocolError as exc:
        return error_response(400, exc.code, exc.message)
    records, address = request.app[RECORDS], client_address(request)
    try:
        await attempts.refuse_if_over(records, settings, "login", address)
    except LimitExceeded as exc:
        count(exc)
        response = error_response(429, exc.code, exc.message)
        response.headers["Retry-After"] = "60"
        return response
    group = group_or_stand_in(settings, group_id)
    if group is not _NO_GROUP and not await origin_allowed(request, group):
        return error_response(403, ErrorCode.FORBIDDEN, "origin not allowed for this group")
    try:
        await request.app[CREDENTIALS].verify(group, tokens.AGENT, agent, key)
    except ProtocolError as exc:
        if exc.code == ErrorCode.BACKEND_UNAVAILABLE:  # the group's public keys could not be fetched
            return error_response(503, exc.code, exc.message)
        log.info("agent login refused for %s/%s: %s", group_id, agent, exc.code)
        await attempts.count_refusal(records, "login", address)
        if exc.code == ErrorCode.UNAUTHORIZED:  # an unknown group and a bad key look the same
            return error_response(401, exc.code, "unknown group or bad key")
        return error_response(STATUS.get(exc.code, 401), exc.code, exc.message)
    cookies = request.app[COOKIES]
    session = await cookies.new_session()
    issued = time.time()
    expires = int(issued) + settings.session_max_age
    # "iat": a revocation of the agent's logins (``revoke_agent``) refuses every cookie issued before it.
    session.update({"group": group.id, "agent": agent, "expires": expires, "sid": secrets.token_hex(16), "iat": issued})
    log.info("agent %s/%s logged in", group.id, agent)
    response = web.json_response({"group": group.id, "agent": agent, "expires": expires})
    await cookies.save_session(request, response, session)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """End the login everywhere: the session lives in the cookie, so a copy
    of it would outlive a cleared cookie; its ID is recorded as revoked (in
    the backend, for every instance) until the session would have expired.
    While the backend is unreachable the logout is refused (503) and the
    cookie stays valid: a logout that could not be recorded everywhere must
    not look done."""
    cookies = request.app[COOKIES]
    session = await cookies.load_session(request)
    group = request.app[SETTINGS].groups.get(session.get("group", ""))
    if group is not None and not await origin_allowed(request, group):
        # A foreign page must not log an agent out (a nuisance CSRF on a cookie it cannot read).
        return error_response(403, ErrorCode.FORBIDDEN, "origin not allowed for this group")
    session_id, expires = session.get("sid"), session.get("expires", 0)
    if isinstance(session_id, str) and expires > time.time():
        try:
            await request.app[RECORDS].kv_set(revoked_login_key(session_id), b"1", ttl=expires - time.time())
        except BackendUnavailable as exc:
            log.warning("logout refused: cannot record the revocation while the backend is unreachable")
            response = error_response(503, exc.code, "the logout cannot be recorded now; try again shortly")
            response.headers["Retry-After"] = "1"
            return response
    session.invalidate()
    response = web.json_response({"ok": True})
    await cookies.save_session(request, response, session)  # the cookie cleared
    return response


@dataclass(frozen=True, slots=True)
class AgentLogin:
    """An agent's login session, from its cookie."""

    group: GroupConfig
    agent: str
    expires: float  # unix s when the login ends
    issued: float  # unix s when it was made (0 for cookies made before Herald recorded it)


async def agent_identity(request: web.Request) -> tuple[GroupConfig, str] | None:
    """The logged-in agent of this request's session, if still valid."""
    login = await agent_login(request)
    return None if login is None else (login.group, login.agent)


async def agent_login(request: web.Request) -> AgentLogin | None:
    """This request's login session, if still valid: not expired, not logged
    out, and not made before its agent's logins were revoked."""
    settings = request.app[SETTINGS]
    session = await request.app[COOKIES].load_session(request)
    group = settings.groups.get(session.get("group", ""))
    agent, session_id = session.get("agent"), session.get("sid")
    if group is None or not isinstance(agent, str) or not isinstance(session_id, str):
        return None
    expires, issued = session.get("expires", 0), session.get("iat", 0)
    if not isinstance(expires, int | float) or not isinstance(issued, int | float) or expires < time.time():
        return None
    try:
        # Both reads in one batch: one round trip.
        logged_out, not_before = await asyncio.gather(
            request.app[RECORDS].kv_get(revoked_login_key(session_id)),
            request.app[REVOCATIONS].not_before(group.id, agent),
        )
        if logged_out is not None or issued < not_before:
            return None
    except BackendUnavailable:
        # Local agents keep working through a Redis outage; a logout or a
        # revocation made meanwhile is only enforced again once Redis is back.
        log.warning("backend unavailable: cannot check whether %s/%s logged out", group.id, agent)
    return AgentLogin(group, agent, float(expires), float(issued))
