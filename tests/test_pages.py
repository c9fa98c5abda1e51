"""Herald's pages and browser client are served as they are, from a fixed
list, with the headers that keep them safe, and a normal install ships them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from herald_presence.server.web import pages

from .harness import HeraldServer, settings


@pytest.fixture
async def herald() -> AsyncIterator[HeraldServer]:
    """One memory-backed instance: the files do not depend on the backend."""
    server = await HeraldServer(settings()).start()
    yield server
    await server.stop()


async def test_every_page_and_script_is_served_with_its_type_and_headers(herald: HeraldServer) -> None:
    async with aiohttp.ClientSession() as http:
        for url, (path, content_type) in pages.FILES.items():
            async with http.get(herald.base_url + url) as response:
                assert response.status == 200, url
                assert response.headers["Content-Type"].startswith(content_type), url
                assert await response.read() == path.read_bytes()
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                if content_type == "text/html":
                    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
                    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
                if url.startswith("/js/"):
                    assert response.headers["Access-Control-Allow-Origin"] == "*"  # customer sites import it


@pytest.mark.parametrize(
    "url",
    [
        "/js/",
        "/js/vendor/",
        "/js/vendor/update.sh",
        "/static/",
        "/js/../server/app.py",
        "/static/%2e%2e/app.py",
        "/js/vendor/..%2f..%2fherald.js",
    ],
)
async def test_nothing_outside_the_list_is_served(herald: HeraldServer, url: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(herald.base_url + url) as response:
        assert response.status == 404, url
