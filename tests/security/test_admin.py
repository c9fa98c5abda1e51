"""The admin API: only the operator's bearer token opens it, and it is shut
when no token is configured."""

from __future__ import annotations

import aiohttp

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import ErrorCode

from ..harness import SECRET, HeraldServer
from .helpers import EVIL, assert_bystanders_served, error_of

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
SETTINGS_PATH = "/v1/admin/groups/acme/settings"


async def test_admin_api_without_a_configured_token(herald: HeraldServer) -> None:
    async with aiohttp.ClientSession() as http:
        for bearer in ("", "anything-at-all-0123456789"):
            response = await http.put(
                herald.base_url + SETTINGS_PATH,
                json={"allowed_origins": [EVIL]},
                headers={"Authorization": f"Bearer {bearer}"},
            )
            assert response.status == 403 and await error_of(response) == ErrorCode.FORBIDDEN
    await assert_bystanders_served(herald.base_url)


async def test_admin_api_with_a_wrong_or_borrowed_token(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(admin_token=ADMIN_TOKEN)
    wrong = [
        None,
        ADMIN_TOKEN[:-1],  # a prefix
        ADMIN_TOKEN + "x",  # an extension
        ADMIN_TOKEN.upper(),
        tokens.api_key(SECRET, "acme"),  # the group's CRM key
        SECRET,  # the group's secret itself
    ]
    async with aiohttp.ClientSession() as http:
        for credential in wrong:
            headers = {"Authorization": f"Bearer {credential}"} if credential else {}
            response = await http.put(
                herald.base_url + SETTINGS_PATH, json={"allowed_origins": [EVIL]}, headers={**headers, "Origin": EVIL}
            )
            assert response.status == 401 and await error_of(response) == ErrorCode.UNAUTHORIZED, credential
            assert "Access-Control-Allow-Origin" not in response.headers
        current = await http.get(herald.base_url + SETTINGS_PATH, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert current.status == 200 and (await current.json())["allowed_origins"] == []  # nothing changed
    await assert_bystanders_served(herald.base_url)
