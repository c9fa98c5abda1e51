"""Credentials in either format: Herald's v1 HMAC tokens and standard JWTs.

A customer's back end may mint visitor tokens, agent login keys and API keys
with Herald's own format (``protocol.tokens``) or as JWTs with any JWT
library. A JWT is told apart by its shape (three base64url parts, the first
a JSON header: ``eyJ…``); the v1 formats never look like that.

A JWT is accepted when:

* its header's ``alg`` is the one its group pins (``jwt_algorithm``:
  ``HS256`` with the group's secrets, the default; ``RS256`` or ``ES256``
  with the group's public keys, ``jwks_file`` or ``jwks_url``). ``none``
  and every other algorithm are refused before any key is tried, so a
  public key can never be used as an HMAC secret;
* its signature verifies (each secret of a rotation is tried; a JWKS key
  is chosen by ``kid``, or each key when the header names none);
* its claims are ``aud`` = the group's ``jwt_audience`` (``"herald"``),
  ``group`` = the group, ``role`` = ``visitor`` / ``agent`` / ``api``,
  ``sub`` = the visitor ID, agent ID or (an API key) the group, ``iat``
  no later than a minute from now, ``exp`` in the future and at most 366
  days away (``nbf``, if present, passed).

Failures are the v1 ones: ``token_expired`` when only the expiry is past,
``unauthorized`` otherwise, with a message saying which check failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.config import ConfigError, GroupConfig, Settings

log = logging.getLogger(__name__)

# Herald checks its own minimum (16 characters) on group secrets; PyJWT's
# advice (32 bytes for HS256) is in the README, not a warning per token.
warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)

JWKS_TTL = 300.0  # seconds a fetched JWKS is used before it is fetched again
JWKS_RETRY = 30.0  # an unknown kid fetches again at most this often
JWKS_TIMEOUT = 5.0
MAX_JWKS_BYTES = 256 * 1024
CLOCK_SKEW = 60.0  # an iat or nbf this far in the future still passes
REQUIRED_CLAIMS = ("sub", "exp", "iat", "aud", "group", "role")
_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    "verify_aud": True,
    "verify_exp": False,  # the expiry, iat and nbf are checked here, against one "now"
    "verify_iat": False,
    "verify_nbf": False,
    "require": ["sub", "exp", "iat", "aud"],
}


def is_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


def unverified_claims(token: str) -> Mapping[str, Any]:
    """The claims of a JWT, unchecked (to find the group an API key claims)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}
    return claims if isinstance(claims, dict) else {}


# A wrong algorithm and a wrong signature get one answer: a group's pinned
# algorithm is not told (nor, through it, whether a group exists: an unknown
# group is checked against a stand-in, auth.group_or_stand_in).
NO_MATCH = "token signature does not match the group's algorithm and keys"


def _refused(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNAUTHORIZED, message)


class KeySet:
    """The public keys of a group that pins RS256 or ES256: from a file (read
    at start) or a URL (fetched when needed, kept ``JWKS_TTL``)."""

    def __init__(self, group: GroupConfig) -> None:
        self.group = group
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetched = 0.0  # monotonic time of the last fetch
        self._lock = asyncio.Lock()
        if group.jwks_file:
            try:
                self.keys = parse_jwks(Path(group.jwks_file).read_text(), group.jwt_algorithm)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"group {group.id!r}: jwks_file {group.jwks_file}: {exc}") from None

    async def candidates(self, kid: str | None) -> list[jwt.PyJWK]:
        if self.group.jwks_url:
            stale = time.monotonic() - self.fetched > JWKS_TTL
            unknown = kid is not None and kid not in self.keys
            if stale or (unknown and time.monotonic() - self.fetched > JWKS_RETRY):
                await self._fetch()
        if kid is not None:
            key = self.keys.get(kid)
            return [key] if key is not None else []
        return list(self.keys.values())

    async def _fetch(self) -> None:
        async with self._lock:
            fetched_before = self.fetched
            if time.monotonic() - fetched_before < 1.0:
                return  # another request fetched it just now
            try:
                timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT)
                async with aiohttp.ClientSession(timeout=timeout) as http, http.get(self.group.jwks_url) as response:
                    if response.status != 200:
                        raise ValueError(f"HTTP {response.status}")
                    body = await response.content.read(MAX_JWKS_BYTES + 1)
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("larger than 256 KiB")
                self.keys = parse_jwks(body.decode(), self.group.jwt_algorithm)
                self.fetched = time.monotonic()
            except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
                log.warning("group %s: cannot fetch its JWKS from %s: %r", self.group.id, self.group.jwks_url, exc)
                if not self.keys:
                    raise ProtocolError(
                        ErrorCode.BACKEND_UNAVAILABLE, "the group's public keys cannot be fetched; try again shortly"
                    ) from None
                # The keys fetched before serve on; try again after JWKS_RETRY.
                self.fetched = time.monotonic() - JWKS_TTL + JWKS_RETRY


