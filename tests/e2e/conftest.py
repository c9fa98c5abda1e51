"""Headless Chromium against real Herald instances, for the browser tests.

Chromium comes from Debian (/usr/bin/chromium), driven by Playwright's
async API on the test's own event loop, so a test can start servers, open
pages and poke the hub in one coroutine. Playwright's own browser download
cannot work on these machines and is never used. Under CI a missing
Chromium fails the run (a skipped browser suite would look green while
testing nothing); on a developer's machine it skips with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from herald_presence.server.config import GroupConfig, Settings

from ..conftest import FAST
from ..harness import HeraldServer, settings
from ..processes import REPO
from ..redis_server import RedisServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Fake media: the browser's own "share your screen?" picker answers by itself (the visitor's
    # consent on the page is its Accept), with a fake camera and screen. A real picker is modal:
    # the page would get no clicks until someone picks.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
ARTIFACTS = REPO / "test-artifacts"
STEP_TIMEOUT_MS = 8_000  # one UI step; the slowest is an offline after the grace period
DEMO_SECRET = "e2e-demo-secret-0123456789"


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium: the one browser these machines can have."""
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} not found (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    """One headless Chromium per test, closed afterwards."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], Awaitable[Page]]]:
    """A page in a fresh browser context (its own cookies: an agent and a visitor
    are different people), failing the test on any uncaught script error."""
    errors: list[str] = []

    async def open_page(url: str) -> Page:
        context = await browser.new_context(viewport={"width": 1200, "height": 860})
        page = await context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("pageerror", lambda error: errors.append(f"{url}: {error}"))
        await page.goto(url)
        await page.locator("body[data-ready='true']").wait_for()
        return page

    yield open_page
    assert not errors, f"script errors in the pages: {errors}"


@pytest.fixture
def shot(request: pytest.FixtureRequest) -> Callable[[Page, str], Awaitable[None]]:
    """Screenshot a page into test-artifacts/<test>/<nn>-<step>.png."""
    folder = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    count = 0

    async def shot(page: Page, step: str) -> None:
        nonlocal count
        count += 1
        await page.screenshot(path=str(folder / f"{count:02d}-{step}.png"), full_page=True)

    return shot


def demo_settings(**overrides: Any) -> Settings:
    """A server as a zero-config ``herald serve`` runs it: only the demo group
    (with a fixed secret, so that the instances of a cluster share it)."""
    server_settings = settings(**overrides)
    server_settings.groups = {"demo": GroupConfig("demo", [DEMO_SECRET], allow_consumer_codes=True, demo=True)}
    return server_settings


@pytest.fixture(params=["one instance", "two instances"])
async def demo_servers(request: pytest.FixtureRequest) -> AsyncIterator[tuple[HeraldServer, HeraldServer]]:
    """(the agent's server, the visitor's server) in demo mode: the same instance,
    or two instances sharing a Redis so that everything crosses between them."""
    started: list[HeraldServer] = []
    try:
        if request.param == "one instance":
            started.append(await HeraldServer(demo_settings()).start())
            yield started[0], started[0]
        else:
            redis: RedisServer = request.getfixturevalue("redis_server")
            if redis.process is None or redis.process.poll() is not None:
                redis.start()
            cluster = {**FAST, "redis_url": redis.url, "redis_prefix": f"e{uuid.uuid4().hex[:10]}"}
            for _ in range(2):
                started.append(await HeraldServer(demo_settings(**cluster)).start())
            yield started[0], started[1]
    finally:
        for server in started:
            await server.stop()
