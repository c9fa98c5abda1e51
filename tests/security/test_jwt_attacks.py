"""Attacks on JWT credentials (PROTOCOL.md §4.2): unsigned tokens, algorithm
confusion, another group's key or claims, a wrong audience, an expired
token, a token of one role used as another. Each is refused with the
documented error before anything is done with it, and bystanders are
served."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Welcome
from herald_presence.server.config import Settings

from ..harness import OTHER_SECRET, SECRET, HeraldServer
from .conftest import Launch
from .helpers import assert_bystanders_served, error_of, handshake, hello, login

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = RSA_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "v1", "group": "acme", "role": "visitor", "aud": "herald", "iat": now, "exp": now + 600, **overrides}


def hs256(secret: str = SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")


def _b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


async def _refused(herald: HeraldServer, token: str, code: ErrorCode, visitor: str = "v1") -> Error:
    error, close_code = await handshake(herald.base_url, hello(visitor, token=token))
    assert isinstance(error, Error) and error.code == code, error
    assert close_code == CloseCode.UNAUTHORIZED
    await assert_bystanders_served(herald.base_url)
    return error


def _rs256_group(tmp_path: Path) -> Any:
    """``configure`` for ``launch``: acme pins RS256 with a JWKS file of RSA_KEY."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))

    def configure(settings: Settings) -> None:
        settings.groups["acme"].jwt_algorithm = "RS256"
        settings.groups["acme"].jwks_file = str(path)

    return configure


async def test_a_valid_jwt_is_welcomed(herald: HeraldServer) -> None:
    welcome, _ = await handshake(herald.base_url, hello("v1", token=hs256()))
    assert isinstance(welcome, Welcome)


async def test_jwt_with_alg_none(herald: HeraldServer) -> None:
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims())}."
    error = await _refused(herald, unsigned, ErrorCode.UNAUTHORIZED)
    assert "alg none" in error.message
    for spelling in ("None", "NONE", "nOnE"):
        await _refused(herald, f"{_b64({'alg': spelling})}.{_b64(claims())}.", ErrorCode.UNAUTHORIZED)


async def test_jwt_algorithm_confusion_with_the_public_key_as_hmac_secret(launch: Launch, tmp_path: Path) -> None:
    herald = await launch(configure=_rs256_group(tmp_path))
    rs256 = jwt.encode(claims(), RSA_KEY, algorithm="RS256", headers={"kid": "k1"})
    welcome, _ = await handshake(herald.base_url, hello("v1", token=rs256))
    assert isinstance(welcome, Welcome), "the group's own RS256 token passes"
    # The classic confusion: HS256 "signed" with the public key the server verifies RS256 with.
    header, payload = _b64({"alg": "HS256", "typ": "JWT", "kid": "k1"}), _b64(claims())
    mac = hmac.new(PUBLIC_PEM, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    await _refused(herald, forged, ErrorCode.UNAUTHORIZED)
    await _refused(herald, hs256(), ErrorCode.UNAUTHORIZED)  # the group's secret, the wrong algorithm
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await _refused(
        herald, jwt.encode(claims(), other_key, algorithm="RS256", headers={"kid": "k1"}), ErrorCode.UNAUTHORIZED
    )


async def test_jwt_signed_with_another_groups_secret(herald: HeraldServer) -> None:
    await _refused(herald, hs256(OTHER_SECRET), ErrorCode.UNAUTHORIZED)
    await _refused(herald, hs256("guessed-secret-0123456789"), ErrorCode.UNAUTHORIZED)


async def test_jwt_of_another_group_presented_to_this_one(herald: HeraldServer) -> None:
    # Signed with acme's own secret but made out for "other": the group claim is checked.
    error = await _refused(herald, hs256(group="other"), ErrorCode.UNAUTHORIZED)
    assert error.message == "token is for another group"


async def test_jwt_with_a_wrong_audience(herald: HeraldServer) -> None:
    error = await _refused(herald, hs256(aud="some-other-service"), ErrorCode.UNAUTHORIZED)
    assert "audience" in error.message
    await _refused(
        herald, jwt.encode({k: v for k, v in claims().items() if k != "aud"}, SECRET), ErrorCode.UNAUTHORIZED
    )


async def test_expired_jwt(herald: HeraldServer) -> None:
    now = int(time.time())
    await _refused(herald, hs256(iat=now - 120, exp=now - 60), ErrorCode.TOKEN_EXPIRED)
    # An expired token re-signed by someone without the secret is no better.
    await _refused(herald, hs256("guessed-secret-0123456789", exp=now + 60), ErrorCode.UNAUTHORIZED)


async def test_jwt_for_another_visitor_or_lifetime_over_366_days(herald: HeraldServer) -> None:
    await _refused(herald, hs256(sub="v2"), ErrorCode.UNAUTHORIZED, visitor="v1")
    await _refused(herald, hs256(exp=int(time.time()) + 367 * 86400), ErrorCode.UNAUTHORIZED)
    await _refused(herald, hs256(iat=int(time.time()) + 3600), ErrorCode.UNAUTHORIZED)  # issued in the future


async def test_visitor_jwt_used_as_an_agent_login_key(herald: HeraldServer) -> None:
    async with aiohttp.ClientSession() as http:
        as_key = await login(http, herald.base_url, agent="v1", key=hs256())
        assert (as_key.status, await error_of(as_key)) == (401, "unauthorized")
        agent_jwt = hs256(sub="alice", role="agent")
        assert (await login(http, herald.base_url, agent="alice", key=agent_jwt)).status == 200
        expired = hs256(sub="alice", role="agent", exp=int(time.time()) - 1)
        refused = await login(http, herald.base_url, agent="alice", key=expired)
        assert (refused.status, await error_of(refused)) == (401, "token_expired")
    await _refused(herald, hs256(role="agent"), ErrorCode.UNAUTHORIZED)  # an agent key as a visitor token
    await assert_bystanders_served(herald.base_url)
