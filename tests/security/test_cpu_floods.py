"""Floods that cost CPU without breaking any rule the frame rate saw: frames
that are well-formed but costly to decode, and websocket control frames.
Each is answered with its limit (error frame, then close 4003), counted in
``herald_limit_hits_total``, and leaves a bystander pair served."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import msgpack
import pytest

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.checks import MAX_MAP_ENTRIES
from herald_presence.protocol.errors import CloseCode, ErrorCode
from herald_presence.protocol.messages import Error, Hello, Welcome

from ..harness import SECRET, HeraldServer, sample, scrape
from .helpers import assert_bystanders_served

# Real limits (the test harness raises them for the rest of the suite).
LIMITS = {
    "message_rate": 50,
    "message_burst": 100,
    "message_bytes_rate": 64 * 1024,
    "message_bytes_burst": 256 * 1024,
}
FLOOD_SECONDS = 10.0  # every flood loop stops after this (or its frame count), closed or not
BYSTANDER_SECONDS = 5.0  # a generous bound on a bystander's round trip after a flood


def costly_frame(fields: int = 5900) -> bytes:
    """The finding: ~58 KiB, a ping with ~5,900 small fields nobody knows."""
    return msgpack.packb({"type": "ping", **{f"f{i:07d}": i % 100 for i in range(fields)}})


async def limit_hits(herald: HeraldServer, limit: str) -> float:
    return sample(await scrape(herald.base_url), "herald_limit_hits_total", limit=limit)


async def attacker(herald: HeraldServer, http: aiohttp.ClientSession, name: str) -> aiohttp.ClientWebSocketResponse:
    """A visitor past its welcome; its pings and pongs reach the test (autoping off)."""
    ws = await http.ws_connect(herald.base_url + "/v1/visitor", autoping=False)
    token = tokens.visitor_token(SECRET, "acme", name)
    await ws.send_bytes(codec.encode(Hello(versions=[1], group="acme", visitor=name, token=token)))
    assert isinstance(codec.decode(await ws.receive_bytes(timeout=5)), Welcome)
    return ws


async def answers(ws: aiohttp.ClientWebSocketResponse, seen: Counter[str], errors: list[Error]) -> None:
    """Read until the server closes: pongs counted, error frames kept."""
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.PONG:
            seen["pong"] += 1
        elif msg.type is aiohttp.WSMsgType.BINARY:
            message = codec.decode(msg.data, from_server=True)
            seen[message.TYPE] += 1
            if isinstance(message, Error):
                errors.append(message)


async def flood(ws: aiohttp.ClientWebSocketResponse, send: Any, count: int) -> tuple[int, Counter[str], list[Error]]:
    """``send()`` up to ``count`` times (or FLOOD_SECONDS) while reading the
    answers; then wait for the close. (frames sent, answers and the seconds
    they took, error frames)."""
    seen: Counter[str] = Counter()
    errors: list[Error] = []
    reader = asyncio.create_task(answers(ws, seen, errors))
    started = time.monotonic()
    sent, deadline = 0, started + FLOOD_SECONDS
    try:
        while sent < count and not reader.done() and time.monotonic() < deadline:
            await send()
            sent += 1
            if sent % 16 == 0:
                await asyncio.sleep(0)  # let the reader (and the server) in
    except (ConnectionError, RuntimeError):
        pass  # closed under us
    async with asyncio.timeout(5):
        await reader
    seen["seconds"] = round(time.monotonic() - started) + 1  # whole seconds, rounded up
    return sent, seen, errors


async def test_costly_well_formed_frames(start_herald) -> None:  # type: ignore[no-untyped-def]
    """A 58 KiB map of 5,900 unknown fields took 1.3-4 ms to decode, and 45
    of them a second passed the frame rate. Now the decoder refuses it at the
    map's header (over the protocol's 64 entries), and the connection's byte
    budget refuses what its bytes are over: a few get ``invalid``, then
    ``rate_limited``, then the connection is closed as flooding."""
    herald = await start_herald(**LIMITS)
    frame = costly_frame()
    assert 55 * 1024 < len(frame) < herald.settings.max_frame_bytes
    before = await limit_hits(herald, "message_bytes_rate")
    started = time.process_time()
    async with aiohttp.ClientSession() as http:
        ws = await attacker(herald, http, "v-costly")
        sent, seen, errors = await flood(ws, lambda: ws.send_bytes(frame), 2000)
        assert ws.close_code == CloseCode.FLOODING, (ws.close_code, sent, seen)
    cpu = time.process_time() - started
    within_burst = LIMITS["message_bytes_burst"] // len(frame)
    invalid = [e for e in errors if e.code == ErrorCode.INVALID]
    assert within_burst <= len(invalid) <= within_burst + 2, [e.code for e in errors]  # the burst and a refill
    assert all(e.message == f"frame: a map has more than {MAX_MAP_ENTRIES} entries" for e in invalid)
    # One error frame per streak of refusals (a refill ends a streak: one more frame goes through).
    limited = [e for e in errors if e.code == ErrorCode.RATE_LIMITED]
    assert 1 <= len(limited) <= len(invalid) - within_burst + 1, [e.code for e in errors]
    assert all(e.message == "over 65536 bytes per second; frames dropped" for e in limited)
    assert {e.code for e in errors[:within_burst]} == {ErrorCode.INVALID}  # the burst's frames: decoded, refused
    assert {e.code for e in errors} == {ErrorCode.INVALID, ErrorCode.RATE_LIMITED}  # then dropped undecoded
    assert before + len(limited) <= await limit_hits(herald, "message_bytes_rate") <= before + len(limited) + 1
    print(f"\n{sent} frames of {len(frame)} bytes: {cpu * 1000:.0f} ms of CPU (attacker and server together)")
    took = await assert_bystanders_served(herald.base_url)
    assert took < BYSTANDER_SECONDS


async def test_costly_frames_within_the_decoder_bounds_are_held_to_the_byte_budget(start_herald) -> None:  # type: ignore[no-untyped-def]
    """Frames within the bounds can still be costly (63 lists of 1,000 nils:
    63,000 objects in 63 KiB); at under 50 frames a second only the byte
    budget stops them: one error frame per streak of refusals, and the
    connection's frames that fit the budget are still answered."""
    herald = await start_herald(**LIMITS)
    frame = msgpack.packb({"type": "ping", **{f"k{i}": [None] * 1000 for i in range(63)}})
    before = await limit_hits(herald, "message_bytes_rate")
    async with aiohttp.ClientSession() as http:
        ws = await attacker(herald, http, "v-nils")
        seen: Counter[str] = Counter()
        errors: list[Error] = []
        reader = asyncio.create_task(answers(ws, seen, errors))
        started = time.monotonic()
        for n in range(90):  # 2 s at 45 frames a second: 5.6 MiB, 44 times the budget
            await asyncio.sleep(max(0.0, started + n / 45 - time.monotonic()))
            await ws.send_bytes(frame)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.5)
        await ws.close()
        async with asyncio.timeout(5):
            await reader
    allowed = (LIMITS["message_bytes_burst"] + elapsed * LIMITS["message_bytes_rate"]) / len(frame)
    assert int(allowed) - 1 <= seen["pong"] <= allowed + 1, (seen, allowed)
    assert 1 <= len(errors) <= seen["pong"] + 1 and {e.code for e in errors} == {ErrorCode.RATE_LIMITED}
    assert await limit_hits(herald, "message_bytes_rate") >= before + 1
    took = await assert_bystanders_served(herald.base_url)
    assert took < BYSTANDER_SECONDS


