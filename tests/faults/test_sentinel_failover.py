"""A Redis failover under Sentinel: the instances name Redis by its
Sentinels (``redis+sentinel://s1,s2,s3/mymaster``); the master is killed
(SIGKILL) while visitors are connected on every instance and an agent keeps
signalling them; the Sentinels promote the replica.

Through the gap and after it: no visitor still connected is lost, no
visitor that left stays a ghost, every signal is answered (delivered, or a
clear error such as ``backend_unavailable``; never silence, never a wrong
answer), and each instance's /readyz said 503 during the gap and 200 after.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from .conftest import FAILOVER_WITHIN, Audit, Cluster, assert_failover_loses_nothing, bounded
from .sentinel import SentinelCluster

pytestmark = pytest.mark.timeout(75)  # and the Sentinels' start (about 7 s), outside the test's own budget


@bounded(45)
async def test_sentinel_failover_loses_no_live_visitor(
    sentinels: SentinelCluster,
    start_cluster: Callable[[list[str]], Awaitable[Cluster]],
    audit_of: Callable[[Cluster], Audit],
) -> None:
    cluster = await start_cluster([sentinels.url] * 3)
    await assert_failover_loses_nothing(
        cluster,
        audit_of(cluster),
        kill=sentinels.kill_master,
        wait_for_failover=lambda: sentinels.wait_for_failover(FAILOVER_WITHIN),
        story=lambda took: f"master killed; the Sentinels promoted the replica {took:.2f}s later",
    )
