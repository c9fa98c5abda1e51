"""A Redis Cluster master dies: the instances name the cluster by its seed
nodes (``redis+cluster://…``); the master serving the group's slot (its
visitors' hashes, its online set, the instances' sets in it, its visitors'
sharded channels) is killed (SIGKILL) while visitors are connected on every
instance and an agent keeps signalling them; its replica takes over.

Through the gap and after it: no visitor still connected is lost, no
visitor that left stays a ghost, every signal is answered (delivered, or a
clear error such as ``backend_unavailable``; never silence, never a wrong
answer), and each instance's /readyz said 503 during the gap (its shard's
probe stopped) and 200 after. The killed node is started again afterwards
and rejoins as a replica, so the run's one cluster stays whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ..redis_cluster import RedisClusterServers
from .conftest import FAILOVER_WITHIN, GROUP, Audit, Cluster, assert_failover_loses_nothing, bounded

pytestmark = pytest.mark.timeout(90)  # and the cluster's heal afterwards, outside the test's own budget


@pytest.fixture
async def redis_cluster_to_break(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisClusterServers]:
    """The run's Redis Cluster, whole again after the test (the killed node back as a replica)."""
    await asyncio.to_thread(redis_cluster.heal)
    yield redis_cluster
    await asyncio.to_thread(redis_cluster.heal)


@bounded(50)
async def test_a_cluster_master_killed_loses_no_live_visitor(
    redis_cluster_to_break: RedisClusterServers,
    start_cluster: Callable[[list[str]], Awaitable[Cluster]],
    audit_of: Callable[[Cluster], Audit],
) -> None:
    servers = redis_cluster_to_break
    cluster = await start_cluster([servers.url] * 3)
    doomed = servers.master_of(f"{{{GROUP}}}")
    await assert_failover_loses_nothing(
        cluster,
        audit_of(cluster),
        kill=lambda: servers.kill(doomed),
        wait_for_failover=lambda: servers.wait_for_failover(doomed, FAILOVER_WITHIN),
        story=lambda took: f"the master of {{{GROUP}}} (:{doomed}) killed; its replica took over {took:.2f}s later",
    )
