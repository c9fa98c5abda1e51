"""X-Forwarded-For: believed only from a trusted proxy, and then only its
nearest untrusted hop, so that per-address limits count real clients behind
a load balancer and a client cannot pick its own address."""

from __future__ import annotations

import aiohttp
import pytest

from herald_presence.server.config import ConfigError, load

from ..harness import HeraldServer
from .conftest import Launch

LIMIT = 2


async def _upgrade(herald: HeraldServer, forwarded: str | None) -> int:
    """The status of a visitor websocket upgrade sent with this X-Forwarded-For."""
    headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(herald.base_url + "/v1/visitor", headers=headers)
        except aiohttp.WSServerHandshakeError as refused:
            return refused.status
        await ws.close()
        return 101


async def test_behind_a_trusted_proxy_each_client_has_its_own_budget(launch: Launch) -> None:
    herald = await launch(connections_per_address=LIMIT, trusted_proxies="127.0.0.1, ::1")
    assert [await _upgrade(herald, "203.0.113.5") for _ in range(LIMIT + 1)] == [101] * LIMIT + [429]
    assert await _upgrade(herald, "203.0.113.6") == 101  # another client behind the same proxy
    # A client that writes its own header gets it prefixed by the proxy: the proxy's hop counts.
    assert await _upgrade(herald, "198.51.100.1, 203.0.113.5") == 429


async def test_an_untrusted_peer_cannot_choose_its_address(launch: Launch) -> None:
    herald = await launch(connections_per_address=LIMIT)  # no trusted proxies: the header is ignored
    statuses = [await _upgrade(herald, f"203.0.113.{i}") for i in range(LIMIT + 1)]
    assert statuses == [101] * LIMIT + [429]


async def test_a_garbage_hop_falls_back_to_the_proxy_address(launch: Launch) -> None:
    herald = await launch(connections_per_address=LIMIT, trusted_proxies="127.0.0.0/8")
    assert [await _upgrade(herald, "not-an-address") for _ in range(LIMIT)] == [101] * LIMIT
    assert await _upgrade(herald, None) == 429  # counted as the proxy itself, like the garbage


async def test_short_code_lookups_count_the_forwarded_client(launch: Launch) -> None:
    herald = await launch(code_lookups_per_address=LIMIT, trusted_proxies="127.0.0.1", consumer_codes=["acme"])
    url = herald.base_url + "/v1/groups/acme/codes/000000"
    async with aiohttp.ClientSession() as session:
        answers = [("203.0.113.7", 404), ("203.0.113.7", 404), ("203.0.113.7", 429), ("203.0.113.8", 404)]
        for client, expected in answers:
            async with session.get(url, headers={"X-Forwarded-For": client}) as response:
                assert response.status == expected, (client, await response.text())


def test_a_malformed_proxy_list_stops_the_server() -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load(env={}, flags={"trusted_proxies": "10.0.0.0/8, not-a-network"})
