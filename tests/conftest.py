from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from .harness import HeraldServer, settings

BACKENDS = ["memory"]


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def start_herald(backend_name: str) -> AsyncIterator[Callable[..., Awaitable[HeraldServer]]]:
    """Start servers with setting overrides; all are stopped afterwards."""
    started: list[HeraldServer] = []

    async def start(**overrides: Any) -> HeraldServer:
        server = await HeraldServer(settings(**overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def herald(start_herald: Callable[..., Awaitable[HeraldServer]]) -> HeraldServer:
    return await start_herald()
