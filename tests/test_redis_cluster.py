"""What Redis Cluster mode adds, on a real cluster (three masters with a
replica each, ``tests/redis_cluster.py``): one slot per operation, sharded
pub/sub with a probe in every shard, and the URL that names the cluster.

The behavioural and fault suites run on the same cluster too
(``tests/topologies.py``, ``tests/backends``, ``tests/faults``)."""

from __future__ import annotations

import asyncio
import functools

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from herald_presence.server.backends.base import LogWrite
from herald_presence.server.backends.redis import STORE_IF_SCRIPT, RedisBackend
from herald_presence.server.backends.redis_cluster import Shards, shard_tags, slot
from herald_presence.server.backends.redis_connect import cluster_address, connect
from herald_presence.server.config import ConfigError
from herald_presence.server.model import events as ev
from herald_presence.server.model import presence_rules
from herald_presence.server.model.names import RedisNames, session_key

from . import slot_check
from .backends.conftest import REDIS_TIMINGS, RecordingListener, closed_in_time, conn, eventually
from .redis_cluster import RedisClusterServers
from .redis_server import RedisServer

GROUP = "acme"


def test_a_cluster_url_names_its_seed_nodes_user_and_tls() -> None:
    address = cluster_address("rediss+cluster://herald:s%40cret@10.0.0.1:6379,[::1]:7000")
    assert address is not None
    assert address.nodes == [("10.0.0.1", 6379), ("::1", 7000)]
    assert (address.tls, address.username, address.password) == (True, "herald", "s@cret")
    assert cluster_address("redis://127.0.0.1:6379/0") is None
    for bad in ("redis+cluster://", "redis+cluster://host", "redis+cluster://h:1/0", "redis+cluster://h:1?x=1"):
        with pytest.raises(ConfigError, match="redis_url"):
            connect(bad, 1.0)


def test_every_shard_gets_a_probe_tag_in_its_own_slots() -> None:
    masters = [("a", set(range(0, 5461))), ("b", set(range(5461, 10923))), ("c", {16383})]
    tags = shard_tags(masters)
    for name, slots in masters:
        assert slot(tags[name]) in slots


def test_every_key_of_a_group_shares_the_groups_slot() -> None:
    names = RedisNames("herald")
    group_keys = [
        names.visitor(GROUP, "v1"),
        names.online(GROUP),
        names.held(GROUP, "v1"),
        names.instance_connections(GROUP, "i1"),
        names.instance_away(GROUP, "i1"),
        names.channel(f"v:{{{GROUP}}}:v1"),
        names.channel(f"g:{{{GROUP}}}"),
    ]
    assert {slot(key) for key in group_keys} == {slot(f"{{{GROUP}}}")}


async def test_the_check_catches_what_a_cluster_refuses(
    redis_server: RedisServer, redis_cluster: RedisClusterServers
) -> None:
    """The suite's check (tests/slot_check.py) sees a transaction or a
    command over two slots on one redis-server, where it works; the cluster
    refuses both, and a script touching an undeclared key of another slot."""
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("{a}:x", 1)
            pipe.set("{b}:x", 1)
            await pipe.execute()
        await client.delete("{a}:x", "{b}:x")
    finally:
        await client.aclose()
    found = slot_check.take()
    assert any("transaction" in f for f in found) and any(f.startswith("DEL") for f in found), found

    port = redis_cluster.master_of("{a}")
    node = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        with pytest.raises(ResponseError, match="same slot"):
            await node.delete("{a}:x", "{a}:y", "{b}:x")
        script = "#!lua\nredis.call('SET', KEYS[1], 1)\nredis.call('SET', ARGV[1], 1)"
        same_node_other_slot = next(f"{{{n}}}" for n in range(10_000) if redis_cluster.master_of(f"{{{n}}}") == port
                                    and slot(f"{{{n}}}") != slot("{a}"))  # fmt: skip
        with pytest.raises(ResponseError, match="same slot"):
            await node.eval(script, 1, "{a}:x", same_node_other_slot)
    finally:
        await node.aclose()
    slot_check.take()  # what this test sent on purpose