@pytest.mark.parametrize("control", ["ping", "pong"])
async def test_websocket_ping_flood(start_herald, control: str) -> None:  # type: ignore[no-untyped-def]
    """Control frames were answered by aiohttp itself, uncounted: 88,000
    pings a second from 10 connections. Now they are frames like any other:
    pings within the frame rate get their pong, and then the flood is
    dropped, answered once with ``rate_limited`` and closed with 4003
    (unsolicited pongs alike)."""
    herald = await start_herald(**LIMITS)
    before = await limit_hits(herald, "message_rate")
    async with aiohttp.ClientSession() as http:
        sockets = [await attacker(herald, http, f"v-{control}-{n}") for n in range(3)]
        results = await asyncio.gather(
            *(flood(ws, lambda ws=ws: getattr(ws, control)(b"hello"), 5000) for ws in sockets)
        )
        streaks = 0
        for ws, (sent, seen, errors) in zip(sockets, results, strict=True):
            assert ws.close_code == CloseCode.FLOODING, (ws.close_code, sent, seen)
            # One error frame per streak of refusals; a streak ends when the rate lets one through.
            assert errors and all(e.code == ErrorCode.RATE_LIMITED for e in errors), errors
            assert all(e.message == "over 50 frames per second; frames dropped" for e in errors)
            allowed = LIMITS["message_burst"] + LIMITS["message_rate"] * seen["seconds"]
            if control == "ping":  # pings within the rate are answered, no more
                assert LIMITS["message_burst"] <= seen["pong"] <= allowed, seen
            else:
                assert seen["pong"] == 0
            assert len(errors) <= allowed - LIMITS["message_burst"] + 1
            streaks += len(errors)
    # Each streak counted once (its error frame is written before the close).
    assert before + streaks <= await limit_hits(herald, "message_rate") <= before + streaks + len(sockets)
    took = await assert_bystanders_served(herald.base_url)
    assert took < BYSTANDER_SECONDS
