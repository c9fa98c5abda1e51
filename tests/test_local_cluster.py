"""The local cluster (deploy/local/cluster.py): Redis, Herald instances and a
real HAProxy on loopback. Clients go through the load balancer only, as they
would in production, and the cluster must behave like one server across
instances, through a kill and through a rolling restart.

Under CI=true a missing haproxy or redis-server fails the run: .ci/run
installs both, so a skip there would hide a broken setup.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from deploy.local.cluster import LocalCluster
from herald_presence.protocol import tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import Backoff
from herald_presence.protocol.client.visitor import VisitorClient

from .harness import SECRET, changed, signal
from .processes import required_binary

# Fast cluster timings (as tests/conftest.py's FAST), and no per-address limits:
# every client of these tests is 127.0.0.1 (HAProxy names it in X-Forwarded-For,
# which the cluster trusts); tests/test_local_cluster_limits.py tests the limits.
SETTINGS = {
    "instance_heartbeat": 0.25,
    "instance_dead_after": 1.5,
    "grace_period": 0.4,
    "signal_hold": 3.0,
    "keepalive": 5,
    "connections_per_address": 100000,
    "log_level": "WARNING",
}
BACKOFF = Backoff(initial=0.1, factor=2.0, cap=0.5)  # quick reconnects keep the tests short


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    required_binary("haproxy", "apt-get install haproxy")
    required_binary("redis-server", "apt-get install redis-server")
    local = LocalCluster(3, groups={"acme": SECRET}, settings=SETTINGS, python=sys.executable, drain_timeout=2.0)
    started = time.monotonic()
    async with local:
        print(f"cluster of 3 up in {time.monotonic() - started:.2f}s at {local.lb_url}")
        yield local


@pytest.fixture
async def clients(cluster: LocalCluster) -> AsyncIterator[Callable[..., Any]]:
    """Make SDK clients that connect through the load balancer; all closed afterwards."""
    made: list[VisitorClient | AgentClient] = []

    def make(role: str, name: str, **options: Any) -> VisitorClient | AgentClient:
        client: VisitorClient | AgentClient
        if role == "visitor":
            token = tokens.visitor_token(SECRET, "acme", name)
            client = VisitorClient(cluster.lb_url, "acme", name, token, backoff=BACKOFF, **options)
        else:
            key = tokens.agent_key(SECRET, "acme", name)
            client = AgentClient(cluster.lb_url, "acme", name, key, backoff=BACKOFF, **options)
        made.append(client)
        return client

    yield make
    await asyncio.gather(*(client.close() for client in made), return_exceptions=True)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def agent_watching(
    clients: Callable[..., Any], count: int, data: dict[str, Any] | None = None
) -> tuple[AgentClient, list[VisitorClient]]:
    """An agent watching the group, and ``count`` visitors it has seen come online, all through the LB."""
    agent = clients("agent", "alice")
    await agent.connect()
    await agent.subscribe_group()
    visitors = [clients("visitor", f"v{i}", data=data) for i in range(count)]
    for visitor in visitors:
        await visitor.connect()
        await agent.wait_for(changed("online", visitor.visitor))
    return agent, visitors


async def spread(cluster: LocalCluster, at_least: int, within: float = 5.0) -> dict[str, int]:
    """HAProxy's open connections per instance, once ``at_least`` instances hold some."""
    deadline = time.monotonic() + within
    while True:
        sessions = cluster.lb_sessions()
        if sum(1 for n in sessions.values() if n > 0) >= at_least or time.monotonic() > deadline:
            return sessions
        await asyncio.sleep(0.05)


async def test_health_and_readiness_answer_through_the_load_balancer(cluster: LocalCluster) -> None:
    for path in ("/healthz", "/readyz"):
        status, body = await asyncio.to_thread(get, cluster.lb_url + path)
        assert status == 200, (path, body)
    assert set(cluster.server_states().values()) == {"UP"}
    instance_ids = set()
    for instance in cluster.instances:  # each instance on its own port, with its own PID
        status, body = await asyncio.to_thread(get, instance.url + "/readyz")
        assert status == 200 and instance.pid
        instance_ids.add(body)
    assert len(instance_ids) == 3


async def test_presence_and_signals_cross_instances_behind_the_load_balancer(
    cluster: LocalCluster, clients: Callable[..., Any]
) -> None:
    agent, visitors = await agent_watching(clients, 3, data={"url": "/billing"})
    assert all(agent.visitors[v.visitor]["connections"][0]["data"] == {"url": "/billing"} for v in visitors)
    # leastconn puts the four websockets on all three instances: at least two
    # visitors are on an instance the agent is not on.
    sessions = await spread(cluster, at_least=3)
    assert all(n >= 1 for n in sessions.values()), sessions

    for visitor in visitors:
        assert await agent.show_terms(visitor.visitor) == 1
        await visitor.wait_for(signal("showterms"))
        await visitor.terms("accepted")
        answer = await agent.wait_for(signal("terms"))
        assert (answer.visitor, answer.data) == (visitor.visitor, {"status": "accepted"})

    await visitors[0].close()
    offline = await agent.wait_for(changed("offline", "v0"))
    assert offline.state["online"] is False


async def test_clients_of_a_killed_instance_come_back_through_the_load_balancer(
    cluster: LocalCluster, clients: Callable[..., Any]
) -> None:
    agent, visitors = await agent_watching(clients, 4)
    sessions = await spread(cluster, at_least=3)
    victim = max(range(3), key=lambda i: sessions[cluster.instances[i].server_name])

    stopped = await cluster.kill(victim)
    assert stopped.code == -9
    await cluster.wait_in_rotation(victim, up=False, within=5)
    # Everyone who was on it reconnects through the same URL to a survivor;
    # then every visitor can be reached again, whichever instance each is on.
    await connected(agent, *visitors)
    for visitor in visitors:
        assert await agent.show_terms(visitor.visitor) == 1
        await visitor.wait_for(signal("showterms"))
    assert cluster.lb_sessions()[cluster.instances[victim].server_name] == 0

    await cluster.start_instance(victim)  # back on its port, back in rotation
    assert cluster.server_states()[cluster.instances[victim].server_name] == "UP"


async def test_a_rolling_restart_keeps_every_visitor_reachable(
    cluster: LocalCluster, clients: Callable[..., Any]
) -> None:
    agent, visitors = await agent_watching(clients, 3)
    for index in range(3):
        stopped = await cluster.terminate(index)
        assert stopped.code == 0, cluster.log(index)
        # A drain ends within drain_timeout (a second of margin for a loaded machine).
        assert stopped.seconds < cluster.drain_timeout + 1, f"instance {index} took {stopped.seconds:.1f}s"
        await cluster.wait_in_rotation(index, up=False, within=5)  # HAProxy's check saw it go
        await cluster.start_instance(index)  # and waits until the checks have it UP again
        await connected(agent, *visitors)
        for visitor in visitors:
            assert await agent.show_terms(visitor.visitor) == 1, f"after restarting instance {index}"
            await visitor.wait_for(signal("showterms"))
    states = await agent.subscribe_group()
    assert sorted(v["visitor"] for v in states.visitors if v["online"]) == ["v0", "v1", "v2"]


async def connected(*clients: VisitorClient | AgentClient, within: float = 10.0) -> None:
    """Until every client is connected again (each reconnects by itself, with jitter)."""
    deadline = time.monotonic() + within
    while not all(client.connected for client in clients):
        if time.monotonic() > deadline:
            pytest.fail(f"not reconnected within {within}s: {[c for c in clients if not c.connected]}")
        await asyncio.sleep(0.02)
