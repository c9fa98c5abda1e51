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
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from ..redis_cluster import RedisClusterServers
from .conftest import GROUP, SETTLE, Audit, Cluster, Readiness, SignalRecord, bounded, shared_problems

pytestmark = pytest.mark.timeout(90)  # and the cluster's heal afterwards, outside the test's own budget

STAYING = 4  # visitors per instance
SIGNAL_EVERY = 0.05  # seconds between the agent's signals
FAILOVER_WITHIN = 20.0  # seconds for the replica to take over


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
    audit = audit_of(cluster)
    await audit.open_views()
    await asyncio.gather(
        *(audit.connect(f"stay-{i}-{k}", i) for i in range(3) for k in range(STAYING)),
        *(audit.connect(f"leave-{i}", i) for i in range(3)),
    )
    await audit.wait_settled()
    agent = audit.agent(0, "alice")
    async with asyncio.timeout(15):
        await agent.connect()
    targets = [v for v in audit.live() if v.startswith("stay-")]
    stop = asyncio.Event()
    sending: list[asyncio.Task[SignalRecord]] = []

    async def keep_signalling() -> None:
        for n in itertools.count():
            if stop.is_set() or n >= 2000:
                return
            sending.append(asyncio.create_task(audit.send_signal(agent, targets[n % len(targets)])))
            await asyncio.sleep(SIGNAL_EVERY)

    signaller = asyncio.create_task(keep_signalling())
    await asyncio.sleep(1.0)  # signals flow before the fault
    readiness = Readiness(cluster, every=0.1).start()

    doomed = servers.master_of(f"{{{GROUP}}}")
    servers.kill(doomed)
    killed_at = time.monotonic()
    # During the gap: visitors leave and arrive.
    await asyncio.sleep(0.3)
    await asyncio.gather(*(audit.close(f"leave-{i}") for i in range(3)))
    arrivals = [audit.connect_later(f"new-{i}", i) for i in range(3)]
    took = await asyncio.to_thread(servers.wait_for_failover, doomed, FAILOVER_WITHIN)
    promoted_at = time.monotonic()

    await asyncio.sleep(SETTLE)  # signals keep flowing after the promotion
    stop.set()
    await signaller
    async with asyncio.timeout(30):
        await asyncio.gather(*sending)
    connects = await asyncio.gather(*arrivals, return_exceptions=True)
    verdict = await audit.verify(promoted_at)
    await readiness.stop()

    wrong, unanswered = audit.judge_signals()
    story = (
        f"the master of {{{GROUP}}} (:{doomed}) killed; its replica took over {took:.2f}s later; "
        f"{len(audit.signals)} signals: {audit.signal_tally()}"
    )
    print(f"\n{story}\n{verdict.report()}\nreadyz: {readiness.summary(killed_at)}\n{audit.visitor_report()}")
    problems = shared_problems("failover", connects, verdict, readiness, [0, 1, 2], (killed_at, promoted_at + SETTLE))
    if wrong:
        problems.append(f"{len(wrong)} signals answered wrongly: {wrong[:10]}")
    if unanswered:
        problems.append(f"{len(unanswered)} signals never answered: {unanswered[:10]}")
    assert not problems, (
        story
        + "\n"
        + "\n".join(problems)
        + f"\nreadyz (from the kill): {readiness.summary(killed_at)}\n{audit.visitor_report()}\n{cluster.explain()}"
    )