async def test_a_presence_change_is_one_script_on_one_slot(redis_cluster: RedisClusterServers) -> None:
    """The change, the group's sets, the announcements: one EVALSHA whose
    every key is declared and in the group's slot (the cluster runs it with
    ``#!lua``, which refuses any other)."""
    backend = RedisBackend(redis_cluster.url, prefix="slots", **REDIS_TIMINGS)
    await backend.start(RecordingListener())
    try:
        sent: list[tuple[object, ...]] = []
        original = backend._batch.script

        async def script(text: str, *args: object) -> object:
            if text == STORE_IF_SCRIPT:
                sent.append(args)
            return await original(text, *args)

        backend._batch.script = script  # type: ignore[method-assign]
        join = functools.partial(presence_rules.join, connection=conn(backend, "c1"), limit=None)
        announce = backend_announce(backend)
        assert await backend.mutate(GROUP, "v1", join, announce) is not None
        leave = functools.partial(presence_rules.leave, connection="c1")
        assert await backend.mutate(GROUP, "v1", leave, announce) is not None
        assert len(sent) == 2
        for numkeys, *rest in sent:
            keys = rest[: int(numkeys)]  # type: ignore[call-overload]
            assert {slot(str(k)) for k in keys} == {slot(f"{{{GROUP}}}")}, keys
            assert any(b":inst:" in str(k).encode() for k in keys)  # the instance's set, in the group's slot
    finally:
        await closed_in_time(backend)


async def test_a_records_change_and_its_events_are_one_script_on_one_slot(redis_cluster: RedisClusterServers) -> None:
    """A session's write and its events (``LogWrite``): one EVALSHA whose keys
    are the record's and the log's, all in the group's slot, and both there
    afterwards."""
    backend = RedisBackend(redis_cluster.url, prefix="logged", **REDIS_TIMINGS)
    await backend.start(RecordingListener())
    try:
        sent: list[tuple[object, ...]] = []
        original = backend._batch.script

        async def script(text: str, *args: object) -> object:
            sent.append(args)
            return await original(text, *args)

        backend._batch.script = script  # type: ignore[method-assign]
        event = ev.new_event(ev.SESSION_STARTED, GROUP, session="s1", visitor="v1")
        key = session_key(GROUP, "s1")
        assert await backend.kv_set(key, b"session", ttl=10, log=LogWrite(GROUP, append=[event]))
        ended = ev.new_event(ev.SESSION_ENDED, GROUP, session="s1", visitor="v1", reason="ended")
        assert await backend.kv_swap(key, None, log=LogWrite(GROUP, append=[ended], cancel=["end:s1"])) == b"session"
        assert len(sent) == 2, "one script per change"
        for numkeys, *rest in sent:
            keys = [str(k) for k in rest[: int(numkeys)]]  # type: ignore[call-overload]
            assert {slot(k) for k in keys} == {slot(f"{{{GROUP}}}")}, keys
            assert backend.names.record(key) in keys and backend.names.events(GROUP) in keys, keys
        assert [e["type"] for _, e in await backend.events.session_events(GROUP, "s1")] == [
            "session.started", "session.ended",
        ]  # fmt: skip
    finally:
        await closed_in_time(backend)


def backend_announce(backend: RedisBackend):  # type: ignore[no-untyped-def]
    def announce(change: object) -> list[tuple[str, bytes]]:
        return [(f"v:{{{GROUP}}}:v1", b"x"), (f"g:{{{GROUP}}}", b"x")]

    return announce


async def test_the_bus_holds_one_subscriber_connection_per_shard_and_a_probe_in_each(
    redis_cluster: RedisClusterServers,
) -> None:
    listener = RecordingListener()
    backend = RedisBackend(redis_cluster.url, prefix="shards", **REDIS_TIMINGS)
    await backend.start(listener)
    try:
        topics = [f"v:{{g{n}}}:x" for n in range(30)]  # spread over every shard
        for topic in topics:
            await backend.subscribe(topic)
        shards = backend._pubsub
        assert isinstance(shards, Shards)
        assert len(shards.readers()) == 3  # one connection per master, whatever the channels
        assert len(backend._probes) == 3 and backend.healthy
        for topic in topics:
            await backend.publish(topic, topic.encode())
        got = {(await listener.next_message())[0] for _ in topics}
        assert got == set(topics)
        # Every master has exactly one subscriber connection of this instance.
        for port in redis_cluster.masters():
            node = aioredis.Redis(host="127.0.0.1", port=port)
            try:
                clients = await node.client_list(_type="pubsub")
            finally:
                await node.aclose()
            assert len([c for c in clients if int(c.get("ssub", c.get("sub", 0))) > 0]) >= 1
    finally:
        await closed_in_time(backend)


