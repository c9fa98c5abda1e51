"""A rolling restart, as Kubernetes does one, on the local cluster behind
HAProxy: 200 visitors and an agent connected; each instance in turn gets
SIGTERM and is started again while the agent keeps signalling visitors.

Afterwards every visitor is online exactly once, the agent never saw an
offline (the grace period covered each move), every signal the agent was
told was delivered did arrive, the agent is still in the co-browse session
it had joined, and every instance exited within its drain deadline. The
instances' own /metrics and /readyz are read to agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from deploy.local.cluster import LocalCluster
from herald_presence.protocol import tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import ClientClosed
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.errors import RequestFailed
from herald_presence.protocol.messages import PresenceChanged, Signal

from .harness import SECRET, sample, scrape
from .processes import required_binary
from .test_cluster import eventually
from .test_local_cluster import BACKOFF, SETTINGS

VISITORS = 200
DRAIN_TIMEOUT = 6.0
ROLLING = {**SETTINGS, "grace_period": 3.0, "drain_spread": 1.5, "message_rate": 100000, "message_burst": 100000}
PROBE = "restart-probe"
SIGNAL_EVERY = 0.02  # seconds between the agent's signals while instances restart


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    required_binary("haproxy", "apt-get install haproxy")
    required_binary("redis-server", "apt-get install redis-server")
    local = LocalCluster(
        3, groups={"acme": SECRET}, settings=ROLLING, python=sys.executable, drain_timeout=DRAIN_TIMEOUT
    )
    async with local:
        yield local


async def _collect(client: VisitorClient | AgentClient, into: list[object]) -> None:
    async for event in client.events():
        if isinstance(event, Signal | PresenceChanged):
            into.append(event)


async def test_rolling_restart_of_every_instance_under_load(cluster: LocalCluster) -> None:
    url = cluster.lb_url
    agent = AgentClient(
        url, "acme", "restart-agent", tokens.agent_key(SECRET, "acme", "restart-agent"), backoff=BACKOFF
    )
    visitors = [
        VisitorClient(url, "acme", f"r{i}", tokens.visitor_token(SECRET, "acme", f"r{i}"), backoff=BACKOFF)
        for i in range(VISITORS)
    ]
    seen_by_agent: list[object] = []
    seen_by_visitor: dict[str, list[object]] = {v.visitor: [] for v in visitors}
    collectors: list[asyncio.Task[None]] = []
    outcomes: dict[tuple[str, int], int | str] = {}
    try:
        await agent.connect()
        await agent.subscribe_group()
        collectors.append(asyncio.create_task(_collect(agent, seen_by_agent)))
        for start in range(0, VISITORS, 25):
            await asyncio.gather(*(v.connect() for v in visitors[start : start + 25]))
        collectors += [asyncio.create_task(_collect(v, seen_by_visitor[v.visitor])) for v in visitors]
        await eventually(lambda: sum(s["online"] for s in agent.visitors.values()) == VISITORS, 20, "all online")
        # One visitor is in a co-browse session with the agent: it must survive every move.
        cobrowse = await visitors[0].start_session("visitor")
        await agent.join_session(session=cobrowse.session)

        stop = asyncio.Event()
        sender = asyncio.create_task(_keep_signalling(agent, visitors, stop, outcomes))
        stopped = []
        for index in range(3):
            stopped.append(await cluster.terminate(index))
            await cluster.start_instance(index)  # and waits until HAProxy has it in rotation again
        stop.set()
        sent = await sender

        await eventually(lambda: all(v.connected for v in visitors) and agent.connected, 20, "every client reconnected")
        await asyncio.sleep(0.5)  # the last acks' frames are on their way to the visitors
        back_in = visitors[0]
        await eventually(lambda: back_in.session is not None and back_in.session.guests == 1, 10, "agent back in")
        in_session = agent.joined
        states = {v.visitor: await agent.lookup(v.visitor) for v in visitors}
        readiness = [await asyncio.to_thread(_status, i.url + "/readyz") for i in cluster.instances]
        metrics = [sample(await scrape(i.url), "herald_connections", role="visitor") for i in cluster.instances]
    finally:
        for task in collectors:
            task.cancel()
        await asyncio.gather(agent.close(), *(v.close() for v in visitors), return_exceptions=True)

    for index, how in enumerate(stopped):
        assert how.code == 0, f"instance {index} exited with {how.code}\n{cluster.log(index)[-3000:]}"
        assert how.seconds <= DRAIN_TIMEOUT, f"instance {index} took {how.seconds:.2f}s (drain_timeout {DRAIN_TIMEOUT})"
    offline = [e for e in seen_by_agent if isinstance(e, PresenceChanged) and e.change == "offline"]
    assert not offline, (
        f"the agent saw {len(offline)} visitors go offline: {[e.state['visitor'] for e in offline][:10]}"
    )
    not_once = {v: len(s["connections"]) for v, s in states.items() if not s["online"] or len(s["connections"]) != 1}
    assert not not_once, f"visitors not online exactly once: {not_once}"
    assert readiness == [200, 200, 200]
    assert in_session == {cobrowse.session}, "the agent is still in the co-browse session"
    assert sum(metrics) == VISITORS, f"herald_connections{{role=visitor}} per instance: {metrics}"

    received = {
        (visitor, event.data["n"])
        for visitor, events in seen_by_visitor.items()
        for event in events
        if isinstance(event, Signal) and event.event == PROBE
    }
    lost = [
        key for key, outcome in outcomes.items() if isinstance(outcome, int) and outcome >= 1 and key not in received
    ]
    tally = Counter("delivered" if isinstance(o, int) and o >= 1 else str(o) for o in outcomes.values())
    print(f"\nrolling restart: {sent} signals during the restarts: {dict(tally)}; "
          f"drains took {[round(s.seconds, 2) for s in stopped]} s")  # fmt: skip
    assert not lost, f"{len(lost)} signals acked as delivered never arrived: {lost[:10]}"
    assert tally["delivered"] >= sent * 0.8, f"too few signals delivered during the restarts: {dict(tally)}"


async def _keep_signalling(
    agent: AgentClient, visitors: list[VisitorClient], stop: asyncio.Event, outcomes: dict[tuple[str, int], int | str]
) -> int:
    """Signal visitor after visitor until ``stop``; record each answer (a count or an error code)."""

    async def one(visitor: str, n: int) -> None:
        try:
            outcomes[visitor, n] = await agent.signal(visitor, PROBE, {"n": n})
        except (RequestFailed, ClientClosed) as exc:
            outcomes[visitor, n] = getattr(exc, "code", type(exc).__name__)

    tasks = []
    for n in itertools.count():
        if stop.is_set() or n >= 5000:
            break
        tasks.append(asyncio.create_task(one(visitors[n % len(visitors)].visitor, n)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SIGNAL_EVERY)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    return len(tasks)


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as response:
        return int(response.status)