def parse_jwks(text: str, algorithm: str) -> dict[str | None, jwt.PyJWK]:
    """The signing keys of a JWKS document usable with ``algorithm``, by ``kid``."""
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError("not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('expected a JWKS document: {"keys": [...]}')
    keys: dict[str | None, jwt.PyJWK] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("alg", algorithm) != algorithm:
            continue
        try:
            keys[entry.get("kid")] = jwt.PyJWK(entry, algorithm=algorithm)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue  # another key type, or not a key: never used for this algorithm
    if not keys:
        raise ValueError(f"no public key in it can verify {algorithm}")
    return keys


class Credentials:
    """Verifies every credential a group's back end mints, in either format."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._key_sets = {
            group.id: KeySet(group) for group in settings.groups.values() if group.jwt_algorithm != "HS256"
        }

    async def verify(self, group: GroupConfig, role: str, subject: str, token: str, now: float | None = None) -> int:
        """The credential's expiry (unix s) if it is a valid ``role``
        credential of ``group`` for ``subject``; else ``ProtocolError``."""
        if is_jwt(token):
            return await self.verify_jwt(group, role, subject, token, now)
        return tokens.verify_token(group.secrets, role, group.id, subject, token, now)

    async def verify_jwt(self, group: GroupConfig, role: str, subject: str, token: str, now: float | None) -> int:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm.lower() == "none":
            raise _refused("unsigned tokens (alg none) are refused")
        if algorithm != group.jwt_algorithm:
            log.debug("a %s JWT for group %s, which takes %s only", algorithm, group.id, group.jwt_algorithm)
            raise _refused(NO_MATCH)
        kid = header.get("kid")
        if algorithm == "HS256":
            keys: list[Any] = list(group.secrets)
        elif group.id in self._key_sets:
            keys = await self._key_sets[group.id].candidates(kid if isinstance(kid, str) else None)
        else:
            keys = []
        claims = self._decode(token, keys, algorithm, group.jwt_audience)
        return _check_claims(claims, group, role, subject, time.time() if now is None else now)

    @staticmethod
    def _decode(token: str, keys: list[Any], algorithm: str, audience: str) -> dict[str, Any]:
        for key in keys:
            try:
                with warnings.catch_warnings():  # short HMAC keys: see the filter at the top
                    warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                    claims: dict[str, Any] = jwt.decode(
                        token, key, algorithms=[algorithm], audience=audience, options=_DECODE_OPTIONS
                    )
                return claims
            except jwt.InvalidSignatureError:
                continue  # the next secret of a rotation, or the next key
            except jwt.InvalidAudienceError:
                raise _refused(f"token audience is not {audience!r}") from None
            except jwt.MissingRequiredClaimError as exc:
                raise _refused(f"token lacks the {exc.claim} claim") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                raise _refused("malformed token") from None
        raise _refused(NO_MATCH)


def _check_claims(claims: dict[str, Any], group: GroupConfig, role: str, subject: str, now: float) -> int:
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise _refused(f"token lacks the {missing[0]} claim")
    if claims["group"] != group.id:
        raise _refused("token is for another group")
    if claims["role"] != role:
        raise _refused(f"token is not a {role} credential")
    if claims["sub"] != subject:
        raise _refused("token is for another subject")
    exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", 0)
    if not all(type(value) in (int, float) for value in (exp, iat, nbf)):
        raise _refused("exp, iat and nbf must be numbers")
    if iat > now + CLOCK_SKEW or nbf > now + CLOCK_SKEW:
        raise _refused("token is not valid yet")
    if exp < now:
        raise ProtocolError(ErrorCode.TOKEN_EXPIRED, "token has expired")
    if exp > now + tokens.MAX_TOKEN_LIFETIME:
        raise _refused("token lifetime is too long")
    return int(exp)
