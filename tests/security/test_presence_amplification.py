"""Presence amplification: a visitor's small ``presence`` frames made Herald
send every watching agent the visitor's whole state, all tabs' data, for
each one: 1,397 times the bytes that came in (10 tabs of 4 KiB, 5 group
watchers). Presence is state, not events: a connection's changes are stored
and announced at most ``presence_rate`` times a second (faster ones
coalesce, the latest value winning), and agents are told what changed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp

from herald_presence.protocol import codec
from herald_presence.protocol.messages import Hello, Presence, PresenceChanged, Snapshot, Subscribe

from ..harness import HeraldServer
from .helpers import assert_bystanders_served, hello, login, session

TABS, WATCHERS = 10, 5
TAB_DATA = {f"field{i:02d}": "x" * 120 for i in range(30)}  # ~3.9 KiB a tab: near max_presence_bytes
FLOOD_SECONDS, FLOOD_RATE = 3.0, 40  # frames a second, under the frame rate


@contextlib.asynccontextmanager
async def group_watcher(herald: HeraldServer, name: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with session() as http:
        assert (await login(http, herald.base_url, name)).status == 200
        async with http.ws_connect(herald.base_url + "/v1/agent") as ws:
            await ws.send_bytes(codec.encode(Hello(versions=[1])))
            await ws.receive_bytes(timeout=5)  # welcome
            await ws.send_bytes(codec.encode(Subscribe(id=1, group=True)))
            assert isinstance(codec.decode(await ws.receive_bytes(timeout=5), from_server=True), Snapshot)
            yield ws


async def count_bytes(ws: aiohttp.ClientWebSocketResponse, until: float, tally: list[int]) -> None:
    """Add up the presence frames' bytes that reach ``ws`` until ``until``."""
    with contextlib.suppress(TimeoutError):
        while (left := until - time.monotonic()) > 0:
            frame = await ws.receive_bytes(timeout=left)
            if isinstance(codec.decode(frame, from_server=True), PresenceChanged):
                tally.append(len(frame))


async def test_presence_amplification(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_connections_per_visitor=TABS)
    async with contextlib.AsyncExitStack() as stack:
        watchers = [await stack.enter_async_context(group_watcher(herald, f"watcher-{n}")) for n in range(WATCHERS)]
        http = await stack.enter_async_context(aiohttp.ClientSession())
        tabs = []
        for _ in range(TABS):
            tab = await stack.enter_async_context(http.ws_connect(herald.base_url + "/v1/visitor"))
            await tab.send_bytes(hello("v-amp", data=TAB_DATA))
            await tab.receive_bytes(timeout=5)  # welcome
            tabs.append(tab)
        await asyncio.sleep(0.5)  # the tabs' own announcements are not the flood's
        for ws in watchers:
            await count_bytes(ws, time.monotonic() + 0.3, [])

        tallies: list[list[int]] = [[] for _ in watchers]
        started = time.monotonic()
        counting = [
            asyncio.create_task(count_bytes(ws, started + FLOOD_SECONDS + 1.0, tally))
            for ws, tally in zip(watchers, tallies, strict=True)
        ]
        sent = 0
        for n in range(int(FLOOD_SECONDS * FLOOD_RATE)):
            await asyncio.sleep(max(0.0, started + n / FLOOD_RATE - time.monotonic()))
            frame = codec.encode(Presence(data={"scroll": n, "field00": f"{n:0120d}"}))
            await tabs[0].send_bytes(frame)
            sent += len(frame)
        await asyncio.gather(*counting)

    out = sum(map(sum, tallies))
    announcements = max(map(len, tallies))
    # One announcement per turn (and the first at once), each only what changed.
    assert 1 <= announcements <= 2 + (FLOOD_SECONDS + 1) * herald.settings.presence_rate, tallies
    assert all(size < 600 for tally in tallies for size in tally), tallies
    print(f"\n{sent} bytes in, {out} bytes out to {WATCHERS} watchers: {out / sent:.2f}x")
    assert out / sent < 2.0  # all watchers together, was 1,397x (measured: ~1.0x, each a fifth of it)
    took = await assert_bystanders_served(herald.base_url)
    assert took < 5.0
