"""Demo credentials: Herald mints tokens for its own demo group only, only in
demo mode (no group configured) and only for clients on this machine. A
configured group's credentials are its back end's to make, always: not even
a group that happens to be called "demo" gets anything."""

from __future__ import annotations

from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from herald_presence.protocol import tokens
from herald_presence.protocol.errors import ProtocolError
from herald_presence.server.config import GroupConfig, Settings
from herald_presence.server.web import demo as http_demo

from ..harness import SECRET
from .conftest import Launch
from .helpers import EVIL, assert_bystanders_served

DEMO_SECRET = "demo-secret-for-tests-0123456789"
ASKS: list[dict[str, Any]] = [
    {"role": "visitor", "id": "v-1"},
    {"role": "agent", "id": "alice"},
    {"role": "agent", "id": "alice", "group": "acme"},
    {"role": "api", "id": "acme"},
]


def _demo_mode(server_settings: Settings) -> None:
    """As ``herald serve`` with nothing configured: the demo group alone."""
    server_settings.groups = {"demo": GroupConfig("demo", [DEMO_SECRET], demo=True)}


def _configured_demo_name(server_settings: Settings) -> None:
    """An operator's own group named "demo": configured, so no demo mode."""
    server_settings.groups["demo"] = GroupConfig("demo", [DEMO_SECRET])


@pytest.mark.parametrize("configure", [None, _configured_demo_name], ids=["configured", "configured-named-demo"])
async def test_no_credentials_are_minted_for_configured_groups(launch: Launch, configure: Any) -> None:
    herald = await launch(configure=configure)
    async with aiohttp.ClientSession() as http:
        async with http.get(herald.base_url + "/demo/credentials") as response:
            assert response.status == 404
        for ask in ASKS:
            for origin in (None, herald.base_url):
                headers = {"Origin": origin} if origin else {}
                async with http.post(herald.base_url + "/demo/credentials", json=ask, headers=headers) as response:
                    assert response.status == 404, (ask, await response.text())
                    assert "token" not in await response.text()
    await assert_bystanders_served(herald.base_url)


async def test_demo_mode_mints_for_the_demo_group_and_nothing_else(launch: Launch) -> None:
    herald = await launch(configure=_demo_mode)
    async with aiohttp.ClientSession() as http:
        async with http.post(herald.base_url + "/demo/credentials", json=ASKS[2]) as response:
            minted = await response.json()
        assert response.status == 200 and minted["group"] == "demo"  # a "group" in the ask changes nothing
        tokens.verify_token([DEMO_SECRET], tokens.AGENT, "demo", "alice", minted["token"])
        with pytest.raises(ProtocolError):
            tokens.verify_token([SECRET], tokens.AGENT, "acme", "alice", minted["token"])
        async with http.post(herald.base_url + "/demo/credentials", json=ASKS[3]) as response:
            assert response.status == 400  # no API keys, no other roles
        async with http.post(herald.base_url + "/demo/credentials", json=ASKS[0], headers={"Origin": EVIL}) as response:
            assert response.status == 403  # a foreign page cannot borrow this machine's demo
        async with http.post(herald.base_url + "/demo/credentials", json={"role": "visitor", "id": "x/../y"}) as r:
            assert r.status == 400


@pytest.mark.parametrize("address", ["203.0.113.7", "10.0.0.2", "::ffff:198.51.100.1", "fe80::1"])
async def test_demo_mode_mints_nothing_for_other_machines(address: str) -> None:
    """A zero-config server started with --host 0.0.0.0 hands nothing to the network."""
    settings = Settings(groups={"demo": GroupConfig("demo", [DEMO_SECRET], demo=True)})
    app = mock.MagicMock()
    app.__getitem__.return_value = settings
    transport = mock.Mock()
    transport.get_extra_info.return_value = (address, 40000)
    request = make_mocked_request("GET", "/demo/credentials", app=app, transport=transport)
    assert request.remote == address
    with pytest.raises(aiohttp.web.HTTPNotFound):
        await http_demo.demo_info(request)


async def test_demo_mode_mints_nothing_for_a_page_whose_name_was_rebound_to_this_machine(launch: Launch) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1, so its page is a
    loopback client of its own origin; its Host gives it away."""
    herald = await launch(configure=_demo_mode)
    rebound = f"evil.example:{herald.port}"
    headers = {"Host": rebound, "Origin": f"http://{rebound}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(herald.base_url + "/demo/credentials", json=ASKS[0], headers=headers) as response:
            assert response.status == 404
            assert "token" not in await response.text()
        async with http.post(herald.base_url + "/demo/credentials", json=ASKS[0]) as response:
            assert response.status == 200  # Herald's own pages, asked by a loopback name, still get theirs
    await assert_bystanders_served(herald.base_url, secret=DEMO_SECRET, group="demo")


async def test_demo_mode_mints_nothing_for_a_remote_client_behind_a_trusted_proxy(launch: Launch) -> None:
    """Behind a load balancer every client is a loopback peer: the client the
    proxy names is the one that must be on this machine."""
    herald = await launch(configure=_demo_mode, trusted_proxies="127.0.0.1")
    async with aiohttp.ClientSession() as http:
        headers = {"X-Forwarded-For": "203.0.113.7"}
        async with http.post(herald.base_url + "/demo/credentials", json=ASKS[0], headers=headers) as response:
            assert response.status == 404
    await assert_bystanders_served(herald.base_url, secret=DEMO_SECRET, group="demo")
