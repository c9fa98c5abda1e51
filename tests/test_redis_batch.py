"""The Redis backend's command batches against a real Redis: results come
back to their own callers, in call order, and an unreachable Redis is a
clear ``BackendUnavailable`` for every caller, never a hang."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis
import redis.asyncio as aioredis

from herald_presence.server.backends.base import BackendUnavailable
from herald_presence.server.backends.redis_batch import (
    Command,
    CommandBatcher,
    pack_commands,
    pack_commands_in_python,
    unpack_messages,
)

from .processes import free_port
from .redis_server import RedisServer


async def test_concurrent_commands_share_a_batch_and_keep_their_order(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    batch = CommandBatcher(client, "test")
    try:
        key = "batch-test:list"
        await client.delete(key)
        lengths = await asyncio.gather(*(batch.call("rpush", key, str(n)) for n in range(50)))
        assert lengths == list(range(1, 51))  # each caller got its own reply
        assert await client.lrange(key, 0, -1) == [str(n).encode() for n in range(50)]  # sent in call order
        assert await batch.call("publish", "batch-test:nobody", b"x") == 0
    finally:
        await batch.close()
        await client.aclose()


async def test_an_unreachable_redis_fails_every_caller_with_backend_unavailable() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    batch = CommandBatcher(client, "test")
    try:
        results = await asyncio.gather(*(batch.call("publish", "c", b"x") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(result, BackendUnavailable) for result in results)
        with pytest.raises(BackendUnavailable):
            await batch.call("hgetall", "k")
    finally:
        await batch.close()
        await client.aclose()


async def test_neighbouring_publishes_to_one_channel_go_out_as_one_message(redis_server: RedisServer) -> None:
    """One loop turn's publishes in a row to one channel are one PUBLISH of
    a batch; the subscriber splits it into the messages as published, in
    order. Publishes to another channel in between are not merged across it."""
    client = aioredis.Redis.from_url(redis_server.url)
    listener = client.pubsub()
    batch = CommandBatcher(client, "test")
    try:
        await listener.subscribe("batch-test:a", "batch-test:b")
        for _ in range(2):
            await listener.get_message(timeout=1)  # the two subscribe confirmations
        stats_before = (await client.info("commandstats")).get("cmdstat_publish", {}).get("calls", 0)
        await batch.call("PUBLISH", "batch-test:warm", b"")  # the batcher holds its connection from now on
        sent = [("batch-test:a", n) for n in range(3)] + [("batch-test:b", 3)] + [("batch-test:a", n) for n in (4, 5)]
        reached = await asyncio.gather(*(batch.call("PUBLISH", ch, b"m%d" % n) for ch, n in sent))
        assert reached == [1] * len(sent)  # every caller hears its channel's subscriber count
        received = []
        while len(received) < 3:
            message = await listener.get_message(timeout=2)
            assert message is not None, received
            received.append((message["channel"].decode(), unpack_messages(message["data"])))
        assert received == [
            ("batch-test:a", [b"m0", b"m1", b"m2"]),
            ("batch-test:b", [b"m3"]),  # alone: as published
            ("batch-test:a", [b"m4", b"m5"]),
        ]
        stats_after = (await client.info("commandstats"))["cmdstat_publish"]["calls"]
        assert stats_after - stats_before == 1 + 3  # the warm-up, then three publishes for six messages
    finally:
        await batch.close()
        await listener.aclose()
        await client.aclose()


@pytest.mark.parametrize("pack", [pack_commands, pack_commands_in_python])
def test_commands_are_packed_as_redis_py_packs_them(pack: Callable[[list[Command]], bytes]) -> None:
    """The batcher's packer (hiredis's when installed, its own otherwise)
    gives redis-py's bytes for every kind of argument Herald sends (and
    refuses what Redis would misread)."""
    commands = [
        ("EVALSHA", ("a" * 40, 2, "herald:{acme}:v:x", b"herald:{acme}:online", b"", 0, 3.25, "é", b"\x00\xff" * 300)),
        ("PUBLISH", ("herald:inbox:i1", b"\x93\x01\x02\x03")),
        ("XGROUP SETID", ("stream", "webhooks", "0-0")),
        ("GET", (memoryview(b"k"),)),
    ]
    reference = redis.Connection()  # a client-side connection object: only its packer is used, nothing connects
    expected = b"".join(reference.pack_commands([(c, *a) for c, a in commands]))
    assert pack(commands) == expected
    for unfit in (True, None):
        with pytest.raises(TypeError):
            pack([("SET", ("k", unfit))])
