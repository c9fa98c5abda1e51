"""An agent's instance that follows a visitor routes its signals from what
the bus told it (core/routes.py), without reading the visitor's record:
and it is never wrong, whatever the visitor does meanwhile on other
instances (tabs opening and closing, focus moving, a reconnect after the
grace period began)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from .conftest import Start
from .harness import HeraldServer, changed, signal
from .topologies import redis_topology  # noqa: F401  (every test here: standalone and cluster)


async def hgetalls(instance: HeraldServer) -> int:
    """HGETALLs Redis has served so far (the record reads; on a cluster, all its nodes')."""
    url = instance.settings.redis_url
    if url.startswith("redis+cluster://"):
        clients = [aioredis.Redis(host=h, port=int(p)) for h, _, p in (n.rpartition(":") for n in url[16:].split(","))]
    else:
        clients = [aioredis.from_url(url)]
    calls = 0
    for client in clients:
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        calls += int(stats.get("cmdstat_hgetall", {}).get("calls", 0))
    return calls


async def test_signals_to_a_watched_visitor_read_nothing_from_redis(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    agent = await b.agent("alice")
    await agent.subscribe(["v-route"])
    visitor = await a.visitor("v-route")
    await agent.show_terms("v-route")  # the first signal learns the route (one read)
    await visitor.wait_for(signal("showterms"))
    before = await hgetalls(a)
    for _ in range(20):
        assert await agent.show_terms("v-route") == 1
        await visitor.wait_for(signal("showterms"))
    assert await hgetalls(a) == before


async def test_signals_follow_tabs_and_focus_across_instances(start_instance: Start) -> None:
    a, b, c = await start_instance(), await start_instance(), await start_instance()
    agent = await c.agent("alice")
    await agent.subscribe(["v-tabs"])
    first = await a.visitor("v-tabs")
    assert await agent.show_terms("v-tabs") == 1
    await first.wait_for(signal("showterms"))

    # Signals follow the visitor as its agent sees it: once the agent has
    # heard of a change, the signals it sends next go by it.
    second = await b.visitor("v-tabs")  # a new tab on another instance takes focus
    await agent.wait_for(changed("connections", "v-tabs"))
    assert second.focused
    assert await agent.show_terms("v-tabs") == 1
    await second.wait_for(signal("showterms"))

    await first.publish(page="/back")  # activity on the first tab brings focus back to it
    await agent.wait_for(changed("data", "v-tabs"))
    assert await agent.show_terms("v-tabs") == 1
    await first.wait_for(signal("showterms"))

    assert await agent.signal("v-tabs", "ping-all", to="all") == 2
    await first.wait_for(signal("ping-all"))
    await second.wait_for(signal("ping-all"))

    await first.close()
    await agent.wait_for(changed("connections", "v-tabs"))
    await second.close()  # the last tab: the visitor is away (agents hear nothing), the route says so
    await asyncio.sleep(0.2)
    pending = asyncio.create_task(agent.show_terms("v-tabs"))
    await asyncio.sleep(0.3)
    assert not pending.done()  # held for the visitor's return
    back = await b.visitor("v-tabs")
    await back.wait_for(signal("showterms"))
    assert await pending == 1
