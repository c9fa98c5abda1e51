"""The agent session cookie: nothing opens ``/v1/agent`` but a live login,
and the cookie is one a page's script cannot read or send cross-site."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import ErrorCode

from ..conftest import Start
from ..harness import SECRET, HeraldServer
from ..redis_server import RedisServer
from .conftest import Launch
from .helpers import assert_bystanders_served, error_of, login, session

COOKIE = "HERALD_SESSION"


async def _upgrade_status(herald: HeraldServer, cookie: str | None) -> tuple[int, str | None]:
    """Status (and error code) of an agent upgrade carrying exactly ``cookie``."""
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie is not None else {}
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(herald.base_url + "/v1/agent", headers=headers)
        except aiohttp.WSServerHandshakeError as refused:
            response = await http.get(
                herald.base_url + "/v1/agent",
                headers={
                    **headers,
                    "Upgrade": "websocket",
                    "Connection": "Upgrade",
                    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version": "13",
                },
            )
            code = await error_of(response) if response.status == refused.status else None
            return refused.status, code
        await ws.close()
        return 101, None


async def _logged_in_cookie(herald: HeraldServer, **login_args: str) -> tuple[aiohttp.ClientResponse, str]:
    async with session() as http:
        response = await login(http, herald.base_url, **login_args)
        assert response.status == 200
        return response, response.cookies[COOKIE].value


def _attributes(set_cookie: str) -> dict[str, str]:
    _value, *attributes = (part.strip() for part in set_cookie.split(";"))
    pairs = (attribute.partition("=") for attribute in attributes)
    return {name.lower(): value for name, _, value in pairs}


async def test_agent_websocket_without_a_cookie(herald: HeraldServer) -> None:
    assert await _upgrade_status(herald, None) == (401, ErrorCode.UNAUTHORIZED)
    await assert_bystanders_served(herald.base_url)


@pytest.mark.parametrize(
    "cookie",
    [
        "",
        "garbage",
        base64.urlsafe_b64encode(b"\x80" + bytes(120)).decode(),  # Fernet-shaped, wrong key
        '{"group": "acme", "agent": "alice", "expires": 9999999999}',  # a session forged in clear
    ],
    ids=["empty", "garbage", "fernet_shaped", "cleartext_session"],
)
async def test_agent_websocket_with_a_garbage_cookie(herald: HeraldServer, cookie: str) -> None:
    assert await _upgrade_status(herald, cookie) == (401, ErrorCode.UNAUTHORIZED)
    await assert_bystanders_served(herald.base_url)


async def test_agent_websocket_with_a_tampered_cookie(herald: HeraldServer) -> None:
    _response, cookie = await _logged_in_cookie(herald)
    middle = len(cookie) // 2
    tampered = cookie[:middle] + ("A" if cookie[middle] != "A" else "B") + cookie[middle + 1 :]
    assert await _upgrade_status(herald, tampered) == (401, ErrorCode.UNAUTHORIZED)
    assert (await _upgrade_status(herald, cookie))[0] == 101
    await assert_bystanders_served(herald.base_url)


async def test_agent_websocket_with_a_cookie_of_another_server(launch: Launch) -> None:
    """Without a shared ``session_secret`` each server has its own key."""
    first, second = await launch(), await launch()
    _response, cookie = await _logged_in_cookie(first)
    assert await _upgrade_status(second, cookie) == (401, ErrorCode.UNAUTHORIZED)
    await assert_bystanders_served(second.base_url)


async def test_agent_websocket_after_logout_in_the_same_browser(herald: HeraldServer) -> None:
    async with session() as http:
        assert (await login(http, herald.base_url)).status == 200
        logout = await http.post(herald.base_url + "/v1/agent/logout")
        assert logout.status == 200
        assert _attributes(logout.headers["Set-Cookie"])["max-age"] == "0"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(herald.base_url + "/v1/agent")
        assert refused.value.status == 401
    await assert_bystanders_served(herald.base_url)


async def test_agent_websocket_with_a_cookie_copied_before_logout(herald: HeraldServer) -> None:
    """Someone who copied the cookie (a shared machine, a leaked HAR file)
    must lose access when the agent logs out."""
    async with session() as http:
        response = await login(http, herald.base_url)
        stolen = response.cookies[COOKIE].value
        assert (await http.post(herald.base_url + "/v1/agent/logout")).status == 200
    assert await _upgrade_status(herald, stolen) == (401, ErrorCode.UNAUTHORIZED)
    await assert_bystanders_served(herald.base_url)


async def test_agent_websocket_with_a_cookie_replayed_after_the_session_expired(launch: Launch) -> None:
    # 2 s, not 1: the session's creation time is kept in whole seconds, so a
    # 1 s session can be over a few milliseconds after the login.
    herald = await launch(session_max_age=2)
    _response, cookie = await _logged_in_cookie(herald)
    assert (await _upgrade_status(herald, cookie))[0] == 101
    await asyncio.sleep(3.1)
    assert await _upgrade_status(herald, cookie) == (401, ErrorCode.UNAUTHORIZED)
    await assert_bystanders_served(herald.base_url)


async def test_login_cookie_flags_by_default(herald: HeraldServer) -> None:
    key = tokens.agent_key(SECRET, "acme", "alice")
    response, cookie = await _logged_in_cookie(herald, key=key)
    attributes = _attributes(response.headers["Set-Cookie"])
    assert "httponly" in attributes
    assert attributes["samesite"] == "Lax"
    assert attributes["path"] == "/"
    assert attributes["max-age"] == str(herald.settings.session_max_age) == "28800"
    assert "secure" not in attributes
    assert len(response.headers.getall("Set-Cookie")) == 1
    # Opaque: neither the identity nor the key can be read out of it.
    for clear in ("alice", "acme", key, key.split(".")[1]):
        assert clear not in cookie
        assert clear not in base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4)).decode("latin-1")


async def test_login_cookie_is_secure_with_cookie_secure(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(cookie_secure="true", cookie_samesite="Strict")
    response, _cookie = await _logged_in_cookie(herald)
    attributes = _attributes(response.headers["Set-Cookie"])
    assert "secure" in attributes and "httponly" in attributes
    assert attributes["samesite"] == "Strict"


async def test_logout_during_a_redis_outage_is_refused_so_a_copied_cookie_is_never_left_working_unseen(
    start_instance: Start, private_redis: RedisServer
) -> None:
    """A logout that cannot be recorded for every instance must not look done:
    503, the cookie stays valid, and the logout succeeds once Redis is back."""
    herald = await start_instance(private_redis)
    async with session() as http:
        response = await login(http, herald.base_url)
        copied = response.cookies[COOKIE].value
        private_redis.stop()
        refused = await http.post(herald.base_url + "/v1/agent/logout")
        assert (refused.status, await error_of(refused)) == (503, ErrorCode.BACKEND_UNAVAILABLE)
        assert refused.headers["Retry-After"] == "1"
        assert "Set-Cookie" not in refused.headers, "the browser keeps its cookie: it is still logged in"
        private_redis.start()
        await asyncio.sleep(0.5)  # the pool's next command reconnects
        assert (await http.post(herald.base_url + "/v1/agent/logout")).status == 200
    assert await _upgrade_status(herald, copied) == (401, ErrorCode.UNAUTHORIZED)
    await assert_bystanders_served(herald.base_url)
