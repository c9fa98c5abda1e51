"""Who can reach an agent, and how much: a visitor addresses only agents that
watch it, signalled it, or share its session, and each visitor's signals to
one agent connection are held to a budget, so no visitor can get an agent
closed as a slow consumer or make its memory grow without bound."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from herald_presence.protocol import RequestFailed
from herald_presence.protocol.errors import ErrorCode
from herald_presence.protocol.messages import Signal
from herald_presence.server.web.keys import HUB

from ..harness import HeraldServer, drain, sample, scrape, signal
from .helpers import assert_bystanders_served

Start = Callable[..., Awaitable[HeraldServer]]
BIG = {"blob": "x" * 2000, "more": "y" * 2000, "again": "z" * 2000, "last": "w" * 1900}  # ~8 KiB of signal data
FLOOD = 400  # signals a visitor sends in the tests' floods


async def test_a_visitor_flooding_an_agent_that_never_watched_it_reaches_nothing(herald: HeraldServer) -> None:
    """The finding: ~8 KiB signals addressed to ``agent: support-7`` filled that
    agent's queue until it was closed as a slow consumer, though it never
    watched the visitor."""
    target = await herald.agent("support-7")
    attacker = await herald.visitor("mallory")
    await asyncio.gather(*(attacker.signal_agent("spam", BIG, agent="support-7") for _ in range(FLOOD)))
    assert not [e for e in await drain(target, 0.5) if isinstance(e, Signal)]
    assert target.connected, "the agent is still connected"
    await assert_bystanders_served(herald.base_url)


async def test_a_watched_visitor_flooding_its_agent_is_held_to_its_budget(start_herald: Start) -> None:
    herald = await start_herald(visitor_signal_rate=5, visitor_signal_burst=10)
    agent = await herald.agent("support-7")
    await agent.subscribe(["mallory"])
    attacker = await herald.visitor("mallory")
    before = await scrape(herald.base_url)
    await asyncio.gather(*(attacker.signal_agent("spam", BIG) for _ in range(FLOOD)))
    got = [e for e in await drain(agent, 1.0) if isinstance(e, Signal)]
    assert 10 <= len(got) < 40, f"{len(got)} of {FLOOD} signals reached the agent"
    assert agent.connected
    after = await scrape(herald.base_url)
    dropped = sample(after, "herald_limit_hits_total", limit="visitor_signal_rate") - sample(
        before, "herald_limit_hits_total", limit="visitor_signal_rate"
    )
    assert dropped >= FLOOD - 40
    # Another visitor the agent watches still gets through.
    await agent.subscribe(["alice"])
    alice = await herald.visitor("alice")
    await alice.signal_agent("hello")
    assert (await agent.wait_for(signal("hello"))).visitor == "alice"
    await assert_bystanders_served(herald.base_url)


async def test_subscribe_and_unsubscribe_churn_keeps_an_agents_memory_bounded(herald: HeraldServer) -> None:
    """The finding: subscribing and unsubscribing fresh visitor IDs grew the
    agent's snapshot floors by ~126 B per ID, forever."""
    agent = await herald.agent("churner")
    for batch in range(20):
        ids = [f"v{batch}-{i}" for i in range(100)]
        await agent.subscribe(ids)
        await agent.unsubscribe(ids)
    (connection,) = [a for a in herald.app[HUB].watchers.agents() if a.subject == "churner"]
    assert len(connection.floors or {}) == 0, "no floor outlives its subscription"
    await assert_bystanders_served(herald.base_url)


async def test_waiting_for_ever_more_session_keys_hits_the_subscription_limit(start_herald: Start) -> None:
    """The finding: each distinct wait_session key cost ~1 KiB and a Redis
    channel, outside the subscription limit."""
    herald = await start_herald(max_subscriptions_per_agent=50)
    agent = await herald.agent("waiter")
    await agent.subscribe([f"v{i}" for i in range(30)])
    for i in range(20):
        await agent.wait_session(f"key-{i}")
    with pytest.raises(RequestFailed) as refused:
        await agent.wait_session("one-too-many")
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    await agent.wait_session("key-3")  # a key already waited for costs nothing more
    await assert_bystanders_served(herald.base_url)
