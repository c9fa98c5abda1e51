"""Resource abuse by an authenticated or anonymous client: every limit has its
exact answer, and whoever hits it costs nobody else anything. (The long list
of malformed frames is tests/test_bad_input.py; these are the few that
matter for the threat model.)"""

from __future__ import annotations

import contextlib

import aiohttp
import msgpack
import pytest

from herald_presence.protocol import RequestFailed, codec
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Ping, Pong
from herald_presence.server.web.keys import HUB

from ..harness import HeraldServer, receive
from ..test_cluster import eventually
from .helpers import assert_bystanders_served, error_of, hello, session


async def _closed_with(ws: aiohttp.ClientWebSocketResponse, seconds: float = 5) -> int | None:
    """Read until the server closes; the close code."""
    while True:
        msg = await ws.receive(timeout=seconds)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return ws.close_code


async def test_oversized_frame(herald: HeraldServer) -> None:
    async with herald.raw_visitor("v-big") as ws:
        await ws.send_bytes(b"\x00" * (herald.settings.max_frame_bytes + 1))
        assert await _closed_with(ws) == CloseCode.MESSAGE_TOO_BIG
    # Also as the very first frame, before any credential was shown.
    async with aiohttp.ClientSession() as http, http.ws_connect(herald.base_url + "/v1/visitor") as ws:
        await ws.send_bytes(b"\x00" * (herald.settings.max_frame_bytes + 1))
        assert await _closed_with(ws) == CloseCode.MESSAGE_TOO_BIG
    await assert_bystanders_served(herald.base_url)


async def test_compressed_frames_are_refused(herald: HeraldServer) -> None:
    """A decompression bomb (~1 KB on the wire, 1 MiB inflated) cannot go off:
    permessage-deflate is never negotiated, so a compressed frame (RSV1 set)
    is a protocol error that closes the connection before anything is inflated."""
    async with aiohttp.ClientSession() as http, http.ws_connect(herald.base_url + "/v1/visitor", compress=15) as ws:
        assert not ws.compress, "the server must decline permessage-deflate"
        await ws.send_bytes(hello("v-bomb"))
        assert (await receive(ws)).TYPE == "welcome"
        bomb = msgpack.packb({"type": "presence", "data": {"k": "x" * (1 << 20)}})
        await ws._writer.send_frame(bomb, aiohttp.WSMsgType.BINARY, compress=15)  # forced: RSV1 and deflate
        assert await _closed_with(ws) == CloseCode.PROTOCOL_ERROR
    await assert_bystanders_served(herald.base_url)


