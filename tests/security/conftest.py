from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from herald_presence.server.config import Settings, load

from ..harness import TEST_SETTINGS, HeraldServer, settings

Launch = Callable[..., Awaitable[HeraldServer]]


@pytest.fixture
async def launch(backend_settings: dict[str, Any]) -> AsyncIterator[Launch]:
    """Like ``start_herald`` (both backends), for settings that only a TOML
    file can give: ``config=`` a TOML file (its groups replace the harness's),
    or ``configure=`` a function that edits the settings before the start."""
    started: list[HeraldServer] = []

    async def launch(
        config: Path | None = None, configure: Callable[[Settings], None] | None = None, **overrides: Any
    ) -> HeraldServer:
        if config is None:
            server_settings = settings(**{**backend_settings, **overrides})
        else:
            flags = {**TEST_SETTINGS, **backend_settings, **overrides}
            server_settings = load(str(config), env={}, flags={k: str(v) for k, v in flags.items()})
        if configure is not None:
            configure(server_settings)
        server = await HeraldServer(server_settings).start()
        started.append(server)
        return server

    yield launch
    for server in started:
        await server.stop()
