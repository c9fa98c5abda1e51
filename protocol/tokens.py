"""Signed, expiring credentials for visitors and agents.

A customer's back end holds its group's secret and mints these; Herald only
verifies them. Both are ``"<expires>.<signature>"`` where ``expires`` is unix
seconds and the signature is HMAC-SHA256 over a role-tagged message, so a
visitor token can never pass as an agent key (or for another group or ID).

``make_jwt`` mints the same credential as an HS256 JWT (PROTOCOL.md §4.2)
with the standard library: the claims the server requires, signed with the
group's secret. The server verifies JWTs itself (``server/web/credentials.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterable

from .errors import ErrorCode, ProtocolError

VISITOR = "visitor"
AGENT = "agent"
API = "api"  # a CRM back end calling the REST API
MAX_TOKEN_LIFETIME = 366 * 24 * 3600
JWT_AUDIENCE = "herald"  # the ``aud`` a group takes unless it sets its own ``jwt_audience``


def _signature(secret: str, role: str, group: str, subject: str, expires: int) -> str:
    payload = f"herald-v1\n{role}\n{group}\n{subject}\n{expires}".encode()
    mac = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def make_token(secret: str, role: str, group: str, subject: str, ttl: float = 3600, now: float | None = None) -> str:
    """Mint a token for ``subject`` (a visitor or agent ID) in ``group``."""
    expires = int((time.time() if now is None else now) + ttl)
    return f"{expires}.{_signature(secret, role, group, subject, expires)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(
    secret: str,
    role: str,
    group: str,
    subject: str,
    ttl: float = 3600,
    audience: str = JWT_AUDIENCE,
    now: float | None = None,
) -> str:
    """An HS256 JWT for ``subject`` (a visitor or agent ID; the group for an
    API key) in ``group``: the claims ``sub``, ``group``, ``role``, ``aud``,
    ``iat`` and ``exp``, signed with the group's ``secret``."""
    issued = int(time.time() if now is None else now)
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {"sub": subject, "group": group, "role": role, "aud": audience, "iat": issued, "exp": int(issued + ttl)}
    signed = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
    mac = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64url(mac)}"


def visitor_token(secret: str, group: str, visitor: str, ttl: float = 3600) -> str:
    return make_token(secret, VISITOR, group, visitor, ttl)


def agent_key(secret: str, group: str, agent: str, ttl: float = 300) -> str:
    """The login key an agent presents to ``POST /v1/agent/login``."""
    return make_token(secret, AGENT, group, agent, ttl)


def api_key(secret: str, group: str, ttl: float = 365 * 24 * 3600) -> str:
    """The bearer credential of a group's back end for the REST API:
    ``<expires>.<signature>.<group>`` (it names its group, so a key of
    another group is told apart from a forged one)."""
    return f"{make_token(secret, API, group, group, ttl)}.{group}"


def api_key_group(key: str) -> str:
    """The group an API key claims to be for (unverified)."""
    return key.split(".", 2)[2] if key.count(".") >= 2 else ""


def verify_token(
    secrets: Iterable[str], role: str, group: str, subject: str, token: str, now: float | None = None
) -> int:
    """Return the token's expiry, or raise ``unauthorized``/``token_expired``.

    Every candidate secret is compared in constant time, so a group can have
    an old and a new secret during a rotation.
    """
    expires_text, _, signature = token.partition(".")
    if not (expires_text.isascii() and expires_text.isdigit()) or len(expires_text) > 12:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "malformed token")
    if not signature or not signature.isascii():
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "malformed token")
    expires = int(expires_text)
    matched = False
    for secret in secrets:
        expected = _signature(secret, role, group, subject, expires)
        matched |= hmac.compare_digest(expected.encode(), signature.encode())
    if not matched:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "token signature does not match")
    current = time.time() if now is None else now
    if expires < current:
        raise ProtocolError(ErrorCode.TOKEN_EXPIRED, "token has expired")
    if expires > current + MAX_TOKEN_LIFETIME:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "token lifetime is too long")
    return expires
