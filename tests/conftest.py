from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from .harness import HeraldServer, settings
from .redis_server import RedisServer

BACKENDS = ["memory", "redis"]

# Short cluster timings so that deaths are noticed within a test.
FAST = {"instance_heartbeat": 0.25, "instance_dead_after": 1.5, "grace_period": 0.4, "signal_hold": 2.0}

Start = Callable[..., Awaitable[HeraldServer]]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def backend_settings(backend_name: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings that pick the backend; each test gets its own Redis prefix."""
    if backend_name == "memory":
        return {}
    redis: RedisServer = request.getfixturevalue("redis_server")
    if redis.process is None or redis.process.poll() is not None:
        redis.start()  # a previous test stopped it
    return {"redis_url": redis.url, "redis_prefix": f"t{uuid.uuid4().hex[:10]}"}


@pytest.fixture
async def start_herald(backend_settings: dict[str, Any]) -> AsyncIterator[Callable[..., Awaitable[HeraldServer]]]:
    """Start instances (of one cluster) with setting overrides; all stop afterwards."""
    started: list[HeraldServer] = []

    async def start(**overrides: Any) -> HeraldServer:
        server = await HeraldServer(settings(**{**backend_settings, **overrides})).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def herald(start_herald: Callable[..., Awaitable[HeraldServer]]) -> HeraldServer:
    return await start_herald()


# --- clusters: several instances on one Redis --------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop and restart at will."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def start_instance(redis_server: RedisServer, prefix: str) -> AsyncIterator[Start]:
    """Start in-process instances of one cluster (one Redis, one prefix)."""
    started: list[HeraldServer] = []

    async def start(redis: RedisServer | None = None, **overrides: Any) -> HeraldServer:
        redis = redis or redis_server
        overrides = {**FAST, **overrides}
        instance = await HeraldServer(settings(redis_url=redis.url, redis_prefix=prefix, **overrides)).start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        await instance.stop()
