"""The bus's pub/sub reader against a real Redis, with hiredis (the fast
extra: the socket read here) and without it (redis-py's ``listen``): the
same messages in the same order, a refused subscribe and a lost connection
raised as redis-py errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from herald_presence.server.backends import redis_pubsub
from herald_presence.server.backends.redis_pubsub import read_messages

from .redis_server import RedisServer

Received = list[tuple[bytes, bytes, Any]]


@pytest.fixture(params=["hiredis", "listen"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "listen":
        monkeypatch.setattr(redis_pubsub, "Reader", None)
    elif redis_pubsub.Reader is None:
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
