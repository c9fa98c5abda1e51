"""JWT credentials (PROTOCOL.md §4.2): the worked examples are what they say,
each algorithm works end to end (HS256 with the group's secrets, RS256 from
a JWKS file, ES256 from a JWKS URL), API keys may be JWTs, the README's
minting snippet makes tokens the server takes, and the group settings that
pin an algorithm are checked at start. The attacks are in
tests/security/test_jwt_attacks.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from herald_presence.protocol import tokens
from herald_presence.protocol.client.base import Refused
from herald_presence.protocol.errors import ErrorCode, ProtocolError
from herald_presence.server.config import ConfigError, GroupConfig, Settings, load

from .conftest import Start
from .harness import SECRET, HeraldServer, settings
from .processes import REPO

PROTOCOL = (REPO / "protocol" / "PROTOCOL.md").read_text()
README = (REPO / "README.md").read_text()
DOCS_NOW = 1767225600
DOCS_SECRET = "s3cret-for-docs-only"


def section(text: str, heading: str) -> str:
    match = re.search(rf"^#+ {re.escape(heading)}[^\n]*\n(.*?)(?=^#+ |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {heading!r}"
    return match[1]


def blocks(text: str, language: str) -> list[str]:
    return [block.strip() for block in re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)]


def claims(subject: str = "v1", role: str = "visitor", **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": subject, "group": "acme", "role": role, "aud": "herald", "iat": now, "exp": now + 600, **overrides}


def credentials_for(groups: dict[str, GroupConfig]) -> Any:
    from herald_presence.server.web.credentials import Credentials

    return Credentials(Settings(groups=groups))


# --- the worked examples ------------------------------------------------------------------


async def test_the_worked_examples_in_protocol_md_are_accepted_as_they_say(tmp_path: Path) -> None:
    text = section(PROTOCOL, "4.2 JWTs")
    hs_visitor, hs_agent, rs_visitor = blocks(text, "text")
    (jwks,) = blocks(text, "json")
    docs = GroupConfig("acme", [DOCS_SECRET])
    verify = credentials_for({"acme": docs}).verify
    assert await verify(docs, tokens.VISITOR, "v-42", hs_visitor, now=DOCS_NOW) == DOCS_NOW + 3600
    assert await verify(docs, tokens.AGENT, "alice", hs_agent, now=DOCS_NOW) == DOCS_NOW + 300

    # The HS256 signature is HMAC-SHA256 of "header.payload" with the secret, as written.
    header, payload, signature = hs_visitor.split(".")
    mac = hmac.new(DOCS_SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == signature
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(base64.urlsafe_b64decode(payload + "==")) == {
        "sub": "v-42",
        "group": "acme",
        "role": "visitor",
        "aud": "herald",
        "iat": DOCS_NOW,
        "exp": DOCS_NOW + 3600,
    }
    # ``tokens.make_jwt`` (what ``herald token --jwt`` prints) makes these very tokens.
    assert tokens.make_jwt(DOCS_SECRET, tokens.VISITOR, "acme", "v-42", 3600, now=DOCS_NOW) == hs_visitor
    assert tokens.make_jwt(DOCS_SECRET, tokens.AGENT, "acme", "alice", 300, now=DOCS_NOW) == hs_agent

    (tmp_path / "jwks.json").write_text(jwks)
    rs_group = GroupConfig("acme", [DOCS_SECRET], jwt_algorithm="RS256", jwks_file=str(tmp_path / "jwks.json"))
    rs_verify = credentials_for({"acme": rs_group}).verify
    assert await rs_verify(rs_group, tokens.VISITOR, "v-42", rs_visitor, now=DOCS_NOW) == DOCS_NOW + 3600
    assert jwt.get_unverified_header(rs_visitor) == {"alg": "RS256", "kid": "docs-2026", "typ": "JWT"}

    # Pinned algorithms: each group refuses the other's token; an hour later both are expired.
    for group, token in ((docs, rs_visitor), (rs_group, hs_visitor)):
        with pytest.raises(ProtocolError) as wrong:
            await credentials_for({"acme": group}).verify(group, tokens.VISITOR, "v-42", token, now=DOCS_NOW)
        assert wrong.value.code == ErrorCode.UNAUTHORIZED
    with pytest.raises(ProtocolError) as late:
        await verify(docs, tokens.VISITOR, "v-42", hs_visitor, now=DOCS_NOW + 3601)
    assert late.value.code == ErrorCode.TOKEN_EXPIRED


# --- end to end ----------------------------------------------------------------------------


async def test_hs256_jwts_connect_a_visitor_log_an_agent_in_and_refresh(herald: HeraldServer) -> None:
    signed = claims()  # compared with what was signed: claims() again may fall in the next second
    visitor = await herald.visitor("v1", token=jwt.encode(signed, SECRET))
    agent = await herald.agent("alice", key=lambda: jwt.encode(claims("alice", "agent"), SECRET))
    await agent.subscribe(["v1"])
    assert await agent.show_terms("v1") == 1
    assert visitor.welcome is not None and visitor.welcome.expires == signed["exp"]


async def test_rotation_accepts_jwts_of_either_secret(start_herald: Start) -> None:
    new = "rotated-new-secret-acme-0123456789"
    herald = await start_herald(groups=f"acme={new}")
    herald.settings.groups["acme"].secrets = [new, SECRET]
    for secret in (new, SECRET):
        assert (await herald.visitor(f"v-{secret[:3]}", token=jwt.encode(claims(f"v-{secret[:3]}"), secret))).connected


async def test_rs256_from_a_jwks_file(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "2026-01"}]}))
    config = settings()
    config.groups["acme"].jwt_algorithm = "RS256"
    config.groups["acme"].jwks_file = str(tmp_path / "jwks.json")
    herald = await HeraldServer(config).start()
    try:
        token = jwt.encode(claims(), key, algorithm="RS256", headers={"kid": "2026-01"})
        assert (await herald.visitor("v1", token=token)).connected
        unknown_kid = jwt.encode(claims("v2"), key, algorithm="RS256", headers={"kid": "2027-01"})
        visitor = await herald.visitor("v2", token=unknown_kid, connect=False, reconnect=False)
        with pytest.raises(Refused) as refused:
            await visitor.connect()
        assert refused.value.code == ErrorCode.UNAUTHORIZED
    finally:
        await herald.stop()


@pytest.fixture
async def jwks_server() -> AsyncIterator[dict[str, Any]]:
    """A back end's JWKS endpoint on loopback; ``state["keys"]`` is what it serves."""
    state: dict[str, Any] = {"keys": [], "fetches": 0}

    async def serve(_request: web.Request) -> web.Response:
        state["fetches"] += 1
        return web.json_response({"keys": state["keys"]})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state["url"] = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    yield state
    await runner.cleanup()


