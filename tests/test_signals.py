"""Signals are accounted for: every agent signal ends in a delivered count or
a clear error, held signals reach a visitor that comes back, visitor signals
reach exactly the agents they should."""

from __future__ import annotations

import asyncio
import time

import pytest

from herald_presence.protocol import RequestFailed
from herald_presence.protocol.messages import Signal

from .harness import HeraldServer, changed, drain, signal


async def test_signal_to_an_offline_visitor_is_refused_at_once(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    started = time.monotonic()
    with pytest.raises(RequestFailed) as refused:
        await agent.show_terms("nobody")
    assert refused.value.code == "visitor_offline"
    assert time.monotonic() - started < 1


async def test_signal_sent_while_the_visitor_reconnects_is_delivered_when_it_is_back(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    first = await herald.visitor("v1")
    await agent.wait_for(changed("online", "v1"))
    await first.close()
    await asyncio.sleep(0.05)  # the server has seen the close: the visitor is away

    pending = asyncio.create_task(agent.show_terms("v1"))
    await asyncio.sleep(0.2)
    assert not pending.done(), "held, not answered, while the visitor is away"
    second = await herald.visitor("v1")
    showterms = await second.wait_for(signal("showterms"))
    assert showterms.agent == "alice"
    assert await pending == 1


async def test_held_signal_expires_when_the_visitor_does_not_come_back(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(grace_period=5, signal_hold=0.5)
    agent = await herald.agent("alice")
    visitor = await herald.visitor("v1")
    await visitor.close()
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(RequestFailed) as expired:
        await agent.show_terms("v1")
    assert expired.value.code == "signal_expired"
    assert 0.4 < time.monotonic() - started < 3
    # Coming back later does not deliver the expired signal.
    again = await herald.visitor("v1")
    assert not [e for e in await drain(again, 0.3) if isinstance(e, Signal)]


async def test_signal_with_to_all_reaches_every_tab(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    tabs = [await herald.visitor("v1") for _ in range(3)]
    assert await agent.signal("v1", "highlight", {"selector": "#pay"}, to="all") == 3
    for tab in tabs:
        got = await tab.wait_for(signal("highlight"))
        assert got.data == {"selector": "#pay"}


async def test_a_signal_to_all_held_for_a_reconnecting_visitor_reaches_every_tab_that_comes_back(
    herald: HeraldServer,
) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    tabs = [await herald.visitor("v1") for _ in range(2)]
    for tab in tabs:
        await tab.close()
    await asyncio.sleep(0.05)  # the server has seen both closes: the visitor is away

    pending = asyncio.create_task(agent.signal("v1", "highlight", {"selector": "#pay"}, to="all"))
    await asyncio.sleep(0.1)
    assert not pending.done(), "held, not answered, while the visitor is away"
    first = await herald.visitor("v1")
    assert (await first.wait_for(signal("highlight"))).data == {"selector": "#pay"}
    assert await pending == 1, "answered once, by the first tab back"
    second = await herald.visitor("v1")  # within signal_hold: it gets the signal too
    assert (await second.wait_for(signal("highlight"))).data == {"selector": "#pay"}
    for tab in (first, second):
        assert not [e for e in await drain(tab, 0.2) if isinstance(e, Signal)], "each tab gets it once"


async def test_a_held_signal_to_the_focused_tab_reaches_only_the_first_tab_back(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    tabs = [await herald.visitor("v1") for _ in range(2)]
    for tab in tabs:
        await tab.close()
    await asyncio.sleep(0.05)

    pending = asyncio.create_task(agent.show_terms("v1"))
    await asyncio.sleep(0.1)
    first = await herald.visitor("v1")
    await first.wait_for(signal("showterms"))
    assert await pending == 1
    second = await herald.visitor("v1")
    assert not [e for e in await drain(second, 0.3) if isinstance(e, Signal)]


async def test_visitor_signal_reaches_every_watching_agent(herald: HeraldServer) -> None:
    by_id = await herald.agent("by-id")
    await by_id.subscribe(["v1"])
    by_group = await herald.agent("by-group")
    await by_group.subscribe_group()
    bystander = await herald.agent("bystander")
    await bystander.subscribe(["v2"])
    visitor = await herald.visitor("v1")
    await visitor.signal_agent("cobrowse", {"step": "ready"})
    for agent in (by_id, by_group):
        got = await agent.wait_for(signal("cobrowse"))
        assert (got.visitor, got.data, got.connection) == ("v1", {"step": "ready"}, visitor.connection_id)
    assert not [e for e in await drain(bystander, 0.3) if isinstance(e, Signal)]


async def test_visitor_can_address_one_agent(herald: HeraldServer) -> None:
    alice = await herald.agent("alice")
    bob = await herald.agent("bob")
    await bob.subscribe(["v1"])
    visitor = await herald.visitor("v1")
    await visitor.signal_agent("terms", {"status": "declined"}, agent="alice")
    got = await alice.wait_for(signal("terms"))
    assert got.data == {"status": "declined"} and got.visitor == "v1"
    assert not [e for e in await drain(bob, 0.3) if isinstance(e, Signal)]

    with pytest.raises(RequestFailed) as refused:
        await visitor.signal_agent("terms", {"status": "declined"}, agent="nobody")
    assert refused.value.code == "agent_offline"


async def test_many_signals_are_all_answered(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    visitor = await herald.visitor("v1")
    answers = await asyncio.gather(*(agent.signal("v1", "ping", {"n": n}) for n in range(200)))
    assert answers == [1] * 200
    received = [e for e in await drain(visitor, 0.5) if isinstance(e, Signal)]
    assert sorted(e.data["n"] for e in received) == list(range(200))
