"""Presence as agents see it: online once per visitor, ordered changes,
snapshots, tabs, focus and the grace period. Runs on every backend."""

from __future__ import annotations

import asyncio
import time

from herald_presence.protocol.messages import Focus, PresenceChanged, Signal

from .harness import HeraldServer, changed, drain, signal
from .topologies import backend_name  # noqa: F401  (memory, redis and a Redis Cluster)


async def test_one_click_flow_from_presence_to_accepted_terms(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    snapshot = await agent.subscribe(["cust-42"])
    assert snapshot.visitors == [{"visitor": "cust-42", "online": False, "version": 0, "connections": []}]

    visitor = await herald.visitor("cust-42", data={"url": "/billing", "title": "Billing"})
    online = await agent.wait_for(changed("online", "cust-42"))
    assert online.state["online"] and online.state["connections"][0]["data"] == {"url": "/billing", "title": "Billing"}

    assert await agent.show_terms("cust-42") == 1
    showterms = await visitor.wait_for(signal("showterms"))
    assert showterms.agent == "alice"

    await visitor.terms("displayed")
    await visitor.terms("accepted")
    answers = [await agent.wait_for(Signal) for _ in range(2)]
    assert [(s.event, s.data, s.visitor) for s in answers] == [
        ("terms", {"status": "displayed"}, "cust-42"),
        ("terms", {"status": "accepted"}, "cust-42"),
    ]
    assert agent.visitors["cust-42"]["online"]


async def test_snapshot_shows_an_online_visitor_with_its_connections_data(herald: HeraldServer) -> None:
    await herald.visitor("v1", data={"url": "/cart", "device": "ios"}, visible=False)
    agent = await herald.agent("alice")
    (state,) = (await agent.subscribe(["v1"])).visitors
    assert state["online"] and state["version"] > 0
    (conn,) = state["connections"]
    assert conn["data"] == {"url": "/cart", "device": "ios"}
    assert conn["visible"] is False and conn["focused"] is True


async def test_a_second_tab_is_not_a_new_visitor_and_focus_moves_to_the_newest(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    tab1 = await herald.visitor("v1")
    await agent.wait_for(changed("online", "v1"))
    assert tab1.focused

    tab2 = await herald.visitor("v1")
    tabs = await agent.wait_for(changed("connections", "v1"))
    assert len(tabs.state["connections"]) == 2
    assert [c["focused"] for c in tabs.state["connections"]] == [False, True]
    assert (await tab1.wait_for(Focus)).focused is False
    assert tab2.focused

    assert await agent.show_terms("v1") == 1
    await tab2.wait_for(signal("showterms"))
    assert not [e for e in await drain(tab1, 0.2) if isinstance(e, Signal)]
    assert await agent.signal("v1", "refresh", to="all") == 2

    await tab2.close()
    after = await agent.wait_for(changed("connections", "v1"))
    assert [c["focused"] for c in after.state["connections"]] == [True]
    assert (await tab1.wait_for(Focus)).focused is True

    await tab1.close()
    await agent.wait_for(changed("offline", "v1"))
    events = [e for e in await drain(agent, 0.3) if isinstance(e, PresenceChanged)]
    assert not [e for e in events if e.change in ("online", "offline")], "only one offline for the visitor"


async def test_presence_data_merges_and_visibility_changes_reach_agents(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    visitor = await herald.visitor("v1", data={"url": "/home", "title": "Home"})
    online = await agent.wait_for(changed("online", "v1"))

    await visitor.publish(url="/cart", items=3)
    data = await agent.wait_for(changed("data", "v1"))
    assert data.state["connections"][0]["data"] == {"url": "/cart", "title": "Home", "items": 3}
    assert data.state["version"] > online.state["version"]

    await visitor.set_presence({"title": None})
    removed = await agent.wait_for(changed("data", "v1"))
    assert removed.state["connections"][0]["data"] == {"url": "/cart", "items": 3}

    await visitor.set_visible(False)
    hidden = await agent.wait_for(changed("visibility", "v1"))
    assert hidden.state["connections"][0]["visible"] is False
    assert hidden.state["version"] > removed.state["version"]


async def test_rapid_changes_coalesce_in_order_latest_values_winning(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    visitor = await herald.visitor("v1")
    await agent.wait_for(changed("online", "v1"))
    started = asyncio.get_running_loop().time()
    for page in range(20):
        await visitor.publish(page=page, **{f"step{page % 3}": page})
    pages, versions = [], []
    while not pages or pages[-1] != 19:
        event = await agent.wait_for(changed("data", "v1"))
        pages.append(event.state["connections"][0]["data"]["page"])
        versions.append(event.state["version"])
    took = asyncio.get_running_loop().time() - started
    assert pages == sorted(set(pages)) and versions == sorted(set(versions))
    # Faster than presence_rate, they coalesce: the first at once, then one per turn, the latest values.
    assert len(pages) <= 2 + took * herald.settings.presence_rate, (pages, took)
    assert agent.visitors["v1"]["connections"][0]["data"] == {"page": 19, "step0": 18, "step1": 19, "step2": 17}
    assert await drain(agent, 0.5) == []


async def test_group_subscription_sees_every_visitor_of_the_group(herald: HeraldServer) -> None:
    await herald.visitor("early")
    agent = await herald.agent("alice")
    snapshot = await agent.subscribe_group()
    assert [s["visitor"] for s in snapshot.visitors] == ["early"]
    await herald.visitor("late")
    await agent.wait_for(changed("online", "late"))
    assert set(agent.visitors) == {"early", "late"}


async def test_an_agent_watching_a_visitor_and_its_group_gets_each_event_once(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    await agent.subscribe_group()
    visitor = await herald.visitor("v1")
    await visitor.terms("displayed")
    events = await drain(agent, 0.5)
    assert len([e for e in events if isinstance(e, PresenceChanged) and e.change == "online"]) == 1
    assert len([e for e in events if isinstance(e, Signal)]) == 1


async def test_lookup_reads_one_visitor_without_subscribing(herald: HeraldServer) -> None:
    await herald.visitor("v1", data={"url": "/x"})
    agent = await herald.agent("alice")
    state = await agent.lookup("v1")
    assert state["online"] and state["connections"][0]["data"] == {"url": "/x"}
    assert (await agent.lookup("nobody"))["online"] is False
    await herald.visitor("v2")
    assert not [e for e in await drain(agent, 0.3) if isinstance(e, PresenceChanged)]


async def test_unsubscribed_agent_hears_nothing_more(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    await agent.unsubscribe(["v1"])
    await herald.visitor("v1")
    assert not [e for e in await drain(agent, 0.3) if isinstance(e, PresenceChanged)]


async def test_a_quick_reconnect_within_the_grace_period_does_not_flap(herald: HeraldServer) -> None:
    agent = await herald.agent("alice")
    await agent.subscribe(["v1"])
    first = await herald.visitor("v1")
    await agent.wait_for(changed("online", "v1"))
    await first.close()
    await asyncio.sleep(herald.settings.grace_period / 4)
    second = await herald.visitor("v1")
    back = await agent.wait_for(changed("connections", "v1"))
    assert back.state["connections"][0]["connection"] == second.connection_id
    events = await drain(agent, herald.settings.grace_period * 2)
    assert not [e for e in events if isinstance(e, PresenceChanged) and e.change in ("online", "offline")]

    closed_at = time.monotonic()
    await second.close()
    await agent.wait_for(changed("offline", "v1"))
    assert time.monotonic() - closed_at >= herald.settings.grace_period * 0.9
    assert agent.visitors["v1"]["online"] is False