def es256_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "kid": kid, "alg": "ES256"}


async def test_es256_from_a_jwks_url_with_a_key_rotation(jwks_server: dict[str, Any]) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks_server["keys"] = [es256_jwk(first, "k1")]
    config = settings()
    config.groups["acme"].jwt_algorithm = "ES256"
    config.groups["acme"].jwks_url = jwks_server["url"]
    herald = await HeraldServer(config).start()
    try:
        await _es256_rotation(herald, jwks_server, first, second)
    finally:
        await herald.stop()


async def _es256_rotation(herald: HeraldServer, jwks_server: dict[str, Any], first: Any, second: Any) -> None:
    from herald_presence.server.web.keys import CREDENTIALS

    token = jwt.encode(claims(), first, algorithm="ES256", headers={"kid": "k1"})
    assert (await herald.visitor("v1", token=token)).connected
    assert jwks_server["fetches"] == 1
    assert (await herald.visitor("v2", token=jwt.encode(claims("v2"), first, "ES256", {"kid": "k1"}))).connected
    assert jwks_server["fetches"] == 1, "kept, not fetched per token"

    # The back end rotates to k2: a token naming it fetches the set again.
    jwks_server["keys"] = [es256_jwk(first, "k1"), es256_jwk(second, "k2")]
    herald.app[CREDENTIALS]._key_sets["acme"].fetched -= 60  # the last fetch is older than the retry pause
    assert (await herald.visitor("v3", token=jwt.encode(claims("v3"), second, "ES256", {"kid": "k2"}))).connected
    assert jwks_server["fetches"] == 2
    # A JWT signed HS256 with the group's secret is refused: the group pins ES256.
    hs = await herald.visitor("v4", token=jwt.encode(claims("v4"), SECRET), connect=False, reconnect=False)
    with pytest.raises(Refused) as refused:
        await hs.connect()
    assert refused.value.code == ErrorCode.UNAUTHORIZED


