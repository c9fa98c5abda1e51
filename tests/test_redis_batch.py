"""The Redis backend's command batches against a real Redis: results come
back to their own callers, in call order, and an unreachable Redis is a
clear ``BackendUnavailable`` for every caller, never a hang."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from herald_presence.server.backends.base import BackendUnavailable
from herald_presence.server.backends.redis_batch import CommandBatcher

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
