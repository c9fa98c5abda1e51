"""Replies read off Redis's socket against a real Redis, with hiredis (the
fast extra: read here) and without it (redis-py reads): the bus's messages
and the batcher's replies alike, the same in the same order; a refused
subscribe, a lost connection and a Redis that does not answer raised as
redis-py errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from herald_presence.server.backends import redis_socket
from herald_presence.server.backends.base import BackendUnavailable
from herald_presence.server.backends.redis_batch import CommandBatcher
from herald_presence.server.backends.redis_socket import read_messages

from .redis_server import RedisServer

Received = list[tuple[bytes, bytes, Any]]


@pytest.fixture(params=["hiredis", "listen"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "listen":
        monkeypatch.setattr(redis_socket, "Reader", None)
    elif redis_socket.Reader is None:
        pytest.fail("hiredis is not installed (pip install -e '.[test,fast]')")
    yield request.param


class Collected:
    """What ``read_messages`` handed on, awaited by count."""

    def __init__(self) -> None:
        self.messages: Received = []
        self._wanted = 0
        self._enough = asyncio.Event()

    def __call__(self, kind: bytes, channel: bytes, data: Any) -> None:
        self.messages.append((kind, channel, data))
        if len(self.messages) >= self._wanted:
            self._enough.set()

    async def until(self, count: int) -> Received:
        self._wanted = count
        self._enough.clear()
        if len(self.messages) < count:
            async with asyncio.timeout(5):
                await self._enough.wait()
        return self.messages


def _reading(pubsub: Any) -> tuple[Collected, asyncio.Task[None]]:
    collected = Collected()
    return collected, asyncio.create_task(read_messages(pubsub, collected))


async def test_messages_arrive_whole_and_in_order(redis_server: RedisServer, reader: str) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(b"ps:a", b"ps:b")
        received, task = _reading(pubsub)
        await received.until(2)
        big = bytes(range(256)) * 1000  # over one read of the socket
        async with client.pipeline(transaction=False) as pipe:
            for n in range(200):
                pipe.publish(b"ps:a" if n % 3 else b"ps:b", b"m%d" % n)
            pipe.publish(b"ps:a", big)
            await pipe.execute()
        messages = await received.until(203)
        assert messages[:2] == [(b"subscribe", b"ps:a", 1), (b"subscribe", b"ps:b", 2)]
        assert messages[2:-1] == [(b"message", b"ps:a" if n % 3 else b"ps:b", b"m%d" % n) for n in range(200)]
        assert messages[-1] == (b"message", b"ps:a", big)
        task.cancel()
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_a_lost_connection_is_a_redis_error(redis_server: RedisServer, reader: str) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(b"ps:lost")
        received, task = _reading(pubsub)
        await received.until(1)
        await client.client_kill_filter(_type="pubsub")
        with pytest.raises(RedisConnectionError):
            async with asyncio.timeout(5):
                await task
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_a_refused_subscribe_is_a_redis_error(redis_server: RedisServer, reader: str) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    await admin.acl_setuser(
        "ps-reader", enabled=True, passwords=["+secret"], channels=["ps:allowed"], commands=["+@all"]
    )
    client = aioredis.Redis.from_url(redis_server.url, username="ps-reader", password="secret")
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(b"ps:allowed")
        received, task = _reading(pubsub)
        await received.until(1)
        await pubsub.subscribe(b"ps:forbidden")
        with pytest.raises(RedisError, match="no permissions"):
            async with asyncio.timeout(5):
                await task
    finally:
        await pubsub.aclose()
        await client.aclose()
        await admin.acl_deluser("ps-reader")
        await admin.aclose()


async def test_batched_replies_are_redis_pys_own(redis_server: RedisServer, reader: str) -> None:
    """What the batcher's callers get, read here or by redis-py alike: values,
    HGETALL as a dict, a script Redis lacks loaded on the way, a refused
    command as ``BackendUnavailable`` for its caller only; a command whose
    reply redis-py makes over (SET's True) read by redis-py."""
    client = aioredis.Redis.from_url(redis_server.url)
    batch = CommandBatcher(client, "test")
    try:
        await client.script_flush()
        for key in ("rs:hash", "rs:text", "rs:set"):
            await client.delete(key)
        script = "return {KEYS[1], ARGV[1]}"
        results = await asyncio.gather(
            batch.call("HSET", "rs:hash", "a", b"1", "b", b"\x00\xff"),
            batch.call("SADD", "rs:text", "a member"),
            batch.call("SADD", "rs:hash", "not a set"),
            batch.call("HGETALL", "rs:hash"),
            batch.call("HGETALL", "rs:none"),
            batch.script(script, 1, "rs:key", "value"),
            batch.call("PUBLISH", "rs:nobody", b"x"),
            return_exceptions=True,
        )
        assert await asyncio.gather(batch.call("SET", "rs:set", b"v"), batch.call("GET", "rs:set")) == [True, b"v"]
        assert results[:2] == [2, 1]
        assert isinstance(results[2], BackendUnavailable) and isinstance(results[2].__cause__, ResponseError)
        assert results[3:] == [{b"a": b"1", b"b": b"\x00\xff"}, {}, [b"rs:key", b"value"], 0]
    finally:
        await batch.close()
        await client.aclose()


BUSY_SCRIPT = """
local start = redis.call('TIME')
local deadline = start[1] * 1000000 + start[2] + tonumber(ARGV[1])
repeat local now = redis.call('TIME') until now[1] * 1000000 + now[2] >= deadline
return 1
"""
PUSH_SCRIPT = "return redis.call('RPUSH', KEYS[1], ARGV[1])"


async def test_batches_called_while_others_wait_keep_their_order_and_replies(
    redis_server: RedisServer, reader: str
) -> None:
    """A script that holds Redis 50 ms is in flight; callers in the turns of
    the event loop after it (each turn its own batch, sent ahead of the
    replies with hiredis) each get their own reply, in call order, and
    those whose replies redis-py reads (SET's True) wait their turn."""
    client = aioredis.Redis.from_url(redis_server.url)
    batch = CommandBatcher(client, "test")
    try:
        await client.delete("{rs}:order", "{rs}:plain")
        for script in (BUSY_SCRIPT, PUSH_SCRIPT):
            await client.script_load(script)  # loaded: no EVALSHA comes back for its EVAL, out of turn
        calls = [asyncio.ensure_future(batch.script(BUSY_SCRIPT, 0, 50_000))]
        for n in range(40):
            await asyncio.sleep(0)  # the next turn of the loop: a batch of its own
            calls.append(asyncio.ensure_future(batch.script(PUSH_SCRIPT, 1, "{rs}:order", n)))
            if n % 10 == 5:
                calls.append(asyncio.ensure_future(batch.call("SET", "{rs}:plain", n)))
        replies = await asyncio.gather(*calls)
        assert replies[0] == 1
        assert [r for r in replies[1:] if r is not True] == list(range(1, 41))  # each its own, in call order
        assert sum(r is True for r in replies) == 4
        assert await client.lrange("{rs}:order", 0, -1) == [str(n).encode() for n in range(40)]
        assert await client.get("{rs}:plain") == b"35"
    finally:
        await batch.close()
        await client.aclose()


async def test_scripts_keep_their_call_order_once_redis_has_lost_them(redis_server: RedisServer, reader: str) -> None:
    """Redis forgot its scripts (restarted, failed over) and the batcher's
    connection went with them: the calls of the next turns of the event loop
    still run in call order, none answered NOSCRIPT and sent again behind
    later ones (the scripts this process ran are loaded on the new
    connection first)."""
    client = aioredis.Redis.from_url(redis_server.url)
    admin = aioredis.Redis.from_url(redis_server.url)
    batch = CommandBatcher(client, "test")
    try:
        await client.delete("{rs}:again")
        assert await batch.script(PUSH_SCRIPT, 1, "{rs}:again", -1) == 1
        assert await batch.script(BUSY_SCRIPT, 0, 1) == 1
        await admin.script_flush()
        await admin.client_kill_filter(_type="normal", skipme=True)
        assert await batch.call("PUBLISH", "rs:nobody", b"x") == 0  # on a new connection
        calls = [asyncio.ensure_future(batch.script(BUSY_SCRIPT, 0, 20_000))]  # batches pile up behind it
        for n in range(30):
            calls.append(asyncio.ensure_future(batch.script(PUSH_SCRIPT, 1, "{rs}:again", n)))
            await asyncio.sleep(0)
        assert await asyncio.gather(*calls) == [1, *range(2, 32)]
        assert await client.lrange("{rs}:again", 0, -1) == [str(n).encode() for n in range(-1, 30)]
    finally:
        await batch.close()
        await client.aclose()
        await admin.aclose()


async def test_a_batch_redis_does_not_answer_fails_within_the_socket_timeout(
    redis_server: RedisServer, reader: str
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=0.5)
    admin = aioredis.Redis.from_url(redis_server.url)
    batch = CommandBatcher(client, "test")
    try:
        assert await batch.call("PUBLISH", "rs:nobody", b"x") == 0
        await admin.client_pause(2000)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await batch.call("PUBLISH", "rs:nobody", b"x")
        assert time.monotonic() - started < 1.5
        await admin.client_unpause()
        assert await batch.call("PUBLISH", "rs:nobody", b"x") == 0  # a new connection: the stalled one is dropped
    finally:
        await admin.client_unpause()
        await batch.close()
        await client.aclose()
        await admin.aclose()
