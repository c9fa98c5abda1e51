"""Keepalive: the server announces its interval and drops silent peers,
including half-open TCP connections that never answer a ping."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.messages import Hello, Ping, Pong, Welcome

from .harness import SECRET, changed


async def test_a_client_that_stops_answering_pings_is_closed_and_goes_offline(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(keepalive=0.4, grace_period=0.2)
    agent = await herald.agent("alice")
    await agent.subscribe(["mute"])
    async with aiohttp.ClientSession() as session:
        # autoping=False: pings are not answered, like a peer whose network vanished.
        ws = await session.ws_connect(herald.base_url + "/v1/visitor", autoping=False)
        token = tokens.visitor_token(SECRET, "acme", "mute")
        await ws.send_bytes(codec.encode(Hello(versions=[1], group="acme", visitor="mute", token=token)))
        welcome = codec.decode(await ws.receive_bytes(timeout=5))
        assert isinstance(welcome, Welcome) and welcome.keepalive == 0.4
        await agent.wait_for(changed("online", "mute"))
        started = time.monotonic()
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
            assert msg.type is aiohttp.WSMsgType.PING
        assert time.monotonic() - started < 0.4 * 1.5 + 1
    offline = await agent.wait_for(changed("offline", "mute"))
    assert offline.state["online"] is False


async def test_a_client_that_answers_pings_stays_connected(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(keepalive=0.3)
    visitor = await herald.visitor("lively")
    assert visitor.welcome is not None and visitor.welcome.keepalive == 0.3
    time_before = time.monotonic()
    while time.monotonic() - time_before < 1.5:
        assert visitor.connected
        await visitor.publish(tick=int(time.monotonic() * 10))
        import asyncio

        await asyncio.sleep(0.1)
    assert (await (await herald.agent("alice")).lookup("lively"))["online"]


async def _raw_visitor(herald: Any, session: aiohttp.ClientSession, visitor: str) -> aiohttp.ClientWebSocketResponse:
    """A visitor socket whose pings and pongs reach the test (autoping off)."""
    ws = await session.ws_connect(herald.base_url + "/v1/visitor", autoping=False)
    token = tokens.visitor_token(SECRET, "acme", visitor)
    await ws.send_bytes(codec.encode(Hello(versions=[1], group="acme", visitor=visitor, token=token)))
    assert isinstance(codec.decode(await ws.receive_bytes(timeout=5)), Welcome)
    return ws


async def test_a_client_that_only_answers_pings_stays_connected(start_herald) -> None:  # type: ignore[no-untyped-def]
    """The server's heartbeat works without aiohttp's autoping: a client that
    sends nothing but the pongs to its pings outlives many keepalive periods."""
    herald = await start_herald(keepalive=0.3, message_rate=5, message_burst=5)
    async with aiohttp.ClientSession() as session:
        ws = await _raw_visitor(herald, session, "quiet")
        pinged, deadline = 0, time.monotonic() + 2.0  # ~7 periods; unanswered, it would be closed within 0.45 s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await ws.receive(timeout=left)
            except TimeoutError:
                break
            assert msg.type is aiohttp.WSMsgType.PING, msg
            pinged += 1
            await ws.pong(msg.data)
        assert pinged >= 4 and not ws.closed
        await ws.send_bytes(codec.encode(Ping()))
        assert isinstance(codec.decode(await ws.receive_bytes(timeout=5)), Pong)
        await ws.close()


async def test_a_client_ping_is_answered_with_its_payload(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(herald.base_url + "/v1/visitor", autoping=False)
        await ws.ping(b"before hello")  # a client's own keepalive may come first
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"before hello")
        token = tokens.visitor_token(SECRET, "acme", "pinger")
        await ws.send_bytes(codec.encode(Hello(versions=[1], group="acme", visitor="pinger", token=token)))
        assert isinstance(codec.decode(await ws.receive_bytes(timeout=5)), Welcome)
        for payload in (b"", b"x" * 125):
            await ws.ping(payload)
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, payload)
        await ws.close()
