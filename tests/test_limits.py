"""Every limit has a defined answer, and hitting it costs nobody else."""

from __future__ import annotations

import time

import aiohttp
import msgpack
import pytest

from herald_presence.protocol import RequestFailed, codec, tokens
from herald_presence.protocol.checks import MAX_STRING_BYTES
from herald_presence.protocol.client.base import Refused
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Hello, Ping, Pong

from .harness import SECRET, HeraldServer, receive, signal


def _hello(visitor: str) -> bytes:
    token = tokens.visitor_token(SECRET, "acme", visitor)
    return codec.encode(Hello(versions=[1], group="acme", visitor=visitor, token=token))


async def test_a_connection_over_its_message_rate_gets_rate_limited_then_closed_as_flooding(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(message_rate=5, message_burst=10)
    async with herald.raw_visitor("flooder") as ws:
        started = time.monotonic()
        for _ in range(300):
            await ws.send_bytes(codec.encode(Ping()))
        answers: list[object] = []
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            answers.append(codec.decode(msg.data))
        elapsed = time.monotonic() - started
        assert ws.close_code == CloseCode.FLOODING
        # The burst, plus what the bucket refilled while the flood lasted (a slow machine takes longer).
        assert sum(isinstance(a, Pong) for a in answers) <= 10 + 1 + int(5 * elapsed)
        errors = [a for a in answers if isinstance(a, Error)]
        # One error per streak, not one per frame (the close may overtake it).
        assert [e.code for e in errors] in ([ErrorCode.RATE_LIMITED], [])
    # Others are unaffected.
    visitor = await herald.visitor("calm")
    agent = await herald.agent("alice")
    assert await agent.show_terms("calm") == 1
    await visitor.wait_for(signal("showterms"))


async def test_a_short_burst_within_the_limit_is_served(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(message_rate=5, message_burst=20)
    async with herald.raw_visitor() as ws:
        for _ in range(20):
            await ws.send_bytes(codec.encode(Ping()))
        for _ in range(20):
            assert isinstance(await receive(ws), Pong)


async def test_too_many_new_connections_from_one_address_get_429(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(connections_per_address=5)
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            ws = await session.ws_connect(herald.base_url + "/v1/visitor")
            await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(herald.base_url + "/v1/visitor")
        assert refused.value.status == 429


async def test_a_visitor_over_its_connection_limit_is_refused_with_4004(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_connections_per_visitor=2)
    await herald.visitor("busy")
    await herald.visitor("busy")
    async with herald.raw_visitor("busy", hello=False) as ws:
        await ws.send_bytes(_hello("busy"))
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.LIMIT_EXCEEDED
        await ws.receive(timeout=5)
        assert ws.close_code == CloseCode.TOO_MANY_CONNECTIONS
    agent = await herald.agent("alice")
    assert len((await agent.lookup("busy"))["connections"]) == 2


async def test_an_agent_over_its_subscription_limit_gets_limit_exceeded(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_subscriptions_per_agent=3)
    agent = await herald.agent("alice")
    await agent.subscribe(["a", "b"])
    with pytest.raises(RequestFailed) as refused:
        await agent.subscribe(["c", "d"])
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    await agent.subscribe(["c"])  # still within: 3


async def test_oversized_presence_data_is_refused_and_nothing_changes(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_presence_bytes=200)
    async with herald.raw_visitor("v1") as ws:
        big = {f"k{i}": "x" * 20 for i in range(12)}
        await ws.send_bytes(msgpack.packb({"type": "presence", "data": big}))
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.LIMIT_EXCEEDED
        agent = await herald.agent("alice")
        assert (await agent.lookup("v1"))["connections"][0]["data"] == {}


async def test_oversized_signal_data_is_refused_both_ways(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_signal_bytes=100)
    visitor = await herald.visitor("v1")
    agent = await herald.agent("alice")
    big = {f"k{i}": "y" * 20 for i in range(10)}
    with pytest.raises(RequestFailed) as refused:
        await agent.signal("v1", "showterms", big)
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(RequestFailed) as refused:
        await visitor.signal_agent("terms", big)
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    assert await agent.show_terms("v1") == 1


async def test_hello_with_oversized_presence_is_refused(herald: HeraldServer) -> None:
    data = {f"k{i}": "z" * 2000 for i in range(3)}  # within the field limits, over max_presence_bytes
    visitor = await herald.visitor("v1", connect=False, data=data)
    with pytest.raises(Refused) as refused:
        await visitor.connect()
    assert refused.value.code == ErrorCode.LIMIT_EXCEEDED
    assert refused.value.close_code == CloseCode.HANDSHAKE_FAILED


async def test_a_frame_of_exactly_the_size_limit_is_accepted(herald: HeraldServer) -> None:
    async with herald.raw_visitor() as ws:
        # Padded with unknown fields, each string within the protocol's bound on strings.
        raw = {"type": "ping", **{f"pad{i}": "x" * MAX_STRING_BYTES for i in range(7)}}
        overhead = len(msgpack.packb({**raw, "last": ""})) + 2  # a long str's header is 2 bytes longer
        frame = msgpack.packb({**raw, "last": "x" * (herald.settings.max_frame_bytes - overhead)})
        assert len(frame) == herald.settings.max_frame_bytes
        await ws.send_bytes(frame)
        assert isinstance(await receive(ws), Pong)


async def test_presence_data_merged_past_the_field_limit_is_refused(herald: HeraldServer) -> None:
    async with herald.raw_visitor("v1") as ws:
        await ws.send_bytes(msgpack.packb({"type": "presence", "data": {f"a{i}": i for i in range(32)}}))
        await ws.send_bytes(msgpack.packb({"type": "presence", "data": {"b": 1}}))
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.LIMIT_EXCEEDED
        agent = await herald.agent("alice")
        assert len((await agent.lookup("v1"))["connections"][0]["data"]) == 32


async def test_a_server_can_allow_fewer_presence_fields(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(max_presence_fields=3)
    async with herald.raw_visitor("v1") as ws:
        await ws.send_bytes(msgpack.packb({"type": "presence", "data": {"a": 1, "b": 2, "c": 3, "d": 4}}))
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.LIMIT_EXCEEDED


async def _limit_hits(herald: HeraldServer, setting: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(herald.base_url + "/metrics") as response:
        text = await response.text()
    prefix = f'herald_limit_hits_total{{limit="{setting}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


async def test_every_limit_hit_is_counted_in_the_metrics(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(message_rate=1, message_burst=1, max_subscriptions_per_agent=1)
    before_rate = await _limit_hits(herald, "message_rate")
    before_subscriptions = await _limit_hits(herald, "max_subscriptions_per_agent")
    async with herald.raw_visitor() as ws:
        for _ in range(3):
            await ws.send_bytes(codec.encode(Ping()))
        assert isinstance(await receive(ws), Pong)
    agent = await herald.agent("alice")
    with pytest.raises(RequestFailed):
        await agent.subscribe(["a", "b"])
    assert await _limit_hits(herald, "message_rate") == before_rate + 1
    assert await _limit_hits(herald, "max_subscriptions_per_agent") == before_subscriptions + 1
