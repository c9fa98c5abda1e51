from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from .harness import HeraldServer, settings
from .redis_server import RedisServer

BACKENDS = ["memory", "redis"]


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