async def test_an_api_key_may_be_a_jwt(herald: HeraldServer) -> None:
    url = herald.base_url + "/v1/groups/acme/visitors/v1"
    api_jwt = jwt.encode(claims("acme", "api"), SECRET)
    async with aiohttp.ClientSession() as http:
        ok = await http.get(url, headers={"Authorization": f"Bearer {api_jwt}"})
        assert ok.status == 200 and (await ok.json())["visitor"] == "v1"
        as_visitor = jwt.encode(claims("acme", "visitor"), SECRET)
        assert (await http.get(url, headers={"Authorization": f"Bearer {as_visitor}"})).status == 401
        other = jwt.encode({**claims("other", "api"), "group": "other"}, herald.secret("other"))
        assert (await http.get(url, headers={"Authorization": f"Bearer {other}"})).status == 403


# --- the README and the configuration ------------------------------------------------------


async def test_the_readmes_python_snippet_mints_a_jwt_the_server_takes(herald: HeraldServer) -> None:
    text = section(README, "Tokens from your back end")
    (snippet,) = blocks(text, "python")
    assert "jwt.encode" in snippet and "javascript" in text.lower()
    namespace: dict[str, Any] = {"GROUP_SECRET": SECRET}
    exec(snippet, namespace)  # defines herald_jwt(secret, group, role, subject, ttl) and mints two
    mint = namespace["herald_jwt"]
    assert (await herald.visitor("v1", token=mint(SECRET, "acme", "visitor", "v1", 600))).connected
    assert (await herald.agent("alice", key=mint(SECRET, "acme", "agent", "alice", 300))).connected
    assert jwt.decode(namespace["visitor_token"], SECRET, ["HS256"], audience="herald")["sub"] == "v-42"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"jwt_algorithm": "none"}, "jwt_algorithm must be one of"),
        ({"jwt_algorithm": "HS512"}, "jwt_algorithm must be one of"),
        ({"jwt_algorithm": "RS256"}, "exactly one of jwks_file and jwks_url"),
        ({"jwt_algorithm": "RS256", "jwks_file": "a", "jwks_url": "https://x/"}, "exactly one of"),
        ({"jwks_url": "https://idp.example/jwks"}, "need RS/ES256"),
        ({"jwt_algorithm": "ES256", "jwks_url": "http://idp.example/jwks"}, "must be https"),
        ({"jwt_audience": ""}, "jwt_audience must not be empty"),
        ({"enforce_expiry": "yes"}, "enforce_expiry must be true or false"),
    ],
)
def test_jwt_group_settings_are_checked_at_start(tmp_path: Path, table: dict[str, Any], problem: str) -> None:
    lines = [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    config = tmp_path / "herald.toml"
    config.write_text('[groups.acme]\nsecret = "test-secret-acme-0123456789"\n' + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=problem):
        load(str(config), env={})


def test_a_jwks_file_without_a_usable_key_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    group = GroupConfig("acme", [SECRET], jwt_algorithm="RS256", jwks_file=str(tmp_path / "jwks.json"))
    with pytest.raises(ConfigError, match="no public key in it can verify RS256"):
        credentials_for({"acme": group})
