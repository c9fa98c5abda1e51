"""Hostile and broken input over a real socket: every bad frame gets its
error code, and neither the connection nor the server goes down."""

from __future__ import annotations

import time

import aiohttp
import msgpack
import pytest

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.errors import CloseCode, ErrorCode, should_reconnect
from herald_presence.protocol.messages import Error, Hello, Ping, Pong

from .harness import SECRET, HeraldServer, receive

BAD_FRAMES = {
    "not_msgpack": (b"\xc1", ErrorCode.BAD_FRAME),
    "truncated_msgpack": (b"\x82\xa4type\xa4pi", ErrorCode.BAD_FRAME),
    "trailing_bytes": (codec.encode(Ping()) + b"\x00", ErrorCode.BAD_FRAME),
    "array_not_map": (msgpack.packb(["ping"]), ErrorCode.BAD_FRAME),
    "integer_not_map": (msgpack.packb(7), ErrorCode.BAD_FRAME),
    "empty_frame": (b"", ErrorCode.BAD_FRAME),
    "integer_map_keys": (msgpack.packb({1: "ping"}), ErrorCode.BAD_FRAME),
    "extension_type": (msgpack.packb({"type": msgpack.ExtType(5, b"xx")}), ErrorCode.BAD_FRAME),
    "deep_nesting": (b"\x91" * 5000, ErrorCode.BAD_FRAME),
    "missing_type": (msgpack.packb({"id": 1}), ErrorCode.UNKNOWN_TYPE),
    "type_not_a_string": (msgpack.packb({"type": 12}), ErrorCode.UNKNOWN_TYPE),
    "unknown_type": (msgpack.packb({"type": "launch_missiles"}), ErrorCode.UNKNOWN_TYPE),
    "signal_without_event": (msgpack.packb({"type": "signal", "id": 3}), ErrorCode.INVALID),
    "event_name_too_long": (msgpack.packb({"type": "signal", "event": "e" * 65}), ErrorCode.INVALID),
    "nested_presence_data": (msgpack.packb({"type": "presence", "data": {"a": {"b": 1}}}), ErrorCode.INVALID),
    "too_many_presence_fields": (
        msgpack.packb({"type": "presence", "data": {f"k{i}": i for i in range(33)}}),
        ErrorCode.INVALID,
    ),
    "huge_string_value": (msgpack.packb({"type": "presence", "data": {"url": "x" * 5000}}), ErrorCode.INVALID),
    "visible_not_bool": (msgpack.packb({"type": "presence", "visible": 1}), ErrorCode.INVALID),
    "empty_presence": (msgpack.packb({"type": "presence"}), ErrorCode.INVALID),
    "request_id_negative": (msgpack.packb({"type": "signal", "event": "x", "id": -1}), ErrorCode.INVALID),
    "agent_message_from_visitor": (msgpack.packb({"type": "subscribe", "id": 4, "group": True}), ErrorCode.INVALID),
    "second_hello": (codec.encode(Hello(versions=[1])), ErrorCode.INVALID),
    "signal_to_absent_agent": (
        msgpack.packb({"type": "signal", "event": "terms", "agent": "nobody", "id": 9}),
        ErrorCode.AGENT_OFFLINE,
    ),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
async def test_bad_frame_gets_its_error_code_and_the_connection_survives(herald: HeraldServer, name: str) -> None:
    frame, code = BAD_FRAMES[name]
    async with herald.raw_visitor() as ws:
        await ws.send_bytes(frame)
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == code, error
        await ws.send_bytes(codec.encode(Ping()))
        assert isinstance(await receive(ws), Pong)


async def test_error_carries_the_request_id_when_the_frame_had_one(herald: HeraldServer) -> None:
    async with herald.raw_visitor() as ws:
        await ws.send_bytes(msgpack.packb({"type": "signal", "id": 41, "event": "x", "data": [1]}))
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.INVALID and error.id == 41


async def test_text_frame_is_a_bad_frame(herald: HeraldServer) -> None:
    async with herald.raw_visitor() as ws:
        await ws.send_str('{"type": "ping"}')
        error = await receive(ws)
        assert isinstance(error, Error) and error.code == ErrorCode.BAD_FRAME


async def test_frame_above_the_size_limit_closes_with_1009(herald: HeraldServer) -> None:
    async with herald.raw_visitor() as ws:
        await ws.send_bytes(b"\x00" * (herald.settings.max_frame_bytes + 1))
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == CloseCode.MESSAGE_TOO_BIG


async def test_a_flood_of_garbage_leaves_the_server_serving_others(herald: HeraldServer) -> None:
    async with herald.raw_visitor("flooder") as ws:
        for i in range(500):
            await ws.send_bytes(bytes([i % 256]) * (i % 50 + 1))
        await ws.send_bytes(codec.encode(Ping()))
        while not isinstance(await receive(ws), Pong):
            pass
    visitor = await herald.visitor("after-flood")
    assert visitor.connected


# --- handshake -------------------------------------------------------------


async def _handshake(herald: HeraldServer, frame: bytes | None) -> tuple[Error | None, int | None]:
    async with aiohttp.ClientSession() as session, session.ws_connect(herald.base_url + "/v1/visitor") as ws:
        if frame is not None:
            await ws.send_bytes(frame)
        error = None
        msg = await ws.receive(timeout=5)
        if msg.type is aiohttp.WSMsgType.BINARY:
            error = codec.decode(msg.data)
            assert isinstance(error, Error)
            msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        return error, ws.close_code


def _hello(
    visitor: str = "v1", group: str = "acme", token: str | None = None, versions: list[int] | None = None
) -> bytes:
    token = token if token is not None else tokens.visitor_token(SECRET, group, visitor)
    return codec.encode(Hello(versions=versions or [1], group=group, visitor=visitor, token=token))


@pytest.mark.parametrize(
    ("case", "error_code", "close_code"),
    [
        ("forged_signature", ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED),
        ("token_of_another_visitor", ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED),
        ("token_signed_for_another_group", ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED),
        ("agent_key_as_visitor_token", ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED),
        ("expired_token", ErrorCode.TOKEN_EXPIRED, CloseCode.UNAUTHORIZED),
        ("unknown_group", ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED),
        ("missing_token", ErrorCode.UNAUTHORIZED, CloseCode.UNAUTHORIZED),
        ("unsupported_version", ErrorCode.UNSUPPORTED_VERSION, CloseCode.UNSUPPORTED_VERSION),
        ("first_frame_not_hello", ErrorCode.HANDSHAKE_REQUIRED, CloseCode.HANDSHAKE_FAILED),
        ("first_frame_garbage", ErrorCode.BAD_FRAME, CloseCode.HANDSHAKE_FAILED),
        ("held_session_not_an_identifier", ErrorCode.INVALID, CloseCode.HANDSHAKE_FAILED),
    ],
)
async def test_bad_visitor_handshake_is_refused_with_its_codes(
    herald: HeraldServer, case: str, error_code: ErrorCode, close_code: CloseCode
) -> None:
    frames = {
        "forged_signature": _hello(token=tokens.visitor_token("not-the-secret-at-all", "acme", "v1")),
        "token_of_another_visitor": _hello(token=tokens.visitor_token(SECRET, "acme", "someone-else")),
        "token_signed_for_another_group": _hello(token=tokens.visitor_token(SECRET, "other", "v1")),
        "agent_key_as_visitor_token": _hello(token=tokens.agent_key(SECRET, "acme", "v1")),
        "expired_token": _hello(token=tokens.make_token(SECRET, "visitor", "acme", "v1", ttl=-5)),
        "unknown_group": _hello(group="nope"),
        "missing_token": codec.encode(Hello(versions=[1], group="acme", visitor="v1")),
        "unsupported_version": _hello(versions=[99]),
        "first_frame_not_hello": codec.encode(Ping()),
        "first_frame_garbage": b"\xc1\xc1",
        "held_session_not_an_identifier": codec.encode(
            Hello(
                versions=[1],
                group="acme",
                visitor="v1",
                token=tokens.visitor_token(SECRET, "acme", "v1"),
                session="s1 OR 1=1",
            )
        ),
    }
    error, code = await _handshake(herald, frames[case])
    assert error is not None and error.code == error_code
    assert code == close_code
    assert not should_reconnect(code)


async def test_silence_instead_of_hello_times_out(start_herald) -> None:  # type: ignore[no-untyped-def]
    herald = await start_herald(handshake_timeout=0.3)
    started = time.monotonic()
    error, code = await _handshake(herald, None)
    assert code == CloseCode.HANDSHAKE_TIMEOUT
    assert error is not None and error.code == ErrorCode.HANDSHAKE_REQUIRED
    assert time.monotonic() - started < 3
