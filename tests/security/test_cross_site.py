"""Cross-site websocket hijacking and cross-origin REST: a page on a foreign
origin, running in a logged-in agent's (or visitor's) browser, must not be
able to use the credentials that browser holds."""

from __future__ import annotations

import aiohttp
import pytest

from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Welcome
from herald_presence.server.config import Settings

from ..harness import HeraldServer
from .conftest import Launch
from .helpers import CRM_ORIGIN, EVIL, assert_bystanders_served, error_of, handshake, hello, login, session

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
FOREIGN = [EVIL, "null", "http://crm.acme.example", "https://crm.acme.example.evil.example"]


def _allow_crm(server_settings: Settings) -> None:
    server_settings.groups["acme"].allowed_origins = [CRM_ORIGIN]


@pytest.mark.parametrize("origin", FOREIGN)
async def test_agent_websocket_hijack_with_a_valid_cookie_from_a_foreign_origin(launch: Launch, origin: str) -> None:
    herald = await launch(configure=_allow_crm)
    async with session() as http:
        assert (await login(http, herald.base_url)).status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(herald.base_url + "/v1/agent", headers={"Origin": origin})
        assert refused.value.status == 403
        # The same cookie from the group's own CRM, from Herald's own pages and
        # from a non-browser client (no Origin) is fine.
        for allowed in (CRM_ORIGIN, herald.base_url, None):
            ws = await http.ws_connect(herald.base_url + "/v1/agent", headers={"Origin": allowed} if allowed else None)
            await ws.close()
    await assert_bystanders_served(herald.base_url)


async def test_agent_websocket_hijack_answer_is_the_json_forbidden_error(herald: HeraldServer) -> None:
    async with session() as http:
        assert (await login(http, herald.base_url)).status == 200
        response = await http.get(
            herald.base_url + "/v1/agent",
            headers={
                "Origin": EVIL,
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert response.status == 403 and await error_of(response) == ErrorCode.FORBIDDEN
    await assert_bystanders_served(herald.base_url)


async def test_visitor_websocket_from_a_foreign_origin(launch: Launch) -> None:
    herald = await launch(configure=_allow_crm)
    error, close_code = await handshake(herald.base_url, hello("v-hijacked"), headers={"Origin": EVIL})
    assert isinstance(error, Error) and error.code == ErrorCode.FORBIDDEN, error
    assert close_code == CloseCode.FORBIDDEN
    agent = await herald.agent("alice")
    assert (await agent.lookup("v-hijacked"))["online"] is False  # never registered
    welcome, _ = await handshake(herald.base_url, hello("v-legit"), headers={"Origin": CRM_ORIGIN})
    assert isinstance(welcome, Welcome) and welcome.visitor == "v-legit"
    await assert_bystanders_served(herald.base_url)


@pytest.mark.parametrize("origin", FOREIGN)
async def test_agent_login_from_a_foreign_origin(launch: Launch, origin: str) -> None:
    herald = await launch(configure=_allow_crm)
    async with session() as http:
        response = await login(http, herald.base_url, origin=origin)
        assert response.status == 403 and await error_of(response) == ErrorCode.FORBIDDEN
        assert "Set-Cookie" not in response.headers and "Access-Control-Allow-Origin" not in response.headers
        response = await login(http, herald.base_url, origin=CRM_ORIGIN)
        assert response.status == 200 and "HERALD_SESSION" in response.cookies
        assert "Access-Control-Allow-Origin" not in response.headers  # login sends no CORS headers
    await assert_bystanders_served(herald.base_url)


async def test_rest_code_create_from_a_foreign_origin(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(admin_token=ADMIN_TOKEN, consumer_codes=["acme"])
    async with aiohttp.ClientSession() as http:
        # The CRM origin is allowed at run time, through the admin API.
        changed = await http.put(
            herald.base_url + "/v1/admin/groups/acme/settings",
            json={"allowed_origins": [CRM_ORIGIN]},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert changed.status == 200
        foreign = {"Origin": EVIL}
        for method, path in (("POST", "/v1/groups/acme/codes"), ("PUT", "/assistserver/shortcode/create?group=acme")):
            response = await http.request(method, herald.base_url + path, headers=foreign)
            assert response.status == 403 and await error_of(response) == ErrorCode.FORBIDDEN, path
            assert "Access-Control-Allow-Origin" not in response.headers
        preflight = await http.options(
            herald.base_url + "/v1/groups/acme/codes", headers={**foreign, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status == 403 and "Access-Control-Allow-Origin" not in preflight.headers
        # From the allowed origin: created, and only that origin is named.
        allowed = {"Origin": CRM_ORIGIN}
        created = await http.post(herald.base_url + "/v1/groups/acme/codes", headers=allowed)
        assert created.status == 201
        assert created.headers["Access-Control-Allow-Origin"] == CRM_ORIGIN and created.headers["Vary"] == "Origin"
        code = (await created.json())["code"]
        # A foreign page cannot redeem it either (and the refusal does not use it up).
        response = await http.get(f"{herald.base_url}/v1/groups/acme/codes/{code}", headers=foreign)
        assert response.status == 403 and "Access-Control-Allow-Origin" not in response.headers
        redeemed = await http.get(f"{herald.base_url}/v1/groups/acme/codes/{code}", headers=allowed)
        assert redeemed.status == 200 and "session_token" in await redeemed.json()
    await assert_bystanders_served(herald.base_url)
