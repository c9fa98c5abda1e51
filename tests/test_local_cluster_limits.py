"""Per-client limits behind the load balancer (issue 18): the local cluster of
deploy/ (Redis, two Herald instances, a real HAProxy with ``option
forwardfor``, which Herald trusts) and many clients, each from its own
loopback address (127.0.0.2, 127.0.0.3, ...), all through the one proxy.

Every TCP connection Herald sees comes from HAProxy (127.0.0.1); without
the X-Forwarded-For it trusts, every client would share one budget, and a
few of them would use it up for all. Here each address gets its own budget,
one address going over its budget is refused alone, and the header a client
writes itself does not get it a fresh one.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from deploy.local.cluster import LocalCluster

from .harness import SECRET
from .processes import required_binary

INSTANCES = 2
WEBSOCKETS_PER_ADDRESS = 3  # connections_per_address: new websockets per address per minute, per instance
LOOKUPS_PER_ADDRESS = 4  # code_lookups_per_address: per address per minute, cluster-wide (counted in Redis)
ADMIN_TOKEN = "cluster-admin-token-0123456789"
SETTINGS = {
    "instance_heartbeat": 0.25,
    "instance_dead_after": 1.5,
    "grace_period": 0.4,
    "connections_per_address": WEBSOCKETS_PER_ADDRESS,
    "code_lookups_per_address": LOOKUPS_PER_ADDRESS,
    "code_lookups_per_group": 1000,  # not the limit under test
    "admin_token": ADMIN_TOKEN,
    "log_level": "WARNING",
}
CLIENTS = [f"127.0.0.{n}" for n in range(2, 10)]  # eight well-behaved clients, each its own address
ABUSER = "127.0.0.10"


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    required_binary("haproxy", "apt-get install haproxy")
    required_binary("redis-server", "apt-get install redis-server")
    local = LocalCluster(
        INSTANCES, groups={"acme": SECRET}, settings=SETTINGS, python=sys.executable, drain_timeout=2.0
    )
    started = time.monotonic()
    async with local:
        print(f"cluster of {INSTANCES} up in {time.monotonic() - started:.2f}s at {local.lb_url}")
        yield local


def client(source: str) -> aiohttp.ClientSession:
    """HTTP from ``source``, a loopback address of its own: HAProxy sees a different client."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=True))


async def upgrade(
    http: aiohttp.ClientSession, url: str, forged: str | None = None
) -> aiohttp.ClientWebSocketResponse | int:
    """A websocket to ``url``, or the HTTP status that refused it."""
    headers = {"X-Forwarded-For": forged} if forged else {}
    try:
        return await http.ws_connect(url, headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=2))
    except aiohttp.WSServerHandshakeError as refused:
        return refused.status


async def test_each_address_behind_the_proxy_has_its_own_websocket_budget(cluster: LocalCluster) -> None:
    url = cluster.lb_url + "/v1/visitor"
    sessions = {source: client(source) for source in [*CLIENTS, ABUSER]}
    opened: list[aiohttp.ClientWebSocketResponse] = []
    try:
        # The abuser opens far more than its budget on every instance together
        # (INSTANCES x WEBSOCKETS_PER_ADDRESS), each with a different made-up
        # X-Forwarded-For: HAProxy appends the real address, which Herald reads.
        abuser = []
        for n in range(INSTANCES * WEBSOCKETS_PER_ADDRESS + 4):
            abuser.append(await upgrade(sessions[ABUSER], url, forged=f"198.51.100.{n}"))
        refused = [answer for answer in abuser if not isinstance(answer, aiohttp.ClientWebSocketResponse)]
        opened += [answer for answer in abuser if isinstance(answer, aiohttp.ClientWebSocketResponse)]
        assert len(refused) >= 4 and set(refused) == {429}, abuser

        # Meanwhile every other client gets its whole budget, whichever instance it lands on.
        for source in CLIENTS:
            for _ in range(WEBSOCKETS_PER_ADDRESS):
                answer = await upgrade(sessions[source], url)
                assert isinstance(answer, aiohttp.ClientWebSocketResponse), f"{source} refused with {answer}"
                opened.append(answer)
        # Far more websockets came through the one proxy than one address may open:
        # the budgets are per client, not per proxy.
        assert len(opened) >= len(CLIENTS) * WEBSOCKETS_PER_ADDRESS > INSTANCES * WEBSOCKETS_PER_ADDRESS
        # And the abuser is still refused.
        assert await upgrade(sessions[ABUSER], url) == 429
    finally:
        await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)
        await asyncio.gather(*(http.close() for http in sessions.values()))


async def test_short_code_look_ups_are_counted_per_address_across_the_cluster(cluster: LocalCluster) -> None:
    """Look-ups are counted in Redis, so whichever instance answers, an
    address has LOOKUPS_PER_ADDRESS a minute in the whole cluster."""
    settings_url = cluster.lb_url + "/v1/admin/groups/acme/settings"
    async with aiohttp.ClientSession() as admin:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with admin.put(settings_url, json={"allow_consumer_codes": True}, headers=auth) as response:
            assert response.status == 200, await response.text()

    redeem = cluster.lb_url + "/v1/groups/acme/codes/{}"

    async def look_up(http: aiohttp.ClientSession, attempt: int, forged: str | None = None) -> int:
        headers = {"X-Forwarded-For": forged} if forged else {}
        async with http.get(redeem.format(100000 + attempt), headers=headers) as response:
            return response.status

    sessions = {source: client(source) for source in [*CLIENTS, ABUSER]}
    try:
        abuser = [await look_up(sessions[ABUSER], n, forged=f"198.51.100.{n}") for n in range(LOOKUPS_PER_ADDRESS + 3)]
        # Unknown codes (404) while within the budget, then refused (429) on every instance.
        assert abuser == [404] * LOOKUPS_PER_ADDRESS + [429] * 3, abuser
        for source in CLIENTS:
            answers = await asyncio.gather(*(look_up(sessions[source], n) for n in range(LOOKUPS_PER_ADDRESS)))
            assert answers == [404] * LOOKUPS_PER_ADDRESS, f"{source}: {answers}"
        assert await look_up(sessions[ABUSER], 99) == 429
        # Both instances answered some of them: the count is the cluster's, not an instance's.
        assert all(n > 0 for n in await asyncio.to_thread(served_requests, cluster)), "HAProxy used one instance"
    finally:
        await asyncio.gather(*(http.close() for http in sessions.values()))


def served_requests(cluster: LocalCluster) -> list[int]:
    """Sessions HAProxy has sent each instance so far (``stot``)."""
    return [int(row.get("stot") or 0) for row in cluster.lb_stats().values()]
