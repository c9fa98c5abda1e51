"""Redis stalls: the redis-server process is frozen (SIGSTOP) for twice
``instance_dead_after`` while visitors come and go on every instance, then
resumes (SIGCONT) with everything it had, every socket still open, and every
instance's heartbeat now older than ``dead_after``.

Presence must stay true: every visitor still connected is online on every
instance's view and in shared state, every visitor that left during the
stall is offline within one grace period (and a few heartbeats) of the
resume; no ghost, nobody lost. Readiness tells the truth meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from ..redis_server import RedisServer
from .conftest import DEAD_AFTER, Audit, Cluster, Readiness, bounded, continue_process, shared_problems

pytestmark = pytest.mark.timeout(60)

FREEZE = 2 * DEAD_AFTER
STAYING, LEAVING, RETURNING = 4, 2, 2  # visitors per instance


@bounded(45)
async def test_redis_frozen_for_twice_instance_dead_after_loses_no_live_visitor_and_leaves_no_ghost(
    redis: RedisServer, start_cluster: Callable[[list[str]], Awaitable[Cluster]], audit_of: Callable[[Cluster], Audit]
) -> None:
    cluster = await start_cluster([redis.url] * 3)
    audit = audit_of(cluster)
    await audit.open_views()
    await asyncio.gather(
        *(audit.connect(f"stay-{i}-{k}", i) for i in range(3) for k in range(STAYING)),
        *(audit.connect(f"leave-{i}-{k}", i) for i in range(3) for k in range(LEAVING)),
        *(audit.connect(f"back-{i}-{k}", i) for i in range(3) for k in range(RETURNING)),
    )
    await audit.wait_settled()
    readiness = Readiness(cluster).start()

    assert redis.process is not None
    pid = redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        # Early in the stall: some visitors leave for good, some close a tab
        # and come back (to the same instance, or to the next one).
        await asyncio.sleep(0.5)
        await asyncio.gather(*(audit.close(f"leave-{i}-{k}") for i in range(3) for k in range(LEAVING)))
        await asyncio.gather(*(audit.close(f"back-{i}-{k}") for i in range(3) for k in range(RETURNING)))
        await asyncio.sleep(1.0)
        returning = [audit.connect_later(f"back-{i}-{k}", (i + k) % 3) for i in range(3) for k in range(RETURNING)]
        # Past dead_after into the stall: newcomers arrive.
        await asyncio.sleep(max(0.0, frozen_at + DEAD_AFTER + 0.5 - time.monotonic()))
        newcomers = [audit.connect_later(f"new-{i}", i) for i in range(3)]
        await asyncio.sleep(max(0.0, frozen_at + FREEZE - time.monotonic()))
    finally:
        continue_process(pid)
    resumed_at = time.monotonic()
    stalled_for = resumed_at - frozen_at

    connects = await asyncio.gather(*returning, *newcomers, return_exceptions=True)
    verdict = await audit.verify(resumed_at)  # watches until SETTLE + WATCH after the resume
    await readiness.stop()

    print(
        f"\nRedis frozen {stalled_for:.2f}s; live {len(audit.live())}, left {len(audit.closed())}\n"
        f"{verdict.report()}\nreadyz: {readiness.summary(frozen_at)}\n{audit.visitor_report()}"
    )
    problems = shared_problems("stall", connects, verdict, readiness, [0, 1, 2], (frozen_at, resumed_at + 0.5))
    assert not problems, (
        f"Redis frozen for {stalled_for:.2f}s (dead_after {DEAD_AFTER}s):\n"
        + "\n".join(problems)
        + f"\nreadyz (from the freeze): {readiness.summary(frozen_at)}\n{audit.visitor_report()}\n{cluster.explain()}"
    )