async def test_a_deaf_shard_is_noticed_by_its_own_probe(
    redis_cluster: RedisClusterServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One shard's subscription stops delivering while the others go on:
    only that shard's probe goes quiet, and that is enough to resubscribe."""
    listener = RecordingListener()
    backend = RedisBackend(redis_cluster.url, prefix="deaf", **{**REDIS_TIMINGS, "probe_timeout": 1.0})
    await backend.start(listener)
    try:
        await backend.subscribe("v:{acme}:v1")
        deaf = slot(backend.names.channel("v:{acme}:v1"))
        deaf_slots = next(s for _node, s in backend._topology.masters().values() if deaf in s)  # type: ignore[union-attr]
        deliver = backend._dispatch

        def dispatch_but_one_shard(kind: bytes, channel: bytes, data: object) -> None:
            if kind == b"smessage" and slot(channel) in deaf_slots:
                return
            deliver(kind, channel, data)

        monkeypatch.setattr(backend, "_dispatch", dispatch_but_one_shard)
        await backend._restart_listener()  # its readers take the dispatch they start with
        restarted = backend._listen_task
        await eventually(lambda: _true(backend._listen_task is not restarted), 10, "the deaf shard's probe noticed")
        monkeypatch.setattr(backend, "_dispatch", deliver)
        restores = listener.restores
        await backend._restart_listener()  # readers that hear every shard again
        await eventually(lambda: _true(listener.restores > restores), 10, "resubscribed and told the listener")
        await backend.publish("v:{acme}:v1", b"after")
        assert await listener.next_message() == ("v:{acme}:v1", b"after")
    finally:
        await closed_in_time(backend)


async def _true(value: bool) -> bool:
    return value


async def test_commands_and_subscriptions_follow_a_slot_that_moved_to_another_master(
    redis_cluster: RedisClusterServers,
) -> None:
    """The slot map a batcher holds goes stale when a slot migrates: its
    master answers MOVED, and the command is sent again where it lives now;
    the subscription to a channel of that slot is made again on its new
    master (and the listener told to resync)."""
    listener = RecordingListener()
    backend = RedisBackend(redis_cluster.url, prefix="moved", **REDIS_TIMINGS)
    await backend.start(listener)
    key = "{moved-slot}:k"
    number = slot(key)
    topic = "v:{moved-slot}:v1"
    assert slot(backend.names.channel(topic)) == number
    source = redis_cluster.master_of(key)
    target = next(port for port in redis_cluster.masters() if port != source)
    try:
        await backend.subscribe(topic)
        await backend.kv_set("{moved-slot}:k", b"before")
        ids = {}
        for port in (source, target):
            node = aioredis.Redis(host="127.0.0.1", port=port)
            ids[port] = (await node.execute_command("CLUSTER", "MYID")).decode()
            await node.aclose()
        await _move_slot(redis_cluster, number, source, target, ids)
        assert await backend.kv_get("{moved-slot}:k") == b"before"  # batched GET: MOVED, then the new master
        await eventually(lambda: _true(listener.restores > 0), 10, "subscribed again after the slot moved")
        await backend.publish(topic, b"on the new master")
        assert await listener.next_message() == (topic, b"on the new master")
        await _move_slot(redis_cluster, number, target, source, ids)
        assert await backend.kv_get("{moved-slot}:k") == b"before"
        await eventually(lambda: _true(listener.restores > 1), 10, "subscribed again after the slot moved back")
        await backend.publish(topic, b"back home")
        assert await listener.next_message() == (topic, b"back home")
    finally:
        await closed_in_time(backend)


async def _move_slot(servers: RedisClusterServers, number: int, source: int, target: int, ids: dict[int, str]) -> None:
    """Migrate one slot (and its keys) from ``source`` to ``target``, as ``redis-cli --cluster reshard`` does."""
    src, dst = aioredis.Redis(host="127.0.0.1", port=source), aioredis.Redis(host="127.0.0.1", port=target)
    try:
        await dst.execute_command("CLUSTER", "SETSLOT", number, "IMPORTING", ids[source])
        await src.execute_command("CLUSTER", "SETSLOT", number, "MIGRATING", ids[target])
        while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", number, 100):
            await src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in servers.masters():
            node = aioredis.Redis(host="127.0.0.1", port=port)
            await node.execute_command("CLUSTER", "SETSLOT", number, "NODE", ids[target])
            await node.aclose()
    finally:
        await src.aclose()
        await dst.aclose()
    await asyncio.sleep(0.2)