MALFORMED = {
    "not_msgpack": (b"\xc1\xc1\xc1", ErrorCode.BAD_FRAME),
    "deeply_nested": (b"\x91" * 60_000 + b"\x00", ErrorCode.BAD_FRAME),
    "extension_type": (msgpack.packb({"type": "ping", "x": msgpack.ExtType(1, b"\x00" * 8)}), ErrorCode.BAD_FRAME),
    "unknown_type": (msgpack.packb({"type": "__proto__"}), ErrorCode.UNKNOWN_TYPE),
    "agent_message_from_a_visitor": (msgpack.packb({"type": "subscribe", "id": 1, "group": True}), ErrorCode.INVALID),
    "huge_map_header": (b"\xdf\xff\xff\xff\xff", ErrorCode.BAD_FRAME),  # claims 4 billion entries
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_frame(herald: HeraldServer, name: str) -> None:
    frame, code = MALFORMED[name]
    async with herald.raw_visitor("v-fuzz") as ws:
        await ws.send_bytes(frame)
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == code, error
        await ws.send_bytes(codec.encode(Ping()))
        assert isinstance(await receive(ws), Pong)  # the connection lives on
    await assert_bystanders_served(herald.base_url)


async def test_message_flood(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(message_rate=5, message_burst=10)
    async with herald.raw_visitor("v-flood") as ws:
        for _ in range(400):
            await ws.send_bytes(codec.encode(Ping()))
        pongs = 0
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            pongs += isinstance(codec.decode(msg.data), Pong)
        assert ws.close_code == CloseCode.FLOODING
        assert pongs <= 12  # the burst and at most a refill or two
    await assert_bystanders_served(herald.base_url)


async def test_valid_frames_spread_over_many_connections_of_one_address(start_herald) -> None:  # type: ignore[no-untyped-def]
    """Each connection within its own budgets, all of them together over
    their address's: 5 connections of one address send 60 pings at once
    each (their own bursts: 100); the address may send 2 connections'
    worth (a burst of 200): the rest are dropped, answered with
    ``rate_limited`` naming the address. Its entry goes with its last
    connection; another address is served."""
    herald = await start_herald(message_rate=50, message_burst=100, address_message_budget=2)
    pongs, refusals = 0, []
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(herald.raw_visitor(f"v-spread{n}")) for n in range(5)]
        for ws in sockets:
            for _ in range(60):
                await ws.send_bytes(codec.encode(Ping()))
        for ws in sockets:
            with contextlib.suppress(TimeoutError):
                while True:
                    answer = codec.decode(await ws.receive_bytes(timeout=1))
                    if isinstance(answer, Error):
                        refusals.append(answer)
                    else:
                        pongs += isinstance(answer, Pong)
        assert len(herald.app[HUB].address_rates) == 1
    assert 200 <= pongs < 250, pongs  # the address's burst, and what it refilled meanwhile
    assert refusals and all(r.code == ErrorCode.RATE_LIMITED and "address" in r.message for r in refusals)
    await eventually(lambda: len(herald.app[HUB].address_rates) == 0, 5, "the address's entry gone with its sockets")
    await assert_bystanders_served(herald.base_url, source="127.0.0.2")


async def test_connection_flood_from_one_address(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(connections_per_address=5)
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            await (await http.ws_connect(herald.base_url + "/v1/visitor")).close()
        for path in ("/v1/visitor", "/v1/agent"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(herald.base_url + path)
            assert refused.value.status == 429, path
        response = await http.get(
            herald.base_url + "/v1/visitor",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert response.status == 429 and await error_of(response) == ErrorCode.RATE_LIMITED
    # Counted per address: a client at another address is served.
    await assert_bystanders_served(herald.base_url, source="127.0.0.2")


async def test_too_many_connections_for_one_visitor(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_connections_per_visitor=2)
    tabs = [await herald.visitor("v-tabs"), await herald.visitor("v-tabs")]
    async with aiohttp.ClientSession() as http, http.ws_connect(herald.base_url + "/v1/visitor") as ws:
        await ws.send_bytes(hello("v-tabs"))
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.LIMIT_EXCEEDED
        assert await _closed_with(ws) == CloseCode.TOO_MANY_CONNECTIONS
    agent = await herald.agent("alice")
    assert await agent.signal("v-tabs", "showterms", to="all") == 2
    assert all(tab.connected for tab in tabs)
    await assert_bystanders_served(herald.base_url)


async def test_subscriptions_over_the_limit(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_subscriptions_per_agent=3)
    agent = await herald.agent("alice")
    await agent.subscribe(["a", "b"])
    with pytest.raises(RequestFailed) as refused:
        await agent.subscribe(["c", "d"])
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(RequestFailed) as refused:
        await agent.subscribe([f"v{i}" for i in range(1001)])  # over the per-request protocol limit too
    assert refused.value.code in (ErrorCode.INVALID, ErrorCode.LIMIT_EXCEEDED)
    assert [s["visitor"] for s in (await agent.subscribe(["c"])).visitors] == ["c"]  # within: 3
    await assert_bystanders_served(herald.base_url)


async def test_short_code_guessing(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(code_lookups_per_address=10, code_lookups_per_group=15, consumer_codes=["acme"])
    url = herald.base_url + "/v1/groups/acme/codes/{:06d}"
    async with session() as first, session("127.0.0.2") as second:
        for guess in range(10):
            assert (await first.get(url.format(guess))).status == 404
        limited = await first.get(url.format(10))
        assert limited.status == 429 and await error_of(limited) == ErrorCode.RATE_LIMITED
        assert limited.headers["Retry-After"] == "60"
        # Another address has its own budget, but the group's (15) runs out too: the first
        # address's refused look-up did not count against it, so five more pass.
        for guess in range(11, 16):
            assert (await second.get(url.format(guess))).status == 404
        limited = await second.get(url.format(16))
        assert limited.status == 429
    await assert_bystanders_served(herald.base_url)
