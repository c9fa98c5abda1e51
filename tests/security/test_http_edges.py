"""HTTP requests that are well-formed but hostile or unusual: each gets a
clear answer and changes nothing it should not."""

from __future__ import annotations

import aiohttp

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import ErrorCode
from herald_presence.server.config import GroupConfig, Settings

from ..harness import HeraldServer
from .conftest import Launch
from .helpers import EVIL, assert_bystanders_served, error_of, login, session

DOTTED = "acme.eu"
DOTTED_SECRET = "dotted-group-secret-0123456789"


async def test_deeply_nested_json_to_login_is_a_clear_400_not_a_traceback(herald: HeraldServer) -> None:
    body = "[" * 100_000 + "]" * 100_000  # deeper than the JSON parser recurses; ~200 KB > the body limit too
    nested = "[" * 20_000 + "]" * 20_000  # within the 64 KiB body limit, still too deep
    async with aiohttp.ClientSession() as http:
        for payload in (nested, body):
            headers = {"Content-Type": "application/json"}
            async with http.post(herald.base_url + "/v1/agent/login", data=payload, headers=headers) as response:
                assert response.status in (400, 413), await response.text()
    await assert_bystanders_served(herald.base_url)


async def test_logout_from_a_foreign_page_is_refused_and_the_login_stays(herald: HeraldServer) -> None:
    async with session() as http:
        assert (await login(http, herald.base_url)).status == 200
        refused = await http.post(herald.base_url + "/v1/agent/logout", headers={"Origin": EVIL})
        assert (refused.status, await error_of(refused)) == (403, ErrorCode.FORBIDDEN)
        assert (await http.post(herald.base_url + "/v1/agent/logout")).status == 200  # its own page may
    await assert_bystanders_served(herald.base_url)


def _dotted_group(server_settings: Settings) -> None:
    server_settings.groups[DOTTED] = GroupConfig(DOTTED, [DOTTED_SECRET])


async def test_an_api_key_of_a_group_whose_id_has_dots_opens_its_group(launch: Launch) -> None:
    herald = await launch(configure=_dotted_group)
    key = tokens.api_key(DOTTED_SECRET, DOTTED)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as crm:
        async with crm.get(f"{herald.base_url}/v1/groups/{DOTTED}/visitors/v1") as response:
            assert response.status == 200, await response.text()
        async with crm.get(f"{herald.base_url}/v1/groups/acme/visitors/v1") as response:
            assert response.status == 403  # still bound to its own group
    await assert_bystanders_served(herald.base_url)


async def test_unknown_and_real_groups_are_refused_alike_so_groups_cannot_be_enumerated(herald: HeraldServer) -> None:
    forged = "not-the-secret-0123456789"
    answers = []
    for group in ("acme", "no-such-group"):
        async with session() as http:
            refused = await login(http, herald.base_url, group=group, key=tokens.agent_key(forged, group, "alice"))
            answers.append(("login", group, refused.status, await refused.text()))
        key = tokens.api_key(forged, group)
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as crm,
            crm.get(f"{herald.base_url}/v1/groups/{group}/visitors/v1") as response,
        ):
            answers.append(("crm", group, response.status, await response.text()))
    by_path: dict[str, set[tuple[int, str]]] = {}
    for path, _group, status, text in answers:
        by_path.setdefault(path, set()).add((status, text))
    assert all(len(seen) == 1 for seen in by_path.values()), answers
    await assert_bystanders_served(herald.base_url)
