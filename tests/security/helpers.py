"""What the security tests share: the bystander check, raw handshakes, logins.

Every attack test ends with ``assert_bystanders_served``: a fresh visitor and
agent, who have nothing to do with the attack, still complete the one-click
flow (``showterms`` out, ``terms`` back). An attack that is refused correctly
but takes the server (or its event loop) down with it fails there.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiohttp

from herald_presence.protocol import codec, tokens
from herald_presence.protocol.client.agent import AgentClient
from herald_presence.protocol.client.visitor import VisitorClient
from herald_presence.protocol.messages import Error, Hello, Message

from ..harness import SECRET, signal

EVIL = "https://evil.example"
CRM_ORIGIN = "https://crm.acme.example"


def session(source: str | None = None) -> aiohttp.ClientSession:
    """An HTTP session keeping cookies for 127.0.0.1, optionally from another
    loopback address (the server then counts it as a different client)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def show_terms_round_trip(agent: AgentClient, visitor: VisitorClient) -> float:
    """Agent -> showterms -> visitor -> terms accepted -> agent; seconds taken.
    The agent must already watch the visitor."""
    started = time.perf_counter()
    assert await agent.show_terms(visitor.visitor or "") == 1
    await visitor.wait_for(signal("showterms"))
    await visitor.terms("accepted")
    answer = await agent.wait_for(signal("terms"))
    assert answer.visitor == visitor.visitor and answer.data == {"status": "accepted"}
    return time.perf_counter() - started


async def assert_bystanders_served(
    base_url: str, secret: str = SECRET, group: str = "acme", source: str | None = None
) -> float:
    """A fresh visitor/agent pair of ``group`` completes ``show_terms`` within
    10 s; returns the round trip's seconds."""
    tag = secrets.token_hex(4)
    visitor_id, agent_id = f"bystander-v-{tag}", f"bystander-a-{tag}"
    async with session(source) as http:
        visitor = VisitorClient(
            base_url, group, visitor_id, tokens.visitor_token(secret, group, visitor_id), session=http, reconnect=False
        )
        agent = AgentClient(
            base_url, group, agent_id, tokens.agent_key(secret, group, agent_id), session=http, reconnect=False
        )
        try:
            async with asyncio.timeout(10):
                await visitor.connect()
                await agent.connect()
                await agent.subscribe([visitor_id])
                return await show_terms_round_trip(agent, visitor)
        finally:
            await visitor.close()
            await agent.close()


def hello(visitor: str | None = "v1", group: str | None = "acme", token: str | None = None, **fields: Any) -> bytes:
    """A visitor hello; the token defaults to a valid one for ``visitor``."""
    if token is None and visitor is not None and group is not None:
        token = tokens.visitor_token(SECRET, group, visitor)
    return codec.encode(Hello(versions=[1], group=group, visitor=visitor, token=token, **fields))


async def handshake(
    base_url: str, frame: bytes, headers: dict[str, str] | None = None
) -> tuple[Message | None, int | None]:
    """Send one first frame on ``/v1/visitor``. Returns (welcome, None) if the
    server accepted, else (error frame, close code) after it closed."""
    async with aiohttp.ClientSession() as http, http.ws_connect(base_url + "/v1/visitor", headers=headers) as ws:
        await ws.send_bytes(frame)
        msg = await ws.receive(timeout=5)
        if msg.type is not aiohttp.WSMsgType.BINARY:
            return None, ws.close_code
        first = codec.decode(msg.data)
        if not isinstance(first, Error):
            return first, None
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        return first, ws.close_code


async def login(
    http: aiohttp.ClientSession,
    base_url: str,
    agent: str = "alice",
    group: str = "acme",
    key: str | None = None,
    origin: str | None = None,
) -> aiohttp.ClientResponse:
    key = key if key is not None else tokens.agent_key(SECRET, group, agent)
    headers = {"Origin": origin} if origin else None
    response = await http.post(
        base_url + "/v1/agent/login", json={"group": group, "agent": agent, "key": key}, headers=headers
    )
    await response.read()
    return response


async def error_of(response: aiohttp.ClientResponse) -> str:
    """The ``error.code`` of a JSON error answer."""
    return str((await response.json(content_type=None))["error"]["code"])
