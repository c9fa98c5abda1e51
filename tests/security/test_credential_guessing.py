"""Guessing credentials over HTTP: an address whose agent logins or admin
tokens keep being refused is stopped for the minute (429), cluster-wide,
before its next guess is even checked; other addresses are not."""

from __future__ import annotations

import aiohttp

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import ErrorCode

from ..harness import SECRET
from .conftest import Launch
from .helpers import assert_bystanders_served, error_of, login, session

ADMIN_TOKEN = "admin-token-of-the-guessing-test-0123"
LIMIT = 5


async def test_guessing_agent_login_keys_from_one_address_is_stopped(launch: Launch) -> None:
    herald = await launch(failed_credentials_per_address=LIMIT)
    wrong = tokens.agent_key("not-the-secret-0123456789", "acme", "alice")
    async with session() as http:
        for _ in range(LIMIT):
            assert (await login(http, herald.base_url, key=wrong)).status == 401
        stopped = await login(http, herald.base_url)  # even the right key is not tried now
        assert (stopped.status, await error_of(stopped)) == (429, ErrorCode.RATE_LIMITED)
        assert stopped.headers["Retry-After"] == "60"
    async with session("127.0.0.2") as elsewhere:
        assert (await login(elsewhere, herald.base_url)).status == 200
    await assert_bystanders_served(herald.base_url, source="127.0.0.3")


async def test_guessing_the_admin_token_from_one_address_is_stopped(launch: Launch) -> None:
    herald = await launch(failed_credentials_per_address=LIMIT, admin_token=ADMIN_TOKEN)
    url = herald.base_url + "/v1/admin/groups/acme/settings"
    async with aiohttp.ClientSession() as http:
        for i in range(LIMIT):
            async with http.get(url, headers={"Authorization": f"Bearer guess-{i:034d}"}) as response:
                assert response.status == 401
        async with http.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response:
            assert response.status == 429
    async with (
        session("127.0.0.2") as elsewhere,
        elsewhere.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as response,
    ):
        assert response.status == 200
    await assert_bystanders_served(herald.base_url, secret=SECRET, source="127.0.0.3")
