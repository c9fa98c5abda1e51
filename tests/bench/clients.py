"""Lean benchmark clients: raw aiohttp websockets and pre-encoded frames.

Not the SDK on purpose: its typed messages, request futures and reconnect
logic cost the generator CPU that the servers, on the same two cores, would
then miss; and the generator must never be the thing that is measured.
Frames follow protocol/PROTOCOL.md (§3 hello, §5.3 subscribe and signal);
the parts that vary per frame (request ID, sequence number) are appended to
bytes encoded once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiohttp
import msgpack

from herald_presence.protocol import tokens

GROUP = "bench"
SECRET = "bench-secret-0123456789"
CONNECT_TIMEOUT = 30.0  # seconds for one client's upgrade and handshake
CONNECT_CONCURRENCY = 50  # handshakes in flight at once per process

T = TypeVar("T")


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _map_header(size: int) -> bytes:
    assert size < 16  # a fixmap is all these frames need
    return bytes([0x80 | size])


def _fields(fields: dict[str, Any]) -> bytes:
    return b"".join(pack(key) + pack(value) for key, value in fields.items())


class SignalFrames:
    """``signal`` frames that differ only by a sequence number ``n``, echoed
    in ``data`` so the answer names its question, and sent as the request
    ``id`` when the sender wants an ``ack`` (as the SDK always does):
    ``{..fixed, "id": n, "data": {..data, "n": n}}``."""

    __slots__ = ("_head", "_middle", "ack")

    def __init__(self, fixed: dict[str, Any], data: dict[str, Any], ack: bool) -> None:
        self.ack = ack
        self._head = _map_header(len(fixed) + 1 + ack) + _fields(fixed) + (pack("id") if ack else b"")
        self._middle = pack("data") + _map_header(len(data) + 1) + _fields(data) + pack("n")

    def frame(self, n: int) -> bytes:
        number = pack(n)
        return self._head + (number if self.ack else b"") + self._middle + number


def show_terms(visitor: str, ack: bool = True) -> SignalFrames:
    """What an agent sends when it clicks "show terms" (SDK: ``show_terms``)."""
    return SignalFrames({"type": "signal", "event": "showterms", "visitor": visitor}, {}, ack)


def terms_displayed(ack: bool = True) -> SignalFrames:
    """The visitor app's answer (SDK: ``terms("displayed")``), to the agents watching it."""
    return SignalFrames({"type": "signal", "event": "terms"}, {"status": "displayed"}, ack)


def session() -> aiohttp.ClientSession:
    """One HTTP session per process, with no connection cap (every websocket
    holds a connector slot) and no cookie jar (each agent's cookie is sent
    by hand)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=CONNECT_TIMEOUT),
    )


async def _handshake(ws: aiohttp.ClientWebSocketResponse, hello: dict[str, Any]) -> dict[str, Any]:
    await ws.send_bytes(pack(hello))
    msg = await ws.receive(timeout=CONNECT_TIMEOUT)
    if msg.type is not aiohttp.WSMsgType.BINARY:
        raise RuntimeError(f"handshake ended with {msg.type.name} {msg.data!r}")
    welcome = msgpack.unpackb(msg.data)
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"handshake refused: {welcome}")
    return dict(welcome)


async def connect_visitor(
    http: aiohttp.ClientSession, base_url: str, visitor: str, data: dict[str, Any] | None = None
) -> aiohttp.ClientWebSocketResponse:
    """A visitor connection past its welcome."""
    ws = await http.ws_connect(base_url + "/v1/visitor", autoping=True, max_msg_size=0)
    token = tokens.visitor_token(SECRET, GROUP, visitor)
    hello = {"type": "hello", "versions": [1], "group": GROUP, "visitor": visitor, "token": token}
    if data:
        hello["data"] = data
    await _handshake(ws, hello)
    return ws


async def login_agent(http: aiohttp.ClientSession, base_url: str, agent: str) -> str:
    """The agent's ``Cookie`` header value after ``POST /v1/agent/login``."""
    key = tokens.agent_key(SECRET, GROUP, agent)
    async with http.post(base_url + "/v1/agent/login", json={"group": GROUP, "agent": agent, "key": key}) as reply:
        if reply.status != 200:
            raise RuntimeError(f"agent login failed: {reply.status} {await reply.text()}")
        morsel = reply.cookies["HERALD_SESSION"]
        return f"{morsel.key}={morsel.value}"


async def connect_agent(
    http: aiohttp.ClientSession, base_url: str, cookie: str, watch: str | None, group: bool = False
) -> aiohttp.ClientWebSocketResponse:
    """An agent connection past its welcome and, if it watches a visitor (or
    the whole ``group``), past that subscription's snapshot (from then on
    the visitor's signals, or the group's presence changes, reach it)."""
    ws = await http.ws_connect(base_url + "/v1/agent", headers={"Cookie": cookie}, autoping=True, max_msg_size=0)
    await _handshake(ws, {"type": "hello", "versions": [1]})
    if watch is not None or group:
        target = {"group": True} if group else {"visitors": [watch]}
        await ws.send_bytes(pack({"type": "subscribe", "id": 1, **target}))
        msg = await ws.receive(timeout=CONNECT_TIMEOUT)
        snapshot = msgpack.unpackb(msg.data) if msg.type is aiohttp.WSMsgType.BINARY else {}
        if snapshot.get("type") != "snapshot":
            raise RuntimeError(f"subscribe refused: {snapshot or msg}")
    return ws


async def bounded(
    items: Iterable[T], work: Callable[[T], Awaitable[Any]], concurrency: int = CONNECT_CONCURRENCY
) -> list[Any]:
    """``work`` on every item, at most ``concurrency`` at once, results in order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(item: T) -> Any:
        async with gate:
            return await work(item)

    return list(await asyncio.gather(*(one(item) for item in items)))
