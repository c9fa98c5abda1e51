"""Credentials that were revoked or ran out (PROTOCOL.md §3.4, §12.4): a cookie
copied before its agent's logins were revoked, a visitor coming back while
its group refuses it, another group's back end trying to cut someone off,
a connection kept open past its token's expiry, a refresh with someone
else's token."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import yarl

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Refresh, Welcome

from ..harness import OTHER_SECRET, SECRET, HeraldServer, receive
from .conftest import Launch
from .helpers import assert_bystanders_served, error_of, handshake, hello, login, session

API_KEY = tokens.api_key(SECRET, "acme")


async def _control(herald: HeraldServer, path: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(herald.base_url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as response,
    ):
        payload = await response.json(content_type=None)
        return response.status, payload["error"]["code"] if "error" in payload else "ok"


async def test_agent_cookie_copied_before_its_logins_were_revoked(herald: HeraldServer) -> None:
    async with session() as http:
        assert (await login(http, herald.base_url)).status == 200
        copied = http.cookie_jar.filter_cookies(yarl.URL(herald.base_url))["HERALD_SESSION"].value
    assert (await _control(herald, "/v1/groups/acme/agents/alice/revoke", API_KEY)) == (200, "ok")
    headers = {"Cookie": f"HERALD_SESSION={copied}"}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        upgrade = await http.get(
            herald.base_url + "/v1/agent",
            headers={
                **headers,
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert (upgrade.status, await error_of(upgrade)) == (401, "unauthorized")
        lookup = await http.get(herald.base_url + "/v1/groups/acme/codes/123456/agent", headers=headers)
        assert lookup.status == 401
    await assert_bystanders_served(herald.base_url)


async def test_visitor_coming_back_while_its_group_refuses_it(herald: HeraldServer) -> None:
    welcome, _ = await handshake(herald.base_url, hello("v1"))
    assert isinstance(welcome, Welcome)
    assert (await _control(herald, "/v1/groups/acme/visitors/v1/disconnect", API_KEY, {"refuse_for": 60})) == (
        200,
        "ok",
    )
    for _ in range(3):  # however often it tries, with a fresh token each time
        error, close_code = await handshake(
            herald.base_url, hello("v1", token=tokens.visitor_token(SECRET, "acme", "v1"))
        )
        assert isinstance(error, Error) and error.code == ErrorCode.REVOKED, error
        assert close_code == CloseCode.REVOKED
    other, _ = await handshake(herald.base_url, hello("v2"))
    assert isinstance(other, Welcome), "another visitor of the group is not refused"
    await assert_bystanders_served(herald.base_url)


async def test_another_groups_back_end_cutting_off_acmes_visitors_and_agents(herald: HeraldServer) -> None:
    visitor = await herald.visitor("v1", reconnect=False)
    agent = await herald.agent("alice", reconnect=False)
    other_key = tokens.api_key(OTHER_SECRET, "other")
    expired_key = tokens.make_token(SECRET, tokens.API, "acme", "acme", ttl=-5) + ".acme"
    for key, expected in ((other_key, (403, "forbidden")), (expired_key, (401, "token_expired"))):
        for path in (
            "/v1/groups/acme/visitors/v1/disconnect",
            "/v1/groups/acme/agents/alice/revoke",
            "/v1/groups/acme/sessions/s0123456789abcdef/end",
        ):
            assert await _control(herald, path, key, {"refuse_for": 600}) == expected, (key, path)
    await asyncio.sleep(0.2)
    assert visitor.connected and agent.connected
    welcome, _ = await handshake(herald.base_url, hello("v1"))
    assert isinstance(welcome, Welcome), "no refusal was recorded"
    await assert_bystanders_served(herald.base_url)


async def test_connection_kept_open_past_its_tokens_expiry(launch: Launch) -> None:
    def enforce(settings: Any) -> None:
        settings.groups["acme"].enforce_expiry = True

    herald = await launch(configure=enforce)
    token = tokens.make_token(SECRET, tokens.VISITOR, "acme", "v1", ttl=2)
    async with aiohttp.ClientSession() as http, http.ws_connect(herald.base_url + "/v1/visitor") as ws:
        await ws.send_bytes(hello("v1", token=token))
        assert isinstance(await receive(ws), Welcome)
        # A refresh with another visitor's token, or a forged one, changes nothing.
        for request_id, wrong in enumerate(
            (tokens.visitor_token(SECRET, "acme", "v2"), tokens.visitor_token(OTHER_SECRET, "acme", "v1")), 1
        ):
            await ws.send_bytes(codec.encode(Refresh(id=request_id, token=wrong)))
            refused = await receive(ws)
            assert isinstance(refused, Error) and (refused.code, refused.id) == (ErrorCode.UNAUTHORIZED, request_id)
        expired = await receive(ws, seconds=5)
        assert isinstance(expired, Error) and expired.code == ErrorCode.TOKEN_EXPIRED
        closing = await ws.receive(timeout=5)
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, CloseCode.UNAUTHORIZED)
        assert time.time() >= int(token.split(".")[0])
    await assert_bystanders_served(herald.base_url)
