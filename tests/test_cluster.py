"""Many instances, one Redis: the cluster behaves like one process, and
survives losing an instance, Redis itself, or just its pub/sub connection.
Each test runs on one redis-server and on a Redis Cluster (``topologies``),
but those that stop or cut off the standalone server."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from herald_presence.protocol import RequestFailed
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.base import Connected, Disconnected
from herald_presence.protocol.messages import Focus, PresenceChanged, Signal
from herald_presence.server.backends.redis import RedisBackend

from .conftest import FAST, STANDALONE_ONLY, Start
from .harness import SECRET, HeraldServer, changed, drain, sample, scrape, settings, signal
from .processes import HERALD, HeraldProcess, start_server
from .redis_server import RedisServer
from .topologies import redis_topology  # noqa: F401  (every test here: standalone and cluster)


def backend(instance: HeraldServer) -> RedisBackend:
    from herald_presence.server.web.keys import HUB

    redis_backend = instance.app[HUB].backend
    assert isinstance(redis_backend, RedisBackend)
    return redis_backend


async def ready(instance: HeraldServer) -> bool:
    async with aiohttp.ClientSession() as session, session.get(instance.base_url + "/readyz") as response:
        return response.status == 200


async def eventually(check: Callable[[], bool | Awaitable[bool]], within: float, what: str) -> float:
    """Poll ``check`` (plain or async) until true; the seconds it took, or fail after ``within``."""
    started = time.monotonic()
    while not await _value(check()):
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# --- the flows across instances ---------------------------------------------


async def test_one_click_flow_with_the_visitor_on_a_and_the_agent_on_b(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    agent = await b.agent("alice")
    await agent.subscribe(["cust-42"])
    visitor = await a.visitor("cust-42", data={"url": "/billing"})
    online = await agent.wait_for(changed("online", "cust-42"))
    assert online.state["connections"][0]["data"] == {"url": "/billing"}

    assert await agent.show_terms("cust-42") == 1
    assert (await visitor.wait_for(signal("showterms"))).agent == "alice"
    await visitor.terms("displayed")
    await visitor.terms("accepted")
    answers = [await agent.wait_for(Signal) for _ in range(2)]
    assert [s.data["status"] for s in answers] == ["displayed", "accepted"]

    await visitor.close()
    await agent.wait_for(changed("offline", "cust-42"))


async def test_tabs_on_two_instances_make_one_visitor_and_focus_crosses_instances(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    agent = await a.agent("alice")
    await agent.subscribe_group()
    tab_on_a = await a.visitor("v1")
    await agent.wait_for(changed("online", "v1"))
    tab_on_b = await b.visitor("v1")
    both = await agent.wait_for(changed("connections", "v1"))
    assert len(both.state["connections"]) == 2
    assert (await tab_on_a.wait_for(Focus)).focused is False
    assert await agent.show_terms("v1") == 1
    await tab_on_b.wait_for(signal("showterms"))
    assert await agent.signal("v1", "refresh", to="all") == 2

    await tab_on_b.close()
    assert (await tab_on_a.wait_for(Focus)).focused is True
    events = await drain(agent, FAST["grace_period"] * 2)
    assert not [e for e in events if isinstance(e, PresenceChanged) and e.change == "offline"]


async def test_held_signal_reaches_the_visitor_back_on_another_instance(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    agent = await a.agent("alice")
    first = await a.visitor("v1")
    await first.close()
    await asyncio.sleep(0.1)
    pending = asyncio.create_task(agent.show_terms("v1"))
    await asyncio.sleep(0.2)
    assert not pending.done()
    back = await b.visitor("v1")
    await back.wait_for(signal("showterms"))
    assert await pending == 1


async def test_snapshot_then_changes_has_no_gap_and_no_duplicate_across_instances(start_instance: Start) -> None:
    # Every change announced (none coalesced), so that any gap would show.
    a, b = await start_instance(presence_rate=10_000), await start_instance(presence_rate=10_000)
    visitor = await a.visitor("busy", data={"page": 0})
    agent = await b.agent("alice")

    async def browse() -> None:
        for page in range(1, 101):
            await visitor.publish(page=page)
            await asyncio.sleep(0.002)

    browsing = asyncio.create_task(browse())
    await asyncio.sleep(0.08)  # subscribe in the middle of the stream
    (state,) = (await agent.subscribe(["busy"])).visitors
    await browsing
    seen = [state["connections"][0]["data"]["page"]]
    versions = [state["version"]]
    while seen[-1] != 100:
        event = await agent.wait_for(changed("data", "busy"))
        seen.append(event.state["connections"][0]["data"]["page"])
        versions.append(event.state["version"])
    assert 0 < seen[0] < 100, "the snapshot was taken mid-stream"
    assert seen == list(range(seen[0], 101)), "every change after the snapshot, once, in order"
    assert versions == sorted(set(versions))


async def test_a_visitor_signal_on_a_reaches_the_watching_agent_on_b_only(start_instance: Start) -> None:
    a, b = await start_instance(), await start_instance()
    watching = await b.agent("watching")
    await watching.subscribe(["v1"])
    addressed = await b.agent("addressed")
    visitor = await a.visitor("v1")
    await addressed.show_terms("v1")  # so v1 may answer it by name
    await visitor.wait_for(signal("showterms"))
    await visitor.signal_agent("terms", {"status": "declined"}, agent="addressed")
    assert (await addressed.wait_for(signal("terms"))).data == {"status": "declined"}
    assert not [e for e in await drain(watching, 0.3) if isinstance(e, Signal)]
    await visitor.signal_agent("hello")
    assert (await watching.wait_for(signal("hello"))).visitor == "v1"


async def test_clusters_with_different_prefixes_do_not_see_each_other(start_instance: Start, redis_url: str) -> None:
    ours = await start_instance()
    theirs = await HeraldServer(settings(redis_url=redis_url, redis_prefix="someone-else", **FAST)).start()
    try:
        await theirs.visitor("v1")
        agent = await ours.agent("alice")
        assert (await agent.lookup("v1"))["online"] is False
    finally:
        await theirs.stop()


# --- losing an instance -----------------------------------------------------


async def test_agent_sees_the_visitor_go_offline_when_its_instance_is_killed(
    start_instance: Start, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    doomed: HeraldProcess = start_server(
        tmp_path,
        str(HERALD), "serve", "--group", f"acme={SECRET}", "--redis-url", redis_url,
        "--redis-prefix", prefix, "--instance-heartbeat", "0.25", "--instance-dead-after", "1.5",
    )  # fmt: skip
    try:
        survivor = await start_instance()
        agent = await survivor.agent("alice")
        await agent.subscribe(["v1"])
        visitor = await survivor.visitor("v1", connect=False, reconnect=False)
        visitor.base_url = doomed.base_url
        await visitor.connect()
        await agent.wait_for(changed("online", "v1"))

        doomed.kill()
        killed_at = time.monotonic()
        offline = await agent.wait_for(changed("offline", "v1"), timeout=15)
        took = time.monotonic() - killed_at
        assert offline.state["online"] is False
        assert took < 1.5 + 2.5, f"offline {took:.1f}s after the kill"

        back = await survivor.visitor("v1")
        await agent.wait_for(changed("online", "v1"))
        assert await agent.show_terms("v1") == 1
        await back.wait_for(signal("showterms"))
    finally:
        doomed.stop()


async def test_a_cleanly_stopped_instance_leaves_no_ghost(start_instance: Start) -> None:
    leaving = await start_instance()
    staying = await start_instance()
    agent = await staying.agent("alice")
    await agent.subscribe(["v1"])
    await leaving.visitor("v1", reconnect=False)
    await agent.wait_for(changed("online", "v1"))
    await leaving.stop()
    await agent.wait_for(changed("offline", "v1"), timeout=10)


# --- losing Redis -----------------------------------------------------------


@STANDALONE_ONLY
async def test_redis_outage_keeps_local_relay_errors_remote_and_converges(
    start_instance: Start, private_redis: RedisServer
) -> None:
    a, b = await start_instance(private_redis), await start_instance(private_redis)
    reconnects_before = sample(await scrape(a.base_url), "herald_backend_reconnects_total")
    visitor = await a.visitor("v1")
    local_agent = await a.agent("local")
    await local_agent.subscribe(["v1"])
    remote_agent = await b.agent("remote")
    await remote_agent.subscribe(["v1", "leaver", "newcomer"])
    leaver = await b.visitor("leaver")
    await remote_agent.wait_for(changed("online", "leaver"))

    private_redis.stop()
    await eventually(lambda: not_ready(a), 10, "instance A reports not ready")
    assert visitor.connected and local_agent.connected and remote_agent.connected
    assert sample(await scrape(a.base_url), "herald_backend_up") == 0

    # Same-instance relay keeps working, both ways.
    assert await local_agent.show_terms("v1") == 1
    await visitor.wait_for(signal("showterms"))
    await visitor.terms("displayed")
    assert (await local_agent.wait_for(signal("terms"))).data == {"status": "displayed"}
    # Across instances: a clear error, never silence.
    with pytest.raises(RequestFailed) as refused:
        await remote_agent.show_terms("v1")
    assert refused.value.code == "backend_unavailable"
    # Visitors come and go meanwhile.
    await leaver.close()
    await a.visitor("newcomer")

    await asyncio.sleep(1)
    private_redis.start()  # empty: everything registered before is gone
    await eventually(lambda: all_ready(a, b), 15, "both instances ready again")
    after = await scrape(a.base_url)
    assert sample(after, "herald_backend_up") == 1
    assert sample(after, "herald_backend_reconnects_total") >= reconnects_before + 2  # a and b, one registry

    async def converged() -> bool:
        try:
            states = {v: (await remote_agent.lookup(v))["online"] for v in ("v1", "leaver", "newcomer")}
        except RequestFailed:
            return False
        return states == {"v1": True, "leaver": False, "newcomer": True}

    await eventually(converged, 10, "presence converged after Redis came back")
    await eventually(lambda: remote_agent.connected, 10, "remote agent reconnected")
    assert await remote_agent.show_terms("v1") == 1
    await visitor.wait_for(signal("showterms"))
    assert remote_agent.visitors["v1"]["online"] and not remote_agent.visitors["leaver"]["online"]


@STANDALONE_ONLY
async def test_an_instance_started_while_redis_is_down_serves_and_recovers(
    start_instance: Start, private_redis: RedisServer
) -> None:
    private_redis.stop()
    lonely = await start_instance(private_redis)
    assert not await ready(lonely)
    visitor = await lonely.visitor("early")
    agent = await lonely.agent("alice")
    assert await agent.show_terms("early") == 1  # same-instance relay without Redis
    await visitor.wait_for(signal("showterms"))
    private_redis.start()
    await eventually(lambda: ready(lonely), 15, "ready once Redis is up")
    other = await start_instance(private_redis)
    watcher = await other.agent("bob")
    await eventually(lambda: _online(watcher, "early"), 10, "the early visitor registered in Redis")


async def _online(agent: AgentClient, visitor: str) -> bool:
    return bool((await agent.lookup(visitor))["online"])


@STANDALONE_ONLY
async def test_killed_pubsub_connection_is_noticed_and_recovered(
    start_instance: Start, private_redis: RedisServer
) -> None:
    a, b = await start_instance(private_redis), await start_instance(private_redis)
    agent = await a.agent("alice")
    await agent.subscribe(["v1"])
    visitor = await b.visitor("v1")
    await agent.wait_for(changed("online", "v1"))
    reconnects = backend(a).reconnects

    killed = private_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed.startswith(b":") and int(killed[1:]) >= 2, killed  # both instances' subscribers
    await eventually(lambda: backend(a).reconnects > reconnects, 10, "instance A resubscribed")
    await agent.wait_for(lambda e: isinstance(e, Connected), timeout=10)  # told to resync, and did

    await visitor.publish(page="/after-kill")
    event = await agent.wait_for(changed("data", "v1"))
    assert event.state["connections"][0]["data"] == {"page": "/after-kill"}


async def test_a_subscription_that_silently_stops_delivering_is_noticed(
    start_instance: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await start_instance(), await start_instance()
    agent = await a.agent("alice")
    await agent.subscribe(["v1"])
    redis_backend = backend(a)
    reconnects = redis_backend.reconnects
    deliver = redis_backend._dispatch
    # The connection stays up but nothing arrives any more, as when Redis
    # drops a subscriber's messages or a middlebox eats them.
    monkeypatch.setattr(redis_backend, "_dispatch", lambda kind, channel, data: None)
    await redis_backend._restart_listener()  # its reader takes the dispatch it starts with
    restarted = redis_backend._listen_task
    await eventually(lambda: redis_backend._listen_task is not restarted, 10, "the probe noticed")
    monkeypatch.setattr(redis_backend, "_dispatch", deliver)
    await eventually(lambda: redis_backend.reconnects > reconnects, 10, "resubscribed")
    await agent.wait_for(lambda e: isinstance(e, Disconnected), timeout=10)
    await agent.wait_for(lambda e: isinstance(e, Connected), timeout=10)
    await b.visitor("v1")
    await agent.wait_for(changed("online", "v1"))


async def _value(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else result


async def all_ready(*instances: HeraldServer) -> bool:
    return all([await ready(instance) for instance in instances])


async def not_ready(instance: HeraldServer) -> bool:
    return not await ready(instance)
